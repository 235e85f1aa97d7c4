"""Behaviour cloning: warm-start a PPO policy from a teacher controller's decisions.

The teacher (by default operator-queueing) is run through the training env; each step
records the raw observation, the allowed action that moves the plan in force closest to
the teacher's plan (:func:`teacher_action`) and the action mask. The
policy is then fitted by maximum likelihood of those actions on the observations
normalised with statistics fitted to the same data (and written into the VecNormalize
wrapper, so PPO continues from them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch as th

from runtime.codec import ActionDecoder
from runtime.control import ClusterState, Controller, Plan
from runtime.models import OPERATOR_GROUPS


@dataclass
class Demonstrations:
    """Recorded teacher steps.

    Attributes:
        obs: raw (unnormalised) observations, float32[n, obs_size].
        actions: MultiDiscrete actions, int64[n, n_sub].
        masks: flat action masks, bool[n, sum(nvec)].
        rewards: env rewards, float64[n].
        episode_returns: undiscounted return of each recorded episode.
    """

    obs: np.ndarray
    actions: np.ndarray
    masks: np.ndarray
    rewards: np.ndarray
    episode_returns: list[float]

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def teacher_action(decoder: ActionDecoder, plan: Plan, prev: Plan) -> np.ndarray:
    """The unmasked action whose decoded plan comes closest to ``plan`` from ``prev``.

    Per group: the allowed replica choice (a delta, or a level in level mode) that lands
    nearest the teacher's replica count (ties: the smaller move), the nearest batch level, and
    the teacher's placement.
    """
    action = decoder.encode(plan, prev)
    mask = decoder.action_mask(prev)
    nd = decoder.n_replica_choices
    offset = 0
    for k, g in enumerate(OPERATOR_GROUPS):
        allowed = mask[offset:offset + nd]
        r = prev[g].replicas
        want = plan[g].replicas
        best = min((i for i in range(nd) if allowed[i]),
                   key=lambda i: (abs(decoder.replicas_for(i, r) - want), abs(decoder.replicas_for(i, r) - r)))
        action[3 * k] = best
        offset += int(decoder.nvec[3 * k] + decoder.nvec[3 * k + 1] + decoder.nvec[3 * k + 2])
    return action


def collect_demonstrations(env: Any, teacher: Controller, decoder: ActionDecoder, episodes: int,
                           state_of: Callable[[Any], ClusterState], seed: int = 0,
                           prev_plan_of: Callable[[Any], Plan] | None = None,
                           max_steps: int = 1_000_000) -> Demonstrations:
    """Run ``teacher`` for ``episodes`` episodes of ``env`` and record what it did.

    Args:
        env: a Gymnasium env whose observation is the shared encoder's output.
        teacher: controller deciding from the env's ClusterState.
        decoder: the env's action decoder (to turn plans into actions).
        episodes: episodes to record.
        state_of: returns the env's current ClusterState (the one the observation encodes).
        prev_plan_of: the plan the env decodes actions against (default ``state.plan``).
        seed: seed of the first reset; later episodes continue the env's RNG.
    """
    obs_l, act_l, mask_l, rew_l, returns = [], [], [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed if ep == 0 else None)
        state = state_of(env)
        teacher.reset(state)
        total, steps, done = 0.0, 0, False
        while not done and steps < max_steps:
            plan = teacher.decide(state)
            prev = prev_plan_of(env) if prev_plan_of is not None else state.plan
            action = teacher_action(decoder, plan, prev)
            obs_l.append(np.asarray(obs, dtype=np.float32))
            act_l.append(action)
            mask_l.append(decoder.action_mask(prev))
            obs, reward, terminated, truncated, _ = env.step(action)
            rew_l.append(float(reward))
            total += float(reward)
            steps += 1
            done = bool(terminated or truncated)
            state = state_of(env)
        returns.append(total)
    return Demonstrations(np.stack(obs_l), np.stack(act_l).astype(np.int64), np.stack(mask_l).astype(bool),
                          np.asarray(rew_l), returns)


def behaviour_clone(model: Any, demos: Demonstrations, normalise: Callable[[np.ndarray], np.ndarray],
                    epochs: int, batch_size: int, learning_rate: float, seed: int = 0) -> dict[str, float]:
    """Fit ``model.policy`` to the demonstrations by maximum likelihood.

    Args:
        model: a PPO or MaskablePPO model (its policy is trained in place).
        normalise: maps raw observations to the policy's input (VecNormalize.normalize_obs).
    Returns:
        ``{"nll": final mean negative log-likelihood per step, "accuracy": share of
        sub-actions where the policy's most likely choice equals the teacher's}``.
    """
    if len(demos) == 0:
        raise ValueError("no demonstrations to clone")
    policy = model.policy
    maskable = "Maskable" in type(policy).__name__
    device = policy.device
    obs = th.as_tensor(normalise(demos.obs), dtype=th.float32, device=device)
    acts = th.as_tensor(demos.actions, dtype=th.long, device=device)
    masks = demos.masks
    opt = th.optim.Adam(policy.parameters(), lr=learning_rate)
    gen = np.random.default_rng(seed)
    n = len(demos)
    policy.set_training_mode(True)
    nll = float("nan")
    for _ in range(epochs):
        order = gen.permutation(n)
        losses = []
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if maskable:
                _, logp, _ = policy.evaluate_actions(obs[idx], acts[idx], action_masks=masks[idx])
            else:
                _, logp, _ = policy.evaluate_actions(obs[idx], acts[idx])
            loss = -logp.mean()
            opt.zero_grad()
            loss.backward()
            th.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        nll = float(np.mean(losses))
    policy.set_training_mode(False)
    with th.no_grad():
        if maskable:
            dist = policy.get_distribution(obs, action_masks=masks)
        else:
            dist = policy.get_distribution(obs)
        pred = dist.mode() if hasattr(dist, "mode") else dist.get_actions(deterministic=True)
        accuracy = float((pred == acts).float().mean())
    return {"nll": nll, "accuracy": accuracy}
