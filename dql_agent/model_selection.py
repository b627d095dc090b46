"""Model selection without the environment: offline signals on held-out episodes.

Offline RL has no environment to pick a checkpoint with, yet the return of Diffusion-QL moves a
lot during training. (The official code picks checkpoints by online evaluation; its offline
selection is broken: it keeps ``argsort(bc_loss) == top_k``, issue #22 of its repository.) This
module holds out whole episodes of the dataset and computes, on them, signals that need no env:

- ``td_error``: mean squared TD error of the two critics against the training target
  ``y = r + gamma * (1 - terminal) * min_i Q'_i(s', a')``, ``a'`` the EMA actor's next action
  (:func:`dql_agent.diffusion_ql.critic_loss`, halved: the mean over the two critics). Lower is
  better.
- ``bc_loss``: the acting actor's diffusion eps-MSE on the held-out (state, action) pairs, fixed
  diffusion steps and noise (the EMA actor when ``act_with_ema``, else the online one). Lower is
  better.
- ``policy_q``: mean min-Q of the target critics at the policy's deterministic action
  (``select_action(obs, deterministic=True)``). Higher is better (if the critics are right).
- ``action_distance``: mean L2 distance, in [-1, 1] units, between the policy's deterministic
  action and the dataset's action. Lower is better (stays close to the data).
- ``q_divergence``: ``|policy_q| / (max|r| / (1 - gamma))``, ``max|r|`` over the training data's
  (transformed) rewards: no discounted return the data supports exceeds ``max|r| / (1 - gamma)``
  in magnitude, so a value above 1 means the critics have diverged (either way: Q of a task with
  negative rewards, Pendulum's, diverges downwards). Not a criterion: a warning.

Everything is computed in the training units (actions scaled to [-1, 1], rewards transformed,
observations normalised with the model's statistics, as ``BaseAgent.set_buffer`` maps the
training data) on a fixed, seeded subsample, with fixed noise: two calls on the same weights
agree exactly, and training is not disturbed (no training RNG is drawn from).

Use::

    train, validation = split_episodes(buffer, validation_fraction=0.1, seed=0)
    model = DiffusionQL(train, env="Pendulum-v1", seed=0)
    selector = OfflineSelectionCallback(validation, save_path="best", eval_freq=1000)
    model.learn(100_000, callback=selector)
    best = DiffusionQL.load("best")          # the checkpoint the criterion picked
    selector.history                          # [{"step": 1000, "td_error": ..., ...}, ...]

``benchmarks/model_selection_study.py`` measures which signal tracks the true return; docs/SELECTION.md has
the table behind the default criterion.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from dql_agent.buffer import Batch, OfflineBuffer
from dql_agent.config import is_int
from dql_agent.diffusion_ql import DiffusionQL, critic_loss
from dql_agent.observations import take_rows, tree_to
from dql_agent.rewards import transform_rewards
from dql_agent.spaces import scale_actions

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "SIGNALS",
    "OfflineSelectionCallback",
    "offline_signals",
    "split_episodes",
]

SIGNALS = ("td_error", "bc_loss", "policy_q", "action_distance", "q_divergence")
"""The names :func:`offline_signals` returns, in order."""
CRITERIA: dict[str, str] = {"td_error": "min", "bc_loss": "min", "policy_q": "max", "action_distance": "min"}
"""The signals a checkpoint can be selected by, and whether lower ('min') or higher ('max') is better."""
DEFAULT_CRITERION = "bc_loss"
"""The criterion :class:`OfflineSelectionCallback` uses by default (measured: docs/SELECTION.md)."""
ACTING_CHUNK = 256
"""Observations per ``select_action`` call in :func:`offline_signals` (bounds the memory of the
``n_action_samples`` candidates per observation)."""


# splitting -------------------------------------------------------------------------------------
def episode_bounds(buffer: OfflineBuffer) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the buffer's episodes, in order. An episode ends at a row
    flagged terminal or timeout; rows after the last such flag (an unfinished run) are an episode."""
    ends = (buffer.terminals | buffer.timeouts).cpu().numpy()
    stops = (np.flatnonzero(ends) + 1).tolist()
    if not stops or stops[-1] != len(buffer):
        stops.append(len(buffer))
    starts = [0, *stops[:-1]]
    return list(zip(starts, stops, strict=True))


def _rows_as_arrays(value: Any, index: np.ndarray) -> Any:
    """Rows of a tensor (or of each tensor of an observation tree) as numpy arrays."""
    if isinstance(value, dict):
        return {key: tensor.cpu().numpy()[index] for key, tensor in value.items()}
    return value.cpu().numpy()[index]


