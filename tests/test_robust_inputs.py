"""Bad data and bad observations get clear errors (property-based where inputs vary).

Each test case that feeds one adversarial input carries ``bad_input(category, outcome)``.
"""

import re

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dql_agent import DiffusionQL, OfflineBuffer
from tests.settings import TINY

KEYS = ("observations", "actions", "rewards", "next_observations")
DATA_ERROR = pytest.mark.bad_input("data", "clear error")
DATA_OK = pytest.mark.bad_input("data", "correct behaviour")
PREDICT_ERROR = pytest.mark.bad_input("predict", "clear error")
PREDICT_OK = pytest.mark.bad_input("predict", "correct behaviour")


def arrays(n=20):
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, 3)),
        "actions": rng.uniform(-1, 1, (n, 2)),
        "rewards": rng.normal(size=n),
        "next_observations": rng.normal(size=(n, 3)),
        "terminals": np.zeros(n),
    }


@DATA_ERROR
@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(KEYS),
    rows=st.sets(st.integers(0, 19), min_size=1, max_size=6),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_nonfinite_values_are_reported_with_key_and_rows(key, rows, value):
    data = arrays()
    data[key] = data[key].astype(np.float64)
    for row in rows:
        data[key][row] = value
    with pytest.raises(ValueError, match=rf"^{key} has NaN/inf in {len(rows)} row\(s\) \(first at row {min(rows)}\)"):
        OfflineBuffer(**data)


@DATA_ERROR
@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(KEYS + ("terminals",)), n=st.integers(0, 40).filter(lambda n: n != 20))
def test_length_mismatches_name_the_key(key, n):
    data = arrays()
    data[key] = data[key][:n] if n < 20 else np.concatenate([data[key]] * 2)[:n]
    with pytest.raises(ValueError, match="rows, expected|empty|has 0 rows"):
        OfflineBuffer(**data)


@DATA_OK
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.float16, np.float64, bool])
def test_any_numeric_observation_dtype_is_converted(dtype):
    data = arrays()
    data["observations"] = (data["observations"] * 3).astype(dtype)
    buffer = OfflineBuffer(**data)
    assert buffer.observations.dtype.is_floating_point


# predict --------------------------------------------------------------------------------------
@PREDICT_ERROR
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3))
def test_predict_rejects_every_wrong_shape(tiny_model, shape):
    shape = tuple(shape)
    if shape in ((3,),) or (len(shape) == 2 and shape[1] == 3):
        return  # valid single or batch
    with pytest.raises(ValueError, match=rf"observation has shape \({', '.join(map(str, shape))},?\); expected \(3,\)"):
        tiny_model.predict(np.zeros(shape, np.float32))


@PREDICT_ERROR
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 5), value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_predict_rejects_nonfinite_observations(tiny_model, position, value):
    obs = np.zeros((2, 3), np.float32)
    obs.flat[position] = value
    with pytest.raises(ValueError, match=r"observation contains 1 NaN/inf value\(s\)"):
        tiny_model.predict(obs)


@PREDICT_OK
@pytest.mark.parametrize("obs", [np.zeros(3, np.int64), np.zeros(3, np.float64), np.zeros(3, np.float16), [0, 0, 0]])
def test_predict_accepts_numeric_dtypes_and_lists(tiny_model, obs):
    assert tiny_model.predict(obs, deterministic=True)[0].shape == (1,)


@PREDICT_ERROR
@pytest.mark.parametrize(
    "obs, error, match",
    [
        (np.array(["a", "b", "c"]), TypeError, "observation must be numeric \\(bool, int or float\\), got dtype <U1"),
        ((np.zeros(3), {}), ValueError, r"\(obs, info\) tuple"),
        (
            np.zeros(3, np.complex64) + 1j,
            TypeError,
            "observation must be numeric \\(bool, int or float\\), got dtype complex64: complex",
        ),
        (np.zeros(3, object), TypeError, "observation must be numeric \\(bool, int or float\\), got dtype object"),
        (
            torch.zeros(3, dtype=torch.complex64),
            TypeError,
            "observation must be numeric \\(bool, int or float\\), got dtype complex64",
        ),
    ],
    ids=["strings", "info-tuple", "complex", "object", "complex-tensor"],
)
def test_predict_rejects_non_numeric_observations_and_info_tuples(tiny_model, obs, error, match):
    with pytest.raises(error, match=match):
        tiny_model.predict(obs)


