"""The huggingface_hub this environment runs, and huggingface-sb3 next to dql_agent.

``make test-hub-versions`` runs the Hub tests in environments whose own huggingface_hub shadows
.venv's (see the Makefile), with ``DQL_AGENT_HF_HUB`` (and ``DQL_AGENT_HF_SB3``) set to the version
each must run: a shadowing that silently failed would otherwise test .venv's version again.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import dql_agent
from tests.hub_server import hub_server_fixture  # noqa: F401 - the fixture, for every huggingface_hub version

PACKAGES = [  # module, distribution, the variable naming the version expected
    ("huggingface_hub", "huggingface_hub", "DQL_AGENT_HF_HUB"),
    ("huggingface_sb3", "huggingface-sb3", "DQL_AGENT_HF_SB3"),
]


@pytest.mark.parametrize("module, distribution, variable", PACKAGES)
def test_runs_the_expected_version(module, distribution, variable):
    expected = os.environ.get(variable)
    if not expected:
        pytest.skip(f"{variable} is set by make test-hub-versions")
    assert importlib.metadata.version(distribution).startswith(expected)
    imported = importlib.import_module(module)
    assert Path(str(imported.__file__)).is_relative_to(sys.prefix)  # this env's own, not .venv's


def test_huggingface_sb3_downloads_what_dql_agent_pushed(tiny_model, hub_server, monkeypatch):
    huggingface_sb3 = pytest.importorskip("huggingface_sb3")
    # Its newer releases refuse any download without this, expecting a pickled SB3 zip; results.json is JSON.
    monkeypatch.setenv("TRUST_REMOTE_CODE", "True")
    tiny_model.push_to_hub("alice/sb3", eval_env=gym.make("Pendulum-v1"), n_eval_episodes=1, video=False)
    results = json.loads(Path(huggingface_sb3.load_from_hub("alice/sb3", "results.json")).read_text())
    assert results["env_id"] == "Pendulum-v1" and results["n_eval_episodes"] == 1
    assert dql_agent.load_from_hub("alice/sb3", device="cpu").num_timesteps == tiny_model.num_timesteps
