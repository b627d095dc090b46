"""Every Python snippet of README.md runs as written, on local data.

The snippets name a Minari dataset (``mujoco/hopper/medium-v0``), the Hub and the demo's model;
here the dataset is a few random Hopper-v5 episodes written under that id in a temporary Minari
root, the Hub is the in-process test server, and ``dql_demo/model`` is a tiny Pendulum model. The
only edits are the budgets in ``BUDGET`` (step and episode counts) and ``device="cuda"`` on a
machine without one; each must still match the README, so a rewritten snippet cannot slip past.
Snippets preceded by ``<!-- readme-test: slow -->`` (compiling, exporting) run with ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SLOW_TAG = "<!-- readme-test: slow -->"
LEROBOT_REPO = "dql-agent/tiny-lerobot"
LEROBOT_FIXTURE = ROOT / "tests" / "data" / "lerobot" / "v3_cameras"
BUDGET = [  # (as written in README.md, as run here)
    ("total_timesteps=1_000_000", "total_timesteps=3"),
    ("learn(20_000", "learn(40"),
    ("total_timesteps=100_000", "total_timesteps=2"),
    ("n_eval_episodes=10", "n_eval_episodes=1"),
    ('gym.make("Hopper-v5"', 'gym.make("Hopper-v5", max_episode_steps=20'),  # push_to_hub evaluates 10 episodes
    ('render_mode="rgb_array"))', 'render_mode="rgb_array"), video_length=20)'),  # a frame takes ~0.15 s here
    ("n_episodes=200", "n_episodes=4"),  # the camera section's PixelReach dataset
    ("model.learn(3_000)", "model.learn(3)"),
    ("n_action_steps=2, n_obs_steps=2)", "n_action_steps=2, n_obs_steps=2, hidden_dim=16)"),  # exported below
]


def readme_snippets() -> list[tuple[int, str, bool]]:
    """(line number, code, slow) of every ```python block, in order."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, slow = i + 1, i > 0 and lines[i - 1].strip() == SLOW_TAG
            end = lines.index("```", start)
            found.append((start, "\n".join(lines[start:end]), slow))
            i = end
        i += 1
    return found


def as_run_here(code: str) -> str:
    for written, here in BUDGET:
        code = code.replace(written, here)
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    return code


def test_every_budget_edit_still_matches_the_readme():
    text = "\n".join(code for _, code, _ in readme_snippets())
    assert [written for written, _ in BUDGET if written not in text] == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the snippets expect: the Minari dataset they name and the demo's model."""
    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.integrations.minari import write_minari_dataset

    root = tmp_path_factory.mktemp("readme")
    env, rng, episodes = gym.make("Hopper-v5"), np.random.default_rng(0), []
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        for _ in range(40):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated or len(actions) == 40)
            if terminated or truncated:
                break
        truncations[-1] = not terminations[-1]
        episodes.append(
            {
                "observations": np.array(observations),
                "actions": np.array(actions),
                "rewards": np.array(rewards),
                "terminations": np.array(terminations),
                "truncations": np.array(truncations),
            }
        )
    import os

    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    try:
        write_minari_dataset(
            "mujoco/hopper/medium-v0",
            episodes,
            observation_space=env.observation_space,
            action_space=env.action_space,
            env_id="Hopper-v5",
        )
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    pendulum = gym.make("Pendulum-v1")
    obs = rng.normal(size=(64, 3)).astype(np.float32)
    buffer = OfflineBuffer(
        obs,
        rng.uniform(-2, 2, (64, 1)),
        rng.normal(size=64),
        obs,
        np.zeros(64, bool),
        action_space=pendulum.action_space,
    )
    DiffusionQL(buffer, env="Pendulum-v1", seed=0, device="cpu", hidden_dim=16, n_hidden=2).save(
        root / "dql_demo" / "model"
    )
    return root


def snippet_params() -> list:
    return [
        pytest.param(code, id=f"line-{line}", marks=[pytest.mark.slow] if slow else [])
        for line, code, slow in readme_snippets()
    ]


@pytest.mark.parametrize("code", snippet_params())
def test_readme_snippet_runs_as_written(code, workspace, hub_server, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(workspace / "minari"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the tracking snippet's W&B run, written locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    if LEROBOT_REPO in code:  # the LeRobot section reads a Hub dataset: the tests' fixture, uploaded
        from huggingface_hub import HfApi

        HfApi().create_repo(LEROBOT_REPO, repo_type="dataset")
        HfApi().upload_folder(folder_path=LEROBOT_FIXTURE, repo_id=LEROBOT_REPO, repo_type="dataset")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(as_run_here(code), "README.md", "exec"), namespace)  # noqa: S102  # our own README's code