def _subset(buffer: OfflineBuffer, index: np.ndarray) -> OfflineBuffer:
    """A new OfflineBuffer of the rows ``index`` (in order), with the same spaces and metadata."""
    return OfflineBuffer(
        observations=_rows_as_arrays(buffer.observations, index),
        actions=_rows_as_arrays(buffer.actions, index),
        rewards=_rows_as_arrays(buffer.rewards, index),
        next_observations=_rows_as_arrays(buffer.next_observations, index),
        terminals=_rows_as_arrays(buffer.terminals, index),
        timeouts=_rows_as_arrays(buffer.timeouts, index),
        observation_space=buffer.observation_space,
        action_space=buffer.action_space,
        metadata=dict(buffer.metadata),
    )


def split_episodes(
    buffer: OfflineBuffer, validation_fraction: float, seed: int = 0
) -> tuple[OfflineBuffer, OfflineBuffer]:
    """Split ``buffer`` by whole episodes into (training, validation) OfflineBuffers.

    ``round(validation_fraction * n_episodes)`` episodes, drawn at random with ``seed`` (numpy's
    ``default_rng``), go to validation; the rest, in their original order, to training. Episodes
    end at a terminal or timeout row; trailing rows without either are one (unfinished) episode.
    Both buffers are new, keep the spaces and the metadata, and live on the CPU.

    Raises:
        TypeError: ``buffer`` is not an OfflineBuffer, or ``seed`` is not an int.
        ValueError: ``validation_fraction`` is not in (0, 1), or leaves no episode on one side
            (the message says which fractions would work for this many episodes).
    """
    if not isinstance(buffer, OfflineBuffer):
        raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
    if not is_int(seed) or seed < 0:
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if (
        isinstance(validation_fraction, bool)
        or not isinstance(validation_fraction, (int, float, np.floating, np.integer))
        or not 0.0 < float(validation_fraction) < 1.0
    ):
        raise ValueError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
    episodes = episode_bounds(buffer)
    n = len(episodes)
    n_validation = round(float(validation_fraction) * n)
    if not 1 <= n_validation <= n - 1:
        hint = (
            "the buffer has a single episode: it cannot be split by episodes"
            if n < 2
            else f"use validation_fraction in [{0.5 / n:.4g}, {1 - 0.5 / n:.4g}]"
        )
        raise ValueError(
            f"validation_fraction must leave at least one episode on each side, got {validation_fraction!r}: "
            f"round({validation_fraction!r} * {n} episodes) = {n_validation} validation episode(s); {hint}"
        )
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(int(seed)).choice(n, size=n_validation, replace=False)] = True
    rows = np.repeat(chosen, [stop - start for start, stop in episodes])
    return _subset(buffer, np.flatnonzero(~rows)), _subset(buffer, np.flatnonzero(rows))


# signals ---------------------------------------------------------------------------------------
def _check_model(model: Any, validation: Any) -> None:
    if not isinstance(model, DiffusionQL):
        raise TypeError(f"model must be a DiffusionQL, got {type(model).__name__}")
    if not isinstance(validation, OfflineBuffer):
        raise TypeError(f"validation must be an OfflineBuffer, got {type(validation).__name__}")
    policy = model.policy
    if model.config.chunked:
        raise ValueError(
            f"offline selection signals score one-step transitions; this model acts in chunks "
            f"(action_horizon={model.config.action_horizon}, n_obs_steps={model.config.n_obs_steps}): "
            "select its checkpoints by evaluation (MetricsCallback)"
        )
    for name, found, expected in (
        ("obs_dim", validation.obs_dim, policy.obs_dim),
        ("action_dim", validation.action_dim, policy.env_action_dim),
        ("has_images", validation.has_images, policy.encoder.uses_images),
    ):
        if found != expected:
            raise ValueError(f"validation.{name} must be {expected} (the model's), got {found}")


def reward_bound(model: DiffusionQL, validation_rewards: torch.Tensor) -> float:
    """The largest discounted return the data supports, ``max|r| / (1 - gamma)``, from the
    training data's transformed rewards (``model.replay_buffer``; a model without data, e.g. one
    just loaded, uses the validation rewards). ``inf`` when ``gamma`` is 1."""
    rewards = model.replay_buffer.rewards if model.replay_buffer is not None else validation_rewards
    largest = float(rewards.abs().max()) if len(rewards) else 0.0
    gamma = float(model.config.gamma)
    return math.inf if gamma >= 1.0 else largest / (1.0 - gamma)


