"""Speed options leave the math unchanged: each fast path against the plain one, same batch and seed."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dql_agent import DiffusionQL, networks
from tests.settings import TINY


def test_sigmoid_mish_matches_f_mish_in_value_and_gradient():
    x = torch.linspace(-100.0, 100.0, 200_001, requires_grad=True)
    fast = networks.mish(x)
    (fast_grad,) = torch.autograd.grad(fast.sum(), x)
    plain = F.mish(x)
    (plain_grad,) = torch.autograd.grad(plain.sum(), x)
    torch.testing.assert_close(fast, plain, atol=5e-6, rtol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, atol=5e-6, rtol=1e-6)
    # the analytic backward is the derivative of the forward (float64, finite differences)
    x64 = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(networks.mish, (x64,))
    # acting (no autograd) takes the in-place path: same values
    with torch.no_grad():
        torch.testing.assert_close(networks.mish(x.detach()), plain.detach(), atol=5e-6, rtol=1e-6)


needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


def one_step(buffer, fast: bool, monkeypatch, compiled: bool = False) -> tuple[dict, dict]:
    """Losses and gradients of the first update of a seeded model: fast or plain Mish, compiled or eager."""
    monkeypatch.setattr(networks, "FAST_CPU_MISH", fast)
    model = DiffusionQL(buffer, seed=3, device="cpu", hidden_dim=64, n_hidden=3, diffusion_steps=5, batch_size=128)
    if compiled:
        model.compile_training()
    losses = model.train_step()
    grads = {f"actor.{n}": p.grad for n, p in model.actor.named_parameters()}
    grads |= {f"critic.{n}": p.grad for n, p in model.critic.named_parameters()}
    return losses, grads


def test_fast_cpu_training_step_equals_the_plain_path(pendulum_buffer, monkeypatch):
    fast_losses, fast_grads = one_step(pendulum_buffer, True, monkeypatch)
    plain_losses, plain_grads = one_step(pendulum_buffer, False, monkeypatch)
    assert set(fast_losses) == set(plain_losses) >= {"critic_loss", "bc_loss", "q_loss", "actor_loss"}
    for key in plain_losses:
        torch.testing.assert_close(fast_losses[key], plain_losses[key], rtol=1e-5, atol=1e-6)
    assert all(g is not None for g in plain_grads.values())
    for key in plain_grads:
        torch.testing.assert_close(fast_grads[key], plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@needs_compiler
def test_compiled_training_step_equals_the_eager_step(pendulum_buffer, monkeypatch):
    compiled_losses, compiled_grads = one_step(pendulum_buffer, True, monkeypatch, compiled=True)
    eager_losses, eager_grads = one_step(pendulum_buffer, True, monkeypatch)
    assert set(compiled_losses) == set(eager_losses)
    for key in eager_losses:
        torch.testing.assert_close(compiled_losses[key], eager_losses[key], rtol=1e-5, atol=1e-6)
    for key in eager_grads:
        torch.testing.assert_close(compiled_grads[key], eager_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@needs_compiler
def test_compiled_acting_gives_the_eager_actions_and_follows_new_weights(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY).learn(5)
    obs = pendulum_buffer.observations[::50].numpy()  # 16 states
    eager_one = model.predict(obs[0], deterministic=True)[0]
    model.policy.set_seed(7)
    eager_batch = model.predict(obs, deterministic=False)[0]

    model.policy.compile_acting()
    np.testing.assert_allclose(model.predict(obs[0], deterministic=True)[0], eager_one, atol=1e-5)
    model.policy.set_seed(7)  # seeded stochastic acting draws the same candidates and the same pick
    np.testing.assert_allclose(model.predict(obs, deterministic=False)[0], eager_batch, atol=1e-5)

    model.learn(5)  # weights change in place: the compiled selection must see them
    model.policy.set_seed(7)
    compiled = model.predict(obs, deterministic=False)[0]
    model.policy._act = model.policy.act  # back to the eager selection
    model.policy.set_seed(7)
    eager = model.predict(obs, deterministic=False)[0]
    assert not np.allclose(eager, eager_batch)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_candidate_scoring_equals_q_min_on_repeated_states():
    critic = networks.Critic(state_dim=5, action_dim=2, n_members=2, hidden_dim=16, n_hidden=2)
    states, actions = torch.randn(3, 5), torch.randn(3 * 4, 2)  # 4 candidates per state, state-major
    plain = critic.q_min(states.repeat_interleave(4, dim=0), actions).view(3, 4)
    torch.testing.assert_close(critic.q_min_of_candidates(states, actions), plain)
