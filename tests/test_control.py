"""The shared vocabulary: model shapes, plans, and the observation/action codec."""
import numpy as np
import pytest

from runtime.codec import ActionDecoder, CodecConfig, ObservationEncoder
from runtime.control import PLACEMENTS, SLO, ClusterState, OperatorPlan, OperatorSpec, OperatorState, Plan, PlanError
from runtime.models import OPERATOR_GROUPS, get_model


def test_llama2_70b_shapes_match_hand_computation():
    m = get_model("llama-2-70b")
    # QKV: 8192 x (64 + 2*8) * 128, O: 8192 x 8192, per layer, 80 layers, 2 bytes.
    assert m.group_weight_bytes("proj") == 80 * (8192 * 80 * 128 + 8192 * 8192) * 2
    # gated MLP: 3 x 8192 x 28672 + norm, per layer.
    assert m.group_weight_bytes("mlp") == 80 * (3 * 8192 * 28672 + 8192) * 2
    # KV: K and V, 80 layers, 8 KV heads of 128, fp16 = 320 KiB per token.
    assert m.kv_bytes_per_token == 327_680
    assert 137e9 < m.weight_bytes < 139e9  # ~69B parameters


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="llama-2-70b"):
        get_model("gpt-5")


def test_operator_spec_layers():
    specs = OperatorSpec.for_model(get_model("llama-2-7b"))
    assert specs["mlp"].layers == 32 and specs["embed"].layers == 1
    assert specs["attn"].kv_bytes_per_token == get_model("llama-2-7b").kv_bytes_per_token
    assert specs["proj"].kv_bytes_per_token == 0


def _plan() -> Plan:
    return Plan({g: OperatorPlan(2, 32, "pack", 1) for g in OPERATOR_GROUPS})


def test_plan_errors_name_the_problem():
    with pytest.raises(PlanError, match="placement"):
        OperatorPlan(1, 8, "spread")
    with pytest.raises(PlanError, match="lacks operator groups"):
        Plan({"mlp": OperatorPlan(1, 8)})
    with pytest.raises(PlanError, match="'attn' needs at least one replica"):
        _plan().with_op("attn", replicas=0)
    with pytest.raises(PlanError, match="'mlp' lacks field 'max_batch'"):
        d = _plan().to_dict()
        del d["mlp"]["max_batch"]
        Plan.from_dict(d)
    with pytest.raises(PlanError, match="non-integer"):
        d = _plan().to_dict()
        d["proj"]["replicas"] = "many"
        Plan.from_dict(d)


def test_plan_roundtrip_and_model_level():
    p = _plan()
    assert Plan.from_dict(p.to_dict()) == p
    ml = Plan.model_level(3, 16, 4)
    assert all(ml[g].replicas == 3 and ml[g].placement == "model" and ml[g].tp == 4 for g in OPERATOR_GROUPS)


