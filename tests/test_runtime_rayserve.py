"""The Ray Serve pools (runtime/rayserve.py): same tokens as in process, scaling and faults lose nothing.

The engine tests below share one engine whose stateless pools run on a local Ray instance
(marker ``ray``; skipped where ray is not installed or cannot start). Each sets the plan it needs first.
"""
from __future__ import annotations

import time

import pytest
import torch

from runtime.control import OperatorPlan, Plan
from runtime.engine import Engine, EngineConfig
from runtime.model import build_model, generate_monolithic
from runtime.models import OPERATOR_GROUPS, get_model
from runtime.rayserve import STATELESS, RayPoolsConfig

TINY = get_model("tiny")


def plan(**replicas: int) -> Plan:
    return Plan({g: OperatorPlan(replicas.get(g, 1), 3, "pack") for g in OPERATOR_GROUPS})


def prompts(n: int, base: int = 3) -> list[list[int]]:
    return [[(13 * i + 7 * j + base) % TINY.vocab_size for j in range(3 + (i % 9))] for i in range(n)]


def wait_all(seqs, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    for s in seqs:
        assert s.finished.wait(max(deadline - time.perf_counter(), 0.01)), f"request {s.id} did not finish"


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- configuration errors (no Ray needed) --------------------------------------------------

def test_ray_pools_config_names_the_problem():
    with pytest.raises(ValueError, match=r"\['attn'\] cannot run on Ray Serve"):
        RayPoolsConfig(groups=("attn", "mlp"))
    with pytest.raises(ValueError, match="num_gpus.*'embed'"):
        RayPoolsConfig(groups=("mlp",), num_gpus={"embed": 1.0})
    with pytest.raises(ValueError, match="num_gpus"):
        RayPoolsConfig(num_gpus={"mlp": -1.0})
    with pytest.raises(ValueError, match=r"RayPoolsConfig.tp: \{'mlp': 9\}"):
        RayPoolsConfig(tp={"mlp": 9})
    with pytest.raises(ValueError, match="EngineConfig.pools must be 'local' or 'ray', got 'k8s'"):
        EngineConfig(pools="k8s")


def test_serve_cli_ray_flags_need_ray_pools():
    from runtime.serve import main

    with pytest.raises(SystemExit, match="need --pools ray"):
        main(["--model", "tiny", "--ray-address", "auto"])
    with pytest.raises(SystemExit, match="need --pools ray"):
        main(["--model", "tiny", "--ray-tp", "2"])
    with pytest.raises(SystemExit, match="--ray-tp must be in 1..8"):
        main(["--model", "tiny", "--pools", "ray", "--ray-tp", "0"])
    with pytest.raises(SystemExit, match="--ray-gpus must be >= 0"):
        main(["--model", "tiny", "--pools", "ray", "--ray-gpus", "-1"])


# ---- one engine on a local Ray instance -----------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return build_model(TINY, dtype=torch.float64, seed=1)


@pytest.fixture(scope="module")
def refs(model):
    return {tuple(p): generate_monolithic(model, p, 8) for p in prompts(12)}


@pytest.fixture(scope="module")
def engine(model):
    ray = pytest.importorskip("ray")
    from ray import serve

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except Exception as e:  # noqa: BLE001 - a machine that cannot run Ray at all (sandbox, no /dev/shm)
        pytest.skip(f"Ray cannot start on this machine: {type(e).__name__}: {e}")
    # the MLP's Serve replicas split their weights in two (tensor parallelism inside a Serve replica)
    rcfg = RayPoolsConfig(tp={"mlp": 2})
    eng = Engine(model, plan(), EngineConfig(pools="ray", ray=rcfg, max_replicas=4)).start(wait_ready=180)
    yield eng
    eng.stop()
    serve.shutdown()
    ray.shutdown()


def served(engine: Engine) -> list:
    """Submit the twelve reference prompts (8 tokens each); returns their sequences."""
    return [engine.submit(p, 8) for p in prompts(12)]


def check(seqs, refs) -> None:
    wait_all(seqs)
    assert [s.finish_reason for s in seqs] == ["length"] * len(seqs)
    assert [list(s.generated) for s in seqs] == [refs[tuple(s.prompt)] for s in seqs]


@pytest.mark.ray
def test_ray_pools_give_the_in_process_tokens(engine, refs):
    engine.apply(plan(mlp=2))
    engine.wait_ready(120)
    pools = engine._remote
    assert set(pools.groups) == set(STATELESS)
    assert all(r.remote for g in STATELESS for r in engine.replicas[g])
    assert not any(r.remote for r in engine.replicas["attn"])
    assert engine.plan["mlp"].tp == 2 and engine.plan["proj"].tp == 1  # the deployments' splits
    assert [r.tp for r in engine.replicas["mlp"]] == [2, 2]
    check(served(engine), refs)
    assert pools.running("mlp") == 2 and pools.running("proj") == 1
    assert all(sum(pools.pid_calls[g].values()) > 0 for g in STATELESS)  # every stateless call went to Serve
    st = engine.observe()
    # a replica's weights are counted where it runs: 2 MLP replicas x the MLP group's bytes
    mlp_bytes = pools.weight_bytes("mlp")
    assert mlp_bytes == sum(p.numel() * 8 for p in engine._masters["mlp"].parameters())
    assert st.operators["mlp"].memory_bytes == pytest.approx(2 * mlp_bytes)


@pytest.mark.ray
def test_ray_pools_scale_with_requests_in_flight(engine, refs):
    engine.apply(plan(mlp=1))
    engine.wait_ready(120)
    pools = engine._remote
    wait_for(lambda: pools.running("mlp") == 1, what="one MLP replica")

    def answering(batch) -> set[int]:
        """Process ids of the MLP replicas that answered calls while ``batch`` ran."""
        snap = dict(pools.pid_calls["mlp"])
        check(batch, refs)
        return {p for p, c in pools.pid_calls["mlp"].items() if c > snap.get(p, 0)}

    (first_pid,) = answering(served(engine))
    # scale up while requests run: the running replica is kept (Serve's in-place update), two join
    seqs = served(engine)
    engine.apply(plan(mlp=3, proj=2))
    check(seqs, refs)
    engine.wait_ready(120)
    assert pools.running("mlp") == 3 and pools.running("proj") == 2
    after = answering(served(engine))
    assert first_pid in after and len(after) >= 2  # the first replica still serves (not restarted), new ones too
    # scale down while requests run: Serve drains the replicas it stops, nothing is lost
    seqs = served(engine)
    engine.apply(plan(mlp=1))
    check(seqs, refs)
    engine.wait_ready(120)
    wait_for(lambda: pools.running("mlp") == 1 and pools.running("proj") == 1, what="scale-down in Serve")
    assert sum(r.state == "ready" for r in engine.replicas["mlp"]) == 1


@pytest.mark.ray
def test_ray_pool_replica_death_loses_nothing(engine, refs):
    engine.apply(plan(mlp=2))
    engine.wait_ready(120)
    deaths = engine.metrics.worker_deaths.labels(group="mlp")._value.get()
    seqs = served(engine)
    engine.kill_replica("mlp")  # the Serve replica answering its next call exits mid-batch
    check(seqs, refs)
    # every proxy with a call on the dead Serve replica saw it die (Serve, not the proxy, routes)
    wait_for(lambda: engine.metrics.worker_deaths.labels(group="mlp")._value.get() >= deaths + 1,
             what="the dead proxy to be replaced")
    engine.wait_ready(120)
    # Serve restarts the dead replica on its own; its status may still count the dead one when the
    # replacement proxy turns ready, so wait for the count rather than read it once
    wait_for(lambda: engine._remote.running("mlp") == 2, what="Serve to run two MLP replicas again")
    check(served(engine), refs)