@torch.no_grad()
def offline_signals(
    model: DiffusionQL, validation: OfflineBuffer, batch_size: int = 1024, seed: int = 0
) -> dict[str, float]:
    """The offline selection signals of ``model`` on ``validation`` (see the module docstring).

    Computed on ``batch_size`` validation transitions drawn once without replacement with
    ``seed`` (all of them, in order, when there are fewer), mapped to the training units as
    ``set_buffer`` maps data: actions with :func:`dql_agent.spaces.scale_actions`, rewards with
    :func:`dql_agent.buffer.transform_rewards` (the model's ``reward_transform``; 'normalize'
    then standardises with the validation rewards' own statistics), observations with
    ``model.policy.normalize_observations``. Camera observations go through
    ``model.policy.encode_batch`` (no augmentation). The diffusion steps and noise come from a
    CPU generator seeded with ``seed``, so the same weights give the same values on any call.
    The model's training/eval mode is restored afterwards and no training RNG is touched.

    Returns:
        ``{"td_error", "bc_loss", "policy_q", "action_distance", "q_divergence"}`` as floats.

    Raises:
        TypeError: ``model`` is not a DiffusionQL or ``validation`` not an OfflineBuffer.
        ValueError: ``validation`` does not match the model's dimensions, or ``batch_size`` /
            ``seed`` are not ints >= 1 / >= 0.
    """
    _check_model(model, validation)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    policy, cfg, device = model.policy, model.config, model.device
    generator = torch.Generator().manual_seed(int(seed))  # CPU: the same draws on every device
    n = len(validation)
    index = torch.arange(n) if n <= batch_size else torch.randperm(n, generator=generator)[:batch_size]
    rows = len(index)

    where = index.to(validation.device)

    def rows_of(value: Any) -> Any:
        return tree_to(take_rows(value, where), device)

    observations = policy.normalize_observations(rows_of(validation.observations))
    next_observations = policy.normalize_observations(rows_of(validation.next_observations))
    actions = scale_actions(rows_of(validation.actions), model.action_space)
    all_rewards = transform_rewards(validation, cfg.reward_transform)
    rewards = rows_of(all_rewards)
    not_dones = 1.0 - rows_of(validation.terminals).float()
    raw = Batch(observations, actions, rewards, next_observations, not_dones)

    steps, dim = cfg.diffusion_steps, policy.action_dim
    t = torch.randint(0, steps, (rows,), generator=generator).to(device)
    bc_noise = torch.randn((rows, dim), generator=generator).to(device)
    bootstraps = bool(not_dones.any())
    k = cfg.n_max_q_samples if cfg.max_q_backup else 1
    next_noise = torch.randn((steps, rows * k, dim), generator=generator).to(device) if bootstraps else None

    was_training = policy.training
    policy.eval()
    try:
        batch = policy.encode_batch(raw)  # camera keys -> features; flat observations as they are
        td, _ = critic_loss(policy, cfg, batch, next_noise)
        actor = policy.ema_actor if cfg.act_with_ema else policy.actor  # the one that acts
        bc = actor.loss(batch.actions, batch.observations, t=t, noise=bc_noise)
        chosen = torch.cat(
            [
                policy.select_action(take_rows(raw.observations, slice(i, i + ACTING_CHUNK)), deterministic=True)
                for i in range(0, rows, ACTING_CHUNK)
            ]
        )
        policy_q = policy.critic_target.q_min(batch.observations, chosen).mean()
        distance = (chosen - actions).norm(dim=1).mean()
    finally:
        policy.train(was_training)
    q = float(policy_q)
    bound = reward_bound(model, all_rewards)
    if bound == 0.0:  # all rewards 0: any nonzero Q is unsupported
        divergence = 0.0 if q == 0.0 else math.inf
    else:
        divergence = abs(q) / bound
    return {
        "td_error": float(td) / 2.0,  # critic_loss sums the two critics' MSEs
        "bc_loss": float(bc),
        "policy_q": q,
        "action_distance": float(distance),
        "q_divergence": divergence,
    }


