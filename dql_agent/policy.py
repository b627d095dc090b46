"""The policy base every algorithm's policy extends: SB3's ``predict``, fixed noise, best-of-N.

``predict(observation)`` accepts one observation or a batch ``(n_envs, *obs_shape)`` (Box or
Dict-of-Box spaces) and answers with the same batching; :mod:`dql_agent.observations` checks and
batches on the way in and the Box scaling is undone on the way out, so every policy behaves alike.
Every algorithm acts the same way: draw N candidate actions per observation (fixed noise when
deterministic), score them with a Q function, keep one (:meth:`PolicyBase.pick`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from dql_agent import scaling
from dql_agent.config import AgentConfig, OfflineDataConfig
from dql_agent.encoders import ObservationEncoder
from dql_agent.observations import batch_of, check_observation_space, flat_dim, flatten, leaves, normalize, rows_of
from dql_agent.spaces import check_action_space, unscale_actions

# Fixed seed of the noise behind deterministic actions: the same observation gives the same
# action in every call, process and after save/load.
DETERMINISTIC_NOISE_SEED = 0
PREDICT_PASS_BYTES = 1 << 30
"""Working memory one pass of ``predict`` may take (the chains' noise, every candidate's
activations, the float camera frames), as :meth:`PolicyBase.rows_per_pass` estimates it: a larger
batch is acted on in passes of that many rows, in order, instead of failing in the allocator. A
deterministic action draws the same noise either way (fixed per observation), so it agrees with one
pass up to float rounding (a matrix product of fewer rows may round its last bit differently);
stochastic ones draw each pass's noise in turn from the same generator."""


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
        self.obs_dim, self.env_action_dim = flat_dim(observation_space), int(np.prod(action_space.shape))
        # What the networks generate: one action, or a chunk of action_horizon of them, flattened.
        self.action_dim = config.action_horizon * self.env_action_dim
        # Observations (or histories of them) -> the features the networks see: a CNN per camera
        # key, the history flattened, else the identity.
        self.encoder = ObservationEncoder(observation_space, config, config.n_obs_steps)
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
        features = observations if self.encoder.passthrough else self.encoder(observations)
        candidates, q = self.score_candidates(features, noise)
        return self.pick(candidates, q, uniform)

    def encode_batch(self, batch: Any, augment: torch.Generator | None = None) -> Any:
        """A training batch with its observation trees encoded to features (a batch of flat
        observations is returned as it is). The observations' features keep the encoder's graph, so
        the loss they feed trains it; the next observations' are computed without gradients."""
        if self.encoder.passthrough:
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
        ``generator`` (default: the policy's seeded one). The networks run in the config's
        ``precision``; the actions come back float32."""
        batch = rows_of(observations)
        if deterministic:
            noise, uniform = self.deterministic_noise_for(batch), None
        else:
            noise, uniform = self.draw_noise(batch, generator)
        with scaling.autocast(self.config.precision, self.device):
            return self._act(observations, noise, uniform).float()

    def forward(
        self, observations: torch.Tensor, noise: torch.Tensor | None = None, uniform: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``predict``'s math on tensors: raw flat observations (B, obs_dim) -> actions (B, *action
        shape) in the Box. A policy with ``n_obs_steps`` k > 1 takes histories (B, k, obs_dim) (a
        tree's leaves (B, k, *shape)), and one with ``action_horizon`` h > 1 returns whole chunks
        (B, h, *action shape), the first action first.

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
        horizon = self.config.action_horizon
        shape = self.action_space.shape if horizon == 1 else (horizon, *self.action_space.shape)
        unscaled = unscale_actions(actions.reshape(-1, self.env_action_dim), self.action_space)
        return unscaled.reshape(batch, *shape)

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

        Actions come back in the action space's bounds. An empty batch ``(0, *obs_shape)`` gives
        ``(0, *action_shape)``; torch tensors are accepted (detached).

        With the papers' settings (``action_horizon`` = ``n_observation_steps`` = 1) ``state`` is
        returned unchanged and ``episode_start`` is ignored. A policy that acts in chunks or from
        a history keeps both in ``state``, as SB3's recurrent policies do (:class:`ActingState`):
        each env runs ``n_action_steps`` actions of its chunk, then plans again from its last
        ``n_obs_steps`` observations; ``episode_start`` (one flag per env, as ``evaluate_policy``
        passes it) drops an env's pending chunk and history. ``state`` None starts every env anew.

        Raises:
            FloatingPointError: the networks produced a NaN/inf action (e.g. NaN weights).
        """
        if self.config.chunked:
            return self._predict_chunked(observation, state, episode_start, deterministic)
        tree, vectorized = batch_of(self.observation_space, observation)
        rows = rows_of(tree)
        if self.encoder.uses_images:
            tensor: Any = {key: torch.as_tensor(value, device=self.device) for key, value in tree.items()}
        else:
            tensor = torch.as_tensor(flatten(self.observation_space, tree), device=self.device)
        if rows == 0:  # nothing to act on: the networks are not run on no rows
            empty = np.zeros((0, self.env_action_dim), np.float32)
            return actions_to_env(empty, self.action_space, vectorized), state
        actions = self._act_in_passes(tensor, rows, deterministic)
        _check_finite(actions)
        return actions_to_env(actions, self.action_space, vectorized), state

    # acting in chunks -----------------------------------------------------------------------------
    def predict_chunk(self, observation: Any, deterministic: bool = False) -> np.ndarray:
        """A whole chunk for one history (or a batch of them): ``(h, *action_shape)``, or
        ``(n, h, *action_shape)``, in the Box. The input is one observation per leaf for
        ``n_obs_steps`` = 1, else its last k observations, ``(k, *shape)`` (``(n, k, *shape)`` for a
        batch), oldest first. What ``predict`` runs from, and what the exported graph computes."""
        k = self.config.n_obs_steps
        tree, vectorized = batch_of(self.observation_space, observation, history=k)
        chunks = self._plan(tree, deterministic)  # (n, h * A) in [-1, 1]
        shape = (self.config.action_horizon, *self.action_space.shape)
        unscaled = unscale_actions(chunks.reshape(-1, self.env_action_dim), self.action_space)
        out = unscaled.reshape(len(chunks), *shape)
        return out if vectorized else out[0]

    def _plan(self, history: dict[str, np.ndarray], deterministic: bool) -> np.ndarray:
        """Checked histories (leaves (n, k, *shape), or (n, *shape) for k = 1) -> chunks (n, h * A)
        in [-1, 1], as the networks give them."""
        if self.encoder.uses_images:
            tensor: Any = {key: torch.as_tensor(value, device=self.device) for key, value in history.items()}
        else:
            steps = history_steps(self.observation_space, history)
            tensor = torch.as_tensor(steps, device=self.device)
        chunks = self._act_in_passes(tensor, len(next(iter(history.values()))), deterministic)
        _check_finite(chunks)
        return chunks

    def rows_per_pass(self) -> int:
        """How many observations one pass of ``predict`` acts on: :data:`PREDICT_PASS_BYTES` over
        :attr:`acting_bytes_per_row`."""
        return max(1, PREDICT_PASS_BYTES // self.acting_bytes_per_row)

    @functools.cached_property
    def acting_bytes_per_row(self) -> int:
        """An estimate of one observation's working memory when acting: for each of its N
        candidates the chains' noise and one float per bias of the networks (every layer's
        activations, targets and ensembles included), plus its camera frames as floats, twice (the
        frame and the first convolution's output)."""
        candidates = max(self.n_candidates(False), int(self.config.n_action_samples))
        widths = sum(p.numel() for name, p in self.named_parameters() if {"bias", "biases"} & set(name.split(".")))
        noise = int(self.config.diffusion_steps) * self.action_dim
        pixels = sum(math.prod(shape) for _, shape in self.encoder.image_layout.values())
        return 4 * candidates * (noise + widths) + 8 * pixels * int(self.config.n_obs_steps)

    def _act_in_passes(self, observations: Any, rows: int, deterministic: bool) -> np.ndarray:
        """:meth:`select_action` on ``rows`` checked raw observations (a tensor or a tree), as numpy,
        in passes of :meth:`rows_per_pass` rows."""
        size = self.rows_per_pass()
        if rows <= size:
            return self.select_action(self.normalize_observations(observations), deterministic).cpu().numpy()
        parts = []
        for start in range(0, rows, size):
            part = _row_range(observations, start, start + size)
            parts.append(self.select_action(self.normalize_observations(part), deterministic).cpu().numpy())
        return np.concatenate(parts)

    def _predict_chunked(
        self, observation: Any, state: Any, episode_start: np.ndarray | None, deterministic: bool
    ) -> tuple[np.ndarray, ActingState]:
        cfg = self.config
        tree, vectorized = batch_of(self.observation_space, observation)
        n = rows_of(tree)
        starts = np.ones(n, bool) if state is None else _episode_starts(episode_start, n)
        state = ActingState.start(self, tree) if state is None else ActingState.check(state, n, self)
        history = state.advanced(tree, starts, cfg.n_obs_steps)
        step = np.where(starts, cfg.n_action_steps, state.next_step)  # a new episode drops its pending chunk
        pending = state.pending.copy()
        plan = step >= cfg.n_action_steps
        if plan.any():
            rows = {key: value[plan] for key, value in history.items()}
            if cfg.n_obs_steps == 1:
                rows = {key: value[:, 0] for key, value in rows.items()}
            pending[plan] = self._plan(rows, deterministic).reshape(int(plan.sum()), cfg.action_horizon, -1)
            step = np.where(plan, 0, step)
        actions = pending[np.arange(n), step]  # (n, A) in [-1, 1]
        new_state = ActingState(pending, step + 1, history)
        return actions_to_env(actions, self.action_space, vectorized), new_state


class ActingState(NamedTuple):
    """What a chunked policy's ``predict`` carries from one call to the next, per env: SB3's
    recurrent ``state``, passed back unchanged by ``evaluate_policy`` and VecEnv loops."""

    pending: np.ndarray
    """(n_envs, h, act_dim) each env's current chunk, in the networks' [-1, 1]."""
    next_step: np.ndarray
    """(n_envs,) the chunk's next action; at ``n_action_steps`` the env plans again."""
    history: dict[str, np.ndarray]
    """Each leaf (n_envs, k, *shape): the env's last k observations, oldest first."""

    @classmethod
    def start(cls, policy: PolicyBase, tree: dict[str, np.ndarray]) -> ActingState:
        n, cfg = rows_of(tree), policy.config
        history = {key: np.repeat(value[:, None], cfg.n_obs_steps, axis=1) for key, value in tree.items()}
        pending = np.zeros((n, cfg.action_horizon, policy.env_action_dim), np.float32)
        return cls(pending, np.full(n, cfg.n_action_steps), history)

    @classmethod
    def check(cls, state: Any, n: int, policy: PolicyBase) -> ActingState:
        """``state`` as ``predict`` returned it for ``n`` envs, or a TypeError/ValueError saying why not."""
        if not isinstance(state, ActingState):
            given = type(state).__name__
            raise TypeError(f"state must be None or what predict returned (an ActingState), got {given}")
        expected = (n, policy.config.action_horizon, policy.env_action_dim)
        if state.pending.shape != expected:
            raise ValueError(
                f"state holds {state.pending.shape[0]} env(s)' chunks of shape {state.pending.shape[1:]}, but the "
                f"observation batch has {n} env(s) and the policy's chunks are {expected[1:]}: pass None to start anew"
            )
        return state

    def advanced(self, tree: dict[str, np.ndarray], starts: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Each env's history with ``tree`` appended (the oldest dropped); an env starting an
        episode gets its first observation repeated k times."""
        out = {}
        for key, value in tree.items():
            shifted = np.concatenate([self.history[key][:, 1:], value[:, None]], axis=1)
            fresh = np.repeat(value[:, None], k, axis=1)
            out[key] = np.where(starts.reshape(-1, *([1] * (shifted.ndim - 1))), fresh, shifted)
        return out


def _episode_starts(episode_start: Any, n: int) -> np.ndarray:
    """SB3's ``episode_start`` (None, a bool, or one flag per env) as (n,) bools."""
    if episode_start is None:
        return np.zeros(n, bool)
    flags = np.asarray(episode_start, dtype=bool).reshape(-1)
    if flags.size == 1:
        return np.full(n, bool(flags[0]))
    if flags.size != n:
        raise ValueError(f"episode_start must hold one flag per env ({n}), got {flags.size}")
    return flags


def history_steps(space: spaces.Space, history: dict[str, np.ndarray]) -> np.ndarray:
    """A flat space's checked observations, (n, obs_dim), or histories of them, (n, k, obs_dim)."""
    first = next(iter(history.values()))
    boxes = dict(leaves(space))
    lead = first.shape[: first.ndim - len(boxes[next(iter(history))].shape)]  # (n,) or (n, k)
    parts = [value.reshape(*lead, -1) for value in history.values()]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _row_range(observations: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch tensor, or of each leaf of a tree."""
    if isinstance(observations, dict):
        return {key: value[start:stop] for key, value in observations.items()}
    return observations[start:stop]


def _check_finite(actions: np.ndarray) -> None:
    finite = np.isfinite(actions).all(axis=1)
    if not finite.all():
        raise FloatingPointError(
            f"the policy's output is not finite: NaN/inf actions for {int((~finite).sum())} of "
            f"{len(actions)} observation(s) (first at index {int(np.flatnonzero(~finite)[0])}); the "
            "network weights or observation statistics probably hold NaN/inf"
        )


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
