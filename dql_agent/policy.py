"""DiffusionQLPolicy: the networks of Diffusion-QL and how they pick an action."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from dql_agent.config import DiffusionQLConfig
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import Critic, NoiseMLP
from dql_agent.spaces import check_action_space, check_observation_space, flat_dim, flatten_batch, unscale_actions

# Fixed seed of the noise behind deterministic actions: the same observation gives the same
# action in every call, process and after save/load.
DETERMINISTIC_NOISE_SEED = 0


class DiffusionQLPolicy(nn.Module):
    """Diffusion actor, its EMA copy, twin critics and their targets, plus action selection.

    Acting follows the official code: draw ``n_action_samples`` candidates from the actor for
    each observation, score them with the target critics' min-Q and pick one by softmax over Q
    (``deterministic=False``) or the argmax (``deterministic=True``, with fixed noise so the
    same observation always gives the same action).

    Args:
        observation_space: Box or Dict-of-Box space of the environment.
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: hyperparameters (network sizes, diffusion steps, schedule, acting).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: DiffusionQLConfig):
        super().__init__()
        check_observation_space(observation_space)
        check_action_space(action_space)
        self.observation_space, self.action_space, self.config = observation_space, action_space, config
        self.obs_dim, self.action_dim = flat_dim(observation_space), int(np.prod(action_space.shape))
        denoiser = NoiseMLP(self.obs_dim, self.action_dim, config.hidden_dim, config.n_hidden, config.time_dim)
        self.actor = GaussianDiffusion(denoiser, self.action_dim, config.diffusion_steps, config.beta_schedule)
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = Critic(self.obs_dim, self.action_dim, 2, config.hidden_dim, config.n_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))
        noise = torch.randn(
            (config.diffusion_steps, config.n_action_samples, self.action_dim),
            generator=torch.Generator().manual_seed(DETERMINISTIC_NOISE_SEED),
        )
        self.register_buffer("deterministic_noise", noise, persistent=False)  # (T, N, A)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None

    # randomness for stochastic acting -------------------------------------------------------
    def set_seed(self, seed: int | None) -> None:
        """Seed the generator behind stochastic (``deterministic=False``) actions."""
        self._seed, self._generator = seed, None

    @property
    def generator(self) -> torch.Generator:
        device = self.obs_mean.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self._seed)
        return self._generator

    # acting ---------------------------------------------------------------------------------
    def normalize_observations(self, observations: torch.Tensor) -> torch.Tensor:
        """Apply the dataset's observation statistics (identity unless ``normalize_observations``)."""
        if not self.config.normalize_observations:
            return observations
        return (observations - self.obs_mean) / self.obs_std

    @torch.no_grad()
    def select_action(self, observations: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Best-of-N diffusion samples for normalised observations (B, S) -> actions (B, A) in [-1, 1]."""
        batch, n = observations.shape[0], self.config.n_action_samples
        actor = self.ema_actor if self.config.act_with_ema else self.actor
        noise = None
        if deterministic:
            noise = self.deterministic_noise.unsqueeze(1).expand(-1, batch, -1, -1)
            noise = noise.reshape(self.config.diffusion_steps, batch * n, self.action_dim)
        actions = actor.sample(observations, self.generator, noise, n_samples=n)  # (B * N, A)
        q = self.critic_target.q_min(observations.repeat_interleave(n, dim=0), actions).view(batch, n)
        if deterministic:
            choice = q.argmax(dim=1)
        else:
            choice = torch.multinomial(torch.softmax(q, dim=1), 1, generator=self.generator).squeeze(1)
        return actions.view(batch, n, self.action_dim)[torch.arange(batch, device=choice.device), choice]

    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict``: one observation or a batch ``(n_envs, *obs_shape)`` in, same batching out.

        Actions come back in the action space's bounds. ``state`` is returned unchanged (the
        policy has no recurrent state) and ``episode_start`` is ignored.
        """
        observations, vectorized = self.observations_to_array(observation)
        tensor = torch.as_tensor(observations, device=self.obs_mean.device)
        actions = self.select_action(self.normalize_observations(tensor), deterministic).cpu().numpy()
        actions = unscale_actions(actions, self.action_space).reshape(-1, *self.action_space.shape)
        return (actions if vectorized else actions[0]), state

    def observations_to_array(self, observation: Any) -> tuple[np.ndarray, bool]:
        """Check and flatten an observation or a batch: returns ((B, obs_dim) float32, batched?)."""
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
            raise ValueError(
                "observation is an (obs, info) tuple: pass only the observation, e.g. "
                "`obs, info = env.reset(); model.predict(obs)`"
            )
        space = self.observation_space
        if isinstance(space, spaces.Dict):
            if not isinstance(observation, dict):
                raise TypeError(
                    f"observation must be a dict for a Dict observation space, got {type(observation).__name__}"
                )
            missing = [k for k in space.spaces if k not in observation]
            if missing:
                raise ValueError(f"observation is missing key(s) {missing}; expected keys {list(space.spaces)}")
            # batching is read off the first Box entry, as SB3 does for Dict spaces
            probe, leaf_space = _first_leaf(observation, space)
        else:
            probe, leaf_space = observation, space
        probe = _as_numeric(probe, "observation")
        shape = leaf_space.shape
        if probe.shape == shape:
            vectorized, batch = False, 1
        elif probe.shape[1:] == shape and probe.ndim == len(shape) + 1:
            vectorized, batch = True, probe.shape[0]
        else:
            raise ValueError(
                f"observation has shape {probe.shape}; expected {shape} for one observation or "
                f"(n_envs, {', '.join(map(str, shape))}) for a batch"
            )
        flat = _as_numeric(flatten_batch(space, observation, batch), "observation").astype(np.float32)
        if not np.all(np.isfinite(flat)):
            bad = ~np.isfinite(flat)
            raise ValueError(
                f"observation contains {int(bad.sum())} NaN/inf value(s) at flat index {np.argwhere(bad)[0].tolist()}"
            )
        return flat, vectorized


def _first_leaf(observation: dict, space: spaces.Dict) -> tuple[Any, spaces.Box]:
    while isinstance(space, spaces.Dict):
        key = next(iter(space.spaces))
        space, observation = space[key], observation[key]
    return observation, space


def _as_numeric(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    return array
