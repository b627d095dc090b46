"""Each script in examples/ runs end to end with tiny budgets (the Hub ones against the fake Hub)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL

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


def run_example(name: str, *args: str) -> str:
    """Run examples/<name>.py as a script, as a user would; returns its stdout."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_qvpo_pendulum(tmp_path):
    out = tmp_path / "qvpo"
    args = ["--steps", "60", "--learning-starts", "40", "--n-eval-episodes", "1", "--seed", "3"]
    stdout = run_example("train_qvpo_pendulum", *args, "--out-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert (results["env_steps"], results["learning_starts"]) == (60, 40)
    for key in ("mean_return_untrained", "mean_return", "mean_return_reloaded"):
        assert -16.3 * 200 <= results[key] <= 0.0, (key, results[key])  # Pendulum: 200 steps, reward in [-16.3, 0]
    # The reloaded model acts as the saved one, so it scores the same on the same seeded episodes.
    assert results["identical_actions_after_reload"] is True
    assert results["mean_return_reloaded"] == results["mean_return"]
    assert f"after 60 env steps (the first 40 random): mean return {results['mean_return']:.1f}" in stdout
    assert f"mean return {results['mean_return_reloaded']:.1f}, identical actions: True" in stdout

    from dql_agent import QVPO

    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    model = QVPO.load(out / "model", device="cpu")
    assert model.num_timesteps == 60 and model.metadata["env_id"] == "Pendulum-v1"
    # Same seed, same initial weights: the saved ones differ only because the 21 updates trained them.
    untrained = QVPO("Pendulum-v1", seed=3, device="cpu", **load_example("train_qvpo_pendulum").PENDULUM)
    saved, initial = model.policy.state_dict(), untrained.policy.state_dict()
    assert saved.keys() == initial.keys() and any(not torch.equal(saved[k], initial[k]) for k in saved)


def test_offline_diffusion_dice(tmp_path):
    out = tmp_path / "dice"
    args = ["--episodes", "2", "--reference-episodes", "2", "--steps", "20", "--hidden-dim", "16", "--batch-size", "32"]
    stdout = run_example("offline_diffusion_dice", *args, "--n-eval-episodes", "1", "--out-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["transitions"] == 4 * 200 and results["gradient_steps"] == 20
    assert results["random_return"] < results["noisy_half_return"] < results["good_half_return"]
    assert -16.3 * 200 <= results["mean_return"] <= 0.0
    score = 100 * (results["mean_return"] - results["random_return"])
    assert results["normalized_score"] == pytest.approx(
        score / (results["controller_return"] - results["random_return"])
    )
    assert results["identical_actions_after_reload"] is True
    assert f"after 20 gradient steps: mean return {results['mean_return']:.1f}" in stdout
    assert "identical deterministic actions: True" in stdout
    assert (out / "minari" / "dql_agent" / "pendulum" / "mixed-v0").is_dir()  # built locally, under --out-dir

    from dql_agent import DiffusionDICE

    model = DiffusionDICE.load(out / "model", device="cpu")
    assert model.num_timesteps == 20 and model.config.hidden_dim == 16
    assert model.metadata["dataset_id"] == "dql_agent/pendulum/mixed-v0"
    settings = dict(load_example("offline_diffusion_dice").SETTINGS, hidden_dim=16, batch_size=32)
    untrained = DiffusionDICE(env="Pendulum-v1", seed=0, device="cpu", **settings)  # same seed, same initial weights
    saved, initial = model.policy.state_dict(), untrained.policy.state_dict()
    assert saved.keys() == initial.keys() and any(not torch.equal(saved[k], initial[k]) for k in saved)


def check_episode(results: dict, stdout: str) -> None:
    """deploy_onnx's episode: a whole Pendulum episode, in range, in bounds, printed as written."""
    assert results["steps"] == 200
    assert np.isfinite(results["episode_return"]) and -16.3 * 200 <= results["episode_return"] <= 0.0
    assert (results["action_low"], results["action_high"]) == ([-2.0], [2.0])  # from the file's metadata
    assert results["actions_within_bounds"] is True
    assert -2.0 <= results["action_min"][0] <= results["action_max"][0] <= 2.0
    assert 0.0 < results["latency_ms_median"] <= results["latency_ms_p90"]
    assert f"return {results['episode_return']:.2f} over 200 steps" in stdout
    assert f"median {results['latency_ms_median']:.3f} ms, p90 {results['latency_ms_p90']:.3f} ms" in stdout
    assert f"within bounds {results['actions_within_bounds']}" in stdout


def test_deploy_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tiny = ["--episodes", "2", "--reference-episodes", "2", "--steps", "20", "--hidden-dim", "16", "--batch-size", "32"]
    out = tmp_path / "trained"
    stdout = run_example("deploy_onnx", *tiny, "--out-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    check_episode(results, stdout)
    assert results["deterministic"] is True and results["inputs"] == ["observation"]
    assert results["algorithm"] == "DiffusionQL" and results["max_abs_diff_vs_model"] < 1e-5
    assert f"{results['max_abs_diff_vs_model']:.1e}" in stdout

    # The model it saved, loaded as a local folder and exported stochastic: the loop feeds numpy noise.
    stochastic = tmp_path / "stochastic"
    stdout = run_example("deploy_onnx", str(out / "model"), "--stochastic", "--out-dir", str(stochastic))
    results = json.loads((stochastic / "results.json").read_text())
    check_episode(results, stdout)
    assert results["deterministic"] is False and results["inputs"] == ["observation", "noise", "uniform"]
    assert results["max_abs_diff_vs_model"] < 1e-5

    # The control loop alone, with torch and dql_agent made unimportable: same seed, same episode.
    alone = tmp_path / "alone"
    argv = ["deploy_onnx.py", "--policy", results["policy"], "--out-dir", str(alone)]
    code = (
        "import runpy, sys; sys.modules['torch'] = sys.modules['dql_agent'] = None; "
        f"sys.argv = {argv!r}; runpy.run_path({str(EXAMPLES / 'deploy_onnx.py')!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    alone_results = json.loads((alone / "results.json").read_text())
    check_episode(alone_results, run.stdout)
    assert alone_results["episode_return"] == results["episode_return"]
    assert alone_results["max_abs_diff_vs_model"] is None


def test_pixels(data_dir, tmp_path):
    out = tmp_path / "pixels"
    args = ["--episodes", "4", "--steps", "4", "--batch-size", "8", "--cnn-channels", "4", "--eval-episodes", "2"]
    results = load_example("pixels").main([*args, "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"])
    assert json.loads((out / "results.json").read_text()) == results
    data = results["dataset"]
    assert (data["n_noisy"], data["n_clean"]) == (2, 2)
    assert -31 <= results["policy_return"] <= 2  # 30 steps of -distance (<= 2 sqrt 2), or +1 on success
    assert results["reloaded_return"] == results["policy_return"]  # the saved model acts as the trained one
    assert iio.imread(results["video"], plugin="FFMPEG").shape[0] > 2


def test_train_distributed_on_two_ranks_then_resume_on_one(tmp_path):
    # the real torchrun, 2 CPU processes (gloo), bf16; then the resume on a world of one
    common = ["--hidden-dim", "32", "--episodes", "1", "--out", str(tmp_path)]

    def torchrun(ranks: int, *args: str) -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        result = subprocess.run(
            [*command, str(EXAMPLES / "train_distributed.py"), *args, *common],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    first = torchrun(2, "--steps", "20", "--precision", "bf16")
    assert first.count("saved ") == 1  # rank 0 alone saves and evaluates
    resumed = torchrun(1, "--steps", "10", "--resume", str(tmp_path / "model"))
    assert "after 30 steps" in resumed
    assert DiffusionQL.load(tmp_path / "model").config.precision == "bf16"
