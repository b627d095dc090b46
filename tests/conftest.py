"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

# The test models are tiny: intra-op threads only add OpenMP synchronisation, which collapses
# when the 2 cores are shared with a subprocess (see dql_agent/cli.py). Set before torch loads,
# so subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run offline: any Hub access outside the `hub_server` fixture (which turns this off for its
# own test) fails at once instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hub_server import hub_offline_fixture, hub_server_fixture  # noqa: E402, F401  # the fixtures


def pytest_configure(config: pytest.Config) -> None:
    """Headless rendering for MuJoCo, before any test imports it (env read at import time)."""
    os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where there is no GPU: the one absence a test may skip for."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not a test id that says "cuda"
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Small models and datasets for the agent tests (settings: tests/settings.py).
from tests.settings import TINY  # noqa: E402


@pytest.fixture(scope="session")
def pendulum_arrays() -> dict:
    """Transitions of 2 good + 2 noisy Pendulum-v1 episodes (800 rows), D4RL-style keys."""
    import numpy as np

    from dql_agent.demo_data import collect_pendulum_episodes

    episodes = collect_pendulum_episodes(n_good=2, n_noisy=2, seed=0)
    return {
        "observations": np.concatenate([e["observations"][:-1] for e in episodes]),
        "actions": np.concatenate([e["actions"] for e in episodes]),
        "rewards": np.concatenate([e["rewards"] for e in episodes]),
        "next_observations": np.concatenate([e["observations"][1:] for e in episodes]),
        "terminals": np.concatenate([e["terminations"] for e in episodes]),
        "timeouts": np.concatenate([e["truncations"] for e in episodes]),
    }


@pytest.fixture
def pendulum_buffer(pendulum_arrays):
    import gymnasium as gym

    from dql_agent import OfflineBuffer

    env = gym.make("Pendulum-v1")
    return OfflineBuffer(**pendulum_arrays, observation_space=env.observation_space, action_space=env.action_space)


@pytest.fixture
def tiny_model(pendulum_buffer):
    """A tiny DiffusionQL on the Pendulum buffer, trained 20 steps."""
    from dql_agent import DiffusionQL

    return DiffusionQL(pendulum_buffer, env="Pendulum-v1", seed=0, device="cpu", **TINY).learn(20)