def test_plans_and_states_travel_between_processes_unchanged():
    # Plans and states cross process boundaries (SubprocVecEnv workers, Ray Serve replicas) by
    # pickle and are copied by deepcopy; the value types are slotted dataclasses (fewer objects per
    # env step), which must keep both working and stay frozen where they were.
    import copy
    import dataclasses
    import pickle

    p = _plan()
    st = _state(p, [1.0, 2.0])
    for obj in (p, p["attn"], st.operators["mlp"]):
        back = pickle.loads(pickle.dumps(obj))
        assert back == obj and type(back) is type(obj)
        assert copy.deepcopy(obj) == obj
    back = pickle.loads(pickle.dumps(st))
    assert back.plan == p and back.operators == st.operators
    assert dataclasses.replace(p["attn"], replicas=5) == OperatorPlan(5, 32, "pack", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p["attn"].replicas = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        st.operators["mlp"].utilization = 0.3  # a misspelt field is an error, not a new attribute


def _state(plan: Plan, hist) -> ClusterState:
    ops = {g: OperatorState(plan[g].replicas, plan[g].max_batch, plan[g].placement, plan[g].tp,
                            arrival_rate=1000.0, utilisation=0.5) for g in OPERATOR_GROUPS}
    return ClusterState(10.0, 5.0, ops, SLO(2.0, 0.1), plan, ttft_p99_s=4.0, tbt_p99_s=0.05,
                        slo_attainment=0.9, gpus_in_use=16, request_rate_history=np.asarray(hist))


def test_encoder_layout_and_values():
    enc = ObservationEncoder(CodecConfig(history_len=4))
    obs = enc.encode(_state(_plan(), [1.0, 2.0]))
    assert obs.shape == (enc.size,) and obs.dtype == np.float32
    per = enc.PER_GROUP
    assert obs[0] == pytest.approx(2 / 32)            # replicas / max_replicas
    assert obs[2] == pytest.approx(2 / 5)             # batch 32 is level 2 of 0..5
    assert list(obs[3:6]) == [0.0, 0.0, 1.0]          # placement one-hot: pack
    assert obs[6] == pytest.approx(np.log1p(1.0))     # 1000 token-steps/s
    c0 = len(OPERATOR_GROUPS) * per
    assert obs[c0 + 1] == pytest.approx(2.0)          # TTFT p99 4 s over SLO 2 s
    assert obs[c0 + 3] == pytest.approx(0.5)          # TBT p99 50 ms over 100 ms
    # history right-aligned, zero-padded at the old end
    assert obs[-4] == 0.0 and obs[-3] == 0.0
    assert obs[-1] == pytest.approx(np.log1p(2.0 / 10.0))


def test_decoder_clips_keeps_tp_and_roundtrips():
    dec = ActionDecoder(CodecConfig(max_replicas=5))
    prev = Plan({g: OperatorPlan(4, 32, "pack", 4) for g in OPERATOR_GROUPS})
    grow = np.array([4, 0, 1] * len(OPERATOR_GROUPS))      # +4 replicas, batch 8, dedicated
    nxt = dec.decode(grow, prev)
    assert all(nxt[g].replicas == 5 and nxt[g].max_batch == 8 and nxt[g].tp == 4 for g in OPERATOR_GROUPS)
    assert all(nxt[g].placement == "dedicated" for g in OPERATOR_GROUPS)
    shrink = np.array([0, 5, 0] * len(OPERATOR_GROUPS))    # -4 from 4 clips to min 1
    assert all(dec.decode(shrink, prev)[g].replicas == 1 for g in OPERATOR_GROUPS)
    assert dec.decode(dec.encode(nxt, prev), prev) == nxt
    with pytest.raises(ValueError, match="expected 15"):
        dec.decode(np.zeros(3), prev)


def test_action_mask_forbids_leaving_bounds():
    dec = ActionDecoder(CodecConfig(max_replicas=5))
    prev = Plan({g: OperatorPlan(1, 32, "pack", 1) for g in OPERATOR_GROUPS})
    mask = dec.action_mask(prev)
    assert mask.shape == (int(dec.nvec.sum()),)
    # deltas (-4, -1, 0, +1, +4) from 1 replica: only 0, +1, +4 allowed
    assert list(mask[:5]) == [False, False, True, True, True]


def test_action_mask_is_cached_by_what_it_depends_on_and_handed_out_as_a_copy():
    dec = ActionDecoder(CodecConfig(max_replicas=5))
    one = Plan({g: OperatorPlan(1, 32, "pack", 1) for g in OPERATOR_GROUPS})
    five = Plan({g: OperatorPlan(5, 32, "pack", 1) for g in OPERATOR_GROUPS})
    m1 = dec.action_mask(one)
    # the mask depends on replica counts only: another layout at 1 replica gets the same mask
    np.testing.assert_array_equal(dec.action_mask(Plan({g: OperatorPlan(1, 8, "dedicated", 2)
                                                        for g in OPERATOR_GROUPS})), m1)
    # from 5 replicas (the maximum) only -4, -1 and 0 are allowed: another key, another mask
    assert list(dec.action_mask(five)[:5]) == [True, True, True, False, False]
    assert list(m1[:5]) == [False, False, True, True, True]
    m1[:] = True                       # a caller's copy: changing it leaves the cache alone
    assert m1.flags.writeable and list(dec.action_mask(one)[:5]) == [False, False, True, True, True]


def test_frozen_layout_mask_keeps_only_the_replica_choice():
    from agents.wrappers import frozen_mask

    dec = ActionDecoder(CodecConfig(replica_levels=(1, 2, 4, 8, 16), max_replicas=10,
                                    batch_levels=(8, 32, 128)))
    ops = {g: OperatorPlan(3, 32, "pack", 1) for g in OPERATOR_GROUPS}
    ops["mlp"] = OperatorPlan(3, 100, "dedicated", 2)     # 100 is nearest the 128 level
    prev = Plan(ops)
    mask = frozen_mask(dec, prev)
    per = 5 + 3 + len(PLACEMENTS)
    attn = OPERATOR_GROUPS.index("attn") * per
    mlp = OPERATOR_GROUPS.index("mlp") * per
    assert list(mask[attn:attn + 5]) == [True, True, True, True, False]   # replicas as unfrozen
    assert list(mask[attn + 5:attn + 8]) == [False, True, False]           # batch 32 only
    assert [p for p, ok in zip(PLACEMENTS, mask[attn + 8:attn + per]) if ok] == ["pack"]
    assert list(mask[mlp + 5:mlp + 8]) == [False, False, True]             # batch 128 only
    assert [p for p, ok in zip(PLACEMENTS, mask[mlp + 8:mlp + per]) if ok] == ["dedicated"]
    # another layout is another mask; the unfrozen mask is not touched
    moved = Plan({**ops, "attn": OperatorPlan(3, 8, "dedicated", 1)})
    assert list(frozen_mask(dec, moved)[attn + 5:attn + 8]) == [True, False, False]
    assert dec.action_mask(prev)[attn + 5:attn + per].all()
    np.testing.assert_array_equal(frozen_mask(dec, prev), mask)


def test_frozen_replicas_return_to_the_fixed_count_and_touch_nothing_else():
    from agents.wrappers import PlanRestriction, frozen_mask

    dec = ActionDecoder(CodecConfig(replica_levels=(1, 2, 4, 8, 16), max_replicas=10,
                                    batch_levels=(8, 32, 128)))
    prev = Plan({**{g: OperatorPlan(3, 32, "pack", 1) for g in OPERATOR_GROUPS},
                 "embed": OperatorPlan(7, 32, "pack", 1)})      # topped up from outside: 7 is no level
    per = 5 + 3 + len(PLACEMENTS)
    at = {g: OPERATOR_GROUPS.index(g) * per for g in OPERATOR_GROUPS}
    mask = frozen_mask(dec, prev, {"embed": 4, "head": 3})
    assert list(mask[at["embed"]:at["embed"] + 5]) == [False, False, True, False, False]   # back to 4
    assert list(mask[at["head"]:at["head"] + 5]) == [False, True, True, False, False]      # 3: levels 2 and 4 tie
    np.testing.assert_array_equal(frozen_mask(dec, prev, {"embed": 4, "head": 3}), mask)  # cached choices unchanged
    assert not dec.nearest_replica_choices(7, 4).flags.writeable
    free = frozen_mask(dec, prev)
    for g in ("attn", "proj", "mlp"):
        np.testing.assert_array_equal(mask[at[g]:at[g] + per], free[at[g]:at[g] + per])
    np.testing.assert_array_equal(mask[at["embed"] + 5:at["embed"] + per], free[at["embed"] + 5:at["embed"] + per])
    with pytest.raises(ValueError, match="unknown operator groups \\['lm'\\]"):
        PlanRestriction(None, prev, True, ("lm",))
    with pytest.raises(ValueError, match="needs freeze_layout"):
        PlanRestriction(None, prev, False, ("embed",))
    with pytest.raises(ValueError, match="needs an initial_plan"):
        PlanRestriction(None, None, True, ("embed",))


def test_plan_restriction_masks_equal_frozen_mask_at_every_step_and_are_fresh_copies():
    """The wrapper keeps its masks by each group's (replicas, batch, placement); what it returns
    must be frozen_mask's answer for the current target plan, step after step, and a caller
    changing a returned mask must not change the next one."""
    from agents.wrappers import PlanRestriction, frozen_mask
    from envs import make_env

    env = make_env(seed=3, episode_intervals=30)
    start = env.scenario.initial_plan()
    wrapped = PlanRestriction(env, start, True, ("embed", "head"))
    wrapped.reset(seed=3)
    rng = np.random.default_rng(3)
    for _ in range(25):
        got = wrapped.action_masks()
        want = frozen_mask(env.decoder, env.sim.timeline.target_plan, wrapped.fixed_replicas)
        np.testing.assert_array_equal(got, want)
        got[:] = False  # the caller's copy
        np.testing.assert_array_equal(wrapped.action_masks(), want)
        a, o = [], 0
        for n in env.action_space.nvec:  # a random allowed action
            a.append(int(rng.choice(np.flatnonzero(want[o:o + n]))))
            o += n
        wrapped.step(np.asarray(a))
    # two plans equal in content but with their groups in another order get the same mask
    twin = Plan({g: env.sim.timeline.target_plan[g] for g in reversed(OPERATOR_GROUPS)})
    np.testing.assert_array_equal(frozen_mask(env.decoder, twin, wrapped.fixed_replicas), wrapped.action_masks())


def test_level_mode_picks_absolute_replica_counts():
    dec = ActionDecoder(CodecConfig(replica_levels=(1, 2, 4, 8, 16), max_replicas=10))
    assert list(dec.nvec[:3]) == [5, 6, 3]
    prev = Plan({g: OperatorPlan(3, 32, "pack", 2) for g in OPERATOR_GROUPS})
    a = np.array([2, 2, 2] * len(OPERATOR_GROUPS))     # level 4, batch 32, pack
    nxt = dec.decode(a, prev)
    assert all(nxt[g].replicas == 4 and nxt[g].tp == 2 for g in OPERATOR_GROUPS)
    # the same action from another plan gives the same count: no cycles through deltas
    assert dec.decode(a, nxt) == nxt
    assert dec.decode(np.array([4, 2, 2] * 5), prev)["mlp"].replicas == 10   # 16 clipped to max
    assert dec.decode(dec.encode(nxt, prev), prev) == nxt
    # 16 > max_replicas is masked; every other level is allowed whatever the current count
    assert list(dec.action_mask(prev)[:5]) == [True, True, True, True, False]


def test_tp_follows_placement_only_for_moved_groups():
    from runtime.codec import tp_follows_placement

    prev = Plan({g: OperatorPlan(2, 32, "model", 4) for g in OPERATOR_GROUPS})
    moved = prev.with_op("mlp", placement="dedicated").with_op("attn", replicas=3)
    out = tp_follows_placement(moved, prev, model_tp=4, group_tp={"mlp": 2, "attn": 1})
    assert out["mlp"].tp == 2                      # left the instance: its own pool's tp
    assert out["attn"].tp == 4                     # replicas changed, placement did not
    back = tp_follows_placement(prev, out, model_tp=4, group_tp={"mlp": 2})
    assert back["mlp"].tp == 4                     # back inside a whole-model instance
    assert tp_follows_placement(prev, prev, 4, {"mlp": 2}) is prev
