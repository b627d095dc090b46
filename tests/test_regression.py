"""Behaviour pinned against stored outputs: training, logging and acting (CPU, one thread).

Two guarantees, kept apart (see ``tests/regression_cases.py`` for the cases, the kernel paths
measured and how to regenerate after a deliberate change):

- against the stored floats, within tolerances measured over this torch's kernel paths (other
  CPUs round differently), and bit for bit where this machine is the one that wrote them;
- within this process, bit for bit: what a run saves loads back exactly.

The last tests make real changes of behaviour (a changed default, a dropped and a sign-flipped
loss term, a 1e-3 relative change of one weight, a reordered random draw) and show the guard
failing on each.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from tests.regression_cases import (
    ACTION_KEYS,
    CASES,
    CEILING,
    CHECKPOINTS,
    KINDS,
    RESUME_STEPS,
    TOLERANCES,
    agent_class,
    attach_data,
    deviations,
    fingerprint,
    load_stored,
    machine,
    resume_case,
    run_case,
    sha256,
    train,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    return load_stored()


@pytest.fixture(scope="module")
def tolerances() -> dict[str, Any]:
    return json.loads(TOLERANCES.read_text())["tolerances"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions must split the same way as when the outputs were stored
    yield
    torch.set_num_threads(threads)


def same_machine(stored: dict[str, Any]) -> bool:
    """This machine is the one that wrote the stored outputs (torch, kernel path, BLAS, CPU)."""
    return machine() == stored["machine"]


def mismatches(found: dict[str, Any], expected: dict[str, Any], tolerance: dict[str, float], exact: bool) -> list[str]:
    """What of one stage's outputs is outside its tolerance (and, with ``exact``, not bit-equal)."""
    out = [
        f"{kind}: {where} deviates by {value:.3g} (tolerance {tolerance[kind]:.3g})"
        for kind, (value, where) in deviations(found, expected).items()
        if value > tolerance[kind]
    ]
    if exact:
        hashes = {key: sha256(tensor) for key, tensor in found["weights"].items()}
        if hashes != expected["weights_sha256"]:
            out.append(
                f"weights not bit-equal: {[k for k in hashes if hashes[k] != expected['weights_sha256'].get(k)]}"
            )
        for key in ACTION_KEYS:
            if found["actions"][key] != expected["actions"][key]:
                out.append(f"{key} not bit-equal")
        if "logged" in expected and found["logged"] != expected["logged"]:
            out.append("logged values not bit-equal")
    return out


