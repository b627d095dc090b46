"""Diffusion-QL learns from pixels (slow): on PixelReach, whose goal is only in the camera image,
6,000 gradient steps from a 48x48 image + agent position clearly beat random actions and the
dataset's noisy half. The default suite runs the same script with a tiny budget
(tests/test_examples.py::test_pixels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pixels.py"


@pytest.mark.slow
def test_diffusion_ql_from_pixels_beats_random_and_the_noisy_half(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("example_pixels", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--steps", "6000", "--out", str(tmp_path / "run"), "--device", "cpu", "--seed", "1"])
    data = results["dataset"]
    # measured (docs/BENCHMARKS.md, "Camera observations"): random -30.8, noisy half -14.1, clean -2.1
    assert results["policy_return"] > data["random_return"] + 15, results
    assert results["policy_return"] > data["noisy_return"] + 2, results
