"""Several seeds in one process: independent DiffusionQL replicas whose losses run as one batched pass.

``train_seeds(buffer, [0, 1, 2, 3, 4], n)`` builds one ordinary ``DiffusionQL`` per seed (so each
starts exactly as a separate run would) and trains them in lockstep. Each step stacks the
replicas' parameters along a leading dimension and computes every replica's losses and gradients
at once with ``torch.func.vmap`` over ``torch.func.grad_and_value`` of the single run's own loss
functions (:func:`dql_agent.diffusion_ql.critic_loss` / ``actor_loss``): every layer becomes one
batched matmul over the replicas instead of one small matmul per run.

Everything else is each model's own public API, so replica i follows the trajectory of
``DiffusionQL(buffer, seed=seeds[i]).learn(n)`` up to the float rounding of batched against
unbatched matmuls and reductions:

- its random inputs are drawn by the model itself (``critic_inputs`` / ``actor_inputs``);
- its gradients go to its own optimizer through :func:`dql_agent.networks.optimize` (clipped by
  its own total norm, its own Adam state and step count);
- its EMA actor, target critics and learning-rate schedule move with ``update_targets``;
- a NaN/inf loss raises naming the replica's seed, or skips that replica's batch only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dql_agent.buffer import Batch, OfflineBuffer
from dql_agent.config import check_seed
from dql_agent.diffusion_ql import ActorNoise, DiffusionQL, DiffusionQLConfig, actor_loss, critic_loss
from dql_agent.networks import optimize
from dql_agent.observations import has_images, image_keys
from dql_agent.sb3 import make_callback
from dql_agent.training import Timestep, train

Params = dict[str, torch.Tensor]
# vmap's in_dims of a stacked one-step Batch: every tensor along the replicas, the chunk fields absent.
_BATCH_DIMS = Batch(*cast(Any, (0, 0, 0, 0, 0, None, None)))
NETWORKS = ("actor", "ema_actor", "critic", "critic_target")


def train_seeds(
    buffer: OfflineBuffer,
    seeds: Sequence[int],
    total_timesteps: int,
    *,
    device: str | torch.device = "auto",
    preset: str | None = None,
    log_interval: int = 1000,
    verbose: int = 0,
    callback: Sequence[Any] | None = None,
    eval_env: str | Callable[[], Any] | None = None,
    eval_freq: int = 0,
    n_eval_episodes: int = 10,
    eval_seed: int = 0,
    **hyperparameters: Any,
) -> list[DiffusionQL]:
    """Train one DiffusionQL per seed on ``buffer``, all replicas' losses in one batched pass.

    Much cheaper than separate runs where a single run leaves the device idle (a GPU at batch
    256); on a CPU the matmuls are the same work either way.

    Args:
        buffer: the offline dataset, shared by all replicas (kept on the device once).
        seeds: distinct seeds, one replica each; replica i is what
            ``DiffusionQL(buffer, seed=seeds[i], ...).learn(total_timesteps)`` would train, up to
            float rounding.
        total_timesteps: gradient steps per replica.
        device: 'auto', 'cpu', 'cuda', ...
        preset: task preset of the official code (see ``dql_agent.PRESETS``).
        log_interval: every this many steps each model writes its mean losses to its own SB3
            logger (``train/critic_loss``, ...; stdout with ``verbose=1``); 0 never.
        verbose: passed to each model.
        callback: one SB3 callback (or list of them, or None) per seed, in the order of ``seeds``;
            each is bound to its replica and called after every step, as ``learn`` calls it. One
            returning False stops all replicas (they train in lockstep).
        eval_env: evaluate each replica on this env (an env id, or a function that makes a new
            ``gymnasium.Env`` or VecEnv, called once per replica) every ``eval_freq`` steps and at
            the end, through a :class:`dql_agent.integrations.metrics.MetricsCallback` per seed:
            ``eval/mean_reward`` (and the normalized score, success rate) go to each model's
            logger. For the numbers in Python pass your own ``MetricsCallback`` per seed instead.
        eval_freq, n_eval_episodes, eval_seed: see ``MetricsCallback``.
        **hyperparameters: fields of :class:`DiffusionQLConfig`, the same for every replica.

    Returns:
        The trained models, in the order of ``seeds``: ordinary ``DiffusionQL`` objects with
        their own weights and optimizer state, ready for ``predict``, ``save`` and ``learn``.
    """
    if not isinstance(buffer, OfflineBuffer):
        raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
    _refuse_images(buffer.observation_space)
    seeds = _check_seeds(seeds)
    if not isinstance(total_timesteps, (int, np.integer)) or isinstance(total_timesteps, bool) or total_timesteps < 0:
        raise ValueError(f"total_timesteps must be an int >= 0, got {total_timesteps!r}")
    if not isinstance(log_interval, (int, np.integer)) or log_interval < 0:
        raise ValueError(f"log_interval must be an int >= 0, got {log_interval!r}")
    if isinstance(callback, (str, bytes)) or (callback is not None and len(callback) != len(seeds)):
        raise ValueError(
            f"callback must hold one callback (or list, or None) per seed ({len(seeds)}), got {callback!r}"
        )
    callbacks = [_as_list(c) for c in (callback or [None] * len(seeds))]
    if eval_env is not None:
        from dql_agent.metrics import MetricsCallback

        for extra in callbacks:
            env = eval_env if isinstance(eval_env, str) else eval_env()
            extra.insert(0, MetricsCallback(env, eval_freq, n_eval_episodes, eval_seed))
    models: list[DiffusionQL] = []
    for seed in seeds:
        model = DiffusionQL(buffer, device=device, seed=seed, preset=preset, verbose=verbose, **hyperparameters)
        if models:
            # Same buffer and config give the same training view: keep one copy on the device.
            model.replay_buffer = models[0].replay_buffer
        models.append(model)
    SeedStack(models).learn(int(total_timesteps), int(log_interval), callbacks=callbacks)
    return models


def _refuse_images(observation_space: Any) -> None:
    """Stacked seeds run the flat losses under vmap; a camera encoder (its CNN, its random-shift
    draws and the batch it encodes per replica) is not part of them, so camera spaces are refused."""
    if has_images(observation_space):
        raise ValueError(
            f"stacked seeds (train_seeds / SeedStack) do not support camera observations: the observation "
            f"space has image keys {image_keys(observation_space)} (uint8 [0, 255] Boxes, encoded by a CNN). "
            "Train the seeds one by one instead: `DiffusionQL(buffer, seed=seed, ...).learn(n)` for each seed"
        )


def _as_list(callback: Any) -> list[Any]:
    return [] if callback is None else list(callback) if isinstance(callback, list) else [callback]


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    if len(seeds) == 0:
        raise ValueError("seeds must hold at least one seed, got an empty sequence")
    values = [check_seed(seed, f"seeds[{position}]") for position, seed in enumerate(seeds)]
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise ValueError(
            f"seeds must be distinct (a repeat trains the same replica twice), got {values}; repeated: {repeated}"
        )
    return values


class _ReplicaMath(nn.Module):
    """One replica's losses (the single run's own functions) as a module, so
    ``torch.func.functional_call`` can swap in that replica's slice of the stacked parameters."""

    def __init__(self, model: DiffusionQL):
        super().__init__()
        self.policy, self.config = model.policy, model.config

    def forward(self, stage: str, batch: Batch, noise: Any) -> tuple[torch.Tensor, Params]:
        if stage == "critic":
            return critic_loss(self.policy, self.config, batch, noise)
        return actor_loss(self.policy, self.config, batch, noise)


