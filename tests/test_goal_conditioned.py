"""Goal-conditioned data end to end on gymnasium-robotics' PointMaze (a real goal env, headless):
SB3's DictReplayBuffer and HerReplayBuffer, D4RL/Minari dict layouts, success rate, third-party
env ids on the command line.

(FetchReach would be the classic goal task, but it fails inside gymnasium-robotics with mujoco 4;
that is not ours to fix, so PointMaze stands in.)
"""

from __future__ import annotations

import json

import gymnasium as gym
import gymnasium_robotics
import h5py
import numpy as np
import pytest
from stable_baselines3 import HerReplayBuffer
from stable_baselines3.common.buffers import DictReplayBuffer
from stable_baselines3.common.vec_env import DummyVecEnv

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.cli import main as cli_main
from dql_agent.integrations.hub import evaluate, make_model_card

gym.register_envs(gymnasium_robotics)
ENV_ID = "PointMaze_UMaze-v3"
STEPS = 25  # a short time limit: episodes end by truncation every 25 steps
TINY = {"hidden_dim": 16, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 4, "batch_size": 16}


def make_env() -> gym.Env:
    return gym.make(ENV_ID, max_episode_steps=STEPS)


def fill(buffer, episodes: int, seed: int = 0) -> list[dict]:
    """Random-action episodes stored as SB3's off-policy algorithms store them; returns the steps."""
    env, rng, steps = make_env(), np.random.default_rng(seed), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            next_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            buffer.add(
                {k: v[None] for k, v in obs.items()},
                {k: v[None] for k, v in next_obs.items()},
                action[None],  # the action space is [-1, 1]: SB3's scaled action is the action
                np.array([reward]),
                np.array([done]),
                [{**info, "TimeLimit.truncated": truncated and not terminated}],
            )
            steps.append({"obs": obs, "next_obs": next_obs, "action": action, "reward": reward, "timeout": truncated})
            obs = next_obs
    return steps


def test_dict_replay_buffer_loads_as_stored_in_gymnasium_flatten_order():
    env = make_env()
    rb = DictReplayBuffer(200, env.observation_space, env.action_space, n_envs=1)
    steps = fill(rb, 3)
    buffer = OfflineBuffer.from_sb3(rb)
    assert len(buffer) == len(steps) == 3 * STEPS
    assert isinstance(buffer.observation_space, gym.spaces.Dict) and buffer.obs_dim == 8
    for row in (0, STEPS - 1, 2 * STEPS + 3):
        expected = gym.spaces.flatten(env.observation_space, steps[row]["obs"])
        np.testing.assert_allclose(buffer.observations[row].numpy(), expected, rtol=1e-6)
        expected_next = gym.spaces.flatten(env.observation_space, steps[row]["next_obs"])
        np.testing.assert_allclose(buffer.next_observations[row].numpy(), expected_next, rtol=1e-6)
        np.testing.assert_allclose(buffer.actions[row].numpy(), steps[row]["action"], rtol=1e-6)
    assert buffer.timeouts.sum() == 3 and not buffer.terminals.any()


def test_her_replay_buffer_as_stored_plus_relabelled_samples():
    env = make_env()
    vec_env = DummyVecEnv([make_env])
    her = HerReplayBuffer(200, env.observation_space, env.action_space, env=vec_env, n_envs=1, n_sampled_goal=4)
    fill(her, 2)
    stored = OfflineBuffer.from_sb3(her)
    assert len(stored) == 2 * STEPS
    buffer = OfflineBuffer.from_sb3(her, relabeled_samples=200)
    assert len(buffer) == 2 * STEPS + 200
    # The relabelled rows carry the reward the env computes for their (new) goal.
    obs_space = env.observation_space
    n_achieved, n_desired = 2, 2  # flattened order: achieved_goal, desired_goal, observation
    relabelled = buffer.next_observations[2 * STEPS :].numpy()
    next_achieved = relabelled[:, :n_achieved]
    desired = buffer.observations[2 * STEPS :, n_achieved : n_achieved + n_desired].numpy()
    rewards = env.unwrapped.compute_reward(next_achieved, desired, [{}] * len(desired))
    np.testing.assert_allclose(buffer.rewards[2 * STEPS :].numpy(), rewards, atol=1e-6)
    assert isinstance(obs_space, gym.spaces.Dict)
    # At least some goals were relabelled (HER's future strategy with 4 sampled goals: 80%).
    stored_goals = {tuple(np.round(r, 5)) for r in stored.observations[:, 2:4].numpy()}
    new_goals = {tuple(np.round(r, 5)) for r in desired}
    assert new_goals - stored_goals


