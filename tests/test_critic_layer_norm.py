"""critic_layer_norm: LayerNorm on the critics' hidden pre-activations, an opt-in stabiliser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL
from dql_agent.networks import Critic
from tests.settings import TINY


def test_off_adds_nothing_and_draws_nothing():
    torch.manual_seed(0)
    plain = Critic(3, 1, hidden_dim=16, n_hidden=2)
    torch.manual_seed(0)
    normed = Critic(3, 1, hidden_dim=16, n_hidden=2, layer_norm=True)
    assert len(normed.state_dict()) == len(plain.state_dict()) + 4  # a scale and a shift per hidden layer
    for name, value in plain.state_dict().items():
        assert torch.equal(value, normed.state_dict()[name])  # the same initial weights: no extra draws


def test_layer_norm_makes_the_critic_blind_to_the_scale_of_a_hidden_layer():
    critic = Critic(3, 1, hidden_dim=16, n_hidden=2, layer_norm=True)
    s, a = torch.randn(8, 3), torch.randn(8, 1)
    before = critic(s, a)
    with torch.no_grad():  # scale the first layer's pre-activation by 10: LayerNorm undoes it
        critic.q.weights[0].mul_(10.0)
        critic.q.biases[0].mul_(10.0)
    torch.testing.assert_close(critic(s, a), before, atol=1e-4, rtol=1e-4)
    plain = Critic(3, 1, hidden_dim=16, n_hidden=2)
    before = plain(s, a)
    with torch.no_grad():
        plain.q.weights[0].mul_(10.0)
        plain.q.biases[0].mul_(10.0)
    assert not torch.allclose(plain(s, a), before, atol=1e-2)


def test_candidates_path_matches_the_plain_forward():
    critic = Critic(3, 2, hidden_dim=16, n_hidden=2, layer_norm=True)
    with torch.no_grad():
        critic.q.norm_scales[0].uniform_(0.5, 1.5)  # not the identity affine
        critic.q.norm_shifts[1].uniform_(-0.5, 0.5)
    states, actions = torch.randn(4, 3), torch.randn(4 * 5, 2)
    expected = critic.q_min(states.repeat_interleave(5, dim=0), actions).view(4, 5)
    torch.testing.assert_close(critic.q_min_of_candidates(states, actions), expected)


def test_trains_saves_loads_and_old_configs_mean_off(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, seed=0, critic_layer_norm=True, **TINY)
    model.learn(5, log_interval=0)
    assert any(not torch.equal(p, torch.ones_like(p)) for p in model.critic.q.norm_scales)  # trained
    model.save(tmp_path / "ln")
    loaded = DiffusionQL.load(tmp_path / "ln")
    obs = pendulum_buffer.observations[:4].numpy()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    # a config.json written before the field existed builds the critic without LayerNorm
    plain = DiffusionQL(pendulum_buffer, seed=0, **TINY)
    plain.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["config"]["critic_layer_norm"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert DiffusionQL.load(tmp_path / "old").config.critic_layer_norm is False


def test_guidance_gradient_refuses_layer_norm():
    critic = Critic(3, 1, hidden_dim=8, n_hidden=2, layer_norm=True)
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        critic.q.input_gradient(torch.randn(2, 4))
