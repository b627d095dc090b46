"""Fixes found by comparing with the official implementations (issue 16, items 1-5)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from dql_agent import DiffusionDICE, DiffusionQL, OfflineBuffer
from dql_agent.buffer import transform_rewards
from dql_agent.integrations.hub import evaluate
from dql_agent.qvpo import QVPO


def d4rl_episodes(lengths: list[int], timeout_ends: list[bool]) -> tuple[dict, list[float]]:
    """A raw D4RL layout (no next_observations): episode i has reward i + 1 at every step, ends by
    timeout or terminal; returns the arrays and each episode's return as loaded (a timeout
    episode loses its last row, whose successor is not in the file)."""
    rows, expected = [], []
    for i, (n, timeout) in enumerate(zip(lengths, timeout_ends, strict=True)):
        for t in range(n):
            last = t == n - 1
            rows.append((i, t, float(i + 1), last and not timeout, last and timeout))
        expected.append(float(i + 1) * (n - 1 if timeout else n))
    data = {
        "observations": np.array([[i, t] for i, t, *_ in rows], np.float32),
        "actions": np.zeros((len(rows), 1), np.float32),
        "rewards": np.array([r for _, _, r, _, _ in rows], np.float32),
        "terminals": np.array([term for *_, term, _ in rows]),
        "timeouts": np.array([tout for *_, tout in rows]),
    }
    return data, expected


def test_raw_d4rl_keeps_episode_boundaries():
    data, expected = d4rl_episodes([5, 4, 6, 3], [True, False, True, True])
    buffer = OfflineBuffer.from_d4rl(data)
    np.testing.assert_allclose(buffer.episode_returns(), expected)
    # Every next observation is its own episode's successor step.
    obs, nxt = buffer.observations.numpy(), buffer.next_observations.numpy()
    same_episode = ~buffer.terminals.numpy()
    np.testing.assert_array_equal(nxt[same_episode, 0], obs[same_episode, 0])
    np.testing.assert_array_equal(nxt[same_episode, 1], obs[same_episode, 1] + 1)


def test_diffusion_dice_reward_scale_on_data_without_terminals():
    # halfcheetah-like: every episode ends by time limit. The IQL locomotion scale is
    # 1000 / (max return - min return) over the episodes, which merging them would hide.
    data, expected = d4rl_episodes([5, 5, 5], [True, True, True])
    buffer = OfflineBuffer.from_d4rl(data)
    scaled = transform_rewards(buffer, "iql_locomotion")
    scale = 1000.0 / (max(expected) - min(expected))
    np.testing.assert_allclose(scaled.numpy(), buffer.rewards.numpy() * scale, rtol=1e-6)
    DiffusionDICE(buffer, seed=0, device="cpu", hidden_dim=16, n_hidden=1, diffusion_steps=3)  # no ValueError


QVPO_TINY = {
    "hidden_dim": 16,
    "n_hidden": 2,
    "diffusion_steps": 3,
    "batch_size": 16,
    "learning_starts": 10,
    "n_diffusion_samples": 4,
    "n_entropy_samples": 2,
    "n_action_samples": 4,
}


def qvpo_weights(model: QVPO) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


def test_qvpo_entropy_schedule_spans_the_run_across_chunked_learn_calls():
    def make() -> QVPO:
        return QVPO(gym.make("Pendulum-v1", max_episode_steps=20), seed=0, device="cpu", **QVPO_TINY)

    whole = make().learn(30)
    chunked = make().learn(15)
    chunked.learn(15, reset_num_timesteps=False)
    assert whole.entropy_coef == chunked.entropy_coef == pytest.approx(0.02 * (1 - 30 / 1_000_000))
    a, b = qvpo_weights(whole), qvpo_weights(chunked)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qvpo_networks_follow_the_official_code():
    model = QVPO(
        observation_space=gym.spaces.Box(-1, 1, (11,)), action_space=gym.spaces.Box(-1, 1, (3,)), seed=0, device="cpu"
    )
    time_mlp = model.policy.actor.denoiser.time_mlp
    assert (time_mlp[1].in_features, time_mlp[1].out_features, time_mlp[3].out_features) == (32, 256, 32)
    first = model.policy.actor.denoiser.input_layer
    assert torch.count_nonzero(first.bias) == 0
    assert first.weight.std().item() == pytest.approx(1 / (2 * math.sqrt(first.in_features)), rel=0.05)
    critic_weight = model.policy.critic.q.weights[1]  # (members, 256, 256)
    assert critic_weight.std().item() == pytest.approx(1 / (2 * math.sqrt(256)), rel=0.05)
    assert all(torch.count_nonzero(b) == 0 for b in model.policy.critic.q.biases)
    torch_init = QVPO(
        observation_space=gym.spaces.Box(-1, 1, (11,)),
        action_space=gym.spaces.Box(-1, 1, (3,)),
        seed=0,
        device="cpu",
        weight_init="torch",
        time_hidden_dim=None,
    )
    assert torch_init.policy.actor.denoiser.time_mlp[1].out_features == 64
    assert torch.count_nonzero(torch_init.policy.actor.denoiser.input_layer.bias) > 0


def small_buffer() -> OfflineBuffer:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, 3)).astype(np.float32)
    return OfflineBuffer(obs, rng.uniform(-1, 1, (64, 1)), rng.normal(size=64), obs, np.zeros(64, bool))


SMALL = {"hidden_dim": 16, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 4, "batch_size": 16}


def learning_rates(model: DiffusionQL) -> list[float]:
    return [g["lr"] for opt in (model.actor_optimizer, model.critic_optimizer) for g in opt.param_groups]


def test_lr_decay_spans_the_first_learn_call_and_holds_at_zero():
    model = DiffusionQL(small_buffer(), seed=0, device="cpu", lr_decay=True, **SMALL)
    model.learn(10)
    assert learning_rates(model) == [0.0, 0.0]  # decayed over the run: 10 steps
    model.learn(5, reset_num_timesteps=False)
    assert learning_rates(model) == [0.0, 0.0]  # torch's cosine would climb back up here
    halfway = DiffusionQL(small_buffer(), seed=0, device="cpu", lr_decay=True, lr_decay_steps=20, **SMALL).learn(10)
    assert learning_rates(halfway) == pytest.approx([3e-4 * 0.5] * 2)


def test_evaluation_protocol_is_a_choice_and_is_recorded():
    env = gym.make("Pendulum-v1", max_episode_steps=5)
    buffer = small_buffer()
    buffer = OfflineBuffer(
        buffer.observations.numpy(),
        buffer.actions.numpy(),
        buffer.rewards.numpy(),
        buffer.next_observations.numpy(),
        np.zeros(len(buffer), bool),
        action_space=env.action_space,
    )
    model = DiffusionQL(buffer, env=env, seed=0, device="cpu", **SMALL)
    assert evaluate(model, env, n_eval_episodes=1)["is_deterministic"] is True
    stochastic = evaluate(model, env, n_eval_episodes=1, deterministic=False)
    assert stochastic["is_deterministic"] is False
    from dql_agent.integrations.hub import make_model_card

    assert "sampled by softmax over fresh candidates" in make_model_card(model, stochastic).text
