"""QVPO: Q-weighted variational policy optimisation of a diffusion policy, online.

Paper: Ding, Hu, Zhang, Ren, Zhang, Yu, Wang, Shi, "Diffusion-based Reinforcement Learning via
Q-weighted Variational Policy Optimization", NeurIPS 2024, https://arxiv.org/abs/2405.16173.
Defaults follow the official code (github.com/wadx2019/qvpo, ``main.py`` argparse defaults with
``--weighted --aug``; see ``QVPOConfig``), with one deliberate fix: a time-limit truncation is
not a terminal state here (the official gym-0.21 loop bootstraps from neither).

One update (:meth:`QVPO.train_step`), every environment step once the random warm-up is over:

1. critic: y = r + gamma * (1 - terminal) * max_k min(Q1', Q2')(s', a'_k) over ``n_target_samples``
   actions of the target actor, scored by the target critics; loss MSE(Q1, y) + MSE(Q2, y);
2. actor: on a fresh batch of states draw ``n_diffusion_samples`` (N_d) actions each from the
   current actor, score them by the current critics' min-Q, keep the best one and weight it by
   ``max(Q_best - mean_{N_d} Q, 0)`` (the 'qadv' transform); add ``n_entropy_samples`` (N_e)
   actions drawn uniformly from the action box, each weighted by ``entropy_coef * w(s)``; train the
   diffusion model with the weighted eps-loss on all of them;
3. Polyak averaging of the target critics and the target actor.

Acting: best-of-K by the current critics' min-Q; K = ``n_behavior_samples`` when exploring
(``predict(deterministic=False)`` and data collection), ``n_action_samples`` with fixed noise when
``deterministic=True``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces

from dql_agent.base import BaseAgent
from dql_agent.buffer import ReplayBuffer
from dql_agent.config import AgentConfig, bounded, check_field, is_int
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import Critic, NoiseMLP, SoftUpdate, optimize, scaled_normal_init
from dql_agent.observations import flatten, tree_from_arrays
from dql_agent.policy import PolicyBase, best_of
from dql_agent.registry import Paper
from dql_agent.spaces import unscale_actions
from dql_agent.training import Rollout

Q_TRANSFORMS = ("qadv", "qrelu")
FEW_UPDATES = 0.5
"""``learn`` warns when fewer than this fraction of its env steps are followed by gradient updates."""


# configuration ---------------------------------------------------------------------------------
WEIGHT_INITS = ("official", "torch")


@dataclass(frozen=True)
class QVPOConfig(AgentConfig):
    """Hyperparameters of QVPO. Defaults are the official code's (identical for every task);
    ``batch_size`` is the transitions per critic update and the states per actor update."""

    renamed: ClassVar[dict[str, str]] = {"n_eval_samples": "n_action_samples"}
    saved_before: ClassVar[dict[str, Any]] = {"time_hidden_dim": None, "weight_init": "torch"}

    learning_rate: float = 1e-4
    """Actor (diffusion policy) Adam learning rate (official `--diffusion_lr`)."""
    critic_learning_rate: float = 3e-4
    """Critic Adam learning rate (official `--critic_lr`)."""
    adam_eps: float = 1e-5
    """Adam epsilon of both optimizers (hard-coded 1e-5 in the official code)."""
    buffer_size: int = bounded(1_000_000, 1_000_000_000)
    """Replay buffer capacity in transitions (official `memory_size` 1e6); oldest are overwritten."""
    learning_starts: int = 10_000
    """Env steps of uniformly random actions before the policy acts and updates start (`start_steps`)."""
    utd_ratio: int = bounded(1, 10_000)
    """Gradient steps per collected transition (update-to-data ratio; official `updates_per_step`)."""
    grad_norm: float | None = 2.0
    """Max gradient norm of actor and critic (official `--ac_grad_norm`); None disables clipping."""
    diffusion_steps: int = 20
    """Number of diffusion steps T (official `--n_timesteps`)."""
    beta_schedule: str = "cosine"
    """Noise schedule: 'cosine' (official default), 'linear' or 'vp'."""
    n_diffusion_samples: int = bounded(64, 10_000)
    """N_d: actions drawn per state from the current policy for the Q-weighted loss (`--train_sample`)."""
    n_entropy_samples: int = bounded(10, 10_000)
    """N_e: uniform actions per state for the entropy regulariser (hard-coded 10 in the official code)."""
    entropy_coef_start: float = 0.02
    """omega_ent at step 0 (official `--entropy_alpha`); the uniform actions' weight is omega_ent * w(s)."""
    entropy_coef_end: float = 0.002
    """Floor of omega_ent, reached at 90% of the decay with the official numbers."""
    entropy_decay_steps: int | None = 1_000_000
    """Env steps of the whole run, over which omega_ent = max(end, start * (1 - step / decay_steps))
    decays linearly (the official `num_steps`, 1M): a saved field, so chunked ``learn(...,
    reset_num_timesteps=False)`` calls follow one schedule. None (the default before 0.2, still
    read from old checkpoints) uses the target of the ``learn`` call in progress."""
    q_transform: str = "qadv"
    """Weight of the best sample: 'qadv' = max(Q - mean_{N_d} Q, 0) (QVPO) or 'qrelu' = max(Q, 0)."""
    n_behavior_samples: int = bounded(4, 10_000)
    """K_b: candidates per state when exploring; the argmax of min-Q is taken (`--behavior_sample`)."""
    n_target_samples: int = bounded(4, 10_000)
    """K_t: target-actor candidates per next state in the TD target (`--target_sample`)."""
    n_action_samples: int = 32
    """Candidates per state for ``predict(deterministic=True)`` (official `--eval_sample`; its help
    text says 512). Was ``n_eval_samples``."""
    time_dim: int = 32
    """Size of the denoiser's sinusoidal time embedding."""
    time_hidden_dim: int | None = bounded(256, 16_384)
    """Hidden width of the time-embedding MLP, time_dim -> 256 -> time_dim as in the official
    code; None is 2 * time_dim (Diffusion-QL's, and what checkpoints saved before this field hold)."""
    weight_init: str = "official"
    """'official': weights N(0, 1 / (2 sqrt(fan_in))), zero biases (the official `init_weights`),
    for the denoiser and critics; 'torch': PyTorch's default (the behaviour before 0.2)."""

    def check(self) -> None:
        super().check()
        for name in ("action_horizon", "n_action_steps", "n_obs_steps"):  # its online loop is one step at a time
            check_field(
                getattr(self, name) == 1,
                name,
                "1 for QVPO (action chunks are for the offline algorithms)",
                getattr(self, name),
            )
        for name in ("learning_rate", "critic_learning_rate", "adam_eps"):
            check_field(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("buffer_size", "utd_ratio", "n_diffusion_samples", "n_behavior_samples", "n_target_samples"):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
        for name in ("learning_starts", "n_entropy_samples"):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 0, name, "an int >= 0", value)
        decay = self.entropy_decay_steps
        check_field(
            decay is None or (is_int(decay) and decay >= 1), "entropy_decay_steps", "an int >= 1 or None", decay
        )
        check_field(self.grad_norm is None or self.grad_norm > 0, "grad_norm", "> 0 or None", self.grad_norm)
        check_field(self.entropy_coef_start >= 0.0, "entropy_coef_start", ">= 0", self.entropy_coef_start)
        check_field(
            0.0 <= self.entropy_coef_end <= self.entropy_coef_start,
            "entropy_coef_end",
            f"in [0, entropy_coef_start={self.entropy_coef_start}]",
            self.entropy_coef_end,
        )
        check_field(self.q_transform in Q_TRANSFORMS, "q_transform", f"one of {Q_TRANSFORMS}", self.q_transform)
        check_field(
            self.time_hidden_dim is None or self.time_hidden_dim >= 1,
            "time_hidden_dim",
            "an int >= 1 or None",
            self.time_hidden_dim,
        )
        check_field(self.weight_init in WEIGHT_INITS, "weight_init", f"one of {WEIGHT_INITS}", self.weight_init)

    def entropy_coef(self, step: int, decay_steps: int) -> float:
        """omega_ent after ``step`` env steps: linear decay from start, floored at end."""
        return max(self.entropy_coef_end, self.entropy_coef_start * (1.0 - step / max(decay_steps, 1)))


