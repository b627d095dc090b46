"""PixelReach, the headless visual reaching task: env contract, expert, pixels, Minari dataset."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from dql_agent.pixel_reach import (
    IMAGE_ENV_ID,
    STATE_ENV_ID,
    PixelReachEnv,
    collect_episodes,
    expert_action,
    pixel_reach_returns,
    write_pixel_reach_dataset,
)


def _rollout_return(env: gym.Env, seed: int, policy) -> tuple[float, bool]:
    """Return and success of one episode; ``policy(env)`` gives the action."""
    env.reset(seed=seed)
    total, done, success = 0.0, False, False
    while not done:
        _, reward, terminated, truncated, info = env.step(policy(env))
        total += reward
        success = success or info["is_success"]
        done = terminated or truncated
    return total, success


def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def _green(image: np.ndarray) -> np.ndarray:
    """Goal pixels: green channel high, blue low (the agent/goal overlap colour counts too)."""
    return (image[..., 1] > 150) & (image[..., 2] < 100)


def _red(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 150) & (image[..., 1] < 100) & (image[..., 2] < 100)


@pytest.mark.parametrize("env_id", [IMAGE_ENV_ID, STATE_ENV_ID])
def test_env_passes_gymnasium_checker(env_id, recwarn):
    env = gym.make(env_id, render_mode="rgb_array")
    check_env(env.unwrapped)  # through gym.make, so the checker also remakes it per render mode
    assert not [w for w in recwarn if "gymnasium" in w.filename], [str(w.message) for w in recwarn]
    obs, info = env.reset(seed=0)
    assert info["is_success"] is False
    image = obs if env_id == IMAGE_ENV_ID else obs["image"]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    if env_id == STATE_ENV_ID:
        # The state is the agent position only: the goal is nowhere but in the pixels.
        assert obs["state"].shape == (2,) and obs["state"].dtype == np.float32
        np.testing.assert_allclose(obs["state"], env.unwrapped.agent_position, atol=1e-6)
    frame = env.render()
    assert frame.shape == (192, 192, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame[::4, ::4], image)  # the observation, upscaled 4x
    env.close()


def test_render_upscales_to_at_least_192_pixels():
    env = PixelReachEnv(size=50, render_mode="rgb_array")
    obs, _ = env.reset(seed=1)
    frame = env.render()
    assert frame.shape == (200, 200, 3)  # factor ceil(192 / 50) = 4
    np.testing.assert_array_equal(frame[::4, ::4], obs)
    assert PixelReachEnv().render() is None  # no render_mode: nothing to draw


def test_seeded_resets_are_reproducible():
    first, second = PixelReachEnv(observation="image+state"), PixelReachEnv(observation="image+state")
    obs_a, _ = first.reset(seed=123)
    obs_b, _ = second.reset(seed=123)
    np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
    np.testing.assert_array_equal(obs_a["state"], obs_b["state"])
    np.testing.assert_array_equal(first.goal_position, second.goal_position)
    action = np.array([0.5, -1.0], np.float32)
    for _ in range(3):
        step_a, step_b = first.step(action), second.step(action)
        np.testing.assert_array_equal(step_a[0]["image"], step_b[0]["image"])
        assert step_a[1:4] == step_b[1:4]
    first.reset(seed=124)
    assert not np.array_equal(first.goal_position, second.goal_position)


def test_reset_draws_goal_away_from_the_agent():
    env = PixelReachEnv()
    for seed in range(50):
        env.reset(seed=seed)
        p, g = env.agent_position, env.goal_position
        assert np.all(np.abs(p) <= 1.0) and np.all(np.abs(g) <= 0.8)
        assert np.linalg.norm(p - g) >= 0.5


def test_dynamics_rewards_and_success():
    env = PixelReachEnv(max_steps=5)
    env.reset(seed=0)
    start, goal = env.agent_position, env.goal_position
    # Out-of-range actions are clipped to the Box before moving.
    _, reward, terminated, truncated, info = env.step(np.array([2.0, 0.0], np.float32))
    expected = np.clip(start + 0.15 * np.array([1.0, 0.0]), -1.0, 1.0)
    np.testing.assert_allclose(env.agent_position, expected)
    assert reward == pytest.approx(-np.linalg.norm(expected - goal))
    assert not terminated and not truncated and info["is_success"] is False
    for _ in range(3):
        assert not env.step(np.zeros(2, np.float32))[3]
    assert env.step(np.zeros(2, np.float32))[3]  # truncated after max_steps = 5

    # Walk the expert to the goal: the terminal step pays +1 and reports success.
    env = PixelReachEnv()
    env.reset(seed=3)
    while True:
        _, reward, terminated, truncated, info = env.step(expert_action(env))
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and info["is_success"] is True
    assert np.linalg.norm(env.agent_position - env.goal_position) < 0.1


def test_expert_reaches_the_goal_and_random_actions_do_not():
    env = gym.make(IMAGE_ENV_ID)  # wrapped: expert_action reads env.unwrapped
    rng = np.random.default_rng(0)
    expert = [_rollout_return(env, seed, expert_action) for seed in range(20)]
    random = [_rollout_return(env, seed, lambda _: rng.uniform(-1, 1, 2).astype(np.float32)) for seed in range(20)]
    expert_success = np.mean([success for _, success in expert])
    random_success = np.mean([success for _, success in random])
    assert expert_success >= 0.9
    assert random_success <= 0.3
    expert_return = np.mean([ret for ret, _ in expert])
    random_return = np.mean([ret for ret, _ in random])
    assert expert_return > random_return + 10.0, (expert_return, random_return)


def test_image_encodes_the_goal():
    env = PixelReachEnv(size=64)
    images, goals = [], []
    for seed in range(10):
        image, _ = env.reset(seed=seed)
        images.append(image)
        goals.append(env.goal_position)
        # At reset the discs are >= 0.5 apart, so neither overlaps the other: centroids are exact
        # up to the rim clipped at the frame's edge.
        np.testing.assert_allclose(_centroid(_green(image)), env.position_to_pixel(env.goal_position), atol=1.0)
        agent_pixel = np.array(env.position_to_pixel(env.agent_position))
        if np.all((agent_pixel > 6) & (agent_pixel < 57)):  # the whole agent disc is in the frame
            np.testing.assert_allclose(_centroid(_red(image)), agent_pixel, atol=0.5)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(goals[0], goals[1])
    # The green centroid follows g: x to the right (columns), y downward (rows).
    green = np.array([_centroid(_green(image)) for image in images])
    goals_array = np.array(goals)
    assert np.corrcoef(green[:, 1], goals_array[:, 0])[0, 1] > 0.99
    assert np.corrcoef(green[:, 0], goals_array[:, 1])[0, 1] > 0.99


def test_goal_stays_visible_when_the_agent_covers_it():
    env = PixelReachEnv()
    env.reset(seed=3)
    goal_pixels = int(_green(env._image()).sum())
    while True:
        obs, _, terminated, truncated, _ = env.step(expert_action(env))
        if terminated or truncated:
            break
    assert terminated
    # The overlap is drawn in a mixed colour, so the goal disc keeps all its pixels.
    assert int(_green(obs).sum()) == goal_pixels


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"observation": "state"}, "observation"),
        ({"observation": None}, "observation"),
        ({"size": 8}, "size"),
        ({"size": 48.0}, "size"),
        ({"size": True}, "size"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
@pytest.mark.bad_input("habits", "clear error")
def test_bad_constructor_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        PixelReachEnv(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(error.value)  # and the value received
    if field == "observation":
        assert "'image+state'" in str(error.value)  # and the allowed values


def test_collect_episodes_layout_and_determinism():
    episodes = collect_episodes(3, size=32, observation="image+state", noise=0.5, random_prob=0.2, seed=7)
    again = collect_episodes(3, size=32, observation="image+state", noise=0.5, random_prob=0.2, seed=7)
    for episode, repeat in zip(episodes, again, strict=True):
        n_steps = len(episode["rewards"])
        assert episode["observations"]["image"].shape == (n_steps + 1, 32, 32, 3)
        assert episode["observations"]["image"].dtype == np.uint8
        assert episode["observations"]["state"].shape == (n_steps + 1, 2)
        assert episode["observations"]["state"].dtype == np.float32
        assert episode["actions"].shape == (n_steps, 2) and episode["actions"].dtype == np.float32
        assert np.all(np.abs(episode["actions"]) <= 1.0)
        assert episode["rewards"].dtype == np.float64
        for key in ("terminations", "truncations"):
            assert episode[key].shape == (n_steps,) and episode[key].dtype == bool
        assert episode["terminations"][-1] or episode["truncations"][-1]
        assert not (episode["terminations"][:-1].any() or episode["truncations"][:-1].any())
        np.testing.assert_array_equal(episode["actions"], repeat["actions"])
        np.testing.assert_array_equal(episode["observations"]["image"], repeat["observations"]["image"])
    images = collect_episodes(1, seed=7)[0]["observations"]
    assert images.shape[1:] == (48, 48, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="random_prob"):
        collect_episodes(1, random_prob=1.5)


@pytest.mark.parametrize("observation", ["image", "image+state"])
def test_write_dataset_round_trips_through_minari(observation, tmp_path, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    dataset_id = "test/pixel-reach-v0"
    n_episodes = 20
    write_pixel_reach_dataset(dataset_id, n_episodes, size=32, observation=observation, seed=0)

    dataset = minari.load_dataset(dataset_id)
    assert dataset.total_episodes == n_episodes
    image_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    if observation == "image":
        assert dataset.observation_space == image_space
    else:
        assert dataset.observation_space["image"] == image_space
    lengths, returns = [], []
    for episode in dataset.iterate_episodes():
        images = episode.observations if observation == "image" else episode.observations["image"]
        assert images.dtype == np.uint8 and images.shape == (len(episode.rewards) + 1, 32, 32, 3)
        lengths.append(len(episode.rewards))
        returns.append(episode.rewards.sum())

    stored = pixel_reach_returns(dataset)
    assert stored["n_noisy"] == stored["n_clean"] == n_episodes // 2
    # The noisy half comes first; the stored means are those of the episodes on disk.
    assert stored["noisy_return"] == pytest.approx(np.mean(returns[: n_episodes // 2]))
    assert stored["clean_return"] == pytest.approx(np.mean(returns[n_episodes // 2 :]))
    assert stored["clean_return"] > stored["noisy_return"] + 3.0
    metadata = dataset.storage.metadata
    assert metadata["ref_min_score"] == pytest.approx(stored["random_return"])
    assert metadata["ref_max_score"] == pytest.approx(stored["expert_return"])
    assert metadata["ref_max_score"] > metadata["ref_min_score"] + 10.0
    assert f"{stored['clean_return']:.2f}" in metadata["description"]
    # The env spec records the image size, so the evaluation env matches the data.
    env = dataset.recover_environment()
    assert env.observation_space == dataset.observation_space
    env.close()

    with pytest.raises(FileExistsError, match=dataset_id):
        write_pixel_reach_dataset(dataset_id, n_episodes, size=32, observation=observation)
    rewritten = write_pixel_reach_dataset(dataset_id, 4, size=32, observation=observation, overwrite=True)
    assert rewritten.total_episodes == 4
