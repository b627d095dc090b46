"""benchmarks/gpu_check.py, the one command for a lent GPU: its dry run on the CPU, and its refusal."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real")
def test_without_cuda_it_refuses_to_start_and_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--out", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "pass --dry-run" in err
    assert not (tmp_path / "gpu_check.json").exists()


def check_report(out, compiled: bool) -> dict:
    report = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    assert report["dry_run"] and "Dry run on the CPU" in table
    # the CUDA tests were collected (the CPU has none to run): every phase reported
    assert report["cuda_tests"]["returncode"] == 0 and "tests collected" in report["cuda_tests"]["summary"]
    speed = report["training_speed"]
    assert speed["eager_fp32"] > 0 and speed["eager_bf16"] > 0
    assert ("compiled_bf16" in speed) == compiled
    assert report["packed_seeds"]["five_over_one"] > 0
    assert report["acting_latency"]["eager"]["median_ms"] > 0
    assert ("cuda_graphs" in report["acting_latency"]) == compiled
    assert report["camera_model"]["bf16_over_fp32"] > 0
    for row in ("| eager fp32 |", "| eager bf16 |", "`train_seeds`", "| eager |", "Camera model"):
        assert row in table
    return report


def test_the_dry_run_exercises_every_phase_on_the_cpu(tmp_path):
    report = check_report_run(tmp_path, ["--skip-compile"])
    assert "training_speed.compiled_fp32" in report["skipped"]


@pytest.mark.slow  # about 2 minutes: torch.compile of each variant on the CPU
def test_the_dry_run_with_the_compiled_variants(tmp_path):
    report = check_report_run(tmp_path, [])
    assert report["acting_latency"]["cuda_graphs"]["median_ms"] > 0


def check_report_run(tmp_path, extra: list[str]) -> dict:
    gpu_check.main(["--out", str(tmp_path), "--dry-run", *extra])
    return check_report(tmp_path, compiled=not extra)
