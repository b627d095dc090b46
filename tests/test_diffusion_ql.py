"""DiffusionQL: the update, hyperparameters and presets, Dict observations (the SB3 surface: test_contract.py)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL, OfflineBuffer, get_preset
from tests.settings import TINY


def absorbing_buffer(terminal: bool, n: int = 64) -> OfflineBuffer:
    """One state, reward 1 for any action, looping to itself: Q = 1 / (1 - gamma) (or 1 if terminal)."""
    rng = np.random.default_rng(0)
    obs = np.ones((n, 2), np.float32)
    return OfflineBuffer(obs, rng.uniform(-1, 1, (n, 1)), np.ones(n), obs, np.full(n, terminal))


def td_error(model: DiffusionQL, target: torch.Tensor) -> float:
    batch = model.replay_buffer.sample(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model.critic(batch.observations, batch.actions) - target).pow(2).mean())


@pytest.mark.parametrize("terminal", [False, True])
def test_one_update_moves_the_critic_toward_the_td_target(terminal):
    model = DiffusionQL(absorbing_buffer(terminal), seed=0, device="cpu", gamma=0.5, **TINY)
    batch = model.replay_buffer.sample(64, torch.Generator().manual_seed(0))
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


def test_replay_is_the_deprecated_name_of_replay_buffer(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    with pytest.warns(DeprecationWarning, match="model.replay is renamed model.replay_buffer"):
        assert model.replay is model.replay_buffer
    assert len(model.replay_buffer) == len(pendulum_buffer)


def test_a_multi_dimensional_action_box_round_trips(tmp_path):
    """A (2, 2) action Box: the networks see 4 dims, predict answers in the Box's shape and bounds."""
    rng = np.random.default_rng(0)
    obs_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    act_space = gym.spaces.Box(np.array([[-2.0, -1.0], [0.0, -3.0]], np.float32), np.float32(3.0), (2, 2), np.float32)
    n = 100
    buffer = OfflineBuffer(
        observations=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        actions=rng.uniform(act_space.low, act_space.high, (n, 2, 2)).reshape(n, 4).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        terminals=np.zeros(n, bool),
        observation_space=obs_space,
        action_space=act_space,
    )
    model = DiffusionQL(buffer, device="cpu", seed=0, **TINY).learn(3)
    one, _ = model.predict(np.zeros(3, np.float32), deterministic=True)
    batch, _ = model.predict(rng.uniform(-1, 1, (5, 3)).astype(np.float32))
    assert one.shape == (2, 2) and batch.shape == (5, 2, 2)
    assert act_space.contains(one) and all(act_space.contains(a) for a in batch)
    model.save(tmp_path / "m")
    again, _ = DiffusionQL.load(tmp_path / "m", device="cpu").predict(np.zeros(3, np.float32), deterministic=True)
    np.testing.assert_array_equal(again, one)
