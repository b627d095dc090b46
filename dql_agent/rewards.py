"""The reward transforms of the official codes, applied once to a dataset's rewards."""

from __future__ import annotations

from typing import Any

import torch

from dql_agent.config import REWARD_TRANSFORMS


def transform_rewards(buffer: Any, kind: str) -> torch.Tensor:
    """The reward transforms of the official codes, as a new tensor (``buffer``: an OfflineBuffer).

    'none'; 'cql_antmaze': 4 (r - 0.5); 'normalize': z-score; 'iql_locomotion': r * 1000 /
    (max - min episode return); 'iql_antmaze': 0 if r > 0 else -1.
    """
    rewards = buffer.rewards
    if kind == "cql_antmaze":
        return (rewards - 0.5) * 4.0
    if kind == "normalize":
        return (rewards - rewards.mean()) / rewards.std().clamp(min=1e-8)
    if kind == "iql_locomotion":
        returns = buffer.episode_returns()
        spread = float(returns.max() - returns.min())
        if not spread > 0:
            raise ValueError(
                f"reward_transform='iql_locomotion' needs episodes with different returns, but all "
                f"{len(returns)} episode(s) return {returns.max():.6g}; use reward_transform='none' or 'normalize'"
            )
        return rewards * (1000.0 / spread)
    if kind == "iql_antmaze":
        return torch.where(rewards > 0, 0.0, -1.0).to(rewards.dtype)
    if kind != "none":
        raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {kind!r}")
    return rewards.clone()