@pytest.mark.bad_input("habits", "clear error")
def test_relabelling_needs_a_her_buffer():
    env = make_env()
    rb = DictReplayBuffer(50, env.observation_space, env.action_space, n_envs=1)
    fill(rb, 1)
    with pytest.raises(TypeError, match="relabeled_samples needs a HerReplayBuffer, got DictReplayBuffer"):
        OfflineBuffer.from_sb3(rb, relabeled_samples=10)


def d4rl_dict(steps: list[dict]) -> dict:
    keys = steps[0]["obs"].keys()
    terminals = np.zeros(len(steps), bool)
    return {
        "observations": {k: np.stack([s["obs"][k] for s in steps]) for k in keys},
        "actions": np.stack([s["action"] for s in steps]),
        "rewards": np.array([s["reward"] for s in steps]),
        "terminals": terminals,
        "timeouts": np.array([s["timeout"] for s in steps]),
    }


@pytest.mark.parametrize("layout", ["mapping", "npz", "hdf5"])
def test_from_d4rl_with_dict_observations(tmp_path, layout):
    env = make_env()
    rb = DictReplayBuffer(200, env.observation_space, env.action_space, n_envs=1)
    steps = fill(rb, 2)
    data = d4rl_dict(steps)
    if layout == "npz":  # an .npz holds no dicts: keys observations/<key>
        flat = {f"observations/{k}": v for k, v in data["observations"].items()}
        np.savez(tmp_path / "d.npz", **flat, **{k: v for k, v in data.items() if k != "observations"})
        data = tmp_path / "d.npz"
    elif layout == "hdf5":  # the D4RL / Minari goal layout: a group per observation key
        with h5py.File(tmp_path / "d.hdf5", "w") as f:
            for key, value in data.items():
                if isinstance(value, dict):
                    group = f.create_group(key)
                    for sub, array in value.items():
                        group.create_dataset(sub, data=array)
                else:
                    f.create_dataset(key, data=value)
        data = tmp_path / "d.hdf5"
    buffer = OfflineBuffer.from_d4rl(data, observation_space=env.observation_space)
    # Raw D4RL: the successor of each row is the next row, and the timeout rows are dropped.
    assert len(buffer) == len(steps) - 2
    np.testing.assert_allclose(
        buffer.next_observations[0].numpy(), gym.spaces.flatten(env.observation_space, steps[1]["obs"]), rtol=1e-6
    )
    from_sb3 = OfflineBuffer.from_sb3(rb)
    np.testing.assert_allclose(buffer.observations[:5].numpy(), from_sb3.observations[:5].numpy())


@pytest.mark.bad_input("data", "clear error")
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("desired_goal"), r"observations keys must be .*missing \['desired_goal'\]"),
        (
            lambda o: o.update(achieved_goal=np.zeros((4, 3))),
            r"observations\['achieved_goal'\] must have shape \(N, 2\)",
        ),
        (lambda o: o.update(observation=np.zeros((3, 4))), r"observations\['observation'\] has 3 rows, expected 4"),
        (lambda o: o["observation"].__setitem__((1, 1), np.nan), r"observations\['observation'\] has NaN/inf"),
    ],
)
def test_dict_observation_errors_name_the_key(change, message):
    space = make_env().observation_space
    obs = {"achieved_goal": np.zeros((4, 2)), "desired_goal": np.ones((4, 2)), "observation": np.zeros((4, 4))}
    change(obs)
    next_obs = {"achieved_goal": np.zeros((4, 2)), "desired_goal": np.ones((4, 2)), "observation": np.zeros((4, 4))}
    with pytest.raises((ValueError, TypeError), match=message):
        OfflineBuffer(obs, np.zeros((4, 2)), np.zeros(4), next_obs, np.zeros(4, bool), observation_space=space)


@pytest.fixture(scope="module")
def maze_model():
    env = make_env()
    rb = DictReplayBuffer(200, env.observation_space, env.action_space, n_envs=1)
    fill(rb, 3)
    return DiffusionQL(OfflineBuffer.from_sb3(rb), env=make_env(), seed=0, device="cpu", **TINY).learn(20)


