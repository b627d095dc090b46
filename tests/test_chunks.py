"""Action chunks and observation histories (issue 28): the data they train on, computed by hand;
acting through SB3's recurrent convention; the exported chunk graph; checkpoints."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from dql_agent import QVPO, DiffusionDICE, DiffusionQL, OfflineBuffer
from dql_agent.chunks import chunk_transitions, episode_index
from dql_agent.policy import ActingState
from tests.settings import tiny

GAMMA = 0.9
CHUNKS = {"action_horizon": 4, "n_action_steps": 3, "n_obs_steps": 3}

# Three episodes: rows 0-4 end in a timeout (truncated), rows 5-7 in a terminal, rows 8-12 run to
# the dataset's end (its last row ends the episode).
EPISODES = [(0, 4, "timeout"), (5, 7, "terminal"), (8, 12, "end")]
N = 13


def hand_buffer() -> OfflineBuffer:
    """Observations and actions that name their row (obs[i] = (i, 10 i), action[i] = i / 100)."""
    rows = np.arange(N, dtype=np.float32)
    terminals, timeouts = np.zeros(N, bool), np.zeros(N, bool)
    terminals[7], timeouts[4] = True, True
    return OfflineBuffer(
        np.stack([rows, 10 * rows], 1),
        (rows / 100)[:, None],
        rows + 1.0,  # reward of row i: i + 1
        np.stack([rows + 0.5, 10 * rows + 5], 1),  # next observation of row i: (i + 0.5, 10 i + 5)
        terminals,
        timeouts,
        action_space=gym.spaces.Box(-1, 1, (1,), np.float32),
    )


def by_hand(i: int, h: int, k: int) -> dict:
    """What a chunk of h starting at row i, with histories of k, must hold (written out in loops)."""
    start, end, kind = next(e for e in EPISODES if e[0] <= i <= e[1])
    steps = [min(i + j, end) for j in range(h)]
    valid = [i + j <= end for j in range(h)]
    length = sum(valid)
    reward = sum(GAMMA**j * (steps[j] + 1.0) for j in range(h) if valid[j])
    last = i + length - 1
    terminal = kind == "terminal" and last == end
    history = [max(i - (k - 1) + j, start) for j in range(k)]
    next_history = [max(last - (k - 2) + j, start) for j in range(k - 1)]
    return {
        "actions": [steps[j] / 100 for j in range(h)],
        "mask": [float(v) for v in valid],
        "reward": reward,
        "not_done": 0.0 if terminal else 1.0,
        "discount": GAMMA**length,
        "history": [[r, 10 * r] for r in history],
        "next_history": [[r, 10 * r] for r in next_history] + [[last + 0.5, 10 * last + 5]],
    }


@pytest.mark.parametrize("h, k", [(4, 3), (3, 1), (1, 2)])
def test_chunk_rewards_bootstraps_masks_and_histories_match_a_hand_computation(h, k):
    buffer = hand_buffer()
    episodes = episode_index(buffer.terminals, buffer.timeouts)
    idx = torch.arange(N)
    got = chunk_transitions(buffer, episodes, idx, h, k, GAMMA)
    for i in range(N):
        want = by_hand(i, h, k)
        np.testing.assert_allclose(got["actions"][i].numpy(), want["actions"], rtol=1e-6, err_msg=f"row {i}")
        np.testing.assert_array_equal(got["action_mask"][i].numpy(), want["mask"], err_msg=f"row {i}")
        assert got["rewards"][i].item() == pytest.approx(want["reward"], rel=1e-6), i
        assert got["not_dones"][i].item() == want["not_done"], i
        assert got["discounts"][i].item() == pytest.approx(want["discount"], rel=1e-6), i
        if k > 1:
            np.testing.assert_array_equal(got["observations"][i].numpy(), want["history"], err_msg=f"row {i}")
            np.testing.assert_array_equal(got["next_observations"][i].numpy(), want["next_history"])
        else:
            np.testing.assert_array_equal(got["observations"][i].numpy(), want["history"][0])
            np.testing.assert_array_equal(got["next_observations"][i].numpy(), want["next_history"][0])


def test_the_training_view_samples_chunks_and_the_one_step_view_does_not(pendulum_buffer):
    chunked = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **tiny(**CHUNKS))
    batch = chunked.replay_buffer.sample(16, torch.Generator().manual_seed(0))
    assert batch.actions.shape == (16, 4) and batch.observations.shape == (16, 3, 3)
    assert batch.discounts is not None and batch.action_mask is not None
    plain = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **tiny()).replay_buffer.sample(16)
    assert plain.discounts is None and plain.action_mask is None and plain.actions.shape == (16, 1)


# acting ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunk_model(pendulum_arrays):
    env = gym.make("Pendulum-v1")
    buffer = OfflineBuffer(**pendulum_arrays, observation_space=env.observation_space, action_space=env.action_space)
    return DiffusionQL(buffer, env="Pendulum-v1", seed=0, device="cpu", **tiny(**CHUNKS)).learn(20)


def three_envs(lengths=(7, 11, 13)) -> DummyVecEnv:
    vec = DummyVecEnv([lambda n=n: Monitor(gym.make("Pendulum-v1", max_episode_steps=n)) for n in lengths])
    vec.seed(5)
    return vec


def test_evaluate_policy_on_envs_of_different_lengths_equals_a_hand_written_loop(chunk_model):
    returns, _ = evaluate_policy(
        chunk_model, three_envs(), n_eval_episodes=6, deterministic=True, return_episode_rewards=True
    )
    # By hand: per env, a history of the last 3 observations (the first repeated at a reset), a
    # chunk planned from it, 3 of its 4 actions run, then a new plan; the same VecEnv loop as SB3's.
    vec, cfg = three_envs(), chunk_model.config
    obs = vec.reset()
    history = np.repeat(obs[:, None], cfg.n_obs_steps, axis=1)
    chunk, step = np.zeros((3, cfg.action_horizon, 1), np.float32), np.full(3, cfg.n_action_steps)
    targets, counts, mine = [2, 2, 2], [0, 0, 0], []
    while counts != targets:
        due = step >= cfg.n_action_steps
        if due.any():
            chunk[due] = chunk_model.predict_chunk(history[due], deterministic=True)
            step[due] = 0
        actions = chunk[np.arange(3), step]
        step += 1
        obs, _, dones, infos = vec.step(actions)
        for i in range(3):
            if dones[i]:
                if counts[i] < targets[i]:
                    mine.append(infos[i]["episode"]["r"])  # the Monitor's return, as evaluate_policy reads it
                    counts[i] += 1
                step[i] = cfg.n_action_steps
                history[i] = obs[i]  # the reset observation, repeated
        history = np.where(dones[:, None, None], history, np.concatenate([history[:, 1:], obs[:, None]], 1))
    assert sorted(returns) == pytest.approx(sorted(mine), rel=0, abs=0)
    assert len(returns) == 6


def test_a_new_episode_drops_the_pending_chunk(chunk_model):
    obs = np.zeros((1, 3), np.float32)
    _, state = chunk_model.predict(obs, deterministic=True)
    assert isinstance(state, ActingState) and state.next_step.tolist() == [1]
    _, state = chunk_model.predict(obs, state=state, episode_start=np.array([False]), deterministic=True)
    assert state.next_step.tolist() == [2]
    _, state = chunk_model.predict(obs, state=state, episode_start=np.array([True]), deterministic=True)
    assert state.next_step.tolist() == [1]  # planned afresh
    with pytest.raises(ValueError, match="state holds 1 env"):
        chunk_model.predict(np.zeros((2, 3), np.float32), state=state)
    with pytest.raises(TypeError, match="ActingState"):
        chunk_model.predict(obs, state=("not", "a state"))


def test_a_checkpoint_round_trip_keeps_the_pending_chunk_behaviour(chunk_model, tmp_path):
    chunk_model.save(tmp_path / "chunks")
    loaded = DiffusionQL.load(tmp_path / "chunks", device="cpu")
    assert (loaded.config.action_horizon, loaded.config.n_action_steps, loaded.config.n_obs_steps) == (4, 3, 3)
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(7, 2, 3)).astype(np.float32)
    mine, theirs = None, None
    for step, obs in enumerate(observations):
        start = np.array([step == 0, step == 4])
        handed = mine if step == 3 else theirs  # at step 3 the loaded model continues the original's state
        a, mine = chunk_model.predict(obs, state=mine, episode_start=start, deterministic=True)
        b, theirs = loaded.predict(obs, state=handed, episode_start=start, deterministic=True)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_the_exported_graph_returns_the_whole_chunk_predict_plans(chunk_model, tmp_path, suffix):
    histories = np.random.default_rng(1).normal(size=(5, 3, 3)).astype(np.float32)
    expected = chunk_model.predict_chunk(histories, deterministic=True)
    assert expected.shape == (5, 4, 1)
    path = chunk_model.export(tmp_path / f"policy{suffix}")
    if suffix == ".onnx":
        import onnxruntime as ort

        (got,) = ort.InferenceSession(str(path)).run(["action"], {"observation": histories})
    else:
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(torch.as_tensor(histories)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    from dql_agent.export import read_metadata

    meta = read_metadata(path)
    assert (meta["action_horizon"], meta["n_action_steps"], meta["n_obs_steps"]) == (4, 3, 3)


def test_diffusion_dice_guides_and_selects_on_chunks(pendulum_buffer):
    model = DiffusionDICE(pendulum_buffer, seed=0, device="cpu", **tiny(DiffusionDICE, **CHUNKS)).learn(5)
    chunk = model.predict_chunk(np.zeros((3, 3), np.float32), deterministic=True)
    assert chunk.shape == (4, 1) and np.all(np.abs(chunk) <= 2.0)


def test_cameras_with_a_history(tmp_path):
    from dql_agent.pixel_reach import PixelReachEnv, collect_episodes

    episodes = collect_episodes(4, observation="image+state", size=24, seed=0)
    obs_space = PixelReachEnv(observation="image+state", size=24).observation_space
    keys = ("image", "state")
    buffer = OfflineBuffer(
        {k: np.concatenate([e["observations"][k][:-1] for e in episodes]) for k in keys},
        np.concatenate([e["actions"] for e in episodes]),
        np.concatenate([e["rewards"] for e in episodes]),
        {k: np.concatenate([e["observations"][k][1:] for e in episodes]) for k in keys},
        np.concatenate([e["terminations"] for e in episodes]),
        np.concatenate([e["truncations"] for e in episodes]),
        observation_space=obs_space,
    )
    settings = tiny(action_horizon=2, n_action_steps=2, n_obs_steps=2, cnn_channels=4, image_features=8)
    model = DiffusionQL(buffer, seed=0, device="cpu", **settings).learn(3)
    history = {k: np.stack([buffer.observations[k][:2].numpy()] * 2, 1) for k in keys}
    chunk = model.predict_chunk(history, deterministic=True)
    assert chunk.shape == (2, 2, 2)
    import onnxruntime as ort

    path = model.export(tmp_path / "cameras.onnx")
    (got,) = ort.InferenceSession(str(path)).run(["action"], history)
    np.testing.assert_allclose(got, chunk, atol=1e-5)


@pytest.mark.bad_input("config", "clear error")
def test_qvpo_and_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="action_horizon must be 1 for QVPO"):
        QVPO("Pendulum-v1", device="cpu", action_horizon=4)
    with pytest.raises(ValueError, match=r"n_action_steps must be <= action_horizon \(2\), got 3"):
        DiffusionQL(
            observation_space=gym.spaces.Box(-1, 1, (3,)),
            action_space=gym.spaces.Box(-1, 1, (1,)),
            action_horizon=2,
            n_action_steps=3,
        )


def test_a_remote_chunked_policy_evaluates_as_the_local_one(chunk_model):
    from dql_agent.remote import RemotePolicy
    from dql_agent.server import PolicyServer

    local, _ = evaluate_policy(chunk_model, three_envs(), n_eval_episodes=6, return_episode_rewards=True)
    with PolicyServer(chunk_model, port=0, batching="exact") as server:
        remote = RemotePolicy(server.url)
        assert (remote.action_horizon, remote.n_action_steps, remote.n_obs_steps) == (4, 3, 3)
        served, _ = evaluate_policy(remote, three_envs(), n_eval_episodes=6, return_episode_rewards=True)
    assert sorted(served) == sorted(local)
