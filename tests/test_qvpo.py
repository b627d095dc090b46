"""QVPO: config, the update, experience collection and learning (the SB3 surface and checkpoints: test_contract.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from dql_agent.qvpo import QVPO, QVPOConfig
from tests.settings import TINY_SETTINGS

# Small networks and sample counts for the plumbing tests (not for learning).
TINY = TINY_SETTINGS["QVPO"]

# The Pendulum learning checks. Differences from the paper's (= official code's) settings, all to
# fit a 2-core CPU budget: networks 64 wide with 2 hidden layers (paper 256 x 3), 5 diffusion steps
# (paper 20), batch 64 (paper 256), N_d = 8 samples for the Q-weighted loss (paper 64), 500 random
# warm-up steps (paper 10,000), learning rates 1e-3 actor / 3e-3 critic (paper 1e-4 / 3e-4),
# tau 0.01 (paper 0.005) and gamma 0.98 (paper 0.99, Pendulum's usual value in rl-zoo). Unchanged:
# cosine schedule, qadv weights with the mean-Q baseline, N_e = 10 uniform actions, omega_ent
# 0.02 -> 0.002 over the run, K_b = K_t = 4, K_eval = 32, update-to-data ratio 1, grad clip 2.
PENDULUM = {
    "hidden_dim": 64,
    "n_hidden": 2,
    "diffusion_steps": 5,
    "batch_size": 64,
    "n_diffusion_samples": 8,
    "learning_starts": 500,
    "learning_rate": 1e-3,
    "critic_learning_rate": 3e-3,
    "tau": 0.01,
    "gamma": 0.98,
}


def seeded_eval_env(n_envs: int = 1, seed: int = 100) -> DummyVecEnv:
    env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))] * n_envs)
    env.seed(seed)
    return env


@pytest.fixture
def tiny_qvpo() -> QVPO:
    """A tiny QVPO on Pendulum-v1 after 60 env steps (10 of them with an update)."""
    return QVPO("Pendulum-v1", seed=0, device="cpu", **TINY).learn(60)


# config ------------------------------------------------------------------------------------------
def test_defaults_are_the_official_codes():
    c = QVPOConfig()
    assert (c.diffusion_steps, c.beta_schedule, c.n_diffusion_samples, c.n_entropy_samples) == (20, "cosine", 64, 10)
    assert (c.entropy_coef_start, c.entropy_coef_end, c.q_transform) == (0.02, 0.002, "qadv")
    assert (c.n_behavior_samples, c.n_target_samples, c.n_action_samples) == (4, 4, 32)
    assert (c.batch_size, c.learning_rate, c.critic_learning_rate, c.adam_eps) == (256, 1e-4, 3e-4, 1e-5)
    assert (c.gamma, c.tau, c.grad_norm, c.buffer_size, c.learning_starts, c.utd_ratio) == (
        0.99,
        0.005,
        2.0,
        1_000_000,
        10_000,
        1,
    )
    assert QVPOConfig.from_dict(c.to_dict()) == c


def test_the_old_name_of_n_action_samples_still_works():
    with pytest.warns(DeprecationWarning, match="'n_eval_samples' is renamed 'n_action_samples'"):
        model = QVPO("Pendulum-v1", device="cpu", seed=0, hidden_dim=16, n_eval_samples=3)
    assert model.config.n_action_samples == 3 and model.policy.deterministic_noise.shape[1] == 3
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['n_candidates'\]"):
        QVPO("Pendulum-v1", device="cpu", n_candidates=3)  # Diffusion-DICE's old name, not QVPO's


def test_entropy_coefficient_decays_linearly_to_its_floor():
    c = QVPOConfig()
    assert c.entropy_coef(0, 1000) == pytest.approx(0.02)
    assert c.entropy_coef(500, 1000) == pytest.approx(0.01)
    assert c.entropy_coef(900, 1000) == pytest.approx(0.002)  # the floor is reached at 90 %
    assert c.entropy_coef(1000, 1000) == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("batch_size", 0, "an int >= 1"),
        ("diffusion_steps", 2.5, "int"),
        ("n_diffusion_samples", True, "int"),
        ("n_entropy_samples", -1, "an int >= 0"),
        ("learning_starts", -5, "an int >= 0"),
        ("learning_rate", 0.0, "> 0"),
        ("gamma", 1.5, r"in \[0, 1\]"),
        ("tau", 0.0, r"in \(0, 1\]"),
        ("grad_norm", -1.0, "> 0 or None"),
        ("entropy_coef_end", 0.5, r"in \[0, entropy_coef_start=0.02\]"),
        ("entropy_decay_steps", 0, "an int >= 1 or None"),
        ("beta_schedule", "quadratic", "one of"),
        ("q_transform", "qexp", "one of"),
        ("time_dim", 7, "an even int >= 4"),
    ],
)
def test_config_errors_name_the_field(field, value, expected):
    with pytest.raises((TypeError, ValueError), match=rf"^{field} must be {expected}.*got {value!r}"):
        QVPOConfig(**{field: value})


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['n_samples'\]"):
        QVPO("Pendulum-v1", n_samples=3)
    with pytest.raises(ValueError, match="unknown QVPOConfig key"):
        QVPOConfig.from_dict({"eta": 1.0})
    with pytest.raises(ValueError, match="cannot tell the spaces"):
        QVPO()
    env = gym.make("Pendulum-v1")
    model = QVPO(observation_space=env.observation_space, action_space=env.action_space, device="cpu", **TINY)
    with pytest.raises(RuntimeError, match="no env"):
        model.learn(10)
    with pytest.raises(ValueError, match="env observation_space"):
        model.set_env("MountainCarContinuous-v0")
    with pytest.raises(TypeError, match="action_space must be a gymnasium Box"):
        QVPO("CartPole-v1")


# the update --------------------------------------------------------------------------------------
def test_weighted_eps_loss_is_the_diffusion_loss_under_unit_weights(tiny_qvpo):
    actor = tiny_qvpo.actor
    actions, states = torch.rand(16, 1) * 2 - 1, torch.randn(16, 3)
    plain = actor.loss(actions, states, torch.Generator().manual_seed(0))
    weighted = actor.loss(actions, states, torch.Generator().manual_seed(0), weights=torch.ones(16))
    torch.testing.assert_close(weighted, plain)
    assert actor.loss(actions, states, weights=torch.zeros(16)) == 0.0
    doubled = actor.loss(actions, states, torch.Generator().manual_seed(0), weights=torch.full((16,), 2.0))
    torch.testing.assert_close(doubled, 2 * plain)


def test_one_update_changes_every_trained_network(tiny_qvpo):
    before = {k: v.clone() for k, v in tiny_qvpo.policy.state_dict().items()}
    losses = tiny_qvpo.train_step()
    assert set(losses) == {"critic_loss", "actor_loss", "q_mean", "weight_mean"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["weight_mean"] >= 0  # qadv: the best sample's advantage over the mean is never negative
    after = tiny_qvpo.policy.state_dict()
    for prefix in ("actor.", "actor_target.", "critic.", "critic_target."):
        changed = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
        assert changed, f"no {prefix[:-1]} parameter changed"


def test_warm_up_is_random_and_updates_start_after_it():
    model = QVPO("Pendulum-v1", seed=0, device="cpu", **TINY)
    model.learn(49)
    assert model.n_updates == 0 and len(model.replay_buffer) == 49
    model.learn(1, reset_num_timesteps=False)  # the 50th transition completes the warm-up: first update
    assert model.n_updates == 1
    actions = model.replay_buffer.actions[:50]
    assert actions.min() < -0.8 and actions.max() > 0.8  # uniform over the whole box
    model.learn(10, reset_num_timesteps=False)
    assert model.n_updates == 11 and model.num_timesteps == 60  # one per env step from step 50 on


# experience collection ---------------------------------------------------------------------------
class CountingEnv(gym.Env):
    """obs = [steps taken]; terminates after ``terminate_at`` steps when that is set."""

    observation_space = gym.spaces.Box(-100, 100, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self, terminate_at: int | None = None):
        self.terminate_at, self.t = terminate_at, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.t == self.terminate_at, False, {}


@pytest.mark.parametrize("terminate_at", [None, 3])
def test_truncation_is_not_termination(terminate_at):
    env = TimeLimit(CountingEnv(terminate_at), max_episode_steps=4)
    model = QVPO(env, seed=0, device="cpu", **dict(TINY, learning_starts=100))
    model.learn(8)
    rb = model.replay_buffer
    obs, next_obs = rb.observations[:8, 0].tolist(), rb.next_observations[:8, 0].tolist()
    terminals = rb.terminals[:8].tolist()
    if terminate_at is None:  # two episodes cut by the time limit at 4 steps: bootstrap from both ends
        assert obs == [0, 1, 2, 3, 0, 1, 2, 3]
        assert next_obs == [1, 2, 3, 4, 1, 2, 3, 4]  # the real final observation, not the reset one
        assert terminals == [False] * 8
        assert rb.sample(64).not_dones.min() == 1.0
    else:  # episodes of 3 steps that really end
        assert obs == [0, 1, 2, 0, 1, 2, 0, 1]
        assert next_obs == [1, 2, 3, 1, 2, 3, 1, 2]
        assert terminals == [False, False, True, False, False, True, False, False]


def test_vecenv_counts_env_steps():
    env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))] * 2)
    model = QVPO(env, seed=0, device="cpu", **TINY).learn(60)
    assert model.num_timesteps == 60 and len(model.replay_buffer) == 60
    assert model.n_updates == 12  # utd 1: two updates per VecEnv step once 50 steps are in (50, 52, ..., 60)


# learning ----------------------------------------------------------------------------------------
@pytest.mark.slow  # ~50 s of a 10-minute suite budget; QVPO's update is checked step by step above
def test_learns_pendulum_within_a_cpu_budget():
    """3,000 env steps (about 2,500 updates, ~40 s on 2 shared cores) lift the deterministic return
    of 5 seeded episodes from random's ~-1,200 to above -900. Settings: ``PENDULUM`` above."""
    torch.set_num_threads(1)
    model = QVPO("Pendulum-v1", seed=0, device="cpu", **PENDULUM).learn(3000)
    mean, _ = evaluate_policy(model, seeded_eval_env(), n_eval_episodes=5)
    assert mean > -900, mean


@pytest.mark.slow
def test_learns_pendulum_to_near_optimal():
    """20,000 env steps with the ``PENDULUM`` settings reach a mean return above -400."""
    torch.set_num_threads(1)
    model = QVPO("Pendulum-v1", seed=0, device="cpu", **PENDULUM).learn(20_000)
    mean, _ = evaluate_policy(model, seeded_eval_env(), n_eval_episodes=10)
    assert mean > -400, mean
