"""DiffusionQL: the update, the SB3 surface, checkpoints."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import TINY
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from dql_agent import DiffusionQL, OfflineBuffer, get_preset


def absorbing_buffer(terminal: bool, n: int = 64) -> OfflineBuffer:
    """One state, reward 1 for any action, looping to itself: Q = 1 / (1 - gamma) (or 1 if terminal)."""
    rng = np.random.default_rng(0)
    obs = np.ones((n, 2), np.float32)
    return OfflineBuffer(obs, rng.uniform(-1, 1, (n, 1)), np.ones(n), obs, np.full(n, terminal))


def td_error(model: DiffusionQL, target: torch.Tensor) -> float:
    batch = model.replay.sample(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model.critic(batch.observations, batch.actions) - target).pow(2).mean())


@pytest.mark.parametrize("terminal", [False, True])
def test_one_update_moves_the_critic_toward_the_td_target(terminal):
    model = DiffusionQL(absorbing_buffer(terminal), seed=0, device="cpu", gamma=0.5, **TINY)
    batch = model.replay.sample(64, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the target the first step regresses to: r + gamma * min Q'(s', a')
        next_a = model.ema_actor.sample(batch.next_observations, torch.Generator().manual_seed(1))
        bootstrap = 0.0 if terminal else 0.5 * model.critic_target(batch.next_observations, next_a).min(0).values
        y = batch.rewards + bootstrap
    before = td_error(model, y)
    model.learn(1)
    assert td_error(model, y) < before


def test_critic_converges_to_the_known_q_value():
    model = DiffusionQL(
        absorbing_buffer(False), seed=0, device="cpu", gamma=0.5, tau=0.05, critic_learning_rate=3e-3, **TINY
    )
    model.learn(400)
    q = model.critic(torch.ones(8, 2), torch.linspace(-1, 1, 8)[:, None])
    np.testing.assert_allclose(q.detach().numpy(), 2.0, atol=0.15)  # 1 / (1 - 0.5)


def test_predict_batching_bounds_and_determinism(tiny_model):
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    action, state = tiny_model.predict(obs, deterministic=True)
    assert action.shape == (1,) and state is None
    assert np.all(np.abs(action) <= 2.0)
    again, _ = tiny_model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(action, again)
    batch = np.stack([obs, obs * 0.5, -obs])
    actions, _ = tiny_model.predict(batch, deterministic=True)
    assert actions.shape == (3, 1)
    np.testing.assert_allclose(actions[0], action, atol=1e-6)  # same obs, same action inside a batch
    stochastic = np.array([tiny_model.predict(obs)[0] for _ in range(20)])
    assert stochastic.std() > 0  # softmax selection over fresh samples
    with pytest.raises(ValueError, match=r"\(obs, info\) tuple"):
        tiny_model.predict(env.reset())
    with pytest.raises(ValueError, match=r"observation has shape \(4,\); expected \(3,\)"):
        tiny_model.predict(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.predict(np.array([np.nan, 0.0, 0.0]))


def test_evaluate_policy_on_env_and_vecenv(tiny_model):
    mean, std = evaluate_policy(tiny_model, Monitor(gym.make("Pendulum-v1")), n_eval_episodes=2)
    assert -2000 < mean < 0 and std >= 0
    vec_env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))] * 3)
    returns, lengths = evaluate_policy(tiny_model, vec_env, n_eval_episodes=3, return_episode_rewards=True)
    assert len(returns) == 3 and lengths == [200, 200, 200]


def test_learn_drives_sb3_callbacks(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, env="Pendulum-v1", seed=0, device="cpu", **TINY)
    eval_cb = EvalCallback(
        Monitor(gym.make("Pendulum-v1")),
        n_eval_episodes=1,
        eval_freq=10,
        best_model_save_path=str(tmp_path / "best"),
        log_path=str(tmp_path / "eval"),
    )
    ckpt_cb = CheckpointCallback(save_freq=15, save_path=str(tmp_path / "ckpt"))
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    model.learn(30, callback=[eval_cb, ckpt_cb], log_interval=10, progress_bar=True)
    assert model.num_timesteps == 30
    evaluations = np.load(tmp_path / "eval" / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [10, 20, 30]
    best = DiffusionQL.load(tmp_path / "best" / "best_model")
    assert best.num_timesteps in (10, 20, 30)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["rl_model_15_steps.zip", "rl_model_30_steps.zip"]
    assert DiffusionQL.load(tmp_path / "ckpt" / "rl_model_15_steps.zip").num_timesteps == 15
    header = (tmp_path / "log" / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train/critic_loss", "train/actor_loss", "train/bc_loss", "train/q_loss", "time/fps"):
        assert key in header


def test_callback_returning_false_stops_and_counts_continue(pendulum_buffer):
    class StopAt(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 7

    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    model.learn(50, callback=StopAt())
    assert model.num_timesteps == 7
    model.learn(5, reset_num_timesteps=False)
    assert model.num_timesteps == 12 and model._n_updates == 12


def test_save_load_gives_identical_deterministic_actions(tiny_model, tmp_path):
    obs = np.random.default_rng(0).uniform(-1, 1, (5, 3)).astype(np.float32)
    expected, _ = tiny_model.predict(obs, deterministic=True)
    for path in (tmp_path / "model", tmp_path / "model.zip"):
        tiny_model.save(path)
        loaded = DiffusionQL.load(path, device="cpu")
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], expected)
        assert loaded.config == tiny_model.config and loaded.num_timesteps == 20
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]


def test_resume_from_optimizer_state_matches_an_uninterrupted_run(pendulum_buffer, tmp_path):
    config = dict(TINY, ema_start_step=5, ema_update_every=2)
    straight = DiffusionQL(pendulum_buffer, seed=3, device="cpu", **config).learn(20)
    first = DiffusionQL(pendulum_buffer, seed=3, device="cpu", **config).learn(10)
    first.save(tmp_path / "ckpt", include_optimizer=True)
    resumed = DiffusionQL.load(tmp_path / "ckpt", device="cpu")
    resumed.set_buffer(pendulum_buffer)
    resumed.learn(10, reset_num_timesteps=False)
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_same_seed_same_weights(pendulum_buffer):
    a = DiffusionQL(pendulum_buffer, seed=1, device="cpu", **TINY).learn(5)
    b = DiffusionQL(pendulum_buffer, seed=1, device="cpu", **TINY).learn(5)
    c = DiffusionQL(pendulum_buffer, seed=2, device="cpu", **TINY).learn(5)
    sa, sb, sc = (m.policy.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_max_q_backup_and_lr_decay_train(pendulum_buffer):
    model = DiffusionQL(
        pendulum_buffer, seed=0, device="cpu", max_q_backup=True, lr_decay=True, lr_decay_steps=10, **TINY
    )
    model.learn(10)
    assert model.actor_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())


def test_hyperparameters_presets_and_errors(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, preset="antmaze-medium-play-v0", eta=1.5, device="cpu")
    assert (model.config.learning_rate, model.config.eta, model.config.max_q_backup) == (1e-3, 1.5, True)
    assert model.config.reward_transform == "cql_antmaze" and model.config.grad_norm == 2.0
    assert get_preset("mujoco/hopper/medium-v0")["grad_norm"] == 9.0
    assert get_preset("pen-human")["learning_rate"] == 3e-5
    with pytest.raises(ValueError, match="preset must be one of"):
        DiffusionQL(pendulum_buffer, preset="cartpole")
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['learning_rat'\]"):
        DiffusionQL(pendulum_buffer, learning_rat=1e-3)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        DiffusionQL(pendulum_buffer, batch_size=0)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DiffusionQL(pendulum_buffer, beta_schedule="quadratic")
    with pytest.raises(ValueError, match="env observation_space"):
        DiffusionQL(
            pendulum_buffer,
            env="MountainCarContinuous-v0",
            observation_space=pendulum_buffer.observation_space,
            action_space=pendulum_buffer.action_space,
        )
    with pytest.raises(RuntimeError, match="no dataset"):
        DiffusionQL(
            observation_space=pendulum_buffer.observation_space, action_space=pendulum_buffer.action_space
        ).learn(1)


def test_dict_observations_are_flattened_in_space_order():
    space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-5, 5, (3,)),
            "desired_goal": gym.spaces.Box(-5, 5, (2,)),
            "achieved_goal": gym.spaces.Box(-5, 5, (2,)),
        }
    )
    assert list(space.spaces) == ["achieved_goal", "desired_goal", "observation"]
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (100, 7)).astype(np.float32)
    buffer = OfflineBuffer(
        obs,
        rng.uniform(-1, 1, (100, 2)),
        rng.normal(size=100),
        obs,
        np.zeros(100, bool),
        observation_space=space,
        action_space=gym.spaces.Box(-1, 1, (2,)),
    )
    model = DiffusionQL(buffer, seed=0, device="cpu", **TINY).learn(3)
    single = {k: space[k].sample() for k in space.spaces}
    flat = gym.spaces.flatten(space, single)
    a, _ = model.predict(single, deterministic=True)
    b = model.policy.select_action(torch.as_tensor(flat[None]), deterministic=True)
    np.testing.assert_allclose(a, b.numpy()[0], atol=1e-6)  # Box(-1, 1): unscaling is the identity
    batch = {k: np.stack([v, v]) for k, v in single.items()}
    assert model.predict(batch, deterministic=True)[0].shape == (2, 2)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['observation'\]"):
        model.predict({k: v for k, v in single.items() if k != "observation"})
    with pytest.raises(TypeError, match="Discrete"):
        DiffusionQL(observation_space=gym.spaces.Discrete(3), action_space=gym.spaces.Box(-1, 1, (2,)))
