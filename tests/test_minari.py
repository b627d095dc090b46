"""Minari in and out: real datasets written under tmp_path, no mocks."""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from dql_agent import OfflineBuffer
from dql_agent.integrations.minari import (
    load_minari_dataset,
    minari_to_transitions,
    write_minari_dataset,
)

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
ACT_SPACE = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


@pytest.fixture(autouse=True)
def _minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))


def _episode(index: int, n_steps: int, terminated: bool) -> dict[str, np.ndarray]:
    """Observations encode (episode, step) as [index, step], so any misalignment shows."""
    steps = np.arange(n_steps + 1, dtype=np.float32)
    truncations = np.zeros(n_steps, dtype=bool)
    terminations = np.zeros(n_steps, dtype=bool)
    (terminations if terminated else truncations)[-1] = True
    return {
        "observations": np.stack([np.full_like(steps, index), steps], axis=1),  # (T+1, 2)
        "actions": (steps[:-1, None] / 10.0).astype(np.float32),  # (T, 1)
        "rewards": 100.0 * index + steps[:-1],
        "terminations": terminations,
        "truncations": truncations,
    }


def test_round_trip_keeps_episodes_aligned():
    lengths = [3, 5, 4]
    episodes = [_episode(i, n, terminated=(i == 0)) for i, n in enumerate(lengths)]
    dataset = write_minari_dataset("test/aligned-v0", episodes, observation_space=OBS_SPACE, action_space=ACT_SPACE)
    assert dataset.total_steps == sum(lengths)

    data = minari_to_transitions("test/aligned-v0")
    n = sum(lengths)
    assert data["observations"].shape == (n, 2) and data["observations"].dtype == np.float32
    assert data["next_observations"].shape == (n, 2)
    assert data["actions"].shape == (n, 1) and data["actions"].dtype == np.float32
    for key in ("rewards", "terminals", "timeouts"):
        assert data[key].shape == (n,)
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool

    starts = np.cumsum([0, *lengths[:-1]])
    for index, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        obs = data["observations"][start : start + length]
        next_obs = data["next_observations"][start : start + length]
        # Every transition of this episode, and only those, carries its index.
        np.testing.assert_array_equal(obs[:, 0], index)
        np.testing.assert_array_equal(obs[:, 1], np.arange(length))
        np.testing.assert_array_equal(next_obs[:, 1], np.arange(1, length + 1))
        np.testing.assert_array_equal(next_obs[:-1], obs[1:])
        np.testing.assert_array_equal(data["rewards"][start : start + length], episodes[index]["rewards"])

    # The first transition of episode 2 starts at its reset observation, not episode 1's last one.
    np.testing.assert_array_equal(data["observations"][starts[2]], episodes[2]["observations"][0])
    np.testing.assert_array_equal(data["terminals"], np.concatenate([ep["terminations"] for ep in episodes]))
    np.testing.assert_array_equal(data["timeouts"], np.concatenate([ep["truncations"] for ep in episodes]))
    assert data["terminals"].sum() == 1 and data["timeouts"].sum() == 2


def test_dict_observations_flatten_like_gymnasium():
    obs_space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
            "desired_goal": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "achieved_goal": gym.spaces.Dict(
                {
                    "pose": gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32),
                    "grip": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
                }
            ),
        },
        seed=0,
    )
    n_steps = 6
    samples = [obs_space.sample() for _ in range(n_steps + 1)]
    observations = {
        "observation": np.stack([s["observation"] for s in samples]),
        "desired_goal": np.stack([s["desired_goal"] for s in samples]),
        "achieved_goal": {
            "pose": np.stack([s["achieved_goal"]["pose"] for s in samples]),
            "grip": np.stack([s["achieved_goal"]["grip"] for s in samples]),
        },
    }
    episode = {
        "observations": observations,
        "actions": np.zeros((n_steps, 1), np.float32),
        "rewards": np.zeros(n_steps),
        "terminations": np.zeros(n_steps, bool),
        "truncations": np.eye(n_steps, dtype=bool)[-1],
    }
    dataset = write_minari_dataset("test/goals-v0", [episode], observation_space=obs_space, action_space=ACT_SPACE)
    data = minari_to_transitions(dataset)

    expected = np.stack([gym.spaces.flatten(obs_space, s) for s in samples])  # (T+1, 10)
    assert data["observations"].shape == (n_steps, 10)
    np.testing.assert_allclose(data["observations"], expected[:-1])
    np.testing.assert_allclose(data["next_observations"], expected[1:])
    # Gymnasium sorts plain-dict keys: achieved_goal (grip, pose), desired_goal, observation.
    np.testing.assert_allclose(data["observations"][:, 0], observations["achieved_goal"]["grip"][:-1, 0])
    np.testing.assert_allclose(data["observations"][:, -3:], observations["observation"][:-1])


