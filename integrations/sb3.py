"""Stable-Baselines3 glue: ReplayBuffer import, callbacks, logger and env wrapping."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from dql_agent.buffer import as_flags
from dql_agent.encoders import has_images
from dql_agent.spaces import unscale_actions


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


class TimestepProgressBar(BaseCallback):
    """A tqdm/rich progress bar over ``learn``'s timesteps (gradient steps offline, env steps
    online) that, unlike SB3's, needs no training env."""

    def _on_training_start(self) -> None:
        import warnings

        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm

        warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)  # as SB3 does
        self.shown = self.model.num_timesteps
        self.pbar = tqdm(total=self.locals["total_timesteps"] - self.shown)

    def _on_step(self) -> bool:
        self.pbar.update(self.model.num_timesteps - self.shown)
        self.shown = self.model.num_timesteps
        return True

    def _on_training_end(self) -> None:
        self.pbar.refresh()
        self.pbar.close()


def make_callback(callback: Any, progress_bar: bool) -> BaseCallback:
    """SB3's rules: None, a list, a function ``f(locals, globals)`` or a BaseCallback."""
    if isinstance(callback, list):
        callback = CallbackList(callback)
    elif callback is None:
        callback = CallbackList([])
    elif not isinstance(callback, BaseCallback):
        if not callable(callback):
            raise TypeError(
                f"callback must be a BaseCallback, a list of them, a callable or None, got {type(callback).__name__}"
            )
        callback = ConvertCallback(callback)
    if progress_bar:
        callback = CallbackList([callback, TimestepProgressBar()])
    return callback


def default_logger(verbose: int, tensorboard_log: str | None = None) -> Logger:
    """The logger SB3's ``BaseAlgorithm`` would configure for this verbosity."""
    formats = ["stdout"] if verbose >= 1 else [""]
    if tensorboard_log is not None:
        formats.append("tensorboard")
    return configure(tensorboard_log, formats)


def refuse_normalized_observations(env: Any) -> None:
    """A ``VecNormalize(norm_obs=True)`` anywhere in ``env``'s wrappers is a ValueError: it would
    feed normalised observations to a model that expects the env's own (a dql_agent model
    normalises its observations itself, with statistics saved in it)."""
    while isinstance(env, VecEnv):
        if isinstance(env, VecNormalize) and env.norm_obs:
            raise ValueError(
                "the env is wrapped in VecNormalize(norm_obs=True), which would feed normalised observations to "
                "a model that acts on the env's raw ones; dql_agent models normalise observations themselves "
                "(normalize_observations=True keeps the dataset's statistics in the model): pass the unwrapped "
                "env (vec_normalize.venv) or VecNormalize(..., norm_obs=False)"
            )
        env = getattr(env, "venv", None)


def wrap_env(env: str | gym.Env | VecEnv) -> VecEnv:
    """An env id, Env or VecEnv as a VecEnv, Monitor-wrapped as SB3 does (a VecNormalize that
    normalises observations is refused: see :func:`refuse_normalized_observations`)."""
    if isinstance(env, VecEnv):
        refuse_normalized_observations(env)
        return env
    if isinstance(env, str):
        env_id = env
        return DummyVecEnv([lambda: Monitor(gym.make(env_id))])
    if isinstance(env, gym.Env):
        instance = env
        return DummyVecEnv([lambda: instance if _has_monitor(instance) else Monitor(instance)])
    raise TypeError(f"env must be an env id, a gymnasium.Env or an SB3 VecEnv, got {type(env).__name__}")


def _has_monitor(env: gym.Env) -> bool:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, Monitor):
            return True
        env = env.env
    return False
