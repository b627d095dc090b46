"""All the diffusion math: beta schedules, the forward process, the eps-loss and the reverse sampler.

DDPM as the official Diffusion-QL code runs it (Wang et al., ICLR 2023, arXiv:2208.06193): a
noise-prediction network eps(x_t, t, s), T=5 steps with the 'vp' schedule, the predicted x0
clamped to [-1, 1] at every reverse step and the final sample clamped again. Actions live in
[-1, 1] here; the policy scales them to the environment's Box bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dql_agent.config import BETA_SCHEDULES
from dql_agent.networks import NoiseMLP

Guidance = Callable[[torch.Tensor, int], torch.Tensor]
"""guidance(x_t, t) -> grad_x log g(x_t, t): a gradient added to the score at reverse step t."""


def vp_beta_schedule(n_steps: int) -> torch.Tensor:
    """Discretised variance-preserving SDE schedule (beta_min=0.1, beta_max=10)."""
    t = torch.arange(1, n_steps + 1, dtype=torch.float64)
    beta_min, beta_max = 0.1, 10.0
    alpha = torch.exp(-beta_min / n_steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / n_steps**2)
    return 1.0 - alpha


def linear_beta_schedule(n_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Ho et al. (2020) linear schedule."""
    return torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)


def cosine_beta_schedule(n_steps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule, betas clipped to [0, 0.999]."""
    x = torch.linspace(0, n_steps, n_steps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / n_steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


def make_beta_schedule(name: str, n_steps: int) -> torch.Tensor:
    """Betas (float64, shape (n_steps,)) of the schedule called ``name``."""
    if n_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {n_steps}")
    schedules = {"vp": vp_beta_schedule, "linear": linear_beta_schedule, "cosine": cosine_beta_schedule}
    if name not in schedules:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}")
    return schedules[name](n_steps)


class GaussianDiffusion(nn.Module):
    """A DDPM over actions in [-1, 1], conditioned on a state, around a noise-prediction network.

    The network is called as ``denoiser(x_t, t, state)`` with integer steps ``t`` in [0, T-1] and
    predicts the noise that produced ``x_t``. All schedule constants are float32 buffers so they
    travel with ``.to(device)`` and the checkpoint.
    """

    # schedule constants, (T,) float32 buffers
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_std: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def __init__(self, denoiser: NoiseMLP, action_dim: int, n_steps: int = 5, beta_schedule: str = "vp"):
        super().__init__()
        self.denoiser = denoiser
        self.action_dim = action_dim
        self.n_steps = n_steps
        # Plain numbers of the config, computed on the CPU even when the model is being built on the
        # meta device (a checkpoint's shapes are checked that way before anything is allocated).
        with torch.device("cpu"):
            betas = make_beta_schedule(beta_schedule, n_steps)
            alphas = 1.0 - betas
            alphas_cumprod = torch.cumprod(alphas, dim=0)
            alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
            constants = {
                "betas": betas,
                "alphas_cumprod": alphas_cumprod,
                "alphas_cumprod_prev": alphas_cumprod_prev,
                "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
                "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
                "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
                "posterior_variance": posterior_variance,
                # sqrt of the clipped log variance; at t=0 the variance is 0 and no noise is added
                "posterior_std": (0.5 * posterior_variance.clamp(min=1e-20).log()).exp(),
                "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
                "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            }
        for name, value in constants.items():
            # Derived from the config, so not saved: a checkpoint cannot carry a stale schedule.
            self.register_buffer(name, value.float(), persistent=False)
        # The reverse chain visits every step once with the same t for the whole batch: plain
        # floats (rounded to float32 like the buffers) spare it an index op per constant.
        names = (
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "posterior_std",
        )
        self._reverse_constants = [tuple(float(getattr(self, n)[i]) for n in names) for i in range(n_steps)]

    # forward process -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.   x_start, noise: (B, A); t: (B,)"""
        return self.sqrt_alphas_cumprod[t, None] * x_start + self.sqrt_one_minus_alphas_cumprod[t, None] * noise

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_hat."""
        return self.sqrt_recip_alphas_cumprod[t, None] * x_t - self.sqrt_recipm1_alphas_cumprod[t, None] * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self.posterior_mean_coef1[t, None] * x_start + self.posterior_mean_coef2[t, None] * x_t

    # training ----------------------------------------------------------------------------------
    def loss(
        self,
        actions: torch.Tensor,
        states: torch.Tensor,
        generator: torch.Generator | None = None,
        weights: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Behaviour-cloning loss: MSE between the predicted and the true noise.

        t ~ U{0..T-1}, eps ~ N(0, I), averaged over the batch and the action dimensions.
        actions: (B, A) in [-1, 1]; states: (B, S). ``weights`` (B,), when given, scale each
        row's squared error before the mean (QVPO's Q-weighted loss). ``t`` (B,) and ``noise``
        (B, A), when given, replace the random draws (stacked seeds draw them per replica).
        ``mask`` (B, A), when given, averages over the entries it marks 1 only (an action chunk's
        padding past its episode's end is 0: see :mod:`dql_agent.chunks`).
        """
        batch = actions.shape[0]
        if t is None:
            t = torch.randint(0, self.n_steps, (batch,), device=actions.device, generator=generator)
        if noise is None:
            noise = torch.randn(actions.shape, device=actions.device, generator=generator)
        x_noisy = self.q_sample(actions, t, noise)
        if mask is not None:
            return ((self.denoiser(x_noisy, t, states) - noise).pow(2) * mask).sum() / mask.sum().clamp(min=1.0)
        if weights is None:
            return F.mse_loss(self.denoiser(x_noisy, t, states), noise)
        return ((self.denoiser(x_noisy, t, states) - noise).pow(2) * weights[:, None]).mean()

    # sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        states: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        n_samples: int = 1,
        guidance: Guidance | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Run the whole reverse chain; gradients flow when the caller has them enabled.

        states: (B, S); ``n_samples`` actions are drawn per state, returned state-major as
        (B * n_samples, A) in [-1, 1]. ``noise`` (T, B * n_samples, A), when given, replaces the
        random draws: ``noise[0]`` is x_T and ``noise[k]`` the noise added at the step that
        produces x_{T-1-k}, so a fixed tensor gives a fixed action (deterministic acting).

        ``guidance(x_t, t)``, when given, returns a gradient g added to the score at each step,
        scaled by ``guidance_scale``. The score of x_t is -eps / sqrt(1 - abar_t), so the predicted
        noise becomes eps - guidance_scale * sqrt(1 - abar_t) * g (classifier guidance;
        Diffusion-DICE passes grad_a of its guidance network).
        """
        device = states.device
        shape = (states.shape[0] * n_samples, self.action_dim)
        if noise is None:
            noise = torch.randn((self.n_steps, *shape), device=device, generator=generator)
        # The state's and each step's share of the first layer do not depend on x_t: once each,
        # and once per state rather than per sample.
        state_features = self.denoiser.state_features(states)  # (B, H)
        if n_samples > 1:
            state_features = state_features.repeat_interleave(n_samples, dim=0)  # (B * n, H)
        time_features = self.denoiser.time_features(torch.arange(self.n_steps, device=device))  # (T, H)
        x = noise[0]
        for k, i in enumerate(reversed(range(self.n_steps))):
            recip, recipm1, coef1, coef2, std = self._reverse_constants[i]
            eps = self.denoiser.forward_from_features(x, state_features + time_features[i])
            if guidance is not None:
                eps = eps - guidance_scale * self.sqrt_one_minus_alphas_cumprod[i] * guidance(x, i)
            # x0_hat = predict_start_from_noise(x, t, eps), clamped; x = q_posterior_mean(x0_hat, x, t)
            x_start = torch.add(x * recip, eps, alpha=-recipm1).clamp(-1.0, 1.0)
            x = torch.add(x_start * coef1, x, alpha=coef2)
            if i > 0:
                x = torch.add(x, noise[k + 1], alpha=std)
        return x.clamp(-1.0, 1.0)