def test_reference_scores_without_env_are_kept():
    episodes = [_episode(0, 4, terminated=False)]
    dataset = write_minari_dataset(
        "test/scored-v0",
        episodes,
        observation_space=OBS_SPACE,
        action_space=ACT_SPACE,
        ref_min_score=-10.0,
        ref_max_score=10.0,
    )
    reloaded = minari.load_dataset("test/scored-v0")
    np.testing.assert_allclose(minari.get_normalized_score(reloaded, np.array([0.0])), [0.5])
    assert load_minari_dataset(dataset) is dataset


def test_env_id_is_recorded_without_rollouts_or_warnings(recwarn):
    episodes = [_episode(0, 3, terminated=False)]
    dataset = write_minari_dataset(
        "test/with-env-v0",
        episodes,
        observation_space=OBS_SPACE,
        action_space=ACT_SPACE,
        env_id="Pendulum-v1",
        ref_min_score=-1000.0,
        ref_max_score=-100.0,
    )
    assert dataset.env_spec.id == "Pendulum-v1"
    assert dataset.storage.metadata["ref_min_score"] == -1000.0
    assert [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)] == []


@pytest.mark.parametrize("bad_id", ["pendulum", "test/pendulum", "p/pendulum-v0"])
def test_bad_id_is_a_value_error(bad_id):
    with pytest.raises(ValueError, match="name-vN"):
        load_minari_dataset(bad_id)
    with pytest.raises(ValueError, match=bad_id):
        write_minari_dataset(bad_id, [_episode(0, 2, True)], observation_space=OBS_SPACE, action_space=ACT_SPACE)


def test_missing_dataset_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as error:
        load_minari_dataset("test/absent-v0")
    assert str(tmp_path) in str(error.value)
    assert "MINARI_DATASETS_PATH" in str(error.value)


@pytest.mark.parametrize(
    ("key", "length", "expected"),
    [("observations", 4, 5), ("actions", 5, 4), ("truncations", 3, 4)],
)
def test_mismatched_episode_lengths_name_episode_and_key(key, length, expected):
    bad = _episode(1, 4, terminated=False)
    bad[key] = np.resize(bad[key], (length, *bad[key].shape[1:]))
    episodes = [_episode(0, 3, terminated=False), bad]
    with pytest.raises(ValueError, match=rf"episode 1: '{key}' has length \[?{length}\]?, expected {expected}"):
        write_minari_dataset("test/bad-v0", episodes, observation_space=OBS_SPACE, action_space=ACT_SPACE)


def test_existing_dataset_is_not_overwritten_and_failed_writes_leave_nothing(tmp_path):
    episodes = [_episode(0, 2, True)]
    write_minari_dataset("test/once-v0", episodes, observation_space=OBS_SPACE, action_space=ACT_SPACE)
    with pytest.raises(ValueError, match="already exists"):
        write_minari_dataset("test/once-v0", episodes, observation_space=OBS_SPACE, action_space=ACT_SPACE)
    assert minari.load_dataset("test/once-v0").total_steps == 2

    with pytest.raises(gym.error.Error):
        write_minari_dataset(
            "test/no-env-v0",
            episodes,
            observation_space=OBS_SPACE,
            action_space=ACT_SPACE,
            env_id="NoSuchEnv-v0",
        )
    assert not (tmp_path / "test" / "no-env-v0").exists()


def test_only_one_reference_score_is_rejected():
    with pytest.raises(ValueError, match="ref_min_score"):
        write_minari_dataset(
            "test/half-v0",
            [_episode(0, 2, True)],
            observation_space=OBS_SPACE,
            action_space=ACT_SPACE,
            ref_max_score=1.0,
        )


