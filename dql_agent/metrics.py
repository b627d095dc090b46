"""A public metrics hook for ``learn`` and ``train_seeds``: every logger dump and evaluation as plain numbers.

``MetricsCallback`` is an SB3 callback. It adds an output to the model's SB3 logger, so it sees
exactly what ``learn`` logs (``train/critic_loss``, ``train/actor_loss``, ..., the mean over each
``log_interval``), and it can evaluate the policy every ``eval_freq`` timesteps, logging
``eval/mean_reward``, ``eval/std_reward`` and, when known, ``eval/normalized_score`` and
``eval/success_rate``. Everything logged is kept in ``callback.records``, a plain
``{timestep: {key: float}}`` dict::

    recorder = MetricsCallback(eval_env="Pendulum-v1", eval_freq=1000, n_eval_episodes=5)
    model.learn(10_000, callback=recorder)
    recorder.records[10_000]  # {'eval/mean_reward': ..., 'train/critic_loss': ..., ...}

Evaluation never touches the training RNG: it acts deterministically (fixed noise) on an env
reset from ``eval_seed`` before every evaluation, so every evaluation sees the same episodes and
training with or without it gives identical weights.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, cast

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter

if TYPE_CHECKING:
    from dql_agent.base import BaseAgent

__all__ = ["MetricsCallback"]


class _Recorder(KVWriter):
    """An SB3 logger output that hands each dump's numbers to its callback."""

    def __init__(self, callback: MetricsCallback) -> None:
        self.callback = callback

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        numbers_only = {
            key: float(value)
            for key, value in key_values.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        self.callback.records.setdefault(int(step), {}).update(numbers_only)

    def close(self) -> None:
        pass


class MetricsCallback(BaseCallback):
    """Record every logger dump (and optional evaluations) into ``records``.

    Args:
        eval_env: an env id, ``gymnasium.Env`` or VecEnv to evaluate on, or None (record the
            training logs only).
        eval_freq: evaluate every this many timesteps (0: only at the end of each ``learn``).
            Each ``learn`` call also ends with an evaluation when ``eval_env`` is given and its
            last timestep was not evaluated.
        n_eval_episodes: episodes per evaluation (deterministic actions).
        eval_seed: the env is reset with this seed before each evaluation.

    Attributes:
        records: ``{timestep: {key: value}}``: all numeric values the model's logger dumped at
            that timestep (``train/*``, ``time/*``, ``rollout/*``) plus this callback's ``eval/*``.
    """

    def __init__(
        self, eval_env: Any = None, eval_freq: int = 0, n_eval_episodes: int = 10, eval_seed: int = 0, verbose: int = 0
    ) -> None:
        super().__init__(verbose)
        for name, value, least in (("eval_freq", eval_freq, 0), ("n_eval_episodes", n_eval_episodes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(eval_seed, int) or isinstance(eval_seed, bool) or eval_seed < 0:
            raise ValueError(f"eval_seed must be an int >= 0, got {eval_seed!r}")
        self.eval_env, self.eval_freq, self.n_eval_episodes, self.eval_seed = (
            eval_env,
            eval_freq,
            n_eval_episodes,
            eval_seed,
        )
        self.records: dict[int, dict[str, float]] = {}
        self._vec_env: Any = None
        self._last_eval = -1

    @property
    def latest(self) -> dict[str, float]:
        """The record of the latest timestep (empty before the first dump)."""
        return self.records[max(self.records)] if self.records else {}

    def _init_callback(self) -> None:
        logger = self.model.logger
        # A new logger (set_logger) between learn calls gets the recorder too; never twice.
        if not any(isinstance(out, _Recorder) and out.callback is self for out in logger.output_formats):
            logger.output_formats.append(_Recorder(self))
        if self.eval_env is not None and self._vec_env is None:
            from dql_agent.sb3 import wrap_env

            self._vec_env = wrap_env(self.eval_env)

    def _on_training_start(self) -> None:
        self._last_eval = max(self._last_eval, self.model.num_timesteps)

    def _on_step(self) -> bool:
        step = self.model.num_timesteps
        if self.eval_env is not None and self.eval_freq and step // self.eval_freq > self._last_eval // self.eval_freq:
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        if self.eval_env is not None and self.model.num_timesteps > self._last_eval:
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Evaluate now: log ``eval/*`` at the current timestep, dump, and return those values."""
        if self._vec_env is None:
            raise RuntimeError("MetricsCallback.evaluate needs eval_env and a model (pass the callback to learn)")
        from dql_agent.evaluation import evaluate

        self._vec_env.seed(self.eval_seed)  # used by evaluate_policy's first reset
        model = cast("BaseAgent", self.model)  # SB3 types the bound model as its own BaseAlgorithm
        results = evaluate(model, self._vec_env, n_eval_episodes=self.n_eval_episodes)
        values = {
            f"eval/{key}": float(results[key])
            for key in ("mean_reward", "std_reward", "normalized_score", "success_rate")
            if results[key] is not None
        }
        for key, value in values.items():
            self.logger.record(key, value)
        self._last_eval = self.model.num_timesteps
        self.logger.dump(self.model.num_timesteps)
        return values
