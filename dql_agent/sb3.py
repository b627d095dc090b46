"""The Stable-Baselines3 protocol the core speaks: callbacks, the logger, env wrapping, load keywords.

SB3 is a required dependency and dql_agent models meet it by protocol (``predict``, ``learn``
with callbacks, ``load`` with SB3's keywords), not by inheritance; what that takes lives here.
"""

from __future__ import annotations

import atexit
import math
import platform
import time
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
    """Progress over ``learn``'s timesteps (gradient steps offline, env steps online) that, unlike
    SB3's bar, needs no training env.

    On a terminal (or in Jupyter) it is a tqdm/rich bar. Anywhere else (output redirected to a file,
    a pipe, a CI or cluster log, where a bar would show nothing until it ends) it reports a line
    (:func:`dql_agent.report.report`) each ``line_fraction`` of the run or after ``line_seconds``,
    whichever comes first, and one at the end: ``timestep 1,200/12,000 (10%), 14 s, 85.3
    timesteps/s, about 2 min 7 s left`` (the rate since the previous line).

    Args:
        terminal: draw the bar (True) or write lines (False); None tells from the console.
        line_seconds: most seconds between two lines (default 30).
        line_fraction: a line at every such fraction of the run (default 0.1).

    A bar still open when ``learn`` stops on Ctrl-C or an error is closed by :meth:`close` or,
    at the latest, when the interpreter exits (while it can still render).
    """

    def __init__(self, terminal: bool | None = None, line_seconds: float = 30.0, line_fraction: float = 0.1):
        super().__init__()
        if not line_seconds > 0 or not 0 < line_fraction <= 1:
            raise ValueError(
                f"line_seconds must be > 0 and line_fraction in (0, 1], got {line_seconds!r} and {line_fraction!r}"
            )
        self.terminal, self.line_seconds, self.line_fraction = terminal, float(line_seconds), float(line_fraction)
        self.pbar: Any = None

    def _on_training_start(self) -> None:
        self.close()  # a bar left open by an interrupted learn
        self.first = self.shown = self.model.num_timesteps
        self.total = self.locals["total_timesteps"] - self.first
        terminal = self.terminal if self.terminal is not None else _console_is_interactive()
        if terminal:
            from tqdm import TqdmExperimentalWarning
            from tqdm.rich import tqdm

            warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)  # as SB3 does
            self.pbar = tqdm(total=self.total)
            atexit.register(self.close)  # rich cannot render once the interpreter tears down
        else:
            self.started = self.last_line = time.monotonic()
            self.every = max(1, math.ceil(self.total * self.line_fraction))
            self.next_line = self.first + self.every

    def _on_step(self) -> bool:
        done = self.model.num_timesteps
        if self.pbar is not None:
            self.pbar.update(done - self.shown)
            self.shown = done
            return True
        if self.total <= 0 or (done < self.next_line and time.monotonic() - self.last_line < self.line_seconds):
            return True
        self._line(done)
        while self.next_line <= done:
            self.next_line += self.every
        return True

    def _line(self, done: int) -> None:
        now = time.monotonic()
        elapsed, count = now - self.started, done - self.first
        # The rate since the previous line: an online run speeds down when its warm-up ends.
        rate = (done - self.shown) / (now - self.last_line) if now > self.last_line else 0.0
        text = f"timestep {done:,}/{self.first + self.total:,} ({100 * count / self.total:.0f}%), {_duration(elapsed)}"
        if rate > 0:
            text += f", {rate:.1f} timesteps/s"
            if count < self.total:
                text += f", about {_duration((self.total - count) / rate)} left"
        report(text)
        self.shown, self.last_line = done, now

    def _on_training_end(self) -> None:
        if self.pbar is None and self.total > 0 and self.shown != self.model.num_timesteps:
            self._line(self.model.num_timesteps)
        self.close()

    def close(self) -> None:
        """Close the bar (a no-op when it is closed or lines are written)."""
        pbar, self.pbar = self.pbar, None
        if pbar is not None:
            atexit.unregister(self.close)
            pbar.refresh()
            pbar.close()


def _console_is_interactive() -> bool:
    """Whether rich draws live on this stdout: a terminal or Jupyter (rich's own test)."""
    from rich import get_console

    console = get_console()
    return bool(console.is_terminal or console.is_jupyter)


def _duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``2 min 7 s``, ``1 h 3 min``."""
    if seconds < 59.5:
        return f"{max(seconds, 0.0):.1f} s" if seconds < 9.95 else f"{seconds:.0f} s"
    seconds = round(seconds)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


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
