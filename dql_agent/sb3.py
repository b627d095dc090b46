"""The Stable-Baselines3 protocol the core speaks: callbacks, the logger, env wrapping, load keywords.

SB3 is a required dependency and dql_agent models meet it by protocol (``predict``, ``learn``
with callbacks, ``load`` with SB3's keywords), not by inheritance; what that takes lives here.
"""

from __future__ import annotations

import platform
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from dql_agent.checkpoint import library_version
from dql_agent.report import report

IGNORED_LOAD_KEYWORDS = frozenset({"buffer_size", "optimize_memory_usage"})
"""Keywords rl-zoo3 passes to SB3's off-policy ``load`` that mean nothing to a dql_agent model
(its load allocates no replay buffer) unless they are hyperparameters."""
RL_ZOO_CUSTOM_OBJECTS = frozenset({"learning_rate", "lr_schedule", "clip_range"})
"""The ``custom_objects`` rl-zoo3's enjoy and record_video always pass: ignored without a warning."""


def system_info() -> dict[str, str]:
    """The versions that matter when a checkpoint does not load (``load(print_system_info=True)``)."""
    return {
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "dql_agent": library_version(),
        "PyTorch": torch.__version__,
        "GPU Enabled": str(torch.cuda.is_available()),
        "Numpy": np.__version__,
        "Gymnasium": gym.__version__,
    }


class TimestepProgressBar(BaseCallback):
    """A tqdm/rich progress bar over ``learn``'s timesteps (gradient steps offline, env steps
    online) that, unlike SB3's, needs no training env."""

    def _on_training_start(self) -> None:
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


def load_keywords(
    owner: str,
    hyperparameters: set[str],
    overrides: dict[str, Any],
    custom_objects: Any,
    flags: dict[str, Any],
) -> dict[str, Any]:
    """SB3's ``load`` keywords checked for ``owner.load``: the bool ``flags``, ``custom_objects``
    (nothing here is unpickled, so it replaces nothing: keys other than rl-zoo3's warn), and the
    hyperparameter ``overrides`` returned without the keywords rl-zoo3 passes to every off-policy
    ``load``. Any other keyword is a TypeError naming it."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{owner}.load: {name} must be a bool, got {flag!r}")
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise TypeError(f"{owner}.load: custom_objects must be a dict or None, got {custom_objects!r}")
    unknown = sorted(set(overrides) - hyperparameters - IGNORED_LOAD_KEYWORDS)
    if unknown:
        raise TypeError(
            f"{owner}.load got unknown keyword(s) {unknown}: neither {owner} hyperparameters "
            f"({sorted(hyperparameters)}) nor SB3 load keywords (custom_objects, print_system_info, force_reset, "
            "seed, buffer_size, optimize_memory_usage)"
        )
    ignored = sorted(set(custom_objects or {}) - RL_ZOO_CUSTOM_OBJECTS)
    if ignored:
        warnings.warn(
            f"{owner}.load ignores custom_objects {ignored}: dql_agent unpickles nothing, so there is "
            "nothing to replace; pass a hyperparameter to change as a keyword, e.g. load(path, n_action_samples=8)",
            stacklevel=3,
        )
    return {key: value for key, value in overrides.items() if key in hyperparameters}


def show_system_info(saved_config: dict[str, Any] | None = None) -> None:
    """SB3's ``print_system_info``: this system's versions, or with ``saved_config`` (a
    config.json) those the checkpoint records."""
    if saved_config is None:
        lines = ["== CURRENT SYSTEM INFO ==", *(f"- {key}: {value}" for key, value in system_info().items())]
    else:
        lines = [
            "== SAVED MODEL SYSTEM INFO ==",
            f"- dql_agent: {saved_config.get('library_version')}",
            f"- format_version: {saved_config.get('format_version')}",
        ]
    report("\n".join(lines))
