"""The OGBench chunk study's scripts, on a tiny budget: the generator writes OGBench's npz layout
that ogbench's own loader reads, and the study trains, evaluates and reports (issue 28)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

pytest.importorskip("ogbench")  # the ogbench extra; installed by make setup


def test_the_generator_writes_what_ogbench_reads_and_the_study_runs_and_reports(tmp_path, capsys):
    data_module = importlib.import_module("benchmarks.ogbench_data")
    study = importlib.import_module("benchmarks.ogbench_chunks")
    written = data_module.main(["--env", "cube-single", "--episodes", "2", "--max-steps", "30", "--out", str(tmp_path)])
    assert [p.name for p in written] == ["cube-single-play-v0.npz", "cube-single-play-v0-val.npz"]
    with np.load(written[0]) as data:
        assert data["observations"].shape == (60, 28) and data["actions"].shape == (60, 5)
        assert data["terminals"].sum() == 2 and np.abs(data["actions"]).max() <= 1.0
        assert data["qpos"].shape[0] == 60
    env, buffer = study.load(tmp_path, "cube-single", 1)
    assert len(buffer) == 58 and buffer.action_space == env.action_space  # each episode's last step has no successor
    out = tmp_path / "runs.jsonl"
    argv = ["--data", str(tmp_path), "--seeds", "0", "--steps", "4", "--episodes", "1", "--out", str(out)]
    records = study.main([*argv, "--configs", "dql-h5", "mlp-bc"])
    assert [r["config"] for r in records] == ["dql-h5", "mlp-bc"] and all(0 <= r["success"] <= 1 for r in records)
    assert study.main([*argv, "--configs", "dql-h5"]) == []  # done runs are not run again
    study.main(["--report", "--out", str(out)])
    assert "| cube-single (task 1) | 4 |" in capsys.readouterr().out
