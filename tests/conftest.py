"""Shared pytest fixtures."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The test models are tiny: intra-op threads only add OpenMP synchronisation, which collapses
# when the 2 cores are shared with a subprocess (see dql_agent/cli.py). Set before torch loads,
# so subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run offline: any Hub access outside the `hub_server` fixture (which turns this off for its
# own test) fails at once instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hub_server import FakeHub  # noqa: E402  # tests/ is on sys.path (rootdir conftest, no __init__.py)

HUB_TEST_TOKEN = "hf_fake_test_token"


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh fake Hub (see ``tests/hub_server.py``) with the real ``huggingface_hub`` aimed at it.

    ``huggingface_hub`` reads its environment at import time, so besides the env vars this patches
    the module constants it already computed, and the endpoint of the module-level ``HfApi`` behind
    the ``huggingface_hub.create_repo``/``list_repo_files``/... functions. The cache lives under
    ``tmp_path/hf_home``; a dummy token is set so writes are authorised. Yields the server:
    ``.url``, ``.repos`` (repo_id -> Repo with its commits), ``.requests`` / ``.calls()``.
    """
    import huggingface_hub.hf_api
    import huggingface_hub.utils._cache_manager
    from huggingface_hub import constants

    server = FakeHub().start()
    home = tmp_path / "hf_home"
    cache = home / "hub"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN": HUB_TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")
    for key in unset:
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": server.url,
        # hf_hub_url formats this template, so it must follow ENDPOINT.
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", str(cache))
    # `huggingface_hub.utils.tqdm` the attribute is the class; the module is in sys.modules.
    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """A switch for ``huggingface_hub`` offline mode: call ``hub_offline()`` to go offline.

    ``constants.is_offline_mode()`` returns the module flag ``constants.HF_HUB_OFFLINE`` (set from
    the env at import), so the flag is what gets patched; the env var is set too for subprocesses.
    Undone at the end of the test. Use it after ``hub_server`` so the cache dir is the tmp one.
    """
    from huggingface_hub import constants

    def set_offline(offline: bool = True) -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

    return set_offline


def pytest_configure(config: pytest.Config) -> None:
    """Headless rendering for MuJoCo, before any test imports it (env read at import time)."""
    os.environ.setdefault("MUJOCO_GL", "egl")


# ---------------------------------------------------------------------------------------------
# Small models and datasets for the agent tests.
TINY = {"hidden_dim": 32, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 8, "batch_size": 64}


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
