"""Scale-down stabilisation: the highest recent recommendation per group, scale-ups at once."""
import numpy as np
import pytest

from agents.stabilize import DownscaleStabilizer
from runtime.control import SLO, ClusterState, Controller, OperatorState, Plan
from runtime.models import OPERATOR_GROUPS


class Scripted(Controller):
    """Asks for the scripted attention replica counts in turn (other groups fixed)."""

    name = "scripted"

    def __init__(self, attn: list[int], placement: list[str] | None = None) -> None:
        self.attn = attn
        self.placement = placement or ["pack"] * len(attn)
        self.i = 0
        self.resets = 0

    def reset(self, state=None) -> None:
        self.i = 0
        self.resets += 1

    def decide(self, state: ClusterState) -> Plan:
        n, pl = self.attn[self.i], self.placement[self.i]
        self.i += 1
        return _plan().with_op("attn", replicas=n, placement=pl)


def _plan() -> Plan:
    return Plan.from_dict({g: {"replicas": 2, "max_batch": 32, "placement": "pack", "tp": 1} for g in OPERATOR_GROUPS})


def _state() -> ClusterState:
    p = _plan()
    ops = {g: OperatorState(p[g].replicas, p[g].max_batch, p[g].placement, p[g].tp) for g in OPERATOR_GROUPS}
    return ClusterState(0.0, 5.0, ops, SLO(ttft_s=1.0, tbt_s=0.1), p, request_rate_history=np.zeros(4))


def _run(ctl: Controller, n: int) -> list[int]:
    s = _state()
    return [ctl.decide(s)["attn"].replicas for _ in range(n)]


def test_window_keeps_the_highest_recent_count_and_scales_up_at_once():
    asked = [8, 4, 4, 4, 12, 2, 2, 2, 2]
    # 10 s window at 5 s intervals: the current and the two previous recommendations
    got = _run(DownscaleStabilizer(Scripted(asked), 10.0, 5.0), len(asked))
    assert got == [8, 8, 8, 4, 12, 12, 12, 2, 2]


def test_zero_window_passes_plans_through_and_reset_forgets():
    asked = [8, 4, 2]
    assert _run(DownscaleStabilizer(Scripted(asked), 0.0, 5.0), 3) == asked
    inner = Scripted([8, 2, 2, 2])
    st = DownscaleStabilizer(inner, 30.0, 5.0)
    assert _run(st, 2) == [8, 8]
    st.reset(_state())
    assert inner.resets == 1
    inner.attn = [2, 2]
    assert _run(st, 2) == [2, 2]  # the 8 from before the reset no longer counts


def test_a_moved_group_starts_a_fresh_window():
    inner = Scripted([8, 4], ["pack", "dedicated"])
    got = DownscaleStabilizer(inner, 20.0, 5.0)
    s = _state()
    first, second = got.decide(s), got.decide(s)
    assert first["attn"].replicas == 8
    assert second["attn"].replicas == 4 and second["attn"].placement == "dedicated"


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match="downscale window must be a finite number of seconds >= 0"):
        DownscaleStabilizer(Scripted([1]), -5.0, 5.0)
    with pytest.raises(ValueError, match="control interval must be"):
        DownscaleStabilizer(Scripted([1]), 10.0, 0.0)


def test_registry_refuses_unknown_ppo_settings(tmp_path):
    from agents.registry import make_controller
    from envs import Scenario

    with pytest.raises(ValueError, match=r"ppo: unknown settings \['window'\]"):
        make_controller("ppo", Scenario.from_yaml(), checkpoint="checkpoints/ppo-default",
                        settings={"ppo": {"window": 10}})
    ctl, plan0 = make_controller("ppo", Scenario.from_yaml(), checkpoint="checkpoints/ppo-default",
                                 settings={"ppo": {"downscale_window_s": 10}})
    assert isinstance(ctl, DownscaleStabilizer) and ctl.name == "ppo" and plan0 == ctl.inner.initial_plan
