"""The embedded Pendulum demo dataset: controller quality, noisy vs good halves, Minari output."""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from dql_agent.demo_data import (
    PendulumDatasetInfo,
    PendulumSwingUpController,
    build_pendulum_dataset,
    collect_pendulum_episodes,
    record_episode,
)
from dql_agent.integrations.minari import minari_to_transitions


@pytest.fixture(autouse=True)
def _minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))


def test_controller_shapes_and_bounds():
    controller = PendulumSwingUpController()
    single = controller(np.array([1.0, 0.0, 0.0]))
    assert single.shape == (1,) and single.dtype == np.float32
    batch = np.random.default_rng(0).uniform(-8.0, 8.0, size=(16, 3))
    actions, state = controller.predict(batch)
    assert actions.shape == (16, 1) and state is None
    assert np.all(np.abs(actions) <= 2.0)
    # Upright and at rest needs no torque; at rest at the bottom it must push to start swinging.
    assert controller(np.array([1.0, 0.0, 0.0]))[0] == 0.0
    assert abs(controller(np.array([-1.0, 0.0, 0.0]))[0]) == 2.0


def test_controller_swings_up_under_evaluate_policy():
    env = Monitor(gym.make("Pendulum-v1"))
    env.reset(seed=7)
    mean, _ = evaluate_policy(PendulumSwingUpController(), env, n_eval_episodes=5)
    assert mean > -300.0


def test_noisy_episodes_are_clearly_worse_and_deterministic():
    episodes = collect_pendulum_episodes(n_good=4, n_noisy=4, seed=3)
    assert len(episodes) == 8
    for episode in episodes:
        assert episode["observations"].shape == (201, 3)
        assert episode["actions"].shape == (200, 1)
        assert np.all(np.abs(episode["actions"]) <= 2.0)
        assert episode["truncations"][-1] and not episode["terminations"].any()
    returns = np.array([episode["rewards"].sum() for episode in episodes])
    good, noisy = returns[:4].mean(), returns[4:].mean()
    assert good > -300.0
    assert noisy < good - 300.0

    again = collect_pendulum_episodes(n_good=4, n_noisy=4, seed=3)
    for first, second in zip(episodes, again, strict=True):
        np.testing.assert_array_equal(first["observations"], second["observations"])
        np.testing.assert_array_equal(first["actions"], second["actions"])


def test_build_pendulum_dataset_round_trips_through_minari():
    info = build_pendulum_dataset("test/pendulum/mixed-v0", n_good=3, n_noisy=3, seed=1, n_reference_episodes=3)
    dataset = minari.load_dataset("test/pendulum/mixed-v0")
    assert dataset.total_episodes == 6 and dataset.total_steps == 1200
    assert dataset.env_spec.id == "Pendulum-v1"
    assert info.random_return < info.noisy_return < info.good_return
    assert info.controller_return > -300.0

    scores = minari.get_normalized_score(dataset, np.array([info.random_return, info.controller_return]))
    np.testing.assert_allclose(scores, [0.0, 1.0])

    stored = PendulumDatasetInfo.from_dataset(dataset)
    assert stored.noisy_return == info.noisy_return and stored.random_return == info.random_return

    data = minari_to_transitions(dataset)
    assert data["observations"].shape == (1200, 3) and data["actions"].shape == (1200, 1)
    assert data["timeouts"].sum() == 6 and not data["terminals"].any()

    # Rebuilding overwrites by default and refuses when asked not to.
    build_pendulum_dataset("test/pendulum/mixed-v0", n_good=1, n_noisy=1, n_reference_episodes=1)
    assert minari.load_dataset("test/pendulum/mixed-v0").total_steps == 400
    with pytest.raises(FileExistsError, match="test/pendulum/mixed-v0"):
        build_pendulum_dataset("test/pendulum/mixed-v0", overwrite=False)


def test_record_episode_stores_the_applied_action_and_truncates_on_budget():
    env = gym.make("Pendulum-v1")
    episode = record_episode(env, lambda obs: np.array([5.0]), reset_seed=3, max_steps=7)
    assert episode["observations"].shape == (8, 3) and episode["observations"].dtype == np.float32
    assert episode["actions"].dtype == np.float32 and np.all(episode["actions"] == 2.0)  # clipped to the Box
    assert episode["truncations"].tolist() == [False] * 6 + [True] and not episode["terminations"].any()
    again = record_episode(env, lambda obs: np.array([5.0]), reset_seed=3, max_steps=7)
    np.testing.assert_array_equal(episode["observations"], again["observations"])  # the reset seed fixes it
    full = record_episode(env, lambda obs: np.zeros(1), reset_seed=3)
    assert len(full["actions"]) == 200 and full["truncations"][-1]  # the env's own time limit


def test_record_episode_stacks_dict_observations_and_refuses_discrete_actions():
    from dql_agent.pixel_reach import PixelReachEnv

    env = PixelReachEnv(size=16, observation="image+state", max_steps=4)
    episode = record_episode(env, lambda obs: np.ones(2), reset_seed=0)
    observations = episode["observations"]
    assert observations["image"].shape == (5, 16, 16, 3) and observations["image"].dtype == np.uint8
    assert observations["state"].shape == (5, 2)
    with pytest.raises(TypeError, match="env.action_space must be a Box, got Discrete"):
        record_episode(gym.make("CartPole-v1"), lambda obs: 0, reset_seed=0)