def test_success_rate_in_evaluate_the_card_and_its_model_index(maze_model):
    results = evaluate(maze_model, make_env(), n_eval_episodes=2)
    assert results["success_rate"] is not None and 0.0 <= results["success_rate"] <= 1.0
    card = make_model_card(maze_model, results=results, repo_id="user/maze")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["success_rate"] == round(results["success_rate"], 4)
    assert "Success rate" in card.text
    pendulum = evaluate_success_free()
    assert pendulum["success_rate"] is None


def evaluate_success_free() -> dict:
    from tests.settings import TINY as PENDULUM_TINY

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(32, 3)).astype(np.float32)
    env = gym.make("Pendulum-v1", max_episode_steps=5)
    buffer = OfflineBuffer(
        obs, rng.uniform(-2, 2, (32, 1)), rng.normal(size=32), obs, np.zeros(32, bool), action_space=env.action_space
    )
    model = DiffusionQL(buffer, env=env, seed=0, device="cpu", **PENDULUM_TINY)
    return evaluate(model, env, n_eval_episodes=1)


def test_cli_third_party_env_is_recorded_apart_and_reimported_only_when_named(tmp_path, capsys):
    # Train from a dataset file with the env named module:id, as gymnasium's convention has it.
    env = make_env()
    rb = DictReplayBuffer(100, env.observation_space, env.action_space, n_envs=1)
    data = d4rl_dict(fill(rb, 2))
    flat = {f"observations/{k}": v for k, v in data["observations"].items()}
    np.savez(tmp_path / "d.npz", **flat, **{k: v for k, v in data.items() if k != "observations"})
    out = tmp_path / "trained"
    args = ["train", str(tmp_path / "d.npz"), "--env", f"gymnasium_robotics:{ENV_ID}", "-o", str(out)]
    args += ["--steps", "3", "--episodes", "1", "--no-progress", "--device", "cpu"]
    args += [f"--set={k}={v}" for k, v in TINY.items()]
    cli_main(args)
    assert "success rate" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["metadata"]["env_id"] == ENV_ID and config["metadata"]["env_module"] == "gymnasium_robotics"
    # Later commands do not import the recorded module on their own: they say which flag to add.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", str(out), "--episodes", "1", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "pass --import gymnasium_robotics" in capsys.readouterr().err
    cli_main(["evaluate", str(out), "--episodes", "1", "--device", "cpu", "--import", "gymnasium_robotics"])
    assert "success rate" in capsys.readouterr().out


@pytest.mark.bad_input("cli", "clear error")
def test_an_unregistered_env_names_the_flag_that_registers_it(tmp_path, capsys, maze_model):
    maze_model.save(tmp_path / "maze")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", str(tmp_path / "maze"), "--env", "NotRegisteredMaze-v3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "NotRegisteredMaze" in err and "pass --import PACKAGE or --env PACKAGE:NotRegisteredMaze-v3" in err


@pytest.mark.bad_input("habits", "clear error")
def test_a_vec_normalize_env_is_refused_where_the_model_meets_it(maze_model):
    from stable_baselines3.common.vec_env import VecNormalize

    from dql_agent.integrations.sb3 import wrap_env

    normalized = VecNormalize(DummyVecEnv([make_env]), norm_obs=True)
    with pytest.raises(ValueError, match=r"VecNormalize\(norm_obs=True\).*pass the unwrapped env"):
        maze_model.set_env(normalized)
    with pytest.raises(ValueError, match=r"VecNormalize\(norm_obs=True\)"):
        evaluate(maze_model, normalized, n_eval_episodes=1)
    rewards_only = VecNormalize(DummyVecEnv([make_env]), norm_obs=False, norm_reward=True)
    assert wrap_env(rewards_only) is rewards_only  # normalised rewards do not change what the model sees


@pytest.mark.bad_input("habits", "clear error")
def test_an_unbounded_action_space_names_the_override():
    obs = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"pass action_space=gymnasium.spaces.Box\(low, high\)"):
        OfflineBuffer(
            obs,
            np.zeros((4, 1)),
            np.zeros(4),
            obs,
            np.zeros(4, bool),
            action_space=gym.spaces.Box(-np.inf, np.inf, (1,)),
        )


def test_offline_buffer_repr_says_what_it_holds():
    env = make_env()
    rb = DictReplayBuffer(100, env.observation_space, env.action_space, n_envs=1)
    fill(rb, 2)
    text = repr(OfflineBuffer.from_sb3(rb, metadata={"dataset_id": "maze/random-v0"}))
    assert text == (
        "OfflineBuffer(50 transitions, 2 episodes of 'maze/random-v0', obs_dim=8, action_dim=2, "
        "terminals=0, timeouts=2, device=cpu)"
    )
