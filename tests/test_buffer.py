"""OfflineBuffer: loaders (D4RL dict/npz/hdf5, SB3 ReplayBuffer, Minari) and input checks."""

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import ReplayBuffer

from dql_agent import OfflineBuffer


def test_from_d4rl_dict_npz_and_hdf5_agree(pendulum_arrays, tmp_path):
    np.savez(tmp_path / "data.npz", **pendulum_arrays)
    with h5py.File(tmp_path / "data.hdf5", "w") as f:
        for key, value in pendulum_arrays.items():
            f[key] = value
    with pytest.warns(UserWarning, match="action_space not given"):  # no spaces given: bounds from the data
        buffers = [
            OfflineBuffer.from_d4rl(src)
            for src in (pendulum_arrays, tmp_path / "data.npz", str(tmp_path / "data.hdf5"))
        ]
    for buffer in buffers:
        assert len(buffer) == 800
        torch.testing.assert_close(buffer.observations, buffers[0].observations)
        torch.testing.assert_close(buffer.next_observations, buffers[0].next_observations)
    assert int(buffers[0].timeouts.sum()) == 4 and int(buffers[0].terminals.sum()) == 0


def test_raw_d4rl_without_next_observations_drops_each_episodes_last_row():
    # two episodes of 3 steps: the first cut by a time limit, the second ends in a terminal
    obs = np.arange(6, dtype=np.float32)[:, None]
    data = {
        "observations": obs,
        "actions": np.zeros((6, 1)),
        "rewards": np.arange(6.0),
        "terminals": np.array([0, 0, 0, 0, 0, 1]),
        "timeouts": np.array([0, 0, 1, 0, 0, 0]),
    }
    buffer = OfflineBuffer.from_d4rl(data)
    assert buffer.observations[:, 0].tolist() == [0, 1, 3, 4, 5]
    assert buffer.next_observations[:, 0].tolist() == [1, 2, 4, 5, 5]
    assert buffer.terminals.tolist() == [False, False, False, False, True]


def test_from_sb3_unscales_actions_and_splits_timeouts():
    env = gym.make("Pendulum-v1")
    rb = ReplayBuffer(10, env.observation_space, env.action_space, n_envs=1)
    rng = np.random.default_rng(0)
    for i in range(6):
        obs = rng.normal(size=(1, 3)).astype(np.float32)
        scaled = np.array([[i / 5 * 2 - 1]], np.float32)  # SB3 stores Box actions in [-1, 1]
        rb.add(obs, obs + 1, scaled, np.array([float(i)]), np.array([i in (2, 5)]), [{"TimeLimit.truncated": i == 5}])
    buffer = OfflineBuffer.from_sb3(rb)
    assert len(buffer) == 6
    np.testing.assert_allclose(buffer.actions[:, 0].numpy(), np.linspace(-2, 2, 6), atol=1e-6)
    assert buffer.terminals.tolist() == [False, False, True, False, False, False]
    assert buffer.timeouts.tolist() == [False] * 5 + [True]
    torch.testing.assert_close(buffer.next_observations, buffer.observations + 1)
    with pytest.raises(ValueError, match="empty"):
        OfflineBuffer.from_sb3(ReplayBuffer(10, env.observation_space, env.action_space))


