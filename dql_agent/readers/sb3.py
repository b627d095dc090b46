"""Stable-Baselines3 replay buffers in transition columns (``OfflineBuffer.from_sb3``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

from dql_agent.observations import has_images
from dql_agent.spaces import unscale_actions
from dql_agent.transitions import as_flags

__all__ = ["replay_buffer_to_transitions"]


def replay_buffer_to_transitions(replay_buffer: ReplayBuffer, relabeled_samples: int = 0) -> dict[str, Any]:
    """Transition arrays from an SB3 ``ReplayBuffer``, ``DictReplayBuffer`` or
    ``HerReplayBuffer`` (all envs, valid rows only, as stored).

    SB3 stores Box actions scaled to [-1, 1] (``scaled_action``); they are mapped back to the
    action space's bounds here. ``dones`` holds terminated-or-truncated, and ``timeouts``
    the truncations, so terminals are ``dones & ~timeouts``. Dict observations come back as a
    dict of (N, *shape) arrays per key. ``relabeled_samples`` > 0 (a ``HerReplayBuffer`` only)
    appends that many transitions drawn by the buffer's own ``sample``, with goals relabelled and
    rewards recomputed by the env's ``compute_reward`` exactly as HER trains on them.
    """
    if not isinstance(replay_buffer, (ReplayBuffer, DictReplayBuffer)):
        raise TypeError(f"replay_buffer must be a stable_baselines3 ReplayBuffer, got {type(replay_buffer).__name__}")
    size = replay_buffer.buffer_size if replay_buffer.full else replay_buffer.pos
    if size == 0:
        raise ValueError("the replay buffer is empty (pos=0 and not full)")
    obs, next_obs = replay_buffer.observations, replay_buffer.next_observations
    if getattr(replay_buffer, "optimize_memory_usage", False):
        # next observation of row i is stored as the observation of row i+1 (mod buffer_size)
        next_obs = replay_buffer.observations[(np.arange(size) + 1) % replay_buffer.buffer_size]
        if not replay_buffer.full:
            size -= 1  # the last row's successor is not written yet

    keep_obs_shape = has_images(replay_buffer.observation_space)  # camera frames stay (N, H, W, C) uint8

    def flat(array: Any, keep_shape: bool = False) -> Any:
        # (size, n_envs, *shape) -> (size * n_envs, prod(shape)), env-major within each step
        if isinstance(array, dict):
            return {key: flat(value, keep_shape=True) for key, value in array.items()}
        rows = array[:size].reshape(size * replay_buffer.n_envs, *array.shape[2:])
        return rows if keep_shape else rows.reshape(len(rows), -1)

    # checked as 0/1 flags (a NaN done must not become True); the float casts happen, checked, in OfflineBuffer
    dones, timeouts = (
        as_flags("dones", flat(replay_buffer.dones).ravel()),
        as_flags("timeouts", flat(replay_buffer.timeouts).ravel()),
    )
    transitions = {
        "observations": flat(obs, keep_obs_shape),
        "actions": flat(replay_buffer.actions),
        "rewards": flat(replay_buffer.rewards).ravel(),
        "next_observations": flat(next_obs, keep_obs_shape),
        "terminals": dones & ~timeouts,
        "timeouts": timeouts,
    }
    if relabeled_samples:
        transitions = _concatenate(transitions, _relabeled(replay_buffer, relabeled_samples))
    if isinstance(replay_buffer.action_space, spaces.Box):
        transitions["actions"] = unscale_actions(transitions["actions"], replay_buffer.action_space)
    return transitions


def _relabeled(replay_buffer: Any, n: int) -> dict[str, Any]:
    """``n`` transitions as HER samples them: relabelled goals, recomputed rewards; its ``dones``
    are already terminations only (SB3 folds the timeouts out)."""
    from stable_baselines3 import HerReplayBuffer

    if not isinstance(replay_buffer, HerReplayBuffer):
        raise TypeError(f"relabeled_samples needs a HerReplayBuffer, got {type(replay_buffer).__name__}")
    if replay_buffer.env is None:
        raise ValueError("relabeled_samples needs the HerReplayBuffer's env (its compute_reward): pass env= to it")
    batch = replay_buffer.sample(n)
    terminals = as_flags("dones", batch.dones.cpu().numpy().ravel())
    return {
        "observations": {k: v.cpu().numpy() for k, v in batch.observations.items()},
        "actions": batch.actions.cpu().numpy().reshape(n, -1),
        "rewards": batch.rewards.cpu().numpy().ravel(),
        "next_observations": {k: v.cpu().numpy() for k, v in batch.next_observations.items()},
        "terminals": terminals,
        "timeouts": np.zeros(n, dtype=bool),
    }


def _concatenate(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {key: _concatenate(a[key], b[key]) for key in a}
    return np.concatenate([np.asarray(a), np.asarray(b).reshape(-1, *np.shape(a)[1:])])