# data: dtypes, float32 range, flags ------------------------------------------------------------
@DATA_ERROR
@pytest.mark.parametrize("value", [1e39, -1e39, float(np.finfo(np.float64).max)])
@pytest.mark.parametrize("key", KEYS)
def test_values_beyond_float32_are_refused_not_stored_as_inf(key, value):
    data = arrays()
    data[key][4] = value  # finite in float64, inf once cast to float32
    with pytest.raises(
        ValueError,
        match=rf"^{key} has values too large for float32 in 1 row\(s\) \(first at row 4\), "
        rf"e\.g\. {re.escape(repr(value))} at {key}\[4",
    ):
        OfflineBuffer(**data)


@DATA_OK
def test_values_just_inside_float32_are_kept():
    data = arrays()
    data["rewards"][4] = float(np.finfo(np.float32).max)
    assert OfflineBuffer(**data).rewards[4] == float(np.finfo(np.float32).max)


RECAST = {
    "complex": lambda a: a + 1j,
    "complex64": lambda a: (a + 1j).astype(np.complex64),
    "object": lambda a: a.astype(object),
    "str": lambda a: a.astype(str),
}


@DATA_ERROR
@pytest.mark.parametrize(
    "key, kind, dtype",
    [
        *[(key, "complex", "complex128") for key in (*KEYS, "terminals", "timeouts")],
        ("observations", "complex64", "complex64"),
        ("observations", "object", "object"),
        ("terminals", "object", "object"),
        ("actions", "str", "<U"),
        ("timeouts", "str", "<U"),
    ],
)
def test_complex_object_and_string_arrays_are_refused(key, kind, dtype):
    data = {**arrays(), "timeouts": np.zeros(20)}
    data[key] = RECAST[kind](data[key])
    with pytest.raises(TypeError, match=rf"^{key} must be numeric \(bool, int or float\), got dtype {dtype}"):
        OfflineBuffer(**data)


@DATA_ERROR
@pytest.mark.parametrize(
    "value, shown", [(np.nan, "nan"), (0.3, "0.3"), (np.inf, "inf"), (-np.inf, "-inf"), (-2, "-2"), (2, "2")]
)
@pytest.mark.parametrize("key", ["terminals", "timeouts"])
def test_flags_other_than_0_and_1_are_refused(key, value, shown):
    data = {**arrays(), "timeouts": np.zeros(20)}
    flags = np.zeros(20, np.int64 if isinstance(value, int) else np.float64)
    flags[[3, 7]] = value
    data[key] = flags
    with pytest.raises(
        ValueError, match=rf"^{key} must be bool or hold only 0 and 1, got {shown} at row 3 \(2 row\(s\) hold"
    ):
        OfflineBuffer(**data)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.uint8, bool])
def test_numeric_0_1_flags_become_bool(dtype):
    data = arrays()
    data["terminals"] = (np.arange(20) % 4 == 3).astype(dtype)
    buffer = OfflineBuffer(**data, timeouts=(np.arange(20) % 4 == 1).astype(dtype))
    assert buffer.terminals.dtype == torch.bool and buffer.terminals.tolist() == (np.arange(20) % 4 == 3).tolist()
    assert buffer.timeouts.tolist() == (np.arange(20) % 4 == 1).tolist()


@DATA_OK
def test_a_row_both_terminal_and_timeout_is_terminal():
    data = arrays()
    data["terminals"] = np.eye(20)[[3, 9]].sum(0)
    buffer = OfflineBuffer(**data, timeouts=np.eye(20)[[3, 15]].sum(0))
    assert np.flatnonzero(buffer.terminals.numpy()).tolist() == [3, 9]
    assert np.flatnonzero(buffer.timeouts.numpy()).tolist() == [15]
    assert buffer.sample(200, torch.Generator().manual_seed(0)).not_dones.min() == 0.0


