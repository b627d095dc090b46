"""Each script in examples/ runs end to end with tiny budgets, against the fake Hub."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import imageio.v3 as iio
import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_TRAINING = [
    "--episodes",
    "2",
    "--reference-episodes",
    "2",
    "--steps",
    "20",
    "--hidden-dim",
    "16",
    "--batch-size",
    "32",
    "--n-eval-episodes",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks: one thread is fastest, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Minari folder; the env var the examples set is restored afterwards."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def test_train_push_evaluate_record(hub_server, data_dir, tmp_path, capsys):
    repo_id = "alice/dql-pendulum-example"
    url = load_example("train_and_push").main(
        ["--repo-id", repo_id, "--data-dir", str(data_dir), "--video-length", "10", *TINY_TRAINING]
    )
    repo = hub_server.repos[repo_id]
    head = repo.commits[repo.branches["main"]]
    assert url.endswith(head.oid)
    assert {"model.safetensors", "config.json", "README.md", "results.json", "replay.mp4"} <= set(head.files)
    results = json.loads(head.files["results.json"])
    assert results["dataset_id"] == "dql_agent/pendulum/mixed-v0"
    assert results["normalized_score"] is not None  # the demo dataset has reference scores

    mean, std = load_example("load_and_evaluate_sb3").main(
        [repo_id, "--n-eval-episodes", "2", "--n-envs", "2", "--device", "cpu"]
    )
    assert np.isfinite(mean) and std >= 0.0
    assert "DiffusionQL on Pendulum-v1: mean reward" in capsys.readouterr().out

    out = tmp_path / "video" / "rollout.mp4"
    path = load_example("record_rollout").main([repo_id, "--out", str(out), "--max-steps", "12", "--device", "cpu"])
    assert path == out
    frames = iio.imread(out, plugin="FFMPEG")
    assert frames.shape[0] == 12 and frames.std() > 1.0


def test_train_to_local_folder_then_record(data_dir, tmp_path):
    folder = tmp_path / "hub-folder"
    written = load_example("train_and_push").main(
        ["--local-dir", str(folder), "--data-dir", str(data_dir), "--no-video", *TINY_TRAINING]
    )
    assert Path(written) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "results.json"]
    out = load_example("record_rollout").main(
        [str(folder), "--out", str(tmp_path / "local.mp4"), "--max-steps", "5", "--episodes", "1", "--device", "cpu"]
    )
    assert iio.imread(out, plugin="FFMPEG").shape[0] == 5
