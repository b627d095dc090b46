"""benchmarks/equivalence.py: DiffusionQL against the official Diffusion-QL step, same weights,
batches and random draws, for 1 and 30 steps (the 1,500-step run is in docs/BENCHMARKS.md).

Needs a checkout of Zhendong-Wang/Diffusion-Policies-for-Offline-RL at /tmp/official, as the
speed test against the official code in tests/test_benchmarks.py does; skipped without one."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path("/tmp/official")

pytestmark = pytest.mark.skipif(
    not (OFFICIAL / "agents" / "ql_diffusion.py").exists(),
    reason="no official checkout at /tmp/official (Zhendong-Wang/Diffusion-Policies-for-Offline-RL)",
)
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
# Only the paths a test names: the compiled and stacked paths and the control are off unless asked for.
ONLY_PLAIN = ["--compile-steps", "0", "--stack-steps", "0", "--no-control"]


def load_equivalence():
    return importlib.import_module("benchmarks.equivalence")


def run(*argv: str, module=None) -> dict:
    module = module or load_equivalence()
    return module.main(["--reference", str(OFFICIAL), "--threads", "1", "--act-observations", "4", *argv])


def at(results: dict, variant: str, step: int) -> dict:
    return results["runs"][variant]["checkpoints"][str(step)]


def test_plain_step_matches_the_official_step():
    # default and early EMA (EMA from step 10): 30 steps; max-Q backup: 1 step. The eager path only.
    results = run("--steps", "1", "30", "--max-q-steps", "1", "--ema-steps", "30", *ONLY_PLAIN)
    assert results["ok"], f"largest entry / bound {results['worst_ratio_to_bound']:.2f}"
    plain = at(results, "default", 30)["plain"]
    groups = {"actor", "ema_actor", "critic", "critic_target", "actor grad", "critic grad", "losses"}
    assert set(plain) == groups | {"acting: candidate probs", "acting: picked action"}
    # Without the control every entry is held to the tolerance itself (1e-3); measured: <= 1e-4.
    assert all(entry["bound"] == 1e-3 for entry in plain.values())
    assert at(results, "early EMA", 30)["plain"]["ema_actor"]["max_rel_diff"] > 0  # the EMA actor has moved
    assert set(at(results, "max-Q backup", 1)) == {"plain", "official_losses"}
    assert "agents" not in sys.modules or "official" not in str(getattr(sys.modules["agents"], "__file__", ""))


def test_the_harness_reports_a_flipped_critic_coin(monkeypatch):
    # Control of the harness: one wrong draw (the critics' roles swapped in the actor's Q-term) fails the run.
    equivalence = load_equivalence()
    replayed = equivalence.replayed_inputs

    def flipped(draws, max_q):
        next_noise, noise = replayed(draws, max_q)
        return next_noise, noise._replace(coin=~noise.coin)

    monkeypatch.setattr(equivalence, "replayed_inputs", flipped)
    results = run("--steps", "1", "--max-q-steps", "--ema-steps", *ONLY_PLAIN, module=equivalence)
    assert not results["ok"]
    plain = at(results, "default", 1)["plain"]
    assert plain["actor grad"]["max_rel_diff"] > 0.1 and plain["losses"]["largest_at"] == "actor_loss"
    assert plain["critic grad"]["max_rel_diff"] < 1e-4  # the critic half does not see the coin


@pytest.mark.slow
def test_the_harness_reports_an_ema_schedule_off_by_one(monkeypatch):
    # The early-EMA run catches an EMA updated one step late (measured: ema_actor 4.5e-3 against 1e-3).
    from dql_agent import DiffusionQL

    update_targets = DiffusionQL.update_targets

    def one_step_late(self):
        self.n_updates -= 1
        try:
            update_targets(self)
        finally:
            self.n_updates += 1

    monkeypatch.setattr(DiffusionQL, "update_targets", one_step_late)
    results = run("--steps", "1", "--max-q-steps", "--ema-steps", "30", *ONLY_PLAIN)
    assert not results["ok"]
    assert at(results, "early EMA", 30)["plain"]["ema_actor"]["max_rel_diff"] > 2e-3


@pytest.mark.slow
def test_stacked_seeds_match_the_official_step():
    # SeedStack (train_seeds' engine), replica 0 replaying the official draws; every variant, 1 and 30
    # steps; with the control (a second official agent one ulp off), which also bounds the entries.
    argv = ["--steps", "1", "30", "--max-q-steps", "1", "30", "--ema-steps", "1", "30", "--compile-steps", "0"]
    results = run(*argv)
    assert results["ok"], f"largest entry / bound {results['worst_ratio_to_bound']:.2f}"
    for variant in ("default", "max-Q backup", "early EMA"):
        assert set(at(results, variant, 30)) == {"plain", "stacked", "control", "official_losses"}


@pytest.mark.slow
@needs_compiler
def test_compiled_training_matches_the_official_step():
    # compile_training() (torch.compile: about a minute to compile on this CPU), 1 and 30 steps.
    argv = ["--steps", "1", "30", "--max-q-steps", "1", "30", "--ema-steps", "30", "--stack-steps", "0"]
    results = run(*argv, "--no-control", "--compile-steps", "30")
    assert results["ok"], f"largest entry / bound {results['worst_ratio_to_bound']:.2f}"
    for variant in ("default", "max-Q backup", "early EMA"):
        assert set(at(results, variant, 30)) == {"plain", "compiled", "official_losses"}
