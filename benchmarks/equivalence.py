"""Step-for-step equivalence of DiffusionQL with the official Diffusion-QL code.

The official agent (``Diffusion_QL`` of Zhendong-Wang/Diffusion-Policies-for-Offline-RL, imported
from a local checkout given by ``--reference``) and ``DiffusionQL`` start from the same weights
(the official initial actor, EMA actor, critics and target critics, copied into our layout) and
are trained side by side, one step at a time, on the same batches with the same random draws:

- each step both get the same batch (indices drawn here from a seeded numpy generator);
- the official step runs with the global random functions (``torch.randn``, ``randn_like``,
  ``randint``, ``np.random.uniform``, ... every one it could call) wrapped, so its draws are
  recorded in call order: the EMA actor's chain for the TD target (x_T and a noise per reverse
  step), the BC loss's t and noise, the actor chain's x_T and step noises, the critic coin;
- our side replays exactly those draws: each of our models' ``critic_inputs`` / ``actor_inputs``
  is replaced by a function returning this step's batch, chain noise and ``ActorNoise``;
  everything else is the library's own ``learn`` (one step per call).

Our paths, each fed the same draws: ``plain``, the eager model; ``compiled``, the model after
``compile_training()`` (torch.compile; up to ``--compile-steps``, 30 by default: compiling takes
about a minute on a CPU); ``stacked``, a ``SeedStack`` of two replicas built as ``train_seeds``
builds them, replica 0 starting from the official weights and replaying the official draws,
replica 1 drawing its own (up to ``--stack-steps``, 30 by default: it costs two runs).

At each checkpoint it compares every actor, EMA-actor, critic and target-critic weight, the
gradients each optimizer applied at that step (after clipping), the four losses, and acting: for a
few observations the official ``sample_action``'s draws (its 50 candidates' chain noise) are
replayed through ``policy.score_candidates`` and ``policy.act``; the softmax over the candidates'
target-critic min-Q and the picked action are compared (our pick inverts the CDF at a uniform;
it gets the midpoint of the CDF bin of the official ``torch.multinomial`` pick).

Each entry is the largest relative difference in a group: per tensor max|ours - official| /
max(max|official|, 1e-12), the maximum over the group's tensors.

Training is chaotic at float precision: after a few hundred steps the actor's differences jump
from ~1e-5 to ~1e-3 in the official code itself (the x0 clamps and the min/max over critics are
kinks that a rounding-sized change can move a sample across). So a ``control`` runs too: a second
official agent with every initial weight one float32 ulp up, replaying the same draws; its
difference from the official is what rounding alone does to the official code. An entry of ours
fails when it exceeds max(``--tolerance``, ``--control-factor`` x the control's entry).

Variants: ``default`` (the D4RL locomotion settings: EMA 0.995 every 5 steps from step 1000);
``max-Q backup`` (10 next-action samples); ``early EMA`` (EMA from step 10, every 5 steps, decay
0.6, so the EMA actor and the TD target it drives are checked before the chaos sets in; 0.6, not
0.5, so that a decay used as the rate would show).

Example (exit status 1 when an entry fails)::

    OMP_NUM_THREADS=1 python -m benchmarks.equivalence --reference /tmp/official --threads 1 \
        --steps 1 30 1500 --max-q-steps 1 30 --ema-steps 1 30 --out equivalence.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine, official_imports, random_data
from dql_agent import DiffusionQL, OfflineBuffer, networks  # noqa: E402
from dql_agent.buffer import Batch  # noqa: E402
from dql_agent.diffusion_ql import ActorNoise  # noqa: E402
from dql_agent.seeds import SeedStack  # noqa: E402

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah/Walker2d-sized
T = 5
BATCH = 256
N_MAX_Q = 10  # hard-coded in the official max-Q backup
N_CANDIDATES = 50  # hard-coded in the official sample_action
GRAD_NORM = 9.0
TINY = 1e-12
DEFAULT_TOLERANCE = 1e-3  # see docs/BENCHMARKS.md, "Equivalence with the official code"
DEFAULT_CONTROL_FACTOR = 10.0

# The official denoiser's layers (Diffusion.model, an MLP) -> ours (GaussianDiffusion.denoiser, a NoiseMLP)
ACTOR_LAYERS = {
    "time_mlp.1": "time_mlp.1",
    "time_mlp.3": "time_mlp.3",
    "mid_layer.0": "input_layer",
    "mid_layer.2": "hidden_layers.0",
    "mid_layer.4": "hidden_layers.2",
    "final_layer": "output_layer",
}
CRITIC_LAYERS = (0, 2, 4, 6)  # the Linear layers of each official q{1,2}_model Sequential
NETWORKS = ("actor", "ema_actor", "critic", "critic_target")
LOSSES = {"critic_loss": "critic_loss", "bc_loss": "bc_loss", "q_loss": "ql_loss", "actor_loss": "actor_loss"}
OUR_PATHS = ("plain", "compiled", "stacked")
COLUMNS = {"plain": "plain", "compiled": "compiled", "stacked": "stacked", "control": "control: official, 1 ulp"}

Draws = list[tuple[str, Any, tuple[Any, ...]]]  # (function, result, positional args) per call


@dataclass(frozen=True)
class Variant:
    name: str
    checkpoints: tuple[int, ...]
    max_q: bool = False
    ema_start: int = 1000
    ema_every: int = 5
    ema_decay: float = 0.995


# ---------------------------------------------------------------------------------------------
# layouts
def actor_in_our_layout(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The official Diffusion's named tensors ('model.mid_layer.0.weight', ...) under our names
    ('<prefix>.denoiser.input_layer.weight', ...); nn.Linear layouts on both sides."""
    out = {}
    for theirs, ours in ACTOR_LAYERS.items():
        for kind in ("weight", "bias"):
            out[f"{prefix}.denoiser.{ours}.{kind}"] = named[f"model.{theirs}.{kind}"]
    return out


