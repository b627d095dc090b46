"""The algorithms' frozen hyperparameter dataclasses: what they all hold, and how fields are checked.

:class:`AgentConfig` declares the fields every algorithm has (the diffusion policy's size and
sampling, the batch, the discount); :class:`ImageConfig` the camera encoder's; and
:class:`OfflineDataConfig` what an offline algorithm does to its dataset. An algorithm's config
extends them with its own fields, and redeclares a shared field only to change its default.

A field is checked against its annotation wherever the value comes from (Python, ``--set`` or a
config.json): a bool field takes only a bool, an int field an int that is not a bool, a float
field an int or a float (stored as float), a str field a str, and ``X | None`` also None. numpy
and 0-d torch scalars are converted to the plain Python value first, so a config always
serialises to JSON. Fields that size an allocation have an upper bound, declared with the field
(:func:`bounded`), so a config.json cannot ask for gigabytes before its weights are checked.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

MAX_SEED = 2**63 - 1
"""Largest seed (torch and numpy both take it; the policy's acting RNG uses seed + 2, wrapped)."""

BETA_SCHEDULES = ("vp", "linear", "cosine")
"""The diffusion noise schedules (:mod:`dql_agent.diffusion`)."""
REWARD_TRANSFORMS = ("none", "cql_antmaze", "normalize", "iql_locomotion", "iql_antmaze")
"""The reward transforms of the official codes (:mod:`dql_agent.rewards`)."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""The compute precisions (:mod:`dql_agent.scaling`): parameters and optimizer state stay fp32."""


def bounded(default: Any, at_most: int) -> Any:
    """A dataclass field that sizes a tensor or a loop: its value may not exceed ``at_most`` (far
    above any published setting, far below what exhausts a machine). A subclass that redeclares
    the field to change its default keeps the bound."""
    return dataclasses.field(default=default, metadata={"at_most": at_most})


def check_field(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise ``ValueError('<field> must be <expected>, got <value>')`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int (numpy ints included) that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def plain_scalar(value: Any) -> Any:
    """numpy scalars and 0-d torch tensors as the Python bool/int/float/str they hold; anything
    else unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value).__module__.startswith("torch") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def check_seed(seed: Any, field: str = "seed") -> int:
    """``seed`` as a Python int in [0, MAX_SEED], or a TypeError/ValueError naming ``field``."""
    seed = plain_scalar(seed)
    if not is_int(seed):
        raise TypeError(f"{field} must be an int, got {seed!r} ({type(seed).__name__})")
    check_field(0 <= seed <= MAX_SEED, field, "an int in [0, 2**63 - 1]", seed)
    return int(seed)


def to_json_safe(value: Any, field: str, depth: int = 0) -> Any:
    """``value`` as plain JSON types (numpy/torch scalars converted, tuples as lists); a TypeError
    names the entry that JSON cannot hold (``field`` is its path, e.g. ``metadata['n']``)."""
    if depth > 32:
        raise ValueError(f"{field} is nested more than 32 levels deep")
    value = plain_scalar(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{field} must be finite to be saved in JSON, got {value!r}")
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{field} keys must be str, got {key!r} ({type(key).__name__})")
            out[key] = to_json_safe(item, f"{field}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item, f"{field}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise TypeError(
        f"{field} must hold JSON values (str, int, float, bool, None, lists, dicts), got {type(value).__name__}"
    )


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """``float | None`` -> (float, NoneType); only plain scalar annotations are used by configs."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(arg for arg in typing.get_args(annotation))
    return (annotation,)


def _typed(value: Any, name: str, allowed: tuple[type, ...]) -> Any:
    """``value`` converted to the field's type, or a TypeError naming the field."""
    value = plain_scalar(value)
    if value is None and type(None) in allowed:
        return None
    if bool in allowed and isinstance(value, bool):
        return value
    if int in allowed and is_int(value):
        return int(value)
    if float in allowed and (is_int(value) or isinstance(value, float)):
        return float(value)
    if str in allowed and isinstance(value, str):
        return value
    expected = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
    hint = " (JSON's false/true, not the string)" if bool in allowed and isinstance(value, str) else ""
    raise TypeError(f"{name} must be {expected}{hint}, got {value!r} ({type(value).__name__})")


class ConfigBase:
    """Typed fields, size limits and the JSON round trip, shared by the frozen config dataclasses.

    A subclass writes its range checks in :meth:`check`; the types and the size limits are
    checked before it runs. ``renamed`` maps old field names to new ones: an old name still works
    (from Python and from an old config.json) with a DeprecationWarning naming the new one.
    """

    renamed: ClassVar[dict[str, str]] = {}
    saved_before: ClassVar[dict[str, Any]] = {}
    """Fields added later, with the value that keeps the meaning of a config.json written before
    them (where a new default would change what an old checkpoint builds); each class lists its
    own, and a config reads those of all its bases."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = _typed(getattr(self, f.name), f.name, _allowed_types(hints[f.name]))
            limit = type(self).size_limit(f.name)
            if limit is not None and value is not None:
                check_field(value <= limit, f.name, f"<= {limit:,}", value)
            if isinstance(value, float):
                check_field(math.isfinite(value), f.name, "finite", value)
            object.__setattr__(self, f.name, value)  # frozen: the converted value replaces the given one
        self.check()

    def check(self) -> None:
        """Range checks of the fields (ValueError naming the field); types are already right. A
        subclass checks its own fields after ``super().check()``."""

    @classmethod
    def size_limit(cls, name: str) -> int | None:
        """The upper bound :func:`bounded` declared for field ``name`` (here or in a base class)."""
        for klass in cls.__mro__:
            found = getattr(klass, "__dataclass_fields__", {}).get(name)
            if found is not None and "at_most" in found.metadata:
                return int(found.metadata["at_most"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]  # subclasses are dataclasses

    @classmethod
    def upgrade_names(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with renamed keys under their new names (a DeprecationWarning per old name)."""
        out = dict(values)
        for old, new in cls.renamed.items():
            if old in out:
                warnings.warn(f"{cls.__name__}: {old!r} is renamed {new!r}", DeprecationWarning, stacklevel=4)
                if new in out:
                    raise ValueError(f"{cls.__name__}: pass {new!r} only, not also its old name {old!r}")
                out[new] = out.pop(old)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Build from a dict; an unknown key is an error that names it."""
        values = cls.upgrade_names(values)
        known = cls.field_names()
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> Any:
        """From a config.json's hyperparameters: :meth:`from_dict`, with ``saved_before`` filling
        the fields an older file lacks."""
        saved_before: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):  # a base's defaults first, a subclass's override them
            saved_before.update(vars(klass).get("saved_before", {}))
        return cls.from_dict({**saved_before, **values})

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
        """The config from keyword hyperparameters over ``base`` (e.g. a task preset).

        An unknown keyword is a TypeError naming it, as for any Python function.
        """
        hyperparameters = cls.upgrade_names(hyperparameters)
        known = cls.field_names()
        unknown = sorted(set(hyperparameters) - known)
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{**(base or {}), **hyperparameters})


# the fields every algorithm shares ---------------------------------------------------------------
@dataclass(frozen=True)
class ImageConfig(ConfigBase):
    """The camera encoder's fields (:mod:`dql_agent.encoders`), used when the observation space has
    camera keys; every algorithm has them."""

    saved_before: ClassVar[dict[str, Any]] = {"cnn_channels": 32, "image_features": 50, "random_shift": 4}

    cnn_channels: int = bounded(32, 4_096)
    """Camera observations: channels of each image key's CNN (c, 2c, 2c over three convolutions)."""
    image_features: int = bounded(50, 16_384)
    """Camera observations: features per image key, concatenated with the vector keys."""
    random_shift: int = bounded(4, 1_024)
    """Camera observations: DrQ's random-shift augmentation in training, up to this many pixels; 0 turns it off."""

    def check(self) -> None:
        super().check()
        for name in ("cnn_channels", "image_features"):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
        check_field(self.random_shift >= 0, "random_shift", "an int >= 0", self.random_shift)


@dataclass(frozen=True)
class AgentConfig(ImageConfig):
    """The fields of every algorithm: the diffusion policy's size and sampling, the batch, the
    discount. Defaults are Diffusion-QL's; an algorithm redeclares a field to change its default."""

    batch_size: int = bounded(256, 1_048_576)
    """Transitions per gradient step, sampled uniformly with replacement."""
    gamma: float = 0.99
    """Discount factor of the TD target."""
    tau: float = 0.005
    """Polyak rate of the target networks, applied every gradient step."""
    diffusion_steps: int = bounded(5, 10_000)
    """Number of diffusion steps T."""
    beta_schedule: str = "vp"
    """Noise schedule: 'vp', 'linear' or 'cosine'."""
    n_action_samples: int = bounded(50, 100_000)
    """Candidate actions per observation when acting; one is picked by Q."""
    hidden_dim: int = bounded(256, 16_384)
    """Width of the MLPs."""
    n_hidden: int = bounded(3, 64)
    """Hidden layers of the MLPs."""
    time_dim: int = bounded(16, 4_096)
    """Size of the denoiser's sinusoidal time embedding."""
    action_horizon: int = bounded(1, 256)
    """h: the diffusion model generates a chunk of h actions, and the critics score whole chunks
    (Q-chunking's h-step backup); 1 is the papers' setting, one action per observation."""
    n_action_steps: int = bounded(1, 256)
    """How many actions of a chunk ``predict`` executes before it plans again (at most h)."""
    n_obs_steps: int = bounded(1, 64)
    """The observation history the policy sees: the last this many observations of the episode
    (the first one repeated at an episode's start)."""
    precision: str = "fp32"
    """Compute precision of the forward passes (sampler, critics, encoders) in training and acting:
    'fp32', 'bf16' (CPU or CUDA) or 'fp16' (CUDA, with loss scaling). Weights, optimizer states,
    the EMA and checkpoints stay fp32 (see :mod:`dql_agent.scaling`)."""

    def check(self) -> None:
        super().check()
        for name in (
            "batch_size",
            "diffusion_steps",
            "n_action_samples",
            "hidden_dim",
            "n_hidden",
            "action_horizon",
            "n_action_steps",
            "n_obs_steps",
        ):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
        check_field(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma)
        check_field(0.0 < self.tau <= 1.0, "tau", "in (0, 1]", self.tau)
        check_field(
            self.beta_schedule in BETA_SCHEDULES, "beta_schedule", f"one of {BETA_SCHEDULES}", self.beta_schedule
        )
        check_field(self.time_dim >= 4 and self.time_dim % 2 == 0, "time_dim", "an even int >= 4", self.time_dim)
        check_field(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        check_field(
            self.n_action_steps <= self.action_horizon,
            "n_action_steps",
            f"<= action_horizon ({self.action_horizon})",
            self.n_action_steps,
        )

    @property
    def chunked(self) -> bool:
        """Whether the policy acts in chunks or from a history (else: the papers' one-step setting)."""
        return self.action_horizon > 1 or self.n_obs_steps > 1


@dataclass(frozen=True)
class OfflineDataConfig(ConfigBase):
    """What an offline algorithm does to its dataset before training (see
    :func:`dql_agent.buffer.prepare_training_data`)."""

    reward_transforms: ClassVar[tuple[str, ...]] = REWARD_TRANSFORMS
    """The transforms this algorithm accepts."""

    reward_transform: str = "none"
    """One of :data:`REWARD_TRANSFORMS` that the algorithm accepts (see :mod:`dql_agent.rewards`)."""
    normalize_observations: bool = False
    """Standardise observations with dataset mean/std (the official codes use raw observations)."""

    def check(self) -> None:
        super().check()
        check_field(
            self.reward_transform in self.reward_transforms,
            "reward_transform",
            f"one of {self.reward_transforms}",
            self.reward_transform,
        )
