"""The policy base every algorithm's policy extends: SB3's ``predict``, fixed noise, best-of-N.

``predict(observation)`` accepts one observation or a batch ``(n_envs, *obs_shape)`` (Box or
Dict-of-Box spaces) and answers with the same batching; :mod:`dql_agent.observations` checks and
batches on the way in and the Box scaling is undone on the way out, so every policy behaves alike.
Every algorithm acts the same way: draw N candidate actions per observation (fixed noise when
deterministic), score them with a Q function, keep one (:meth:`PolicyBase.pick`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from dql_agent.config import AgentConfig, OfflineDataConfig
from dql_agent.encoders import ObservationEncoder
from dql_agent.observations import batch_of, check_observation_space, flat_dim, flatten, normalize, rows_of
from dql_agent.spaces import check_action_space, unscale_actions

# Fixed seed of the noise behind deterministic actions: the same observation gives the same
# action in every call, process and after save/load.
DETERMINISTIC_NOISE_SEED = 0


class PolicyBase(nn.Module):
    """What every policy shares: its spaces, observation statistics, the fixed noise behind
    deterministic actions, a seeded generator for stochastic ones, SB3's ``predict`` and a
    tensor-in, tensor-out ``forward`` for ``torch.compile``/``torch.export``/``torch.jit.trace``.

    Every policy acts the same way: draw N candidate actions per observation with the reverse
    chain (fixed noise when deterministic), score them with a Q function, keep one (:meth:`pick`).
    Subclasses build their networks and define :meth:`score_candidates`; they may change
    :meth:`n_candidates` and :attr:`temperature`.

    Args:
        observation_space: Box or Dict-of-Box space (flattened, see :mod:`dql_agent.spaces`).
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: the algorithm's config: ``diffusion_steps`` and ``n_action_samples`` (the
            candidates per observation when acting deterministically) size the fixed noise;
            ``normalize_observations``, if the config has it, turns on the observation statistics.
    """

    obs_mean: torch.Tensor  # (obs_dim,) dataset statistics (used with normalize_observations)
    obs_std: torch.Tensor
    deterministic_noise: torch.Tensor  # (T, N, A)

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: AgentConfig):
        super().__init__()
        check_observation_space(observation_space)
        check_action_space(action_space)
        self.observation_space, self.action_space, self.config = observation_space, action_space, config
        self.obs_dim, self.action_dim = flat_dim(observation_space), int(np.prod(action_space.shape))
        # Observations -> the features the networks see: a CNN per camera key, else the identity.
        self.encoder = ObservationEncoder(observation_space, config)
        self.feature_dim = self.encoder.feature_dim
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))
        noise = torch.randn(
            (config.diffusion_steps, config.n_action_samples, self.action_dim),
            generator=torch.Generator().manual_seed(DETERMINISTIC_NOISE_SEED),
        )
        self.register_buffer("deterministic_noise", noise, persistent=False)  # (T, N, A)
        self._generator: torch.Generator | None = None
        self._seed: int | None = None
        self._act: Any = self.act  # compile_acting() swaps in a compiled one

    # what an algorithm's policy defines ------------------------------------------------------
    def score_candidates(self, observations: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates drawn with ``noise`` (T, B * N, A) for normalised observations (B, S), and
        their Q: (B * N, A) state-major in [-1, 1], (B, N)."""
        raise NotImplementedError

    def n_candidates(self, deterministic: bool) -> int:
        """Candidates per observation (``n_action_samples``; an algorithm may explore with fewer)."""
        return int(self.config.n_action_samples)

    @property
    def temperature(self) -> float | None:
        """Softmax temperature over Q for stochastic acting; None picks the argmax (greedy)."""
        return 1.0

    # acting ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    def set_seed(self, seed: int | None) -> None:
        """Seed the generator behind stochastic (``deterministic=False``) actions."""
        self._seed, self._generator = seed, None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            if self._seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self._seed)
        return self._generator

    def deterministic_noise_for(self, batch: int) -> torch.Tensor:
        """The fixed noise repeated for ``batch`` observations: (T, batch * N, A), state-major."""
        steps, n, dim = self.deterministic_noise.shape
        return self.deterministic_noise.unsqueeze(1).expand(-1, batch, -1, -1).reshape(steps, batch * n, dim)

    def draw_noise(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stochastic acting's random inputs, in draw order: the chains' noise (T, batch * N, A)
        and, unless acting is greedy, one uniform per observation for the softmax pick (batch,)."""
        generator = self.generator if generator is None else generator
        shape = (self.config.diffusion_steps, batch * self.n_candidates(False), self.action_dim)
        noise = torch.randn(shape, device=self.device, generator=generator)
        if self.temperature is None:
            return noise, None
        return noise, torch.rand((batch,), device=self.device, generator=generator)

    def act(self, observations: Any, noise: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """Normalised observations (B, S) (or a tree) -> actions (B, A) in [-1, 1], every random input given."""
        # A module call costs microseconds: acting on flat observations skips the identity encoder.
        features = self.encoder(observations) if self.encoder.uses_images else observations
        candidates, q = self.score_candidates(features, noise)
        return self.pick(candidates, q, uniform)

    def encode_batch(self, batch: Any, augment: torch.Generator | None = None) -> Any:
        """A training batch with its observation trees encoded to features (a batch of flat
        observations is returned as it is). The observations' features keep the encoder's graph, so
        the loss they feed trains it; the next observations' are computed without gradients."""
        if not self.encoder.uses_images:
            return batch
        with torch.no_grad():
            next_features = self.encoder(batch.next_observations, augment)
        return batch._replace(observations=self.encoder(batch.observations, augment), next_observations=next_features)

    def pick(self, candidates: torch.Tensor, q: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """Keep one of N candidates per observation by Q: candidates (B * N, A) state-major, q (B, N) -> (B, A).

        The argmax when ``uniform`` is None; else the softmax(q / temperature) draw that ``uniform``
        (B,) in [0, 1) selects by inverting the distribution's CDF (so a runtime can feed it).
        """
        batch, n = q.shape
        candidates = candidates.view(batch, n, -1)
        temperature = self.temperature
        if uniform is None or temperature is None:
            return best_of(candidates, q)[0]
        logits = q if temperature == 1.0 else q / temperature
        cdf = torch.softmax(logits, dim=1).cumsum(dim=1)
        choice = (cdf < uniform[:, None]).to(torch.int64).sum(dim=1).clamp(max=n - 1)
        return _take(candidates, choice)

    @torch.no_grad()
    def select_action(
        self, observations: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised observations (B, S) -> actions (B, A) in [-1, 1]; stochastic draws come from
        ``generator`` (default: the policy's seeded one)."""
        batch = rows_of(observations)
        if deterministic:
            return self._act(observations, self.deterministic_noise_for(batch), None)
        noise, uniform = self.draw_noise(batch, generator)
        return self._act(observations, noise, uniform)

    def forward(
        self, observations: torch.Tensor, noise: torch.Tensor | None = None, uniform: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``predict``'s math on tensors: raw flat observations (B, obs_dim) -> actions (B, *action
        shape) in the Box.

        ``noise`` None acts deterministically (the fixed noise, the argmax). Otherwise ``noise``
        (B, T, N, A) standard normal drives the chains and ``uniform`` (B,) in [0, 1) the softmax
        pick (None: the argmax of the fresh candidates); ``predict(deterministic=False)`` draws
        both (:meth:`draw_noise`, in the (T, B * N, A) layout).
        """
        batch = rows_of(observations)
        x = self.normalize_observations(observations)
        if noise is None:
            actions = self.act(x, self.deterministic_noise_for(batch), None)
        else:
            steps, n, dim = noise.shape[1:]
            actions = self.act(x, noise.transpose(0, 1).reshape(steps, batch * n, dim), uniform)
        return unscale_actions(actions, self.action_space).reshape(batch, *self.action_space.shape)

    def normalize_observations(self, observations: Any) -> Any:
        """Apply the dataset's observation statistics (identity unless ``normalize_observations``);
        in an observation tree only the vector keys (images are scaled by the encoder)."""
        if not (isinstance(self.config, OfflineDataConfig) and self.config.normalize_observations):
            return observations
        return normalize(self.observation_space, observations, self.obs_mean, self.obs_std)

    def compile_acting(self, **compile_kwargs: Any) -> None:
        """Run ``predict``'s action selection through ``torch.compile`` (same math, fused kernels).

        Acting on one observation is a chain of small layers where per-op overhead rivals the
        arithmetic; compiling fuses the element-wise work (see docs/BENCHMARKS.md for the measured
        gain). The random inputs are drawn outside the compiled part, so it has no graph break.
        The first call of each batch size and ``deterministic`` flag compiles (seconds; on CPU a
        C++ compiler is needed). Weights loaded later are picked up. ``compile_kwargs`` go to
        ``torch.compile`` (e.g. ``mode="max-autotune"``). Every policy shares the compiled code of
        ``act``: torch.compile keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs
        for it (one per model, batch size and flag) and runs later ones eagerly, with a warning.
        """
        self._act = torch.compile(self.act, **compile_kwargs)

    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict``: one observation or a batch ``(n_envs, *obs_shape)`` in, same batching out.

        Actions come back in the action space's bounds. ``state`` is returned unchanged (the
        policies have no recurrent state) and ``episode_start`` is ignored. An empty batch
        ``(0, *obs_shape)`` gives ``(0, *action_shape)``; torch tensors are accepted (detached).

        Raises:
            FloatingPointError: the networks produced a NaN/inf action (e.g. NaN weights).
        """
        tree, vectorized = batch_of(self.observation_space, observation)
        rows = rows_of(tree)
        if self.encoder.uses_images:
            tensor: Any = {key: torch.as_tensor(value, device=self.device) for key, value in tree.items()}
        else:
            tensor = torch.as_tensor(flatten(self.observation_space, tree), device=self.device)
        if rows == 0:  # nothing to act on: the networks are not run on no rows
            empty = np.zeros((0, self.action_dim), np.float32)
            return actions_to_env(empty, self.action_space, vectorized), state
        actions = self.select_action(self.normalize_observations(tensor), deterministic).cpu().numpy()
        finite = np.isfinite(actions).all(axis=1)
        if not finite.all():
            raise FloatingPointError(
                f"the policy's output is not finite: NaN/inf actions for {int((~finite).sum())} of "
                f"{len(actions)} observation(s) (first at index {int(np.flatnonzero(~finite)[0])}); the "
                "network weights or observation statistics probably hold NaN/inf"
            )
        return actions_to_env(actions, self.action_space, vectorized), state


def best_of(candidates: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest-Q candidate of each observation and its Q: (B, N, A), (B, N) -> (B, A), (B,)."""
    q_best, index = q.max(dim=1)
    return _take(candidates, index), q_best


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates[b, index[b]] for each b: (B, N, A), (B,) -> (B, A) (a gather, as ONNX has it)."""
    return candidates.gather(1, index.view(-1, 1, 1).expand(-1, 1, candidates.shape[2])).squeeze(1)


def actions_to_env(actions: np.ndarray, action_space: spaces.Box, vectorized: bool) -> np.ndarray:
    """(B, act_dim) actions in [-1, 1] -> the Box's units and shape, batched like the observation."""
    actions = unscale_actions(actions, action_space).reshape(-1, *action_space.shape)
    return actions if vectorized else actions[0]