def assert_bit_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for key in ACTION_KEYS:
        np.testing.assert_array_equal(np.array(a["actions"][key]), np.array(b["actions"][key]), err_msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_training_logging_and_acting_match_the_stored_outputs(name, stored, tolerances, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model, run = run_case(name)
    expected = stored["cases"][name]["run"]
    assert not mismatches(run, expected, tolerances[name]["run"], exact=same_machine(stored))
    # Within this process, bit for bit: what is saved is what the run produced.
    model.save(tmp_path / "m", include_optimizer=True)
    assert_bit_equal(fingerprint(type(model).load(tmp_path / "m", device="cpu")), run)


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_saved_by_earlier_code_load_act_and_resume(name, stored, tolerances):
    outputs = resume_case(name, CHECKPOINTS / name)
    expected = stored["cases"][name]
    exact = same_machine(stored)
    # Loading is a copy, equal on every machine: the weights match by hash.
    loaded_hashes = {key: sha256(tensor) for key, tensor in outputs["loaded"]["weights"].items()}
    assert loaded_hashes == expected["loaded"]["weights_sha256"]
    loaded = {"actions": outputs["loaded"]["actions"], "weights": {}}
    assert not mismatches(
        loaded, {**expected["loaded"], "weights_sha256": {}}, tolerances[name]["loaded"], exact=exact
    ), "the loaded model acts differently"
    assert not mismatches(outputs["resumed"], expected["resumed"], tolerances[name]["resumed"], exact=exact)


OFFLINE = [name for name in CASES if CASES[name]["algo"] != "QVPO"]  # QVPO's resumed run starts a new episode


@pytest.mark.parametrize("name", OFFLINE)
def test_an_old_checkpoint_resumed_in_two_legs_equals_one_leg_bit_for_bit(name, tmp_path):
    """Within this process: interrupting the resumed run with a save changes nothing."""
    one_leg = resume_case(name, CHECKPOINTS / name)["resumed"]
    model = agent_class(name).load(CHECKPOINTS / name, device="cpu")
    attach_data(name, model)
    train(name, model, RESUME_STEPS // 2, reset=False)
    model.save(tmp_path / "half", include_optimizer=True)
    model = agent_class(name).load(tmp_path / "half", device="cpu")
    attach_data(name, model)
    train(name, model, RESUME_STEPS - RESUME_STEPS // 2, reset=False)
    assert_bit_equal(fingerprint(model), one_leg)


def test_the_tolerances_were_measured_over_every_kernel_path_and_sit_below_a_real_change():
    measured = json.loads(TOLERANCES.read_text())
    assert len(measured["paths"]) >= 4 and {} in [path["env"] for path in measured["paths"]]
    for name in CASES:
        for stage, kinds in measured["tolerances"][name].items():
            assert set(kinds) <= set(KINDS), (name, stage)
            assert all(0 < value <= CEILING < 1e-3 for value in kinds.values()), (name, stage, kinds)


def test_the_exact_check_sees_a_one_ulp_change(stored):
    """Where the machine is the same, one float32 ulp of one weight is already a failure."""
    model = agent_class("dql").load(CHECKPOINTS / "dql", device="cpu")
    with torch.no_grad():
        weight = next(model.policy.parameters())
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1e9))
    hashes = {key: sha256(tensor) for key, tensor in fingerprint(model)["weights"].items()}
    assert hashes != stored["cases"]["dql"]["loaded"]["weights_sha256"]


# Real changes of behaviour: each must fail the tolerance check (exact=False: any machine). --------
def run_changed(monkeypatch: pytest.MonkeyPatch, change: str) -> dict[str, Any]:
    """The 'dql' case's run outputs with one deliberate change of behaviour."""
    import dql_agent.diffusion_ql as dql

    overrides: dict[str, Any] = {}
    if change == "changed default: gamma 0.99 -> 0.95":
        overrides["gamma"] = 0.95
    elif change == "changed default: learning_rate +10%":
        overrides["learning_rate"] = 3.3e-4
    elif change == "dropped Q term of the actor loss":
        original = dql.actor_loss

        def dropped_actor_loss(policy, cfg, batch, noise):
            cfg = copy.copy(cfg)  # the agent drew its noise for eta > 0; only the loss changes
            object.__setattr__(cfg, "eta", 0.0)
            return original(policy, cfg, batch, noise)

        monkeypatch.setattr(dql, "actor_loss", dropped_actor_loss)
    elif change == "sign-flipped Q term of the actor loss":
        original_flip = dql.actor_loss

        def flipped_actor_loss(policy, cfg, batch, noise):
            # The actor sees -Q (its normaliser |Q| is unchanged): q_loss changes sign.
            critic, forward = policy.critic, policy.critic.forward
            critic.forward = lambda *inputs: -forward(*inputs)
            try:
                return original_flip(policy, cfg, batch, noise)
            finally:
                del critic.forward

        monkeypatch.setattr(dql, "actor_loss", flipped_actor_loss)
    elif change == "dropped bootstrap term of the TD target":
        original_critic = dql.critic_loss

        def changed_critic_loss(policy, cfg, batch, next_noise):
            cfg = copy.copy(cfg)
            object.__setattr__(cfg, "gamma", 0.0)
            return original_critic(policy, cfg, batch, next_noise)

        monkeypatch.setattr(dql, "critic_loss", changed_critic_loss)
    elif change == "reordered random draw (BC noise before its steps)":

        def reordered_actor_inputs(self):
            cfg, rows, dim = self.config, self.config.batch_size, self.policy.action_dim
            coin = torch.rand((), generator=self.coin_generator) > 0.5
            bc_noise = torch.randn((rows, dim), generator=self.generator)
            t = torch.randint(0, cfg.diffusion_steps, (rows,), generator=self.generator)
            chain = torch.randn((cfg.diffusion_steps, rows, dim), generator=self.generator)
            return dql.ActorNoise(t, bc_noise, chain, coin)

        monkeypatch.setattr(dql.DiffusionQL, "actor_inputs", reordered_actor_inputs)
    else:
        raise AssertionError(change)
    return run_case("dql", **overrides)[1]


CHANGES = [
    "changed default: gamma 0.99 -> 0.95",
    "changed default: learning_rate +10%",
    "dropped Q term of the actor loss",
    "sign-flipped Q term of the actor loss",
    "dropped bootstrap term of the TD target",
    "reordered random draw (BC noise before its steps)",
]


@pytest.mark.parametrize("change", CHANGES)
def test_a_real_change_of_behaviour_fails_the_tolerances(change, stored, tolerances, monkeypatch):
    found = run_changed(monkeypatch, change)
    assert mismatches(found, stored["cases"]["dql"]["run"], tolerances["dql"]["run"], exact=False), change


def test_the_unchanged_run_passes_the_same_check(stored, tolerances):
    """The control for the changes above: the same check, no change, no mismatch."""
    _, found = run_case("dql")
    assert not mismatches(found, stored["cases"]["dql"]["run"], tolerances["dql"]["run"], exact=False)


@pytest.mark.parametrize("where", ["largest", "typical"])
def test_a_1e_3_relative_change_of_one_weight_fails_the_tolerances(where, stored, tolerances):
    _, found = run_case("dql")
    weights = dict(found["weights"])
    key = "actor.denoiser.layers.0.weight" if "actor.denoiser.layers.0.weight" in weights else sorted(weights)[0]
    tensor = weights[key].clone()
    flat = tensor.view(-1)
    order = flat.abs().argsort()
    index = int(order[-1] if where == "largest" else order[len(order) // 2])  # the largest, or the median magnitude
    flat[index] *= 1 + 1e-3
    weights[key] = tensor
    failures = mismatches({**found, "weights": weights}, stored["cases"]["dql"]["run"], tolerances["dql"]["run"], False)
    assert failures and all(failure.startswith("weights") for failure in failures), failures