@DATA_OK
def test_raw_d4rl_row_both_terminal_and_timeout_is_kept_as_terminal():
    # episode 1: rows 0-2, its last row terminated and truncated at once; episode 2: rows 3-5
    data = {
        "observations": np.arange(6.0)[:, None],
        "actions": np.zeros((6, 1)),
        "rewards": np.arange(6.0),
        "terminals": np.array([0, 0, 1, 0, 0, 1]),
        "timeouts": np.array([0, 0, 1, 0, 0, 0]),
    }
    buffer = OfflineBuffer.from_d4rl(data)
    assert buffer.observations[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert buffer.terminals.tolist() == [False, False, True, False, False, True]
    assert not buffer.timeouts.any()


# data: raw D4RL without next_observations ---------------------------------------------------------
def raw_d4rl(n=6):
    return {
        "observations": np.arange(n * 2, dtype=np.float64).reshape(n, 2),
        "actions": np.zeros((n, 1)),
        "rewards": np.ones(n),
        "terminals": np.zeros(n, bool),
        "timeouts": np.eye(n, dtype=bool)[n - 1] if n else np.zeros(0, bool),
    }


@DATA_ERROR
@pytest.mark.parametrize(
    "change, match",
    [
        ({"terminals": np.zeros(5, bool)}, r"^terminals has shape \(5,\), expected 6 rows like observations \(6, 2\)"),
        ({"timeouts": np.zeros(7, bool)}, r"^timeouts has shape \(7,\), expected 6 rows like observations \(6, 2\)"),
        ({"actions": np.zeros((5, 1))}, r"^actions has shape \(5, 1\), expected 6 rows like observations \(6, 2\)"),
        ({"rewards": np.float64(1.0)}, r"^rewards has shape \(\), expected 6 rows like observations \(6, 2\)"),
        ({"observations": np.zeros((0, 2))}, r"^the dataset is empty: observations has shape \(0, 2\)"),
        ({"observations": np.float64(3.0)}, r"^observations must have a first axis of rows, got a scalar"),
        ({"terminals": np.array([0, 0, np.nan, 0, 0, 0])}, r"^terminals must be bool or hold only 0 and 1, got nan"),
        (
            {"timeouts": np.array([0, 0, 0, 0, 0, 0.5])},
            r"^timeouts must be bool or hold only 0 and 1, got 0\.5 at row 5",
        ),
        ({"rewards": np.array([1, 1, 1e39, 1, 1, 1])}, r"^rewards has values too large for float32 .* 1e\+39"),
    ],
    ids=[
        "terminals-short",
        "timeouts-long",
        "actions-short",
        "rewards-scalar",
        "empty",
        "observations-scalar",
        "terminals-nan",
        "timeouts-half",
        "rewards-1e39",
    ],
)
def test_raw_d4rl_bad_arrays_name_the_key_and_shapes(change, match):
    with pytest.raises(ValueError, match=match):
        OfflineBuffer.from_d4rl({**raw_d4rl(), **change})


@DATA_OK
def test_raw_d4rl_with_1d_observations_loads():
    buffer = OfflineBuffer.from_d4rl({**raw_d4rl(), "observations": np.arange(6.0)})
    assert buffer.observations[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert buffer.next_observations[:, 0].tolist() == [1, 2, 3, 4, 5]


def _garbage(path):
    path.write_bytes(b"this is not a dataset\n" * 10)


def _empty(path):
    path.write_bytes(b"")


def _npy_named_npz(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def _object_npz(path):
    with open(path, "wb") as f:
        np.savez(f, observations=np.array([{"a": 1}], dtype=object))


def _truncated_hdf5(path):
    with h5py.File(path, "w") as f:
        for key, value in raw_d4rl().items():
            f[key] = value
    path.write_bytes(path.read_bytes()[:200])


@DATA_ERROR
@pytest.mark.parametrize(
    "name, write",
    [
        ("data.hdf5", _garbage),
        ("data.h5", _garbage),
        ("data.npz", _garbage),
        ("data.hdf5", _empty),
        ("data.npz", _empty),
        ("data.npz", _npy_named_npz),
        ("data.npz", _object_npz),
        ("data.hdf5", _truncated_hdf5),
    ],
    ids=[
        "garbage-hdf5",
        "garbage-h5",
        "garbage-npz",
        "empty-hdf5",
        "empty-npz",
        "npy-as-npz",
        "pickle-npz",
        "cut-hdf5",
    ],
)
def test_unreadable_d4rl_files_name_the_path(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a readable HDF5/NPZ dataset: "):
        OfflineBuffer.from_d4rl(path)


# predict: batches, Dict entries, tensors, non-finite outputs --------------------------------------
DICT_SPACE = gym.spaces.Dict(
    {"a": gym.spaces.Box(-1, 1, (2, 3), np.float32), "b": gym.spaces.Box(-1, 1, (4,), np.float32)}
)


@pytest.fixture(scope="module")
def dict_model():
    """An untrained tiny DiffusionQL on a Dict space {'a': (2, 3), 'b': (4,)} with (2,) actions."""
    return DiffusionQL(
        observation_space=DICT_SPACE, action_space=gym.spaces.Box(-2, 2, (2,), np.float32), seed=0, device="cpu", **TINY
    )


@PREDICT_OK
def test_predict_on_an_empty_batch_returns_no_actions(tiny_model):
    actions, state = tiny_model.predict(np.zeros((0, 3), np.float32), state="s", deterministic=True)
    assert actions.shape == (0, 1) and actions.dtype == tiny_model.action_space.dtype and state == "s"


@PREDICT_OK
def test_predict_on_an_empty_dict_batch_returns_no_actions(dict_model):
    actions, _ = dict_model.predict({"a": np.zeros((0, 2, 3)), "b": np.zeros((0, 4))})
    assert actions.shape == (0, 2)


@PREDICT_ERROR
@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"a": (2, 3), "b": (5,)}, r"observation\['b'\] has shape \(5,\); expected \(4,\) \(one observation"),
        ({"a": (2, 3), "b": (2, 4)}, r"observation\['b'\] has shape \(2, 4\); expected \(4,\) \(one observation"),
        ({"a": (2, 3), "b": (2, 2)}, r"observation\['b'\] has shape \(2, 2\); expected \(4,\)"),
        ({"a": (5, 2, 3), "b": (4,)}, r"observation\['b'\] has shape \(4,\); expected \(5, 4\) \(a batch of 5"),
        ({"a": (2, 2, 3), "b": (3, 4)}, r"observation\['b'\] has shape \(3, 4\); expected \(2, 4\) \(a batch of 2"),
        ({"a": (2, 2, 3), "b": (2, 5)}, r"observation\['b'\] has shape \(2, 5\); expected \(2, 4\)"),
        ({"a": (3, 2), "b": (4,)}, r"observation\['a'\] has shape \(3, 2\); expected \(2, 3\) for one observation"),
        ({"a": (6,), "b": (4,)}, r"observation\['a'\] has shape \(6,\); expected \(2, 3\) for one observation"),
    ],
    ids=[
        "b-wrong",
        "b-batched-a-single",
        "b-same-size",
        "a-batched-b-single",
        "batch-sizes",
        "b-wrong-batched",
        "a-transposed",
        "a-flat",
    ],
)
def test_predict_checks_every_dict_entry(dict_model, shapes, match):
    with pytest.raises(ValueError, match=match):
        dict_model.predict({key: np.zeros(shape, np.float32) for key, shape in shapes.items()})


