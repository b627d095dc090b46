"""Behaviour pinned bit for bit: training, logging and acting against stored outputs (CPU).

The stored outputs (``tests/data/regression.json``) and checkpoints (``tests/data/checkpoints``)
were written by ``tests/regression_cases.py``; see there for what each case covers and how to
regenerate them after a deliberate change of behaviour.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from regression_cases import CASES, CHECKPOINTS, STORED, fingerprint, resume_case, run_case

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stored() -> dict:
    return json.loads(STORED.read_text())["cases"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions must split the same way as when the outputs were stored
    yield
    torch.set_num_threads(threads)


def assert_same(found: dict, expected: dict) -> None:
    assert found["weights"] == expected["weights"], [
        k for k in expected["weights"] if found["weights"].get(k) != expected["weights"][k]
    ]
    for key in ("predict_deterministic", "predict_stochastic_seed_123", "predict_single"):
        np.testing.assert_array_equal(np.array(found[key]), np.array(expected[key]), err_msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_training_logging_and_acting_match_the_stored_outputs(name, stored, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model, outputs = run_case(name)
    assert outputs["logged"] == stored[name]["logged"]
    assert_same(outputs, stored[name])
    # What is saved is what the run produced: loading loses nothing.
    model.save(tmp_path / "m", include_optimizer=True)
    assert_same(fingerprint(type(model).load(tmp_path / "m", device="cpu")), stored[name])


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_saved_by_earlier_code_load_act_and_resume(name, stored):
    outputs = resume_case(name, CHECKPOINTS / name)
    # The earlier release's model loads as it was saved (its training may predate a deliberate
    # change of behaviour, so it is compared with what was recorded when it was written).
    assert_same(outputs["loaded"], stored[name]["loaded"])
    assert outputs["resumed"]["logged"] == stored[name]["resumed"]["logged"]
    assert_same(outputs["resumed"], stored[name]["resumed"])


def test_the_fingerprint_sees_a_one_ulp_change(stored):
    """The guard can fail: nudging one weight by one float32 ulp changes the stored hash."""
    from regression_cases import agent_class

    model = agent_class("dql").load(CHECKPOINTS / "dql", device="cpu")
    with torch.no_grad():
        weight = next(model.policy.parameters())
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1e9))
    assert fingerprint(model)["weights"] != stored["dql"]["weights"]
