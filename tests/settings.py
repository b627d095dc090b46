"""One registry of small settings for the tests, and the data builders several tests share.

``TINY_SETTINGS[algorithm]`` is what a test trains an algorithm with when it only needs a model
that runs; :func:`tiny` returns them with a test's own changes, so every deviation is written
where it is made. The contract suite (tests/test_contract.py) checks that every registered
algorithm has an entry. The stored-output cases (tests/regression_cases.py) keep their own
settings: they are pinned with the stored outputs and change only with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TINY_SETTINGS: dict[str, dict[str, Any]] = {
    "DiffusionQL": {"hidden_dim": 32, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 8, "batch_size": 64},
    "DiffusionDICE": {
        "hidden_dim": 32,
        "n_hidden": 2,
        "diffusion_steps": 3,
        "batch_size": 64,
        "n_action_samples": 8,
        "behavior_batch_size": 64,
        "behavior_n_hidden": 2,
        "guidance_n_hidden": 2,
        "n_noisy_copies": 4,
        "q_ensemble_size": 3,
    },
    "QVPO": {
        "hidden_dim": 32,
        "n_hidden": 2,
        "diffusion_steps": 3,
        "batch_size": 32,
        "n_diffusion_samples": 8,
        "n_entropy_samples": 4,
        "n_action_samples": 8,
        "learning_starts": 50,
    },
}
TINY = TINY_SETTINGS["DiffusionQL"]
"""Diffusion-QL's entry, the settings most tests use."""


def tiny(algorithm: str | type = "DiffusionQL", **changes: Any) -> dict[str, Any]:
    """The small settings of ``algorithm`` (its registered name or class) with ``changes``."""
    name = algorithm if isinstance(algorithm, str) else algorithm.algorithm  # type: ignore[attr-defined]
    return {**TINY_SETTINGS[name], **changes}


# A contextual bandit with four action modes: one-step episodes from a zero state, rewards
# N(mean of the mode, 0.5). A policy that learns from Q concentrates on the best mode.
BANDIT_MODES = np.array([[-0.8, 0.8], [-0.8, -0.8], [0.8, 0.8], [0.8, -0.8]])
BANDIT_MEAN_REWARDS = np.array([3.0, 0.0, 1.5, 5.0])
BANDIT_BEST = 3


def bandit_buffer(n: int = 10_000, seed: int = 0) -> Any:
    """The bandit's dataset: modes drawn uniformly, actions near them, all rows terminal."""
    from dql_agent import OfflineBuffer

    rng = np.random.default_rng(seed)
    mode = rng.integers(0, 4, n)
    actions = np.clip(BANDIT_MODES[mode] + rng.normal(0, 0.05, (n, 2)), -1, 1)
    states = np.zeros((n, 1), np.float32)
    rewards = rng.normal(BANDIT_MEAN_REWARDS[mode], 0.5)
    return OfflineBuffer(states, actions, rewards, states, np.ones(n, bool))  # one-step episodes


def output_dtypes(model: Any) -> list[Any]:
    """Record the dtype of every ``nn.Linear`` output of ``model`` from now on (precision tests)."""
    import torch

    seen: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen
