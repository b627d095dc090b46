"""The diffusion math against closed forms computed independently in float64."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dql_agent.diffusion import GaussianDiffusion, make_beta_schedule
from dql_agent.networks import NoiseMLP


def test_vp_schedule_values_for_t5():
    betas = make_beta_schedule("vp", 5).numpy()
    t = np.arange(1, 6)
    expected = 1 - np.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    np.testing.assert_allclose(betas, [0.196, 0.459, 0.636, 0.755, 0.835], atol=1e-3)
    assert np.prod(1 - betas) == pytest.approx(0.0064, abs=1e-4)


def test_linear_and_cosine_schedules():
    np.testing.assert_allclose(make_beta_schedule("linear", 3).numpy(), [1e-4, 0.01005, 2e-2])
    cosine = make_beta_schedule("cosine", 10).numpy()
    assert np.all((cosine > 0) & (cosine <= 0.999)) and np.all(np.diff(cosine) > 0)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        make_beta_schedule("sigmoid", 5)
    with pytest.raises(ValueError, match="diffusion_steps must be >= 1, got 0"):
        make_beta_schedule("vp", 0)


@pytest.fixture
def diffusion():
    torch.manual_seed(0)
    return GaussianDiffusion(NoiseMLP(3, 2, hidden_dim=32), action_dim=2, n_steps=5, beta_schedule="vp")


def test_q_sample_and_posterior_match_closed_forms(diffusion):
    betas = make_beta_schedule("vp", 5).numpy()
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.arange(5)
    xt = diffusion.q_sample(x0, t, noise).double().numpy()
    expected = np.sqrt(abar)[:, None] * x0.double().numpy() + np.sqrt(1 - abar)[:, None] * noise.double().numpy()
    np.testing.assert_allclose(xt, expected, rtol=1e-5, atol=1e-6)
    # x0 recovered from x_t and the true noise
    recovered = diffusion.predict_start_from_noise(torch.as_tensor(xt).float(), t, noise)
    np.testing.assert_allclose(recovered.numpy(), x0.numpy(), atol=1e-4)
    # posterior q(x_{t-1} | x_t, x_0): mean and variance of Ho et al. eq. 7
    mean = diffusion.q_posterior_mean(x0, torch.as_tensor(xt).float(), t).double().numpy()
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    c2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    np.testing.assert_allclose(mean, c1[:, None] * x0.double().numpy() + c2[:, None] * xt, rtol=1e-5, atol=1e-6)
    variance = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(diffusion.posterior_variance.double().numpy(), variance, rtol=1e-6)
    assert diffusion.posterior_variance[0] == 0.0  # no noise is added at the last step


def test_loss_is_mse_on_eps(diffusion):
    actions, states = torch.rand(64, 2) * 2 - 1, torch.randn(64, 3)
    loss = diffusion.loss(actions, states, torch.Generator().manual_seed(3))
    # replay the same draws by hand
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 5, (64,), generator=g)
    noise = torch.randn(actions.shape, generator=g)
    eps_hat = diffusion.denoiser(diffusion.q_sample(actions, t, noise), t, states)
    assert loss.item() == pytest.approx(F.mse_loss(eps_hat, noise).item(), rel=1e-6)
    assert loss.item() == pytest.approx(((eps_hat - noise) ** 2).mean().item(), rel=1e-6)


def test_sampler_output_is_within_bounds_and_reproducible(diffusion):
    states = torch.randn(500, 3) * 10  # far from anything seen: the raw chain would leave [-1, 1]
    a = diffusion.sample(states, torch.Generator().manual_seed(1))
    b = diffusion.sample(states, torch.Generator().manual_seed(1))
    assert a.shape == (500, 2)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    fixed = torch.randn(5, 500, 2)
    assert torch.equal(diffusion.sample(states, noise=fixed), diffusion.sample(states, noise=fixed))


def test_sampler_fast_path_equals_plain_reverse_chain(diffusion):
    """The sampler's split first layer gives the DDPM reverse step computed the plain way."""
    states = torch.randn(7, 3)
    noise = torch.randn(5, 7, 2)
    fast = diffusion.sample(states, noise=noise)
    x = noise[0]
    for k, i in enumerate(reversed(range(5))):
        t = torch.full((7,), i)
        eps = diffusion.denoiser(x, t, states)
        x0 = (diffusion.sqrt_recip_alphas_cumprod[i] * x - diffusion.sqrt_recipm1_alphas_cumprod[i] * eps).clamp(-1, 1)
        mean = diffusion.posterior_mean_coef1[i] * x0 + diffusion.posterior_mean_coef2[i] * x
        std = math.sqrt(diffusion.posterior_variance[i].item())
        x = mean + (std * noise[k + 1] if i > 0 else 0.0)
    torch.testing.assert_close(fast, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_n_samples_draws_state_major_candidates(diffusion):
    states = torch.randn(3, 3)
    noise = torch.randn(5, 12, 2)
    grouped = diffusion.sample(states, noise=noise, n_samples=4)
    repeated = diffusion.sample(states.repeat_interleave(4, 0), noise=noise)
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=1e-6)


def test_gradients_flow_through_the_whole_chain(diffusion):
    states = torch.randn(16, 3)
    actions = diffusion.sample(states, torch.Generator().manual_seed(0))
    actions.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in diffusion.parameters())
    assert diffusion.denoiser.input_layer.weight.grad.abs().sum() > 0
