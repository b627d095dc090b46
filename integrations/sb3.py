"""Stable-Baselines3 glue: ReplayBuffer import, callbacks, logger and env wrapping."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from dql_agent.buffer import as_flags
from dql_agent.spaces import unscale_actions


def replay_buffer_to_transitions(replay_buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    """Flat transition arrays from an SB3 ``ReplayBuffer`` (all envs, valid rows only).

    SB3 stores Box actions scaled to [-1, 1] (``scaled_action``); they are mapped back to the
    action space's bounds here. ``dones`` holds terminated-or-truncated, and ``timeouts``
    the truncations, so terminals are ``dones & ~timeouts``.
    """
    if not isinstance(replay_buffer, ReplayBuffer):
        raise TypeError(f"replay_buffer must be a stable_baselines3 ReplayBuffer, got {type(replay_buffer).__name__}")
    if isinstance(replay_buffer.observation_space, spaces.Dict):
        raise TypeError("Dict-observation replay buffers (DictReplayBuffer) are not supported yet")
    size = replay_buffer.buffer_size if replay_buffer.full else replay_buffer.pos
    if size == 0:
        raise ValueError("the replay buffer is empty (pos=0 and not full)")
    obs = replay_buffer.observations[:size]
    if replay_buffer.optimize_memory_usage:
        # next observation of row i is stored as the observation of row i+1 (mod buffer_size)
        next_obs = replay_buffer.observations[(np.arange(size) + 1) % replay_buffer.buffer_size]
        if not replay_buffer.full:
            size -= 1  # the last row's successor is not written yet
            obs, next_obs = obs[:size], next_obs[:size]
    else:
        next_obs = replay_buffer.next_observations[:size]

    def flat(array: np.ndarray) -> np.ndarray:
        # (size, n_envs, *shape) -> (size * n_envs, prod(shape)), env-major within each step
        return array[:size].reshape(size * replay_buffer.n_envs, -1)

    # checked as 0/1 flags (a NaN done must not become True); the float casts happen, checked, in OfflineBuffer
    dones, timeouts = (
        as_flags("dones", flat(replay_buffer.dones).ravel()),
        as_flags("timeouts", flat(replay_buffer.timeouts).ravel()),
    )
    actions = flat(replay_buffer.actions)
    if isinstance(replay_buffer.action_space, spaces.Box):
        actions = unscale_actions(actions, replay_buffer.action_space)
    return {
        "observations": flat(obs),
        "actions": actions,
        "rewards": flat(replay_buffer.rewards).ravel(),
        "next_observations": flat(next_obs),
        "terminals": dones & ~timeouts,
        "timeouts": timeouts,
    }


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


def wrap_env(env: str | gym.Env | VecEnv) -> VecEnv:
    """An env id, Env or VecEnv as a VecEnv, Monitor-wrapped as SB3 does."""
    if isinstance(env, VecEnv):
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