@pytest.mark.parametrize("batch", [None, 1, 3])
def test_predict_accepts_good_dict_observations(dict_model, batch):
    lead = () if batch is None else (batch,)
    obs = {"a": np.zeros((*lead, 2, 3)), "b": np.zeros((*lead, 4))}
    assert dict_model.predict(obs, deterministic=True)[0].shape == (*lead, 2)


@PREDICT_OK
@pytest.mark.parametrize("shape", [(3,), (4, 3)])
def test_predict_accepts_tensors_that_require_grad(tiny_model, shape):
    obs = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape).requires_grad_(True)
    actions, _ = tiny_model.predict(obs, deterministic=True)
    expected, _ = tiny_model.predict(obs.detach().numpy(), deterministic=True)
    np.testing.assert_array_equal(actions, expected)


@PREDICT_OK
def test_predict_accepts_dict_tensors_that_require_grad(dict_model):
    obs = {"a": torch.zeros((2, 3), requires_grad=True), "b": torch.ones(4, requires_grad=True)}
    actions, _ = dict_model.predict(obs, deterministic=True)
    expected, _ = dict_model.predict({"a": np.zeros((2, 3)), "b": np.ones(4)}, deterministic=True)
    np.testing.assert_array_equal(actions, expected)


@PREDICT_ERROR
@pytest.mark.parametrize("deterministic", [True, False])
def test_predict_never_returns_non_finite_actions(tiny_model, deterministic):
    with torch.no_grad():
        for parameter in tiny_model.policy.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"^the policy's output is not finite: NaN/inf actions for 2 of 2"):
        tiny_model.predict(np.zeros((2, 3), np.float32), deterministic=deterministic)


# env / model mismatch -------------------------------------------------------------------------
def test_evaluating_or_recording_on_a_mismatched_env_is_refused(tiny_model, tmp_path):
    from dql_agent.integrations.hub import evaluate
    from dql_agent.integrations.video import record_video

    other = gym.make("MountainCarContinuous-v0", render_mode="rgb_array")
    with pytest.raises(ValueError, match="observation_space"):
        evaluate(tiny_model, other, n_eval_episodes=1)
    with pytest.raises(ValueError, match="observation_space"):
        record_video(tiny_model, other, tmp_path / "x.mp4", max_steps=5)
    with pytest.raises(ValueError, match="observation_space"):
        tiny_model.set_env(other)
    assert not (tmp_path / "x.mp4").exists()
