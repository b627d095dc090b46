"""Smoke tests of the benchmark scripts with tiny budgets (the numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOPPER_ZIP = Path(__file__).resolve().parents[2] / "shared" / "agents" / "sac_Hopper.zip"  # ../shared beside the repo


def load_script(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_step_flops_match_the_hand_count():
    speed = load_script("speed")
    flops, passes = speed.step_flops(11, 3)
    # denoiser: 2*(30*256 + 2*256*256 + 256*3 + 16*32 + 32*16) per row; twin critics: 2*2*(14*256 + 2*256*256 + 256)
    d, c = 2 * (30 * 256 + 2 * 256 * 256 + 256 * 3 + 16 * 32 + 32 * 16), 4 * (14 * 256 + 2 * 256 * 256 + 256)
    expected = 256 * (5 * d + c + 3 * c + 3 * d + 3 * 5 * d + 2 * c)
    assert flops == expected
    assert 2.4e9 < flops < 2.6e9  # "about 2.6 GFLOP per step" at Hopper shapes (issue 4)
    assert len(passes) == 6
    mm = speed.step_matmuls(11, 3)
    assert sum(2 * m * k * n * count for (m, k, n), count in mm.items()) == flops


def test_speed_main_runs(tmp_path):
    speed = load_script("speed")
    out = tmp_path / "speed.json"
    results = speed.main(
        ["--seconds", "0.2", "--repeats", "1", "--threads", "1", "--problems", "hopper", "--out", str(out)]
    )
    hopper = results["hopper"]["dql_agent"]
    assert hopper["steps_per_s"] > 0 and hopper["predict_b1_ms"] > 0 and hopper["select_action_b16_ms"] > 0
    assert 0 < hopper["fraction_of_step_shapes"] < 2
    assert json.loads(out.read_text())["machine"]["torch_threads"] == 1


@pytest.mark.slow  # ~25 s: the deployment paths themselves are tested in test_export and the deploy example
def test_speed_deploy_runs(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    speed = load_script("speed")
    out = tmp_path / "speed.json"
    argv = ["--seconds", "0.2", "--repeats", "1", "--threads", "1", "--problems", "hopper", "--deploy"]
    deploy = speed.main([*argv, "--out", str(out)])["hopper"]["deploy"]
    paths = ("predict", "onnxruntime_1t", "onnxruntime_2t", "pt2")
    assert all(deploy[p]["b1_ms"] > 0 and deploy[p]["b16_ms"] > 0 for p in paths)
    assert set(deploy["ratios_vs_predict"]) == {f"{p}_b{b}" for p in paths[1:] for b in (1, 16)}
    assert "ratios_vs_official" not in deploy and "predict_compiled" not in deploy
    # The exported graphs act as predict(deterministic=True) (float32 rounding only).
    assert set(deploy["info"]["max_abs_diff_vs_predict"]) == set(paths[1:])
    assert max(deploy["info"]["max_abs_diff_vs_predict"].values()) < 1e-5
    assert set(deploy["info"]["file_bytes"]) == {".onnx", ".pt2"}
    assert json.loads(out.read_text())["hopper"]["deploy"]["pt2"]["b1_ms"] == deploy["pt2"]["b1_ms"]
    table = capsys.readouterr().out
    assert "| ONNX Runtime, 1 intra-op thread |" in table and "1 obs vs eager predict" in table


@pytest.mark.slow  # ~30 s of a 10-minute suite budget; the equivalence tests check the official step itself
@pytest.mark.skipif(not Path("/tmp/official/agents/ql_diffusion.py").exists(), reason="no official checkout")
def test_speed_against_the_official_code():
    speed = load_script("speed")
    argv = ["--seconds", "0.2", "--repeats", "1", "--threads", "1", "--problems", "hopper", "--deploy"]
    results = speed.main([*argv, "--reference", "/tmp/official"])
    assert results["hopper"]["official"]["steps_per_s"] > 0
    assert results["hopper"]["ratios"]["dql_agent_steps_per_s"] > 0
    deploy = results["hopper"]["deploy"]
    assert deploy["official"]["b1_ms"] > 0 and deploy["ratios_vs_official"]["onnxruntime_1t_b1"] > 0
    assert "agents" not in sys.modules or "official" not in str(getattr(sys.modules["agents"], "__file__", ""))


@pytest.fixture(scope="module")
def hopper_datasets(tmp_path_factory):
    pytest.importorskip("shimmy")
    if not HOPPER_ZIP.exists():
        pytest.skip(f"{HOPPER_ZIP} not present")
    datasets = load_script("datasets")
    root = tmp_path_factory.mktemp("minari")
    argv = [str(HOPPER_ZIP), "--steps", "300", "--ref-episodes", "1", "--out", str(root), "--namespace", "smoke"]
    return root, datasets.main(argv)


def test_datasets_main_writes_minari_datasets_with_reference_scores(hopper_datasets):
    import minari

    root, summaries = hopper_datasets
    assert set(summaries) == {f"smoke/hopper/{k}-v0" for k in ("expert", "medium", "medium-expert")}
    assert summaries["smoke/hopper/expert-v0"]["steps"] == 300
    assert summaries["smoke/hopper/medium-expert-v0"]["steps"] == 600
    dataset = minari.load_dataset("smoke/hopper/expert-v0")
    assert dataset.storage.metadata["ref_max_score"] > dataset.storage.metadata["ref_min_score"]
    assert dataset.total_steps == 300


def smoke_scores_argv(root: Path, out: Path, algos: list[str], extra: list[str]) -> list[str]:
    """scores.py arguments for a 20-step, 1-seed, 1-episode run on the smoke medium dataset."""
    budget = "--steps 20 --eval-every 10 --eval-episodes 1 --seeds 0 --threads 1".split()
    dataset = ["--minari-path", str(root), "--datasets", "smoke/hopper/medium-v0"]
    return [*dataset, "--algos", *algos, *budget, *extra, "--out", str(out)]


def test_scores_main_runs(hopper_datasets, tmp_path):
    scores = load_script("scores")
    root, _ = hopper_datasets
    bandit = "--bandit-ql-steps 10 --bandit-bc-steps 10 --bandit-td3bc-steps 10".split()
    variant = ["--dql-variant", 'ln={"critic_layer_norm": true}']
    results = scores.main(smoke_scores_argv(root, tmp_path, ["dql", "bc-diffusion", "bc-mlp"], [*bandit, *variant]))
    r = results["datasets"]["smoke/hopper/medium-v0"]
    assert set(r["mean"]) == {"dql", "bc-diffusion", "bc-mlp", "dql:ln"}
    assert [p["step"] for p in r["curves"]["dql"][0]] == [10, 20]
    for algo, curves in r["curves"].items():  # best of training is the best evaluation point
        assert r["best_scores"][algo] == [max(p["score"] for p in c) for c in curves]
        assert r["best_mean"][algo] >= r["mean"][algo]
    assert "Diffusion-QL ln" in (tmp_path / "scores.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra draws the figures
        assert (tmp_path / "curve_smoke_hopper_medium-v0.png").stat().st_size > 0
        assert (tmp_path / "bandit.png").stat().st_size > 0
    else:
        assert any("matplotlib is not installed" in note for note in results["notes"])


def test_scores_with_d3rlpy(hopper_datasets, tmp_path):
    pytest.importorskip("d3rlpy")
    scores = load_script("scores")
    root, _ = hopper_datasets
    results = scores.main(smoke_scores_argv(root, tmp_path, ["td3bc", "iql"], ["--bandit-ql-steps", "0"]))
    assert set(results["datasets"]["smoke/hopper/medium-v0"]["mean"]) == {"td3bc", "iql"}


def test_side_by_side_exact_tests_enumerate_every_split():
    side = load_script("side_by_side")
    t = side.exact_tests([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t["splits"] == 20 and t["mean_difference"] == -3.0
    assert t["permutation_p"] == pytest.approx(2 / 20)  # only the two extreme splits are as far apart
    assert (t["mann_whitney_u"], t["mann_whitney_p"]) == (0.0, pytest.approx(2 / 20))
    same = side.exact_tests([1.0, 2.0], [1.0, 2.0])
    assert same["permutation_p"] == 1.0 and same["mann_whitney_p"] == 1.0


def test_side_by_side_interval_inverts_the_permutation_test():
    side = load_script("side_by_side")
    low, high = side.shift_interval([11.0, 12.0, 13.0, 14.0, 15.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert low <= 10.0 <= high and low > 0.0  # the true shift is in; no shift (0) is rejected
    low, high = side.shift_interval([1.0, 3.0, 5.0, 7.0, 9.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    assert low < -1.0 < high  # the observed gap is -1
    assert side.shift_interval([1.0, 2.0, 3.0], [4.0, 5.0]) == (-math.inf, math.inf)  # 10 splits: p >= 0.2


def test_side_by_side_runs_resumes_and_reports(hopper_datasets, tmp_path, monkeypatch):
    side = load_script("side_by_side")
    root, _ = hopper_datasets
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    out = tmp_path / "runs.jsonl"
    common = ["--dataset", "smoke/hopper/medium-expert-v0", "--preset", "hopper-medium-expert", "--steps", "3"]
    common += ["--eval-episodes", "1", "--out", str(out)]
    side.main(["--impl", "ours", "--seeds", "0", "1", *common])
    side.main(["--impl", "ours", "--seeds", "0", "1", *common])  # both seeds done: nothing runs again
    runs = side.read_runs(out)
    assert [(r["impl"], r["seed"]) for r in runs] == [("ours", 0), ("ours", 1)]
    assert all(len(r["returns"]) == 1 and r["steps"] == 3 for r in runs)
    implementations = ["ours"]
    if Path("/tmp/official/agents/ql_diffusion.py").exists():  # the official side needs its checkout
        side.main(["--impl", "official", "--reference", "/tmp/official", "--seeds", "0", "1", *common])
        implementations.append("official")
    table = side.report(out)
    for impl in implementations:
        assert f"| {impl} | 2 |" in table
    assert ("exact permutation p" in table) == (len(implementations) == 2)


def test_stability_reports_best_final_gap_and_a_verdict(tmp_path):
    stability = load_script("stability")
    out = tmp_path / "stability.json"
    argv = ["--steps", "20", "--every", "10", "--seeds", "0", "1", "--eval-episodes", "1", "--set", "hidden_dim=16"]
    results = stability.main(
        [*argv, "--configs", "layernorm", "bogus", "--extra", 'bogus={"no_such_field": 1}', "--out", str(out)]
    )
    configs = results["datasets"]["pendulum-mixed"]["configs"]
    assert configs["bogus"]["available"] is False and "no_such_field" in configs["bogus"]["error"]
    for name in ("default", "layernorm"):
        for run in configs[name]["runs"]:
            returns = [p["return"] for p in run["points"]]
            assert len(returns) == 2 and run["best"] == max(returns) and run["final"] == returns[-1]
    assert "verdict" in configs["layernorm"] and json.loads(out.read_text())["table"] == results["table"]