def test_reading_unsupported_observation_space_is_a_type_error():
    # Written with minari directly: our writer refuses such spaces.
    buffer = EpisodeBuffer(
        observations=np.array([0, 1, 2, 3]),
        actions=np.zeros((3, 1), np.float32),
        rewards=np.zeros(3),
        terminations=np.zeros(3, bool),
        truncations=np.ones(3, bool),
        infos={},
    )
    with pytest.warns(UserWarning, match="env"):  # minari warns that no env is given
        minari.create_dataset_from_buffers(
            "test/discrete-v0",
            [buffer],
            observation_space=gym.spaces.Discrete(4),
            action_space=ACT_SPACE,
            algorithm_name="test",
            author="test",
            author_email="test@example.com",
            code_permalink="https://example.com",
            description="discrete observations",
        )
    with pytest.raises(TypeError, match="Discrete"):
        minari_to_transitions("test/discrete-v0")


def test_writing_unsupported_observation_space_is_a_type_error():
    space = gym.spaces.Discrete(5)
    episode = {
        "observations": np.arange(4),
        "actions": np.zeros((3, 1), np.float32),
        "rewards": np.zeros(3),
        "terminations": np.zeros(3, bool),
        "truncations": np.zeros(3, bool),
    }
    with pytest.raises(TypeError, match="Discrete"):
        write_minari_dataset("test/discrete-w-v0", [episode], observation_space=space, action_space=ACT_SPACE)


@pytest.mark.bad_input("data", "correct behaviour")
def test_a_step_both_terminated_and_truncated_loads_as_terminal():
    # gymnasium's TimeLimit reports both when the limit falls on a terminal step; minari records it
    ended_at_limit = _episode(0, 3, terminated=True)
    ended_at_limit["truncations"][-1] = True
    episodes = [ended_at_limit, _episode(1, 2, terminated=False)]
    write_minari_dataset("test/both-v0", episodes, observation_space=OBS_SPACE, action_space=ACT_SPACE)
    data = minari_to_transitions("test/both-v0")
    assert data["terminals"].tolist() == [False, False, True, False, False]
    assert data["timeouts"].tolist() == [False, False, False, False, True]
    buffer = OfflineBuffer.from_minari("test/both-v0")
    assert buffer.terminals.tolist() == [False, False, True, False, False]
    assert buffer.timeouts.tolist() == [False, False, False, False, True]
    assert buffer.episode_returns().tolist() == [3.0, 201.0]


@pytest.mark.bad_input("data", "clear error")
@pytest.mark.parametrize(
    "stored, index, key, row",
    [
        ("observations", (2, 0), "observations", 2),
        ("observations", (4, 1), "next_observations", 3),  # the final observation is only a next one
        ("actions", (1, 0), "actions", 1),
        ("rewards", (3,), "rewards", 3),
    ],
    ids=["observations", "final-observation", "actions", "rewards"],
)
def test_values_beyond_float32_in_a_float64_dataset_are_refused(stored, index, key, row):
    episode = {k: v if v.dtype == bool else v.astype(np.float64) for k, v in _episode(0, 4, True).items()}
    episode[stored][index] = 1e39
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    write_minari_dataset(
        "test/huge-v0", [episode], observation_space=space, action_space=gym.spaces.Box(-1, 1, (1,), np.float64)
    )
    message = (
        rf"^{key} has values too large for float32 in 1 row\(s\) \(first at row {row}\), e\.g\. 1e\+39 at {key}\[{row}"
    )
    with pytest.raises(ValueError, match=message):
        OfflineBuffer.from_minari("test/huge-v0")


@pytest.mark.bad_input("data", "clear error")
def test_a_dataset_without_stored_spaces_never_imports_the_module_its_env_spec_names(tmp_path, monkeypatch):
    # Minari would gym.make the env_spec (importing its entry point) to recover missing spaces.
    import json

    (tmp_path / "evil_module.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    write_minari_dataset("test/nospace-v0", [_episode(0, 3, True)], observation_space=OBS_SPACE, action_space=ACT_SPACE)
    meta_path = tmp_path / "test" / "nospace-v0" / "data" / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    del metadata["observation_space"]
    metadata["env_spec"] = gym.envs.registration.EnvSpec("Evil-v0", entry_point="evil_module:Env").to_json()
    meta_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"stores no observation_space .* imports code named in a file"):
        minari_to_transitions("test/nospace-v0")
    assert not (tmp_path / "IMPORTED").exists()