def critic_in_our_layout(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The official twin critics' named tensors (two nn.Sequential, Linear weights (out, in)) as our
    one EnsembleMLP: weights (2, in, out), biases (2, 1, out), member 0 = q1_model."""
    out = {}
    for i, layer in enumerate(CRITIC_LAYERS):
        w1, w2 = (named[f"q{k}_model.{layer}.weight"] for k in (1, 2))
        b1, b2 = (named[f"q{k}_model.{layer}.bias"] for k in (1, 2))
        out[f"{prefix}.q.weights.{i}"] = torch.stack([w1.t(), w2.t()])
        out[f"{prefix}.q.biases.{i}"] = torch.stack([b1[None], b2[None]])
    return out


def in_our_layout(named: dict[str, torch.Tensor], net: str) -> dict[str, torch.Tensor]:
    return (actor_in_our_layout if "actor" in net else critic_in_our_layout)(named, net)


def our_weights(model: DiffusionQL) -> dict[str, torch.Tensor]:
    return {
        f"{net}.{n}": p.detach().clone() for net in NETWORKS for n, p in getattr(model.policy, net).named_parameters()
    }


@torch.no_grad()
def load_weights(model: DiffusionQL, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (our names) into ``model`` in place (the optimizers keep their Parameters)."""
    params = {f"{net}.{n}": p for net in NETWORKS for n, p in getattr(model.policy, net).named_parameters()}
    if params.keys() != weights.keys():
        ours, theirs = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise KeyError(f"layouts differ: ours only {ours}, theirs only {theirs}")
    for name, param in params.items():
        if param.shape != weights[name].shape:
            raise ValueError(f"{name}: ours {tuple(param.shape)}, official {tuple(weights[name].shape)}")
        param.copy_(weights[name])


# ---------------------------------------------------------------------------------------------
# the official step's random draws: recorded, read, replayed
class DrawRecorder:
    """Wraps the global random functions while active and records each call: (name, result, args).

    The official code looks them up on the module at call time (``torch.randn(...)``,
    ``np.random.uniform()``), so replacing the module attributes sees every call. Functions it does
    not call are wrapped too, so an unexpected draw shows up in the record (and fails the replay).
    """

    TORCH = ("randn", "randn_like", "randint", "randint_like", "rand", "rand_like", "normal")
    TORCH += ("multinomial", "bernoulli", "randperm", "poisson")
    NUMPY = ("uniform", "rand", "randn", "randint", "random", "normal", "choice", "random_sample")

    def __init__(self) -> None:
        self.draws: Draws = []

    def _call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = fn(*args, **kwargs)
        kept = result.clone() if isinstance(result, torch.Tensor) else result
        self.draws.append((name, kept, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
        return result

    @contextlib.contextmanager
    def record(self) -> Iterator[Draws]:
        self.draws = []
        saved = [(torch, "torch", n, getattr(torch, n)) for n in self.TORCH]
        saved += [(np.random, "np.random", n, getattr(np.random, n)) for n in self.NUMPY]
        try:
            for module, prefix, name, fn in saved:
                setattr(module, name, self._wrapper(f"{prefix}.{name}", fn))
            yield self.draws
        finally:
            for module, _, name, fn in saved:
                setattr(module, name, fn)

    def _wrapper(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args, **kwargs: self._call(name, fn, args, kwargs)


class DrawReplayer(DrawRecorder):
    """Makes the official code draw a given record instead: each wrapped function still runs (the
    shape of its result is checked against the record's) but returns the recorded value. The calls
    are recorded as usual, with this run's arguments (e.g. the probabilities given to multinomial)."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: Draws = []

    def _call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        own = fn(*args, **kwargs)
        if not self.queue:
            raise AssertionError(f"replay: {name} called after the record ended")
        recorded, value, _ = self.queue.pop(0)
        if recorded != name or np.shape(own) != np.shape(value):
            raise AssertionError(f"replay: {name} {np.shape(own)} called where {recorded} {np.shape(value)} was")
        self.draws.append((name, value, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
        return value.clone() if isinstance(value, torch.Tensor) else value

    @contextlib.contextmanager
    def replay(self, draws: Draws) -> Iterator[Draws]:
        self.queue = list(draws)
        with self.record() as calls:
            yield calls
        if self.queue:
            raise AssertionError(f"replay: {len(self.queue)} recorded draw(s) not used")


class DrawReader:
    """Reads recorded draws in order, checking each one's function and shape."""

    def __init__(self, draws: Draws, what: str):
        self.draws, self.position, self.what = draws, 0, what

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[Any, tuple[Any, ...]]:
        if self.position >= len(self.draws):
            raise AssertionError(f"{self.what}: expected draw {self.position} to be {name}, but the record ends")
        got, value, args = self.draws[self.position]
        if got != name or (shape is not None and tuple(np.shape(value)) != shape):
            raise AssertionError(
                f"{self.what}: expected draw {self.position} to be {name} {shape}, found {got} {np.shape(value)}"
            )
        self.position += 1
        return value, args

    def chain(self, rows: int) -> torch.Tensor:
        """The official reverse chain's draws (p_sample_loop): x_T by torch.randn, then one
        torch.randn_like per step t = T-1..0, the last multiplied by 0 (no noise at t = 0). As our
        sampler's ``noise`` (T, rows, A): noise[0] = x_T, noise[k] = the noise of step T-k."""
        x_t = self.take("torch.randn", (rows, ACT_DIM))[0]
        steps = [self.take("torch.randn_like", (rows, ACT_DIM))[0] for _ in range(T)]
        return torch.stack([x_t, *steps[:-1]])

    def done(self) -> None:
        if self.position != len(self.draws):
            extra = [name for name, _, _ in self.draws[self.position :]]
            raise AssertionError(f"{self.what}: {len(extra)} draw(s) not replayed: {extra}")


def replayed_inputs(draws: Draws, max_q: bool) -> tuple[torch.Tensor, ActorNoise]:
    """The official training step's draws as our critic's chain noise and our ActorNoise."""
    reader = DrawReader(draws, "official training step")
    next_noise = reader.chain(BATCH * (N_MAX_Q if max_q else 1))  # the EMA actor's next actions (TD target)
    t = reader.take("torch.randint", (BATCH,))[0]  # Diffusion.loss: the BC loss's steps
    bc_noise = reader.take("torch.randn_like", (BATCH, ACT_DIM))[0]  # Diffusion.p_losses: its noise
    chain_noise = reader.chain(BATCH)  # the actor chain sampled with gradients
    uniform = reader.take("np.random.uniform")[0]  # > 0.5: q1 scored, normalised by |q2|
    reader.done()
    return next_noise, ActorNoise(t, bc_noise, chain_noise, torch.tensor(bool(uniform > 0.5)))


def acting_draws(draws: Draws) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An official ``sample_action``'s draws: the candidates' chain noise (T, 50, A), the
    probabilities given to torch.multinomial (the softmax over min-Q) and the index it drew."""
    reader = DrawReader(draws, "official sample_action")
    noise = reader.chain(N_CANDIDATES)
    index, (probs, *_) = reader.take("torch.multinomial", (1,))
    reader.done()
    return noise, probs, int(index)


# ---------------------------------------------------------------------------------------------
# the official side
class OneBatch:
    """The official ``replay_buffer`` argument: ``sample`` returns the batch given for this step."""

    def __init__(self) -> None:
        self.batch: tuple[torch.Tensor, ...] | None = None

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        assert self.batch is not None and self.batch[0].shape[0] == batch_size
        batch, self.batch = self.batch, None
        return batch


class GradientTap:
    """Copies of the gradients each optimizer applies (after clipping), taken by a step pre-hook
    while ``armed`` (at checkpoints only: the copies cost memory)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], names: dict[str, list[str]]):
        self.armed = False
        self.grads: dict[str, torch.Tensor] = {}
        for key, optimizer in optimizers.items():
            optimizer.register_step_pre_hook(self._hook(names[key]))

    def _hook(self, names: list[str]) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.armed:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                for name, p in zip(names, params, strict=True):
                    self.grads[name] = p.grad.detach().clone()

        return hook


class Official:
    """The official agent, one iteration per ``step`` on a given batch, its draws recorded (or,
    given another agent's record, replayed)."""

    def __init__(self, reference: Path, seed: int, variant: Variant):
        with official_imports(reference):
            ql = importlib.import_module("agents.ql_diffusion")
        torch.manual_seed(seed)  # the official initialisation draws from the global RNG
        np.random.seed(seed)
        # main.py's locomotion settings: vp, T=5, lr 3e-4, eta 1, EMA 0.995 every 5 steps from step 1000.
        self.agent = ql.Diffusion_QL(
            OBS_DIM, ACT_DIM, 1.0, "cpu", 0.99, 0.005, max_q_backup=variant.max_q, eta=1.0, beta_schedule="vp",
            n_timesteps=T, ema_decay=variant.ema_decay, step_start_ema=variant.ema_start,
            update_ema_every=variant.ema_every, lr=3e-4, lr_decay=False, grad_norm=GRAD_NORM,
        )  # fmt: skip
        self.sampler, self.recorder, self.replayer = OneBatch(), DrawRecorder(), DrawReplayer()
        names = {
            "actor": [n for n, _ in self.agent.actor.named_parameters()],
            "critic": [n for n, _ in self.agent.critic.named_parameters()],
        }
        self.tap = GradientTap({"actor": self.agent.actor_optimizer, "critic": self.agent.critic_optimizer}, names)

    def modules(self) -> dict[str, torch.nn.Module]:
        a = self.agent
        return {"actor": a.actor, "ema_actor": a.ema_model, "critic": a.critic, "critic_target": a.critic_target}

    def weights(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, in our layout and names."""
        out: dict[str, torch.Tensor] = {}
        for net, module in self.modules().items():
            out |= in_our_layout({n: p.detach().clone() for n, p in module.named_parameters()}, net)
        return out

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients of the last armed step, in our layout (actor and critic)."""
        g = self.tap.grads
        actor = {n: v for n, v in g.items() if n.startswith("model.")}
        return in_our_layout(actor, "actor") | in_our_layout({n: v for n, v in g.items() if n not in actor}, "critic")

    def step(self, batch: Batch, replay: Draws | None = None) -> tuple[Draws, dict[str, float]]:
        """One official iteration on ``batch``: its draws (recorded, or ``replay``'s) and its losses."""
        self.sampler.batch = (
            batch.observations, batch.actions, batch.next_observations, batch.rewards[:, None], batch.not_dones[:, None]
        )  # fmt: skip
        with self.recorder.record() if replay is None else self.replayer.replay(replay) as draws:
            metric = self.agent.train(self.sampler, iterations=1, batch_size=BATCH)
        return list(draws), {ours: metric[theirs][0] for ours, theirs in LOSSES.items()}

    def act(self, observation: np.ndarray, replay: Draws | None = None) -> tuple[np.ndarray, Draws]:
        """``sample_action`` with its draws recorded (or ``replay``'s): (action, draws)."""
        with self.recorder.record() if replay is None else self.replayer.replay(replay) as draws:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its F.softmax without dim (implicit dim 0)
                action = self.agent.sample_action(observation)
        return action, list(draws)

    @torch.no_grad()
    def nudge(self) -> None:
        """Every weight (actor, EMA actor, critics, target critics) one float32 ulp up."""
        for module in self.modules().values():
            for p in module.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))


# ---------------------------------------------------------------------------------------------
# the compared paths: ours, and the control
class Replay:
    """Our model's ``critic_inputs``/``actor_inputs``, replaced: they return this step's batch and
    the official draws, each exactly once per step."""

    def __init__(self, model: DiffusionQL):
        self.critic: tuple[Batch, torch.Tensor] | None = None
        self.actor: ActorNoise | None = None
        model.critic_inputs = self.critic_inputs  # type: ignore[method-assign]
        model.actor_inputs = self.actor_inputs  # type: ignore[method-assign]

    def feed(self, batch: Batch, next_noise: torch.Tensor, actor_noise: ActorNoise) -> None:
        self.critic, self.actor = (batch, next_noise), actor_noise

    def critic_inputs(self) -> tuple[Batch, torch.Tensor]:
        assert self.critic is not None, "critic_inputs called twice in one step"
        inputs, self.critic = self.critic, None
        return inputs

    def actor_inputs(self) -> ActorNoise:
        assert self.actor is not None, "actor_inputs called twice in one step"
        inputs, self.actor = self.actor, None
        return inputs

    def check_consumed(self) -> None:
        assert self.critic is None and self.actor is None, "a replayed input was not used this step"


def make_model(buffer: OfflineBuffer, seed: int, variant: Variant) -> DiffusionQL:
    """A DiffusionQL with the official agent's settings."""
    return DiffusionQL(
        buffer, device="cpu", seed=seed, learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=BATCH,
        gamma=0.99, tau=0.005, eta=1.0, diffusion_steps=T, beta_schedule="vp", grad_norm=GRAD_NORM,
        max_q_backup=variant.max_q, n_max_q_samples=N_MAX_Q, ema_decay=variant.ema_decay,
        ema_update_every=variant.ema_every, ema_start_step=variant.ema_start, n_action_samples=N_CANDIDATES,
        hidden_dim=256, n_hidden=3, time_dim=16,
    )  # fmt: skip


class OurPath:
    """One of our training paths, started from the official weights and fed the official draws."""

    name: str
    model: DiffusionQL  # the model (replica) compared with the official agent

    def attach(self, model: DiffusionQL, weights: dict[str, torch.Tensor]) -> None:
        self.model = model
        load_weights(model, weights)
        self.replay = Replay(model)
        names = {
            "actor": [f"actor.{n}" for n, _ in model.actor.named_parameters()],
            "critic": [f"critic.{n}" for n, _ in model.critic.named_parameters()],
        }
        self.tap = GradientTap({"actor": model.actor_optimizer, "critic": model.critic_optimizer}, names)
        self.losses: dict[str, float] = {}

    def step(self, batch: Batch, draws: Draws, inputs: tuple[torch.Tensor, ActorNoise]) -> None:
        self.replay.feed(batch, *inputs)
        self.learn_one_step()
        self.replay.check_consumed()

    def learn_one_step(self) -> None:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        return our_weights(self.model)

    def gradients(self) -> dict[str, torch.Tensor]:
        return self.tap.grads

    @torch.no_grad()
    def acting(self, observation: np.ndarray, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Our policy on an official ``sample_action``'s draws: (candidate probabilities, picked action)."""
        noise, probs, index = acting_draws(draws)
        policy, x = self.model.policy, torch.as_tensor(observation, dtype=torch.float32)[None]
        _, q = policy.score_candidates(x, noise)
        cdf = probs.double().cumsum(0)
        low = float(cdf[index - 1]) if index > 0 else 0.0
        uniform = torch.tensor([(low + float(cdf[index])) / 2], dtype=torch.float32)  # inside the official pick's bin
        return torch.softmax(q[0], dim=0), policy.act(x, noise, uniform)[0]


class PlainPath(OurPath):
    """``DiffusionQL.learn``, one step per call: eager, or after ``compile_training()``."""

    def __init__(self, name: str, buffer: OfflineBuffer, weights: dict[str, torch.Tensor], variant: Variant):
        self.name = name
        model = make_model(buffer, 0, variant)
        if name == "compiled":
            model.compile_training()
        self.attach(model, weights)
        train_step = model.train_step

        def train_step_keeping_losses() -> dict[str, torch.Tensor]:
            losses = train_step()
            self.losses = {k: float(losses[k]) for k in LOSSES}
            return losses

        model.train_step = train_step_keeping_losses  # type: ignore[method-assign]

    def learn_one_step(self) -> None:
        self.model.learn(1, log_interval=0, reset_num_timesteps=False)


class StackedPath(OurPath):
    """Stacked seeds: a ``SeedStack`` of two replicas, built as ``train_seeds`` builds them (one
    ``DiffusionQL`` per seed, the second sharing the first's buffer) and stepped by its ``learn``.
    Replica 0 (seed 0) starts from the official weights and replays the official draws; replica 1
    (seed 1) keeps its own initialisation and draws, so the batched (vmap) pass has two replicas."""

    name = "stacked"

    def __init__(self, buffer: OfflineBuffer, weights: dict[str, torch.Tensor], variant: Variant):
        models = [make_model(buffer, seed, variant) for seed in (0, 1)]
        models[1].replay_buffer = models[0].replay_buffer
        self.attach(models[0], weights)
        self.stack = SeedStack(models)
        train_step = self.stack.train_step

        def train_step_keeping_losses() -> dict[str, torch.Tensor]:
            losses = train_step()
            self.losses = {k: float(losses[k][0]) for k in LOSSES}
            return losses

        self.stack.train_step = train_step_keeping_losses  # type: ignore[method-assign]

    def learn_one_step(self) -> None:
        self.stack.learn(1, log_interval=0)


class ControlPath:
    """A second official agent with every initial weight one float32 ulp up, replaying the official
    draws: how far the official code itself moves from a rounding-sized change."""

    name = "control"

    def __init__(self, reference: Path, seed: int, variant: Variant):
        self.official = Official(reference, seed, variant)
        self.official.nudge()
        self.tap = self.official.tap
        self.losses: dict[str, float] = {}

    def step(self, batch: Batch, draws: Draws, inputs: Any) -> None:
        self.losses = self.official.step(batch, replay=draws)[1]

    def weights(self) -> dict[str, torch.Tensor]:
        return self.official.weights()

    def gradients(self) -> dict[str, torch.Tensor]:
        return self.official.gradients()

    def acting(self, observation: np.ndarray, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Its ``sample_action`` on the official one's draws (so the same index is drawn)."""
        action, calls = self.official.act(observation, replay=draws)
        return acting_draws(calls)[1], torch.as_tensor(action)


# ---------------------------------------------------------------------------------------------
# comparison
def relative(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of max|ours - theirs| / max(max|theirs|, tiny), and the tensor where it is largest."""
    if ours.keys() != theirs.keys():
        raise KeyError(f"compared groups differ: {sorted(ours.keys() ^ theirs.keys())}")
    worst, where = 0.0, "-"
    for name, b in theirs.items():
        a = ours[name].to(b.dtype)
        diff = float((a - b).abs().max()) / max(float(b.abs().max()), TINY)
        diff = diff if math.isfinite(diff) else math.inf
        if diff > worst:
            worst, where = diff, name
    return worst, where


def part(tensors: dict[str, torch.Tensor], net: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(net + ".")}


def differences(
    path: Any,
    theirs: dict[str, torch.Tensor],
    their_grads: dict[str, torch.Tensor],
    their_losses: dict[str, float],
    acts: list[tuple[np.ndarray, np.ndarray, Draws]],
) -> dict[str, tuple[float, str]]:
    """Every group's largest relative difference between ``path`` and the official agent."""
    ours, grads = path.weights(), path.gradients()
    rows = {net: relative(part(ours, net), part(theirs, net)) for net in NETWORKS}
    rows |= {f"{net} grad": relative(part(grads, net), part(their_grads, net)) for net in ("actor", "critic")}
    as64 = lambda losses: {k: torch.tensor(v, dtype=torch.float64) for k, v in losses.items()}  # noqa: E731
    rows["losses"] = relative(as64(path.losses), as64(their_losses))
    probs: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "theirs": {}}
    picked: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "theirs": {}}
    for i, (observation, action, draws) in enumerate(acts):
        probs["ours"][f"obs{i}"], picked["ours"][f"obs{i}"] = path.acting(observation, draws)
        probs["theirs"][f"obs{i}"], picked["theirs"][f"obs{i}"] = acting_draws(draws)[1], torch.as_tensor(action)
    rows["acting: candidate probs"] = relative(probs["ours"], probs["theirs"])
    rows["acting: picked action"] = relative(picked["ours"], picked["theirs"])
    return rows


def batch_at(tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> Batch:
    return Batch(
        tensors["observations"][idx],
        tensors["actions"][idx],
        tensors["rewards"][idx],
        tensors["next_observations"][idx],
        1.0 - tensors["terminals"][idx].float(),
    )


# ---------------------------------------------------------------------------------------------
# one variant: the official agent, our paths and the control in lockstep
def run(args: argparse.Namespace, data: dict[str, np.ndarray], variant: Variant) -> dict[str, Any]:
    """Train the official agent and every path in lockstep for max(checkpoints) steps, comparing
    at each checkpoint."""
    official = Official(args.reference, args.seed, variant)
    weights = official.weights()
    buffer = OfflineBuffer(**data)
    tensors = {k: torch.as_tensor(v) for k, v in data.items()}
    paths: list[tuple[Any, float]] = [(PlainPath("plain", buffer, weights, variant), math.inf)]  # with its last step
    if args.compile_steps > 0:
        paths.append((PlainPath("compiled", buffer, weights, variant), args.compile_steps))
    if args.stack_steps > 0:
        paths.append((StackedPath(buffer, weights, variant), args.stack_steps))
    for path, _ in paths:  # the starting point: the official initial weights, all four networks, exactly
        assert all(torch.equal(w, weights[n]) for n, w in path.weights().items()), f"{path.name}: copy not exact"
    if args.control:
        paths.append((ControlPath(args.reference, args.seed, variant), math.inf))

    rng = np.random.default_rng(args.seed + 1000)  # batch indices, shared by all
    n = len(data["observations"])
    observations = data["observations"][rng.choice(n, args.act_observations, replace=False)]
    seconds = {"official": 0.0} | {path.name: 0.0 for path, _ in paths}
    results: dict[str, Any] = {}
    for step in range(1, max(variant.checkpoints) + 1):
        batch = batch_at(tensors, torch.as_tensor(rng.integers(0, n, BATCH)))
        checkpoint = step in variant.checkpoints
        official.tap.armed = checkpoint
        start = time.perf_counter()
        draws, official_losses = official.step(batch)
        seconds["official"] += time.perf_counter() - start
        inputs = replayed_inputs(draws, variant.max_q)
        active = [path for path, last in paths if step <= last]
        for path in active:
            path.tap.armed = checkpoint
            start = time.perf_counter()
            path.step(batch, draws, inputs)
            seconds[path.name] += time.perf_counter() - start
        if not checkpoint:
            continue
        theirs, their_grads = official.weights(), official.gradients()
        acts = [(obs, *official.act(obs)) for obs in observations]
        at_step: dict[str, Any] = {"official_losses": official_losses}
        for path in active:
            rows = differences(path, theirs, their_grads, official_losses, acts)
            at_step[path.name] = {group: {"max_rel_diff": v, "largest_at": where} for group, (v, where) in rows.items()}
        results[str(step)] = at_step
        print(f"  step {step}: compared ({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())})", flush=True)
    return {"checkpoints": results, "seconds": seconds, "steps": max(variant.checkpoints)}


def judge(results: dict[str, Any], tolerance: float, factor: float) -> float:
    """Give each entry of our paths its bound, max(tolerance, factor x the control's entry), and
    whether it passes; returns the largest ratio of an entry to its bound (<= 1: all pass)."""
    worst = 0.0
    for res in results["runs"].values():
        for at in res["checkpoints"].values():
            control = at.get("control", {})
            for name in OUR_PATHS:
                for group, entry in at.get(name, {}).items():
                    floor = control.get(group, {}).get("max_rel_diff", 0.0)
                    entry["bound"] = max(tolerance, factor * floor)
                    entry["ok"] = entry["max_rel_diff"] <= entry["bound"]
                    worst = max(worst, entry["max_rel_diff"] / entry["bound"])
    return worst


# ---------------------------------------------------------------------------------------------
# CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="checkout of the official Diffusion-QL code")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 30, 1500], help="checkpoints of the default run")
    p.add_argument(
        "--max-q-steps", type=int, nargs="*", default=[1, 30], help="checkpoints of the max-Q backup run (none: skip)"
    )
    p.add_argument(
        "--ema-steps", type=int, nargs="*", default=[1, 30],
        help="checkpoints of the early-EMA run (EMA from step 10, every 5, decay 0.6; none: skip)",
    )  # fmt: skip
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest relative difference allowed")
    p.add_argument(
        "--control-factor", type=float, default=DEFAULT_CONTROL_FACTOR,
        help="an entry may also be this many times the control's (the official code's own rounding sensitivity)",
    )  # fmt: skip
    p.add_argument(
        "--no-control", dest="control", action="store_false",
        help="skip the control (then every entry is held to --tolerance: expect failures past ~100 steps)",
    )  # fmt: skip
    p.add_argument("--compile-steps", type=int, default=30, help="run compile_training() up to this step (0: never)")
    p.add_argument("--stack-steps", type=int, default=30, help="run the stacked seeds up to this step (0: never)")
    p.add_argument("--act-observations", type=int, default=8, help="observations for the acting comparison")
    p.add_argument("--plain-mish", action="store_true", help="our Mish as F.mish (networks.FAST_CPU_MISH off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def variants(args: argparse.Namespace) -> list[Variant]:
    out = [Variant("default", tuple(sorted(set(args.steps))))]
    if args.max_q_steps:
        out.append(Variant("max-Q backup", tuple(sorted(set(args.max_q_steps))), max_q=True))
    if args.ema_steps:
        early = Variant("early EMA", tuple(sorted(set(args.ema_steps))), ema_start=10, ema_every=5, ema_decay=0.6)
        out.append(early)
    return out


def table(results: dict[str, Any]) -> list[str]:
    lines = []
    for run_name, res in results["runs"].items():
        checkpoints = res["checkpoints"]
        paths = [p for p in (*OUR_PATHS, "control") if any(p in at for at in checkpoints.values())]
        lines += [f"\n### {run_name} ({res['steps']} steps)", ""]
        lines.append("| group | step | " + " | ".join(COLUMNS[p] for p in paths) + " | bound | largest at (plain) |")
        lines.append("|---" * (len(paths) + 4) + "|")
        for group in next(iter(checkpoints.values()))["plain"]:
            for step, at in checkpoints.items():
                cells = []
                for p in paths:
                    entry = at.get(p, {}).get(group)
                    cells.append("-" if entry is None else f"{entry['max_rel_diff']:.1e}")
                    cells[-1] += " **FAIL**" if entry is not None and not entry.get("ok", True) else ""
                plain = at["plain"][group]
                where = plain["largest_at"] if plain["largest_at"] == "-" else f"`{plain['largest_at']}`"
                lines.append(f"| {group} | {step} | {' | '.join(cells)} | {plain['bound']:.1e} | {where} |")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (args.reference / "agents" / "ql_diffusion.py").exists():
        raise FileNotFoundError(f"--reference {args.reference} has no agents/ql_diffusion.py")
    torch.set_num_threads(args.threads)
    fast_mish, networks.FAST_CPU_MISH = networks.FAST_CPU_MISH, not args.plain_mish
    try:
        return compare(args)
    finally:
        networks.FAST_CPU_MISH = fast_mish


def compare(args: argparse.Namespace) -> dict[str, Any]:
    data = random_data(OBS_DIM, ACT_DIM, args.seed)
    results: dict[str, Any] = {
        "machine": machine(torch.device("cpu"), args.threads),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": {},
    }
    print("machine:", json.dumps(results["machine"]))
    started = time.perf_counter()
    for variant in variants(args):
        print(f"{variant.name}: {max(variant.checkpoints)} steps, checkpoints {list(variant.checkpoints)}", flush=True)
        results["runs"][variant.name] = run(args, data, variant)
    results["seconds"] = time.perf_counter() - started
    results["worst_ratio_to_bound"] = judge(results, args.tolerance, args.control_factor if args.control else 0.0)
    results["ok"] = results["worst_ratio_to_bound"] <= 1.0
    print("\n".join(table(results)))
    verdict = "PASS" if results["ok"] else "FAIL"
    print(
        f"\nbound: max({args.tolerance:.0e}, {args.control_factor:g} x control); largest entry / bound "
        f"{results['worst_ratio_to_bound']:.2f}: {verdict} ({results['seconds']:.0f} s)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