# the callback ----------------------------------------------------------------------------------
class OfflineSelectionCallback(BaseCallback):
    """Select a checkpoint by an offline signal on held-out data, during ``learn``.

    Every ``eval_freq`` timesteps it computes :func:`offline_signals` on ``validation``, records
    them in the model's logger as ``offline/<name>`` (and dumps it at the current timestep, as
    SB3's ``EvalCallback`` does), appends ``{"step": ..., **signals}`` to :attr:`history`, saves
    the model to ``save_path`` (``model.save``: a folder, or a ``.zip`` when the path ends so)
    whenever ``criterion`` improves, and warns once each time ``q_divergence`` rises above
    ``divergence_threshold``.

    Args:
        validation: held-out episodes (:func:`split_episodes`), never trained on.
        criterion: the signal to select by, one of :data:`CRITERIA` (lower is better for
            td_error, bc_loss and action_distance, higher for policy_q).
        save_path: where the best model is saved; None keeps only :attr:`best_step`.
        eval_freq: compute the signals every this many timesteps (gradient steps).
        divergence_threshold: warn when ``q_divergence`` exceeds it (1.0: Q beyond any return the
            rewards allow).
        verbose: 1 prints each evaluation and each new best.
        batch_size: validation transitions the signals are computed on (a fixed subsample).
        seed: seeds that subsample and the signals' noise.

    Attributes:
        history: one dict per evaluation: ``step`` and the signals.
        best_step, best_value: the timestep and criterion value of the best evaluation so far
            (None before the first).
    """

    def __init__(
        self,
        validation: OfflineBuffer,
        criterion: str = DEFAULT_CRITERION,
        save_path: str | os.PathLike[str] | None = None,
        eval_freq: int = 1000,
        divergence_threshold: float = 1.0,
        verbose: int = 0,
        *,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(verbose)
        if not isinstance(validation, OfflineBuffer):
            raise TypeError(f"validation must be an OfflineBuffer, got {type(validation).__name__}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise TypeError(f"save_path must be a path or None, got {save_path!r}")
        for name, value, least in (("eval_freq", eval_freq, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if not is_int(value) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if (
            isinstance(divergence_threshold, bool)
            or not isinstance(divergence_threshold, (int, float))
            or not divergence_threshold > 0
        ):
            raise ValueError(f"divergence_threshold must be a number > 0, got {divergence_threshold!r}")
        self.validation = validation
        self.criterion = criterion
        self.save_path = save_path
        self.eval_freq = int(eval_freq)
        self.divergence_threshold = float(divergence_threshold)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.history: list[dict[str, float]] = []
        self.best_step: int | None = None
        self.best_value: float | None = None
        self._diverged = False
        self._last_eval = -1

    def _init_callback(self) -> None:
        _check_model(self.model, self.validation)

    def _on_training_start(self) -> None:
        # Count from where this learn call starts (0 after reset_num_timesteps, else the resumed step).
        self._last_eval = int(self.model.num_timesteps)

    def _on_step(self) -> bool:
        step = int(self.model.num_timesteps)
        if step // self.eval_freq > self._last_eval // self.eval_freq:
            self.evaluate()
        return True

    def is_better(self, value: float) -> bool:
        """Whether ``value`` of the criterion beats the best so far (NaN never does)."""
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if CRITERIA[self.criterion] == "min" else value > self.best_value

    def evaluate(self) -> dict[str, float]:
        """Compute the signals now, log, record, save if best, warn on divergence; returns them."""
        model: Any = self.model
        step = int(model.num_timesteps)
        signals = offline_signals(model, self.validation, self.batch_size, self.seed)
        for name, value in signals.items():
            self.logger.record(f"offline/{name}", value)
        self.history.append({"step": step, **signals})
        self._last_eval = step
        value = signals[self.criterion]
        if self.is_better(value):
            self.best_step, self.best_value = step, value
            self.logger.record("offline/best_step", step)
            if self.save_path is not None:
                model.save(self.save_path)
            if self.verbose >= 1:
                where = f"; saved to {os.fspath(self.save_path)}" if self.save_path is not None else ""
                print(f"offline selection: new best {self.criterion}={value:.6g} at step {step}{where}")
        divergence = signals["q_divergence"]
        if divergence > self.divergence_threshold and not self._diverged:
            warnings.warn(
                f"Q divergence at step {step}: q_divergence={divergence:.3g} exceeds divergence_threshold="
                f"{self.divergence_threshold:g} (policy_q={signals['policy_q']:.4g}, beyond max|r| / (1 - gamma)); "
                "the critics may be diverging: lower learning rates, a smaller eta or gamma, or stop here",
                RuntimeWarning,
                stacklevel=2,
            )
        self._diverged = divergence > self.divergence_threshold
        self.logger.record("time/total_timesteps", step, exclude="tensorboard")  # as EvalCallback does
        self.logger.dump(step)
        return signals