# diffusion helpers -----------------------------------------------------------------------------
CPU_CHUNK_ROWS = 2048
"""On the CPU, :func:`sample_and_score` runs the chains of about this many candidate rows at a time
(whole states): with the defaults the actor's 256 x 64 candidates are 8 chunks of 32 states. Each
activation is then 2 MB instead of 16 MB, so it stays in cache and is not a fresh allocation the
kernel has to zero. The values are bit for bit those of one pass (the same noise, and every matmul
row computed alike: tests/test_first_week.py checks it). 0 turns chunking off. See
benchmarks/qvpo_speed.py and the README's QVPO timing."""
MIN_CHUNK_STATES = 32
"""A chunk holds at least this many states: the per-state matmuls (the first layers' state share)
of a handful of rows take other BLAS kernels, which round differently."""


@torch.no_grad()
def sample_and_score(
    actor: GaussianDiffusion,
    critic: Critic,
    states: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` actions per state and their min-Q: states (B, S) -> actions (B, n, A), q (B, n).

    ``noise`` (T, B * n, A) is drawn as one :meth:`GaussianDiffusion.sample` call draws it when
    None; on the CPU the chains then run in chunks of :data:`CPU_CHUNK_ROWS` rows."""
    batch = states.shape[0]
    n_chunks = batch // max(MIN_CHUNK_STATES, CPU_CHUNK_ROWS // n) if CPU_CHUNK_ROWS else 1
    if states.device.type != "cpu" or n_chunks < 2:
        actions = actor.sample(states, generator, noise, n_samples=n)  # (B * n, A), state-major
        q = critic.q_min_of_candidates(states, actions)  # (B, n)
        return actions.view(batch, n, -1), q
    if noise is None:  # the draw actor.sample would make, so chunking changes no value
        noise = torch.randn((actor.n_steps, batch * n, actor.action_dim), device=states.device, generator=generator)
    parts, bounds = [], [batch * i // n_chunks for i in range(n_chunks + 1)]  # near-equal, >= MIN_CHUNK_STATES
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        rows = states[start:end]
        chunk_noise = noise[:, start * n : end * n]
        actions = actor.sample(rows, noise=chunk_noise, n_samples=n)
        parts.append((actions, critic.q_min_of_candidates(rows, actions)))
    return torch.cat([a for a, _ in parts]).view(batch, n, -1), torch.cat([q for _, q in parts])


# policy ----------------------------------------------------------------------------------------
class QVPOPolicy(PolicyBase):
    """Diffusion actor and its target, twin critics and their targets, plus action selection.

    Args:
        observation_space: Box or Dict-of-Box space of the environment (flattened, not normalised).
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: hyperparameters (network sizes, diffusion steps, schedule, K_b / K_eval).
    """

    config: QVPOConfig

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: QVPOConfig):
        super().__init__(observation_space, action_space, config)
        features = self.feature_dim  # the observation's length, or the camera encoder's output
        denoiser = NoiseMLP(
            features, self.action_dim, config.hidden_dim, config.n_hidden, config.time_dim, config.time_hidden_dim
        )
        self.actor = GaussianDiffusion(denoiser, self.action_dim, config.diffusion_steps, config.beta_schedule)
        self.critic = Critic(features, self.action_dim, 2, config.hidden_dim, config.n_hidden)
        if config.weight_init == "official":
            scaled_normal_init(self.actor)
            scaled_normal_init(self.critic)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    # acting ---------------------------------------------------------------------------------
    def n_candidates(self, deterministic: bool) -> int:
        """K_eval = ``n_action_samples`` (fixed noise) when deterministic, K_b = ``n_behavior_samples``
        when exploring (``predict(deterministic=False)`` and data collection)."""
        return self.config.n_action_samples if deterministic else self.config.n_behavior_samples

    @property
    def temperature(self) -> None:
        """Greedy either way: the argmax of the current critics' min-Q."""
        return None

    def score_candidates(self, observations: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K samples of the current actor per observation, scored by the current critics' min-Q."""
        n = noise.shape[1] // observations.shape[0]
        candidates = self.actor.sample(observations, noise=noise, n_samples=n)  # (B * K, A)
        return candidates, self.critic.q_min_of_candidates(observations, candidates)  # (B, K)


# the algorithm ---------------------------------------------------------------------------------
QVPO_PAPER = Paper(
    method_name="QVPO",
    title="Diffusion-based Reinforcement Learning via Q-weighted Variational Policy Optimization",
    short_citation="Ding, Hu, Zhang, Ren, Zhang, Yu, Wang and Shi, NeurIPS 2024",
    url="https://arxiv.org/abs/2405.16173",
    method=(
        "QVPO trains a diffusion policy online. For each state it draws several actions from the "
        "current policy, keeps the one twin critics rate highest and trains the diffusion model "
        "on it with the denoising loss weighted by its advantage over the samples' mean Q value; "
        "actions drawn uniformly from the action box, weighted by a decaying entropy coefficient, "
        "keep the policy exploring. The agent acts, and builds its TD targets, by taking the "
        "best-rated of a few sampled actions."
    ),
    bibtex=(
        "@inproceedings{ding2024diffusionbased,\n"
        "  title     = {Diffusion-based Reinforcement Learning via Q-weighted Variational Policy "
        "Optimization},\n"
        "  author    = {Ding, Shutong and Hu, Ke and Zhang, Zhenhao and Ren, Kan and Zhang, Weinan and "
        "Yu, Jingyi and Wang, Jingya and Shi, Ye},\n"
        "  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},\n"
        "  year      = {2024},\n"
        "  eprint    = {2405.16173},\n"
        "  archivePrefix = {arXiv},\n"
        "  url       = {https://arxiv.org/abs/2405.16173}\n"
        "}"
    ),
)


class QVPO(BaseAgent, algorithm="QVPO", short_name="qvpo", paper=QVPO_PAPER):
    """QVPO: online RL with a diffusion policy trained by a Q-weighted variational loss.

    ``learn`` collects experience like SB3's off-policy algorithms: ``num_timesteps`` counts env
    steps (``n_envs`` per VecEnv step), actions are uniformly random while ``num_timesteps <
    learning_starts``, then ``utd_ratio`` gradient steps follow each collected transition;
    callbacks' ``on_step`` runs once per VecEnv step.

    Args:
        env: env id, ``gymnasium.Env`` or SB3 VecEnv to train on (Monitor-wrapped when it is an id
            or an Env). May be None for a model that only acts (e.g. before loading weights);
            then pass ``observation_space`` and ``action_space``.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; the replay buffer lives there.
        seed: seeds network initialisation, the env, warm-up actions, batches and diffusion noise.
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        observation_space, action_space: explicit spaces (else the env's).
        **hyperparameters: any field of :class:`QVPOConfig` (``learning_starts``, ``batch_size``,
            ``n_diffusion_samples``, ``n_entropy_samples``, ``n_behavior_samples``, ...).
    """

    config_class, policy_class = QVPOConfig, QVPOPolicy
    config: QVPOConfig
    policy: QVPOPolicy
    replay_buffer: ReplayBuffer | None

    def __init__(self, env: Any = None, **kwargs: Any):
        super().__init__(None, env, **kwargs)
        cfg = self.config
        env_id = _env_id(self.env)
        if env_id is not None:
            self.metadata["env_id"] = env_id
        self.actor, self.actor_target = self.policy.actor, self.policy.actor_target
        self.critic, self.critic_target = self.policy.critic, self.policy.critic_target
        self.update_targets = (SoftUpdate(self.critic_target, self.critic), SoftUpdate(self.actor_target, self.actor))
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
        # A camera encoder is shared by actor and critics and trained by the critic loss only
        # (DrQ-v2's choice): the actor's loss and the TD targets see its features without gradients.
        critic_params = [*self.critic.parameters(), *self.policy.encoder.parameters()]
        self.critic_optimizer = torch.optim.Adam(critic_params, lr=cfg.critic_learning_rate, eps=cfg.adam_eps)
        self.warmup_rng = np.random.default_rng(self.seed + 1)  # uniform actions of the warm-up

    def learn(self, total_timesteps: int, *args: Any, **kwargs: Any) -> QVPO:
        """:meth:`BaseAgent.learn` (same arguments), after a warning when this call will make no
        gradient update, or updates after fewer than :data:`FEW_UPDATES` of its env steps, because
        the first ``learning_starts`` env steps only collect random experience."""
        call = inspect.signature(BaseAgent.learn).bind(self, total_timesteps, *args, **kwargs)
        call.apply_defaults()
        if is_int(total_timesteps) and total_timesteps > 0 and self.env is not None:
            start = 0 if call.arguments["reset_num_timesteps"] else self.num_timesteps
            self._warn_few_updates(start, int(total_timesteps))
        super().learn(total_timesteps, *args, **kwargs)
        return self

    def _warn_few_updates(self, start: int, total: int) -> None:
        cfg, n_envs = self.config, self.env.num_envs
        vec_steps = -(-total // n_envs)  # the loop runs VecEnv steps until it reaches start + total
        # VecEnv step k (from 0) updates when start + (k + 1) * n_envs >= learning_starts
        first = max(0, -(-(cfg.learning_starts - start) // n_envs) - 1)
        updating = max(0, vec_steps - first) * n_envs  # env steps followed by updates
        if updating >= FEW_UPDATES * total:
            return
        end = start + vec_steps * n_envs
        warm = (
            f"QVPO acts randomly for its first learning_starts={cfg.learning_starts:,} env steps (filling the replay "
            "buffer) and makes no gradient update before"
        )
        if updating == 0:
            what = f"this learn call (env steps {start:,} to {end:,}) will make no gradient update"
        else:
            what = (
                f"only {updating:,} of this learn call's {end - start:,} env steps will be followed by gradient "
                f"updates ({updating * cfg.utd_ratio:,} updates)"
            )
        warnings.warn(
            f"{what}: {warm}. Train for more env steps, or pass a smaller learning_starts (QVPO(..., "
            f"learning_starts=N), N at least batch_size={cfg.batch_size} so the first batch has that many "
            "transitions to draw from)",
            stacklevel=3,
        )

    @property
    def entropy_coef(self) -> float:
        """omega_ent at the current ``num_timesteps``."""
        decay = self.config.entropy_decay_steps or self._total_timesteps
        return self.config.entropy_coef(self.num_timesteps, decay)

    # experience collection -------------------------------------------------------------------
    def collect_step(self) -> Rollout:
        """One VecEnv step: random actions during the warm-up, then the behaviour policy
        (best of ``n_behavior_samples`` by min-Q); stores the transitions."""
        cfg, env = self.config, self.env
        n_envs = env.num_envs
        if self.replay_buffer is None:
            self.replay_buffer = ReplayBuffer(
                cfg.buffer_size, self.observation_space, self.policy.action_dim, self.device
            )
        if self._last_obs is None:
            env.seed(self.seed)
            self._last_obs = env.reset()
        obs = self._observation_rows(self._last_obs, n_envs)  # (n_envs, S), or a tree of (n_envs, *shape)
        if self.num_timesteps < cfg.learning_starts:
            scaled = self.warmup_rng.uniform(-1.0, 1.0, (n_envs, self.policy.action_dim)).astype(np.float32)
        else:
            tensor: Any = (
                {key: torch.as_tensor(value, device=self.device) for key, value in obs.items()}
                if isinstance(obs, dict)
                else torch.as_tensor(obs, device=self.device)
            )
            scaled = self.policy.select_action(tensor, deterministic=False, generator=self.generator).cpu().numpy()
        actions = unscale_actions(scaled, self.action_space).reshape(n_envs, *self.action_space.shape)
        new_obs, rewards, dones, infos = env.step(actions)
        next_obs, terminals = self._transition_ends(new_obs, dones, infos)
        self.replay_buffer.add(obs, scaled, np.asarray(rewards, np.float32), next_obs, terminals)
        self._last_obs = new_obs
        learning = self.num_timesteps + n_envs >= cfg.learning_starts  # counted once this step is
        return Rollout(n_envs, cfg.utd_ratio * n_envs if learning else 0, actions, new_obs, rewards, dones, infos)

    def _observation_rows(self, observations: Any, n_envs: int) -> Any:
        """A VecEnv's observations as the replay buffer stores them: (n_envs, S) float32 rows, or
        for a space with camera keys a fresh tree of (n_envs, *shape) arrays per key (uint8 images,
        float32 vectors)."""
        tree = tree_from_arrays(self.observation_space, observations, "observation")
        if self.policy.encoder.uses_images:
            return {key: np.array(value, copy=True) for key, value in tree.items()}
        return np.array(flatten(self.observation_space, tree), dtype=np.float32, copy=True)

    def _transition_ends(self, new_obs: Any, dones: np.ndarray, infos: list[dict]) -> tuple[Any, np.ndarray]:
        """Next observations and terminal flags of a VecEnv step.

        A VecEnv resets a finished env at once: its real last observation is in
        ``info["terminal_observation"]``. ``info["TimeLimit.truncated"]`` marks a truncation,
        which is not a terminal: its TD target still bootstraps.
        """
        n_envs = len(dones)
        next_obs = self._observation_rows(new_obs, n_envs)
        terminals = np.zeros(n_envs, dtype=bool)
        for i, done in enumerate(dones):
            if not done:
                continue
            final = infos[i].get("terminal_observation")
            if final is not None:
                last = self._observation_rows(_add_batch_axis(final), 1)
                if isinstance(next_obs, dict):
                    for key, value in next_obs.items():
                        value[i] = last[key][0]
                else:
                    next_obs[i] = last[0]
            terminals[i] = not infos[i].get("TimeLimit.truncated", False)
        return next_obs, terminals

    # the update ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, replay = self.config, self.replay_buffer
        assert replay is not None  # collect_step runs first
        # The batch's observations are the encoder's features, with its graph for a camera space
        # (the critic loss trains the encoder); the next observations' are computed without it.
        batch = self.sample_batch(replay, cfg.batch_size)

        # Critic: TD target from the best of K_t target-actor samples under the target critics.
        with torch.no_grad():
            _, next_q = sample_and_score(
                self.actor_target, self.critic_target, batch.next_observations, cfg.n_target_samples, self.generator
            )
            target_q = batch.rewards + batch.not_dones * cfg.gamma * next_q.max(dim=1).values  # (B,)
        current_q = self.critic(batch.observations, batch.actions)  # (2, B)
        critic_loss = (current_q - target_q).pow(2).mean(dim=1).sum()  # MSE(Q1, y) + MSE(Q2, y)
        optimize(self.critic_optimizer, critic_loss, grad_norm=cfg.grad_norm)

        # Actor: the best of N_d current-policy samples per (fresh) state, weighted by its advantage
        # over the samples' mean Q, plus N_e uniform actions weighted by omega_ent * that weight.
        with torch.no_grad():  # features without gradients: the actor loss does not train the encoder
            states = self.policy.encoder(replay.sample(cfg.batch_size, self.generator).observations, self.generator)
        candidates, q = sample_and_score(self.actor, self.critic, states, cfg.n_diffusion_samples, self.generator)
        best_actions, q_best = best_of(candidates, q)  # (B, A), (B,)
        if cfg.q_transform == "qadv":
            weights = (q_best - q.mean(dim=1)).clamp(min=0.0)
        else:  # qrelu
            weights = q_best.clamp(min=0.0)
        entropy_coef = self.entropy_coef
        actions, weight_rows, state_rows = best_actions, weights, states
        if cfg.n_entropy_samples > 0 and entropy_coef > 0:
            n = cfg.n_entropy_samples
            shape = (states.shape[0] * n, self.policy.action_dim)
            uniform = torch.rand(shape, device=self.device, generator=self.generator)
            actions = torch.cat([best_actions, 2.0 * uniform - 1.0])
            state_rows = torch.cat([states, states.repeat_interleave(n, dim=0)])
            weight_rows = torch.cat([weights, entropy_coef * weights.repeat_interleave(n)])
        actor_loss = self.actor.loss(
            actions, state_rows, self.generator, weights=weight_rows
        )  # the official WeightedL2
        optimize(self.actor_optimizer, actor_loss, grad_norm=cfg.grad_norm)

        for update in self.update_targets:
            update(cfg.tau)
        self.logger.record("train/entropy_coef", entropy_coef)  # its value now, not a mean
        return {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "q_mean": current_q.detach().mean(),
            "weight_mean": weights.mean(),
        }

    # checkpoints -----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().training_state()
        meta |= {
            "np_rng": self.warmup_rng.bit_generator.state,
            "episode_num": self._episode_num,
            "total_timesteps": self._total_timesteps,
        }
        return tensors, meta

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_training_state(tensors, meta)
        self.warmup_rng.bit_generator.state = meta["np_rng"]
        self._episode_num = int(meta["episode_num"])
        self._total_timesteps = int(meta["total_timesteps"])


def _add_batch_axis(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {key: _add_batch_axis(value) for key, value in observation.items()}
    return np.asarray(observation)[None]


def _env_id(vec_env: Any) -> str | None:
    """The registered id of the first env of a VecEnv, when it can be read."""
    if vec_env is None:
        return None
    try:
        spec = vec_env.get_attr("spec", [0])[0]
    except (AttributeError, IndexError):  # a VecEnv whose envs have no spec: the id is only metadata
        return None
    return getattr(spec, "id", None)


__all__ = ["QVPO", "QVPOConfig", "QVPOPolicy"]