def _stack(values: Sequence[Any]) -> Any:
    """Stack a field of each replica's inputs (a tensor, a NamedTuple of them, or None)."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return type(first)(*(_stack(list(field)) for field in zip(*values, strict=True)))
    return torch.stack(list(values))


def _in_dims(value: Any) -> Any:
    """vmap's in_dims for ``value``: 0 for every tensor, None where an input is absent."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return type(value)(*(_in_dims(field) for field in value))
    return 0


class SeedStack:
    """DiffusionQL models of one config trained in lockstep; see the module docstring."""

    def __init__(self, models: Sequence[DiffusionQL]):
        self.models = list(models)
        if not self.models:
            raise ValueError("models must hold at least one DiffusionQL, got none")
        first = self.models[0]
        for model in self.models:
            _refuse_images(model.observation_space)
            if model.config.chunked:
                raise ValueError(
                    "stacked seeds train the one-step losses; this model acts in chunks "
                    f"(action_horizon={model.config.action_horizon}, n_obs_steps={model.config.n_obs_steps}): "
                    "train its seeds one by one"
                )
            if model.config.precision == "fp16":
                raise ValueError(
                    "stacked seeds take their gradients from torch.func, which fp16's loss scaling does not reach: "
                    "precision must be 'fp32' or 'bf16' here, got 'fp16'"
                )
        self.config: DiffusionQLConfig = first.config
        for model in self.models[1:]:
            for field, ours, theirs in (
                ("config", first.config, model.config),
                ("device", first.device, model.device),
                ("gradient step (n_updates; the EMA schedule is shared)", first.n_updates, model.n_updates),
            ):
                if ours != theirs:
                    raise ValueError(
                        f"models must share one {field}: the model with seed {first.seed} has {ours}, "
                        f"the one with seed {model.seed} has {theirs}"
                    )
        self.device = first.device
        self.math = _ReplicaMath(first)
        # Each model's parameters by network, in the order of its own optimizers.
        self.parameters = [{net: list(getattr(m.policy, net).parameters()) for net in NETWORKS} for m in self.models]
        self.names = {
            net: [f"policy.{net}.{n}" for n, _ in getattr(first.policy, net).named_parameters()] for net in NETWORKS
        }
        self._gradients: dict[str, Callable[..., Any]] = {}

    # one update of every replica -----------------------------------------------------------------
    def _stacked(self, *nets: str) -> Params:
        """The named parameters of ``nets``, each stacked over the replicas (a copy, no autograd)."""
        with torch.no_grad():
            return {
                name: torch.stack([params[net][i] for params in self.parameters])
                for net in nets
                for i, name in enumerate(self.names[net])
            }

    def _gradient(self, stage: str, inputs: Any) -> Callable[..., Any]:
        """vmap over replicas of grad_and_value of the stage's loss (built once per input layout)."""
        key = f"{stage}{_in_dims(inputs)}"
        if key not in self._gradients:

            def loss(trained: Params, frozen: Params, batch: Batch, noise: Any) -> tuple[torch.Tensor, Params]:
                return functional_call(self.math, {**trained, **frozen}, (stage, batch, noise))

            dims = (0, 0, _BATCH_DIMS, _in_dims(inputs))
            self._gradients[key] = vmap(grad_and_value(loss, has_aux=True), in_dims=dims)
        return self._gradients[key]

    def train_step(self) -> dict[str, torch.Tensor]:
        """One gradient step of every replica, counted as ``learn`` counts it; returns the losses,
        each (R,), with 0 and ``skipped_batches`` 1 where a replica skipped its batch."""
        models = self.models
        active = [True] * len(models)

        # Critic. Each replica draws its batch and TD chain noise as its single run does.
        inputs = [m.critic_inputs() for m in models]
        batch = _stack([b for b, _ in inputs])
        next_noise = _stack([n for _, n in inputs])
        frozen = self._stacked("ema_actor", "critic_target")
        grads, (_, losses) = self._gradient("critic", next_noise)(self._stacked("critic"), frozen, batch, next_noise)
        self._check_finite("critic_loss", losses["critic_loss"], active)
        self._apply("critic", grads, active)

        # Actor. Draws per replica still taking the step; one that skipped gets zeros (its losses are
        # computed and thrown away) and keeps its generators where its single run would.
        draws = [m.actor_inputs() if taking else None for m, taking in zip(models, active, strict=True)]
        like = next((d for d in draws if d is not None), None)
        if like is not None:
            noise = _stack([d if d is not None else _zeros_like(like) for d in draws])
            # The updated critics score the new actions as frozen inputs: no gradients for them.
            trained, frozen = self._stacked("actor"), self._stacked("critic")
            grads, (_, actor_losses) = self._gradient("actor", noise)(trained, frozen, batch, noise)
            self._check_finite("actor_loss", actor_losses["actor_loss"], active)
            self._apply("actor", grads, active)
            losses = losses | actor_losses
        for model, taking in zip(models, active, strict=True):
            if taking:
                model.update_targets()
            model.num_timesteps += 1
            model.n_updates += 1
        if not all(active):  # as the single run reports a skipped batch
            taking_now = torch.tensor(active, device=self.device)
            losses = {k: torch.where(taking_now, v, 0.0) for k, v in losses.items()}
            losses["skipped_batches"] = (~taking_now).float()
        return losses

    def _check_finite(self, name: str, losses: torch.Tensor, active: list[bool]) -> None:
        """The single run's NaN/inf guard, per replica: raise naming the seed, or mark it skipped.
        One host read for all replicas."""
        finite = torch.isfinite(losses).tolist()
        if all(finite):
            return
        step = self.models[0].n_updates + 1
        for i, (ok, model) in enumerate(zip(finite, self.models, strict=True)):
            if ok or not active[i]:
                continue
            value = float(losses[i])
            if self.config.nonfinite_loss == "skip":
                warnings.warn(
                    f"{name} is {value} at gradient step {step} of the replica with seed {model.seed}: "
                    "skipping its batch",
                    stacklevel=3,
                )
                active[i] = False
                continue
            raise FloatingPointError(
                f"{name} is {value} at gradient step {step} of the replica with seed {model.seed}; no weights "
                "were updated with it. Check the data (rewards/observations scale), lower learning_rate or set "
                "grad_norm, or pass nonfinite_loss='skip'"
            )

    def _apply(self, net: str, grads: Params, active: list[bool]) -> None:
        """Each replica still taking the step gives its gradient slice to its own optimizer."""
        for i, (model, taking) in enumerate(zip(self.models, active, strict=True)):
            if taking:
                optimizer = model.critic_optimizer if net == "critic" else model.actor_optimizer
                optimize(optimizer, grads=[grads[name][i] for name in self.names[net]], grad_norm=self.config.grad_norm)

    # the loop ------------------------------------------------------------------------------------
    def timestep(self) -> Timestep:
        """One timestep of the training loop: a gradient step of every replica."""
        return Timestep([self.train_step()])

    def learn(
        self, total_timesteps: int, log_interval: int = 1000, callbacks: Sequence[Any] | None = None
    ) -> SeedStack:
        """``total_timesteps`` steps of every replica through ``learn``'s own loop (bookkeeping,
        logging to each model's logger, Ctrl-C), with ``callbacks[i]`` (an SB3 callback, a list of
        them or None) for replica i."""
        if callbacks is not None and len(callbacks) != len(self.models):
            raise ValueError(f"callbacks must hold one entry per replica ({len(self.models)}), got {len(callbacks)}")
        bound = [make_callback(c, False) for c in callbacks or [None] * len(self.models)]
        train(self.models, total_timesteps, self.timestep, bound, log_interval=log_interval, reset_num_timesteps=False)
        return self


def _zeros_like(noise: ActorNoise) -> ActorNoise:
    chain, coin = noise.chain_noise, noise.coin
    return ActorNoise(
        torch.zeros_like(noise.t),
        torch.zeros_like(noise.bc_noise),
        None if chain is None else torch.zeros_like(chain),
        None if coin is None else torch.zeros_like(coin),
    )


__all__ = ["SeedStack", "train_seeds"]