def test_from_minari_aligns_next_observations_per_episode(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from dql_agent.integrations.minari import write_minari_dataset

    space = gym.spaces.Box(-100, 100, (2,), np.float32)
    episodes = []
    for e, length in enumerate((4, 3)):
        obs = np.array([[e, t] for t in range(length + 1)], np.float32)  # encodes (episode, step)
        episodes.append(
            {
                "observations": obs,
                "actions": np.zeros((length, 1), np.float32),
                "rewards": np.ones(length),
                "terminations": np.arange(length) == length - 1 if e else np.zeros(length, bool),
                "truncations": np.zeros(length, bool) if e else np.arange(length) == length - 1,
            }
        )
    write_minari_dataset(
        "test/align-v0",
        episodes,
        observation_space=space,
        action_space=gym.spaces.Box(-1, 1, (1,), np.float32),
        env_id="Pendulum-v1",
        ref_min_score=0.0,
        ref_max_score=10.0,
    )
    buffer = OfflineBuffer.from_minari("test/align-v0")
    obs, next_obs = buffer.observations.numpy(), buffer.next_observations.numpy()
    assert obs.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    assert next_obs.tolist() == [[0, 1], [0, 2], [0, 3], [0, 4], [1, 1], [1, 2], [1, 3]]
    assert buffer.timeouts.tolist() == [False, False, False, True, False, False, False]
    assert buffer.terminals.tolist() == [False] * 6 + [True]
    assert buffer.metadata["dataset_id"] == "test/align-v0"
    assert (buffer.metadata["ref_min_score"], buffer.metadata["ref_max_score"]) == (0.0, 10.0)
    assert buffer.episode_returns().tolist() == [4.0, 3.0]


def good_arrays(n=10):
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, 3)),
        "actions": rng.uniform(-1, 1, (n, 2)),
        "rewards": rng.normal(size=n),
        "next_observations": rng.normal(size=(n, 3)),
        "terminals": np.zeros(n, bool),
    }


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"rewards": np.ones(9)}, ValueError, "rewards has 9 rows, expected 10"),
        # (N, 2, 2) rows are observations of a (2, 2) Box, which the (N, 3) next observations do not match
        ({"observations": np.ones((10, 2, 2))}, ValueError, "next_observations has dim 3, expected 4"),
        ({"next_observations": np.ones((10, 4))}, ValueError, "next_observations has dim 4, expected 3"),
        ({"actions": np.full((10, 2), 3.0)}, ValueError, None),  # inferred bounds: warns, no error
        ({"observations": np.zeros((0, 3))}, ValueError, "empty"),
        ({"terminals": np.array(["a"] * 10)}, TypeError, r"terminals must be numeric \(bool, int or float\)"),
    ],
)
def test_bad_arrays_get_errors_naming_the_field(change, error, message):
    arrays = {**good_arrays(), **change}
    if message is None:
        with pytest.warns(UserWarning, match="action_space not given"):
            OfflineBuffer(**arrays)
        return
    with pytest.raises(error, match=message):
        OfflineBuffer(**arrays)


def test_nan_terminal_timeout_and_bounds_checks():
    arrays = good_arrays()
    arrays["observations"][[2, 5], 1] = np.nan
    with pytest.raises(ValueError, match=r"observations has NaN/inf in 2 row\(s\) \(first at row 2\)"):
        OfflineBuffer(**arrays)
    arrays = good_arrays()
    both = OfflineBuffer(**{**arrays, "terminals": np.eye(10)[3]}, timeouts=np.eye(10)[3])
    assert both.terminals.tolist() == np.eye(10, dtype=bool)[3].tolist() and not both.timeouts.any()
    box = gym.spaces.Box(-0.5, 0.5, (2,))
    with pytest.raises(ValueError, match="outside the action_space bounds"):
        OfflineBuffer(**arrays, action_space=box)
    with pytest.warns(UserWarning, match="clipping"):
        clipped = OfflineBuffer(**arrays, action_space=box, clip_actions=True)
    assert clipped.actions.abs().max() <= 0.5
    with pytest.raises(KeyError, match="missing key"):
        OfflineBuffer.from_d4rl({k: v for k, v in arrays.items() if k != "rewards"})
    ints = OfflineBuffer(**{**arrays, "observations": np.arange(30).reshape(10, 3)})
    assert ints.observations.dtype == torch.float32


def test_sample_stays_on_device_and_respects_terminals():
    arrays = good_arrays(50)
    arrays["terminals"][::2] = True
    buffer = OfflineBuffer(**arrays)
    batch = buffer.sample(1000, torch.Generator().manual_seed(0))
    assert batch.observations.shape == (1000, 3) and batch.not_dones.shape == (1000,)
    assert 0.4 < batch.not_dones.mean() < 0.6


@pytest.mark.bad_input("data", "clear error")
@pytest.mark.parametrize("key", ["observations", "next_observations"])
def test_from_sb3_refuses_observations_beyond_float32(key):
    # A float64 Box keeps 1e39 in the SB3 buffer; it is refused by name before a float32 cast makes it inf.
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    rb = ReplayBuffer(10, space, gym.spaces.Box(-1, 1, (1,)), n_envs=1)
    for i in range(4):
        obs, next_obs = np.zeros((1, 2)), np.ones((1, 2))
        if i == 2:
            (obs if key == "observations" else next_obs)[0, 1] = 1e39
        rb.add(obs, next_obs, np.zeros((1, 1)), np.zeros(1), np.zeros(1), [{}])
    with pytest.raises(
        ValueError, match=rf"^{key} has values too large for float32 in 1 row\(s\) \(first at row 2\), e\.g\. 1e\+39"
    ):
        OfflineBuffer.from_sb3(rb)
