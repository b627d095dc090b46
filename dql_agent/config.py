"""Frozen hyperparameter configs and the per-task presets of the official Diffusion-QL code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from dql_agent.diffusion import BETA_SCHEDULES

REWARD_TRANSFORMS = ("none", "cql_antmaze", "normalize")


def check_field(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise ``ValueError('<field> must be <expected>, got <value>')`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int (numpy ints included) that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class ConfigBase:
    """JSON round trip shared by the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Build from a dict; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def make_config(config_class: type, hyperparameters: dict[str, Any], preset: str | None = None) -> Any:
    """``config_class`` from keyword hyperparameters over an optional task preset.

    An unknown keyword is a TypeError naming it, as for any Python function.
    """
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(hyperparameters) - known)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
    values = get_preset(preset) if preset is not None else {}
    values.update(hyperparameters)
    return config_class(**values)


@dataclass(frozen=True)
class DiffusionQLConfig(ConfigBase):
    """Hyperparameters of Diffusion-QL. Defaults reproduce the official D4RL locomotion run."""

    learning_rate: float = 3e-4
    """Actor (diffusion policy) Adam learning rate; the per-task `lr` of the official code."""
    critic_learning_rate: float = 3e-4
    """Critic Adam learning rate; fixed at 3e-4 for every task in the official code."""
    batch_size: int = 256
    """Transitions per gradient step, sampled uniformly with replacement."""
    gamma: float = 0.99
    """Discount factor of the TD target."""
    tau: float = 0.005
    """Polyak rate of the target critics, applied every step."""
    eta: float = 1.0
    """Weight of the Q-term in the actor loss: bc_loss + eta * q_loss."""
    diffusion_steps: int = 5
    """Number of diffusion steps T."""
    beta_schedule: str = "vp"
    """Noise schedule: 'vp', 'linear' or 'cosine'."""
    grad_norm: float | None = 1.0
    """Max gradient norm for actor and critic (one shared value); None disables clipping."""
    max_q_backup: bool = False
    """TD target from the max over `n_max_q_samples` next actions per critic, then the min."""
    n_max_q_samples: int = 10
    """Next-action samples per state for the max-Q backup."""
    ema_decay: float = 0.995
    """Decay of the EMA actor that produces the TD target's next actions."""
    ema_update_every: int = 5
    """The EMA actor is updated every this many gradient steps..."""
    ema_start_step: int = 1000
    """...from this step on; before it the EMA actor stays the initial actor."""
    lr_decay: bool = False
    """Cosine-anneal both learning rates to 0 over `lr_decay_steps`."""
    lr_decay_steps: int = 1_000_000
    """Length of the cosine decay in gradient steps (used when `lr_decay`)."""
    n_action_samples: int = 50
    """Candidate actions per observation when acting; one is picked by the target critics' min-Q."""
    act_with_ema: bool = False
    """Act with the EMA actor instead of the online actor (the official code uses the online one)."""
    reward_transform: str = "none"
    """'none', 'cql_antmaze' (r <- 4 (r - 0.5)) or 'normalize' (r <- (r - mean) / std)."""
    normalize_observations: bool = False
    """Standardise observations with dataset mean/std (the official code uses raw observations)."""
    hidden_dim: int = 256
    """Width of the denoiser and critic MLPs."""
    n_hidden: int = 3
    """Hidden layers of the denoiser and critic MLPs."""
    time_dim: int = 16
    """Size of the denoiser's sinusoidal time embedding."""
    nonfinite_loss: str = "raise"
    """A NaN/inf loss: 'raise' (FloatingPointError naming the step) or 'skip' the batch."""

    def __post_init__(self) -> None:
        for name in ("learning_rate", "critic_learning_rate"):
            check_field(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in (
            "batch_size",
            "diffusion_steps",
            "n_max_q_samples",
            "ema_update_every",
            "lr_decay_steps",
            "n_action_samples",
            "hidden_dim",
            "n_hidden",
        ):
            value = getattr(self, name)
            check_field(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", value
            )
        check_field(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma)
        check_field(0.0 < self.tau <= 1.0, "tau", "in (0, 1]", self.tau)
        check_field(0.0 <= self.ema_decay <= 1.0, "ema_decay", "in [0, 1]", self.ema_decay)
        check_field(self.eta >= 0.0, "eta", ">= 0", self.eta)
        check_field(self.ema_start_step >= 0, "ema_start_step", ">= 0", self.ema_start_step)
        check_field(self.grad_norm is None or self.grad_norm > 0, "grad_norm", "> 0 or None", self.grad_norm)
        check_field(
            self.beta_schedule in BETA_SCHEDULES, "beta_schedule", f"one of {BETA_SCHEDULES}", self.beta_schedule
        )
        check_field(
            self.reward_transform in REWARD_TRANSFORMS,
            "reward_transform",
            f"one of {REWARD_TRANSFORMS}",
            self.reward_transform,
        )
        check_field(self.time_dim >= 4 and self.time_dim % 2 == 0, "time_dim", "an even int >= 4", self.time_dim)
        check_field(
            self.nonfinite_loss in ("raise", "skip"), "nonfinite_loss", "'raise' or 'skip'", self.nonfinite_loss
        )


# Per-task settings of the official code (main.py's hyperparameter dictionary; see
# reference/diffusion_ql.md §2). `total_timesteps` is the paper's training length in gradient
# steps (epochs x 1000); it is a suggestion for `learn`, not a config field.
_PRESET_TABLE = {
    # task: (learning_rate, eta, max_q_backup, reward_transform, epochs, grad_norm)
    "halfcheetah-medium": (3e-4, 1.0, False, "none", 2000, 9.0),
    "hopper-medium": (3e-4, 1.0, False, "none", 2000, 9.0),
    "walker2d-medium": (3e-4, 1.0, False, "none", 2000, 1.0),
    "halfcheetah-medium-replay": (3e-4, 1.0, False, "none", 2000, 2.0),
    "hopper-medium-replay": (3e-4, 1.0, False, "none", 2000, 4.0),
    "walker2d-medium-replay": (3e-4, 1.0, False, "none", 2000, 4.0),
    "halfcheetah-medium-expert": (3e-4, 1.0, False, "none", 2000, 7.0),
    "hopper-medium-expert": (3e-4, 1.0, False, "none", 2000, 5.0),
    "walker2d-medium-expert": (3e-4, 1.0, False, "none", 2000, 5.0),
    "antmaze-umaze": (3e-4, 0.5, False, "cql_antmaze", 1000, 2.0),
    "antmaze-umaze-diverse": (3e-4, 2.0, True, "cql_antmaze", 1000, 3.0),
    "antmaze-medium-play": (1e-3, 2.0, True, "cql_antmaze", 1000, 2.0),
    "antmaze-medium-diverse": (3e-4, 3.0, True, "cql_antmaze", 1000, 1.0),
    "antmaze-large-play": (3e-4, 4.5, True, "cql_antmaze", 1000, 10.0),
    "antmaze-large-diverse": (3e-4, 3.5, True, "cql_antmaze", 1000, 7.0),
    "pen-human": (3e-5, 0.15, False, "normalize", 1000, 7.0),
    "pen-cloned": (3e-5, 0.1, False, "normalize", 1000, 8.0),
    "kitchen-complete": (3e-4, 0.005, False, "none", 250, 9.0),
    "kitchen-partial": (3e-4, 0.005, False, "none", 1000, 10.0),
    "kitchen-mixed": (3e-4, 0.005, False, "none", 1000, 10.0),
}

PRESETS: dict[str, dict[str, Any]] = {
    task: {"learning_rate": lr, "eta": eta, "max_q_backup": max_q, "reward_transform": reward, "grad_norm": gn}
    for task, (lr, eta, max_q, reward, _, gn) in _PRESET_TABLE.items()
}
PRESET_TOTAL_TIMESTEPS: dict[str, int] = {task: epochs * 1000 for task, (*_, epochs, _) in _PRESET_TABLE.items()}


def preset_name(name: str) -> str:
    """Normalise 'hopper-medium-v2', 'mujoco/hopper/medium-v0' or 'Hopper-Medium' to a preset key."""
    key = name.strip().lower().replace("/", "-").replace("_", "-")
    if key.startswith("mujoco-") or key.startswith("d4rl-"):
        key = key.split("-", 1)[1]
    head, _, tail = key.rpartition("-v")
    if head and tail.isdigit():
        key = head
    if key not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return key


def get_preset(name: str) -> dict[str, Any]:
    """Hyperparameter overrides of the official code for a task, e.g. ``get_preset('hopper-medium')``."""
    return dict(PRESETS[preset_name(name)])
