"""DiffusionQL: the Diffusion-QL update and its SB3-style surface.

Paper: Wang, Hunt, Zhou, "Diffusion Policies as an Expressive Policy Class for Offline
Reinforcement Learning", ICLR 2023, https://arxiv.org/abs/2208.06193. Defaults follow the
official implementation's D4RL locomotion runs (see ``DiffusionQLConfig``).
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from torch.nn.utils import clip_grad_norm_

from dql_agent.base import BaseAgent, draw_seed, resolve_device, resolve_spaces
from dql_agent.buffer import Batch, OfflineBuffer, transform_rewards
from dql_agent.config import DiffusionQLConfig, make_config
from dql_agent.networks import SoftUpdate
from dql_agent.policy import DiffusionQLPolicy


class DiffusionQL(BaseAgent):
    """Diffusion-QL: a diffusion policy trained with behaviour cloning plus Q-learning.

    Args:
        buffer: the offline dataset (``OfflineBuffer.from_minari/from_d4rl/from_sb3``). May be
            None for a model that only acts (e.g. before loading weights).
        env: optional env id, ``gymnasium.Env`` or VecEnv; supplies the spaces and is what
            ``get_env()`` returns to SB3 callbacks (EvalCallback, progress bars).
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; the dataset is moved there once.
        seed: seeds network initialisation, batch sampling, diffusion noise and acting.
        preset: task preset of the official code, e.g. 'hopper-medium', 'antmaze-large-play'
            (see ``dql_agent.config.PRESETS``); explicit keyword arguments override it.
        observation_space, action_space: explicit spaces (else from env, else from buffer).
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        **hyperparameters: any field of :class:`DiffusionQLConfig` (``learning_rate``,
            ``batch_size``, ``gamma``, ``tau``, ``eta``, ``diffusion_steps``, ``beta_schedule``,
            ``grad_norm``, ``max_q_backup``, ``ema_decay``, ``n_action_samples``, ...).
    """

    algorithm = "DiffusionQL"
    config_class = DiffusionQLConfig

    def __init__(
        self,
        buffer: OfflineBuffer | None = None,
        env: Any = None,
        *,
        device: str | torch.device = "auto",
        seed: int | None = None,
        preset: str | None = None,
        observation_space: spaces.Space | None = None,
        action_space: spaces.Box | None = None,
        verbose: int = 0,
        tensorboard_log: str | None = None,
        **hyperparameters: Any,
    ):
        if buffer is not None and not isinstance(buffer, OfflineBuffer):
            raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
        self.config = make_config(DiffusionQLConfig, hyperparameters, preset)
        self.device = resolve_device(device)
        self.seed = draw_seed() if seed is None else int(seed)
        observation_space, action_space = resolve_spaces(buffer, env, observation_space, action_space)
        self.metadata: dict[str, Any] = dict(buffer.metadata) if buffer is not None else {}
        if preset is not None:
            self.metadata["preset"] = preset

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.policy = DiffusionQLPolicy(observation_space, action_space, self.config).to(self.device)
        self.policy.set_seed(self.seed + 2)
        self.actor, self.ema_actor = self.policy.actor, self.policy.ema_actor
        self.critic, self.critic_target = self.policy.critic, self.policy.critic_target
        self._update_ema = SoftUpdate(self.ema_actor, self.actor)
        self._update_critic_target = SoftUpdate(self.critic_target, self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=self.config.learning_rate)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.config.critic_learning_rate)
        self.lr_schedulers = []
        if self.config.lr_decay:
            self.lr_schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.lr_decay_steps, eta_min=0.0)
                for opt in (self.actor_optimizer, self.critic_optimizer)
            ]
        self._rng = torch.Generator(device=self.device).manual_seed(self.seed)
        self._coin_rng = torch.Generator().manual_seed(self.seed + 1)  # host-side: no device sync
        self._critic_loss, self._actor_loss = self._critic_loss_eager, self._actor_loss_eager

        self.replay: OfflineBuffer | None = None
        if buffer is not None:
            self.set_buffer(buffer)
        self._init_surface(env, verbose, tensorboard_log)

    # data ------------------------------------------------------------------------------------
    def set_buffer(self, buffer: OfflineBuffer) -> None:
        """Use ``buffer`` for training: observations normalised (when configured), actions
        scaled to [-1, 1], rewards transformed, all moved to the training device once."""
        self.replay = self._training_view(buffer, transform_rewards(buffer.rewards, self.config.reward_transform))
        # A dataset of one-step episodes (a contextual bandit) never bootstraps: y = r exactly,
        # so the next-action chain of the TD target can be skipped. Checked once, not per step.
        self._bootstraps = not bool(buffer.terminals.all())

    def _check_can_learn(self) -> None:
        if self.replay is None:
            raise RuntimeError("DiffusionQL has no dataset: pass buffer=... or call set_buffer(buffer) before learn()")

    # the update ------------------------------------------------------------------------------
    def compile_training(self, **compile_kwargs: Any) -> None:
        """Run the update's two loss computations (forward and backward) through ``torch.compile``.

        Same math, fused element-wise kernels (the test suite compares losses and gradients with
        the eager step). The first step compiles (tens of seconds on a CPU, which also needs a C++
        compiler); optimizer steps and the target updates stay eager. ``compile_kwargs`` go to
        ``torch.compile``.
        """
        self._critic_loss = torch.compile(self._critic_loss_eager, **compile_kwargs)
        self._actor_loss = torch.compile(self._actor_loss_eager, **compile_kwargs)

    def _critic_loss_eager(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """TD loss of both critics, with the target from the EMA actor's next action and the target
        critics: (MSE(Q1, y) + MSE(Q2, y), current Q (2, B))."""
        cfg = self.config
        with torch.no_grad():
            if not self._bootstraps:
                next_q = torch.zeros_like(batch.rewards)
            elif cfg.max_q_backup:
                n = cfg.n_max_q_samples
                next_obs = batch.next_observations.repeat_interleave(n, dim=0)
                next_act = self.ema_actor.sample(batch.next_observations, self._rng, n_samples=n)
                # max over samples for each target critic, then the min over the two critics
                next_q = self.critic_target(next_obs, next_act).view(2, -1, n).max(dim=2).values.min(dim=0).values
            else:
                next_act = self.ema_actor.sample(batch.next_observations, self._rng)
                next_q = self.critic_target(batch.next_observations, next_act).min(dim=0).values
            target_q = batch.rewards + batch.not_dones * cfg.gamma * next_q  # (B,)
        current_q = self.critic(batch.observations, batch.actions)  # (2, B)
        return (current_q - target_q).pow(2).mean(dim=1).sum(), current_q

    def _actor_loss_eager(
        self, obs: torch.Tensor, act: torch.Tensor, normaliser: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """BC (eps-MSE) + eta * Q-term on actions sampled through the whole chain:
        (actor loss, BC loss, Q loss or None when eta = 0)."""
        bc_loss = self.actor.loss(act, obs, self._rng)
        if self.config.eta <= 0:  # pure diffusion BC: skip the costly chain with gradients
            return bc_loss, bc_loss, None
        new_act = self.actor.sample(obs, self._rng)
        q_new = self.critic(obs, new_act)  # (2, B); the critic's gradients are not asked for
        # Normalise by the *other* critic's |Q|; the caller draws the roles at random each step.
        q_loss = -q_new[1 - normaliser].mean() / q_new[normaliser].abs().mean().detach()
        return bc_loss + self.config.eta * q_loss, bc_loss, q_loss

    def _train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = self.replay.sample(cfg.batch_size, self._rng)

        critic_loss, current_q = self._critic_loss(batch)
        skip = cfg.nonfinite_loss == "skip"
        if not self._loss_is_finite("critic_loss", critic_loss, skip):
            return {"skipped_batches": torch.ones((), device=self.device)}
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        if cfg.grad_norm is not None:
            clip_grad_norm_(self.critic.parameters(), cfg.grad_norm)
        self.critic_optimizer.step()

        normaliser = int(torch.rand((), generator=self._coin_rng) > 0.5)
        # The critic only scores the actor's actions: not asking for its gradients skips work the
        # official code does and then zeroes.
        self.critic.requires_grad_(False)
        try:
            actor_loss, bc_loss, q_loss = self._actor_loss(batch.observations, batch.actions, normaliser)
        finally:
            self.critic.requires_grad_(True)
        losses = {"critic_loss": critic_loss.detach(), "bc_loss": bc_loss.detach(), "q_mean": current_q.detach().mean()}
        if q_loss is not None:
            losses["q_loss"] = q_loss.detach()
        if not self._loss_is_finite("actor_loss", actor_loss, skip):
            return {"skipped_batches": torch.ones((), device=self.device)}
        losses["actor_loss"] = actor_loss.detach()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        if cfg.grad_norm is not None:
            clip_grad_norm_(self.actor.parameters(), cfg.grad_norm)
        self.actor_optimizer.step()

        # EMA actor every `ema_update_every` steps from `ema_start_step`; targets every step.
        step = self._n_updates
        if step % cfg.ema_update_every == 0 and step >= cfg.ema_start_step:
            self._update_ema(1.0 - cfg.ema_decay)
        self._update_critic_target(cfg.tau)
        for scheduler in self.lr_schedulers:
            scheduler.step()
        return losses

    # checkpoints -----------------------------------------------------------------------------
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer}

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"rng.train": self._rng.get_state(), "rng.coin": self._coin_rng.get_state()}
        meta = {"lr_schedulers": [s.state_dict() for s in self.lr_schedulers]}
        return tensors, meta

    def _load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._rng.set_state(tensors["rng.train"])
        self._coin_rng.set_state(tensors["rng.coin"])
        for scheduler, state in zip(self.lr_schedulers, meta.get("lr_schedulers", []), strict=False):
            scheduler.load_state_dict(state)


__all__ = ["DiffusionQL"]
