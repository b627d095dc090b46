"""What every algorithm's frozen hyperparameter dataclass shares: checks, renames, JSON round trip."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import fields
from typing import Any, ClassVar

import numpy as np


def check_field(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise ``ValueError('<field> must be <expected>, got <value>')`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int (numpy ints included) that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class ConfigBase:
    """JSON round trip shared by the frozen config dataclasses.

    ``renamed`` maps old field names to new ones: an old name still works (from Python and from
    an old config.json) with a DeprecationWarning naming the new one.
    """

    renamed: ClassVar[dict[str, str]] = {}

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
