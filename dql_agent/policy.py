"""DiffusionQLPolicy: the networks of Diffusion-QL and how they pick an action."""

from __future__ import annotations

import copy

import torch
from gymnasium import spaces

from dql_agent.acting import PolicyBase
from dql_agent.config import DiffusionQLConfig
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import Critic, NoiseMLP


class DiffusionQLPolicy(PolicyBase):
    """Diffusion actor, its EMA copy, twin critics and their targets, plus action selection.

    Acting follows the official code: draw ``n_action_samples`` candidates from the actor for
    each observation, score them with the target critics' min-Q and pick one by softmax over Q
    (``deterministic=False``) or the argmax (``deterministic=True``, with fixed noise so the
    same observation always gives the same action). ``predict`` is SB3's (see ``PolicyBase``).

    Args:
        observation_space: Box or Dict-of-Box space of the environment.
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: hyperparameters (network sizes, diffusion steps, schedule, acting).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: DiffusionQLConfig):
        super().__init__(observation_space, action_space, config, config.n_action_samples)
        denoiser = NoiseMLP(self.obs_dim, self.action_dim, config.hidden_dim, config.n_hidden, config.time_dim)
        self.actor = GaussianDiffusion(denoiser, self.action_dim, config.diffusion_steps, config.beta_schedule)
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = Critic(self.obs_dim, self.action_dim, 2, config.hidden_dim, config.n_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    @torch.no_grad()
    def select_action(self, observations: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Best-of-N diffusion samples for normalised observations (B, S) -> actions (B, A) in [-1, 1]."""
        batch, n = observations.shape[0], self.config.n_action_samples
        actor = self.ema_actor if self.config.act_with_ema else self.actor
        noise = self.deterministic_noise_for(batch) if deterministic else None
        actions = actor.sample(observations, self.generator, noise, n_samples=n)  # (B * N, A)
        q = self.critic_target.q_min_of_candidates(observations, actions)  # (B, N)
        if deterministic:
            choice = q.argmax(dim=1)
        else:
            choice = torch.multinomial(torch.softmax(q, dim=1), 1, generator=self.generator).squeeze(1)
        return actions.view(batch, n, self.action_dim)[torch.arange(batch, device=choice.device), choice]
