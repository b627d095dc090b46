"""Bad data and bad observations get clear errors (property-based where inputs vary)."""

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dql_agent import OfflineBuffer

KEYS = ("observations", "actions", "rewards", "next_observations")


def arrays(n=20):
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, 3)),
        "actions": rng.uniform(-1, 1, (n, 2)),
        "rewards": rng.normal(size=n),
        "next_observations": rng.normal(size=(n, 3)),
        "terminals": np.zeros(n),
    }


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


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(KEYS + ("terminals",)), n=st.integers(0, 40).filter(lambda n: n != 20))
def test_length_mismatches_name_the_key(key, n):
    data = arrays()
    data[key] = data[key][:n] if n < 20 else np.concatenate([data[key]] * 2)[:n]
    with pytest.raises(ValueError, match="rows, expected|empty|has 0 rows"):
        OfflineBuffer(**data)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.float16, np.float64, bool])
def test_any_numeric_observation_dtype_is_converted(dtype):
    data = arrays()
    data["observations"] = (data["observations"] * 3).astype(dtype)
    buffer = OfflineBuffer(**data)
    assert buffer.observations.dtype.is_floating_point


# predict --------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3))
def test_predict_rejects_every_wrong_shape(tiny_model, shape):
    shape = tuple(shape)
    if shape in ((3,),) or (len(shape) == 2 and shape[1] == 3):
        return  # valid single or batch
    with pytest.raises(ValueError, match=rf"observation has shape \({', '.join(map(str, shape))},?\); expected \(3,\)"):
        tiny_model.predict(np.zeros(shape, np.float32))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 5), value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_predict_rejects_nonfinite_observations(tiny_model, position, value):
    obs = np.zeros((2, 3), np.float32)
    obs.flat[position] = value
    with pytest.raises(ValueError, match=r"observation contains 1 NaN/inf value\(s\)"):
        tiny_model.predict(obs)


@pytest.mark.parametrize("obs", [np.zeros(3, np.int64), np.zeros(3, np.float64), np.zeros(3, np.float16), [0, 0, 0]])
def test_predict_accepts_numeric_dtypes_and_lists(tiny_model, obs):
    assert tiny_model.predict(obs, deterministic=True)[0].shape == (1,)


def test_predict_rejects_strings_and_info_tuples(tiny_model):
    with pytest.raises(TypeError, match="observation must be numeric, got dtype <U1"):
        tiny_model.predict(np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"\(obs, info\) tuple"):
        tiny_model.predict((np.zeros(3), {}))


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
