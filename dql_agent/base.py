"""BaseAgent: the SB3-style surface every algorithm shares: learn, predict, save/load, export, the Hub.

Compatibility with SB3 is by protocol, not inheritance (SB3's ``BaseAlgorithm`` insists on an env
and on pickled zips): ``evaluate_policy`` needs ``predict``; SB3 callbacks need ``num_timesteps``,
``logger``, ``get_env()``, ``get_vec_normalize_env()`` and ``save()``.

An algorithm is one class statement and at most four hooks::

    class MyAlgo(BaseAgent, algorithm="MyAlgo", short_name="myalgo", paper=Paper(...)):
        config_class, policy_class = MyAlgoConfig, MyAlgoPolicy

        def __init__(self, buffer=None, env=None, **kwargs):
            super().__init__(buffer, env, **kwargs)   # config, spaces, seeded policy, env, data
            self.optimizer = ...                     # the policy is built by now

        def train_step(self) -> dict[str, torch.Tensor]: ...    # one gradient step; its losses
        def optimizers(self) -> dict[str, Optimizer]: ...       # what save(include_optimizer) keeps
        def training_state(self): ...                           # RNG/scheduler state to resume
        def load_training_state(self, tensors, meta): ...
        def collect_step(self) -> Rollout: ...                  # online algorithms only

The class statement registers it (:mod:`dql_agent.registry`): :func:`dql_agent.load_from_hub`
and the model card find it by the ``algorithm`` name saved in config.json. The jobs around the
surface live in their own modules: the training loop in :mod:`dql_agent.training`, dataset
preparation in :mod:`dql_agent.buffer`, checkpoint restore and its checks in
:mod:`dql_agent.checkpoint`, SB3's protocol in :mod:`dql_agent.sb3`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from gymnasium import spaces

from dql_agent import scaling
from dql_agent.buffer import Batch, OfflineBuffer, prepare_training_data
from dql_agent.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_config,
    checked_config,
    load_checkpoint,
    optimizer_to_tensors,
    restore_training_state,
    save_checkpoint,
)
from dql_agent.config import AgentConfig, OfflineDataConfig, check_seed, is_int, to_json_safe
from dql_agent.observations import check_observation_space, flat_dim
from dql_agent.registry import ALGORITHMS, Paper, algorithm_class, register
from dql_agent.sb3 import default_logger, load_keywords, make_callback, show_system_info, wrap_env
from dql_agent.scaling import World
from dql_agent.spaces import check_action_space, spaces_equal
from dql_agent.training import Rollout, Timestep, train

if TYPE_CHECKING:
    from dql_agent.policy import PolicyBase

__all__ = ["ALGORITHMS", "BaseAgent", "Paper", "Rollout", "algorithm_class", "resolve_device"]

SelfAgent = TypeVar("SelfAgent", bound="BaseAgent")


DEVICE_CHOICES = "'auto', 'cpu', 'cuda' or 'cuda:N' (or 'mps' on Apple silicon)"


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present, else the CPU. Under ``torchrun`` on a CUDA machine, 'auto'
    and 'cuda' mean this rank's GPU, cuda:LOCAL_RANK.

    Raises:
        ValueError: a device this machine does not have (CUDA or MPS absent, a CUDA index past the
            last GPU), 'meta' (shapes without data: nothing can train or act there), or a device
            type dql_agent does not run on; the message names the device and the choices.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {device!r}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but this torch sees no CUDA device; use device='auto' or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        if resolved.index is None:
            resolved = scaling.local_cuda_device() or resolved
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device={device!r} (Apple's Metal) but this torch has no MPS device (it needs Apple silicon, "
                "macOS 12.3 or later and a torch built with MPS); use device='auto' or 'cpu'"
            )
    elif resolved.type == "meta":
        raise ValueError(
            f"device={device!r} holds shapes without data: a model can neither train nor act there; "
            f"use {DEVICE_CHOICES}"
        )
    elif resolved.type != "cpu":
        raise ValueError(f"device type {resolved.type!r} is not one dql_agent runs on: use {DEVICE_CHOICES}")
    return resolved


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's (host or device) rather than some other failure."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return any(words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))


def check_tensorboard(tensorboard_log: Any) -> None:
    """A usable ``tensorboard_log``: a path, and the tensorboard package installed (SB3 asserts it
    only when the logger is first made, after training started)."""
    if not isinstance(tensorboard_log, (str, os.PathLike)):
        raise TypeError(f"tensorboard_log must be a folder path or None, got {tensorboard_log!r}")
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            f"tensorboard_log={str(tensorboard_log)!r} needs the tensorboard package: pip install tensorboard"
        )


def draw_seed() -> int:
    """A fresh seed when the user gave none, so the run can still be reproduced from config.json."""
    return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))


def resolve_spaces(
    buffer: OfflineBuffer | None, env: Any, observation_space: spaces.Space | None, action_space: spaces.Box | None
) -> tuple[spaces.Space, spaces.Box]:
    """The model's spaces: explicit ones win, then the env's, then the buffer's; dimensions must agree."""
    env_spaces = (env.observation_space, env.action_space) if env is not None else (None, None)
    buffer_spaces = (buffer.observation_space, buffer.action_space) if buffer is not None else (None, None)
    obs_space = next((s for s in (observation_space, env_spaces[0], buffer_spaces[0]) if s is not None), None)
    act_space = next((s for s in (action_space, env_spaces[1], buffer_spaces[1]) if s is not None), None)
    if obs_space is None or act_space is None:
        raise ValueError("cannot tell the spaces: pass buffer=, env=, or observation_space= and action_space=")
    check_observation_space(obs_space)
    check_action_space(act_space)
    if buffer is not None:
        if flat_dim(obs_space) != buffer.obs_dim:
            raise ValueError(
                f"observation_space flattens to {flat_dim(obs_space)} dims, "
                f"but the buffer's observations have {buffer.obs_dim}: pass observation_space= (or an env) that "
                "matches the data"
            )
        if int(np.prod(act_space.shape)) != buffer.action_dim:
            raise ValueError(
                f"action_space has shape {act_space.shape}, but the buffer's actions have dim {buffer.action_dim}: "
                "pass action_space= (or an env) that matches the data"
            )
    return obs_space, act_space


class BaseAgent:
    """The shared surface of every algorithm: SB3's attributes, ``predict``, ``learn``,
    ``save``/``load`` and the Hub.

    Offline algorithms train on an :class:`OfflineBuffer` (``set_buffer``; one timestep is one
    gradient step); online ones override :meth:`collect_step` and train on what it collects from
    ``env`` (one timestep is one env step).

    Args:
        buffer: the offline dataset, or None (an online algorithm, or a model that only acts).
        env: an env id, ``gymnasium.Env`` or VecEnv (Monitor-wrapped as SB3 does): the online
            algorithms' experience, the offline ones' evaluation env (``get_env()``).
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; data lives there.
        seed: seeds network initialisation, the training generator and acting; None draws one
            (saved in config.json).
        observation_space, action_space: explicit spaces (else the env's, else the buffer's).
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        **hyperparameters: fields of the algorithm's ``config_class`` (see :meth:`make_config`).

    The policy is ``policy_class(observation_space, action_space, config)``, built with the torch
    RNG seeded by ``seed``.
    """

    algorithm: ClassVar[str]
    """The name config.json records and the registry knows the class by."""
    short_name: ClassVar[str]
    """The name on the command line (``dql-agent train --algo NAME``)."""
    paper: ClassVar[Paper | None] = None
    """What the model card cites."""
    online: ClassVar[bool] = False
    """Whether the algorithm collects its own experience (it overrides :meth:`collect_step`)."""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Per-task hyperparameters by name (``preset=`` / ``--preset``), for algorithms that have them."""
    stackable: ClassVar[bool] = False
    """Whether :class:`dql_agent.seeds.SeedStack` can train several seeds of it in one batched pass."""
    config_class: ClassVar[type[AgentConfig]]
    config: AgentConfig
    policy_class: ClassVar[type[PolicyBase]]

    def __init_subclass__(
        cls, algorithm: str | None = None, short_name: str | None = None, paper: Paper | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.online = cls.collect_step is not BaseAgent.collect_step
        if algorithm is not None:
            cls.algorithm, cls.short_name, cls.paper = algorithm, short_name or algorithm.lower(), paper
            register(cls)

    def __init__(
        self,
        buffer: OfflineBuffer | None = None,
        env: Any = None,
        *,
        device: str | torch.device = "auto",
        seed: int | None = None,
        observation_space: spaces.Space | None = None,
        action_space: spaces.Box | None = None,
        verbose: int = 0,
        tensorboard_log: str | None = None,
        **hyperparameters: Any,
    ):
        if buffer is not None and not isinstance(buffer, OfflineBuffer):
            raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
        self.config = self.make_config(hyperparameters)
        if tensorboard_log is not None:
            check_tensorboard(tensorboard_log)
        self.device = resolve_device(device)
        scaling.check_precision(self.config.precision, self.device)
        self.seed = draw_seed() if seed is None else check_seed(seed)
        env_module, _, env_id = env.rpartition(":") if isinstance(env, str) else ("", "", None)
        if env is not None:
            env = wrap_env(env)
        observation_space, action_space = resolve_spaces(buffer, env, observation_space, action_space)
        # JSON-safe now (numpy scalars converted), so a save at the end of training cannot fail on it.
        self.metadata: dict[str, Any] = to_json_safe(dict(buffer.metadata), "metadata") if buffer is not None else {}
        if env_id is not None:  # an id typed in code: the plain id, and the module it named apart
            self.metadata.setdefault("env_id", env_id)
            if env_module:
                self.metadata.setdefault("env_module", env_module)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.policy: Any = self.policy_class(observation_space, action_space, self.config).to(self.device)
        self.policy.set_seed(self.seed + 2)
        # The update's random draws (batches, diffusion steps and noise): one stream, saved with
        # the optimizer state so a resumed run draws what the uninterrupted one would.
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        # fp16's loss scalers, one per optimizer (by id), kept across learn calls and saved with the
        # optimizer state: a scale that restarted at every call would skip steps each time.
        self.grad_scalers: dict[int, Any] = {}

        # SB3's attributes
        self.num_timesteps = 0
        self.n_updates = 0
        self.verbose = verbose
        self.tensorboard_log = tensorboard_log
        self._logger: Any = None
        self._total_timesteps = 0  # the target of the current learn() call (QVPO's entropy schedule)
        self._episode_num = 0
        self._last_obs: Any = None  # online: the observation the next collect_step acts on
        self.ep_info_buffer: deque[dict[str, Any]] = deque(maxlen=100)
        self.replay_buffer: Any = None
        self.env: Any = None
        if env is not None:
            self.set_env(env)
        if buffer is not None:
            self.set_buffer(buffer)

    @classmethod
    def make_config(cls, hyperparameters: dict[str, Any]) -> AgentConfig:
        """The config from the constructor's keyword hyperparameters (unknown keys: TypeError)."""
        config: AgentConfig = cls.config_class.from_hyperparameters(hyperparameters)
        return config

    # hooks ---------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One gradient step; returns its losses as detached 0-d tensors (summed on the device)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers ``save(include_optimizer=True)`` keeps, by name."""
        return {}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (RNG states) and JSON state (schedulers, fp16's loss scales) beyond the
        optimizers, to resume exactly."""
        meta: dict[str, Any] = {"rng_device": self.generator.device.type}
        scales = {
            name: scaling.scaler_state(self.grad_scalers[id(optimizer)])
            for name, optimizer in self.optimizers().items()
            if id(optimizer) in self.grad_scalers
        }
        if scales:
            meta["grad_scalers"] = scales
        return {"rng.train": self.generator.get_state()}, meta

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        if "rng.train" in tensors:  # absent when saved by a generator of another device type
            self.generator.set_state(tensors["rng.train"])
        optimizers = self.optimizers()
        for name, state in meta.get("grad_scalers", {}).items():
            if name not in optimizers:
                raise ValueError(f"grad_scalers names the optimizer {name!r}; this model has {sorted(optimizers)}")
            optimizer = optimizers[name]
            self.grad_scalers[id(optimizer)] = scaling.restored_scaler(state, optimizer, f"grad_scalers[{name!r}]")

    def collect_step(self) -> Rollout:
        """Online algorithms: act in ``env`` once, store the transitions, say how many gradient
        steps follow. Offline algorithms do not override it."""
        raise NotImplementedError

    # SB3 attributes ------------------------------------------------------------------------------
    @property
    def observation_space(self) -> spaces.Space:
        return self.policy.observation_space

    @property
    def action_space(self) -> spaces.Box:
        return self.policy.action_space

    @property
    def _n_updates(self) -> int:  # SB3's name
        return self.n_updates

    @property
    def replay(self) -> Any:
        """Deprecated name of :attr:`replay_buffer`."""
        warnings.warn("model.replay is renamed model.replay_buffer", DeprecationWarning, stacklevel=2)
        return self.replay_buffer

    @property
    def logger(self) -> Any:
        """The SB3 logger (``stdout`` when ``verbose >= 1``); replace it with :meth:`set_logger`."""
        if self._logger is None:
            self._logger = default_logger(self.verbose, self.tensorboard_log)
        return self._logger

    def set_logger(self, logger: Any) -> None:
        """Use an SB3 ``Logger`` (e.g. ``stable_baselines3.common.logger.configure(dir, ['csv'])``)."""
        self._logger = logger

    def get_env(self) -> Any:
        """The env as an SB3 VecEnv (None when the model was built without one)."""
        return self.env

    def set_env(self, env: Any) -> None:
        """Attach an env id, ``gymnasium.Env`` or VecEnv; its spaces must match the model's.
        An online algorithm's next ``learn`` starts from a reset of it."""
        vec_env = wrap_env(env)
        self.check_env_spaces(vec_env.observation_space, vec_env.action_space)
        self.env = vec_env
        self._last_obs = None

    def get_vec_normalize_env(self) -> None:
        return None

    def check_env_spaces(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Raise ValueError if an env's spaces differ from the model's."""
        for name, ours, theirs in (
            ("observation_space", self.observation_space, observation_space),
            ("action_space", self.action_space, action_space),
        ):
            if not spaces_equal(ours, theirs):
                raise ValueError(f"env {name} {theirs} does not match the model's {name} {ours}")

    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict``: see :meth:`dql_agent.policy.PolicyBase.predict`."""
        return self.policy.predict(observation, state, episode_start, deterministic)

    def predict_chunk(self, observation: Any, deterministic: bool = False) -> np.ndarray:
        """A whole action chunk for one observation history (or a batch): see
        :meth:`dql_agent.policy.PolicyBase.predict_chunk`."""
        return self.policy.predict_chunk(observation, deterministic)

    # data ----------------------------------------------------------------------------------------
    def set_buffer(self, buffer: OfflineBuffer) -> None:
        """Train on ``buffer``: observations normalised (when configured; the statistics go into the
        policy), actions scaled to [-1, 1], rewards transformed, all moved to the device once."""
        if not isinstance(buffer, OfflineBuffer):
            raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
        policy = self.policy
        if buffer.obs_dim != policy.obs_dim or buffer.action_dim != policy.env_action_dim:
            raise ValueError(
                f"buffer has obs_dim={buffer.obs_dim}, action_dim={buffer.action_dim}; the model expects "
                f"obs_dim={policy.obs_dim}, action_dim={policy.env_action_dim}"
            )
        if buffer.has_images != policy.encoder.uses_images or (
            buffer.has_images and not spaces_equal(buffer.observation_space, policy.observation_space)
        ):
            raise ValueError(
                f"buffer has observation_space {buffer.observation_space}; the model expects "
                f"{policy.observation_space} (camera keys must match: uint8 [0, 255] Boxes of the same shapes)"
            )
        data = self.config if isinstance(self.config, OfflineDataConfig) else OfflineDataConfig()
        self.replay_buffer = prepare_training_data(
            buffer,
            policy,
            self.device,
            reward_transform=data.reward_transform,
            normalize_observations=data.normalize_observations,
            action_horizon=self.config.action_horizon,
            n_obs_steps=self.config.n_obs_steps,
            gamma=self.config.gamma,
        )

    def sample_batch(self, replay: Any, batch_size: int) -> Batch:
        """A batch from ``replay`` drawn with the update's generator, its observations encoded for
        the networks (camera keys through the CNNs, random-shift augmented, drawing from the same
        generator; flat observations as they are)."""
        batch = replay.sample(batch_size, self.generator)
        return self.policy.encode_batch(batch, self.generator)

    def check_can_learn(self) -> None:
        """Raise RuntimeError naming what is missing when the model has nothing to train on."""
        if self.online and self.env is None:
            raise RuntimeError(
                f"{self.algorithm} has no env to collect experience from: pass env=... or call set_env(env)"
            )
        if not self.online and self.replay_buffer is None:
            raise RuntimeError(
                f"{self.algorithm} has no dataset: pass buffer=... or call set_buffer(buffer) before learn()"
            )

    # training ------------------------------------------------------------------------------------
    def learn(
        self: SelfAgent,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1000,
        progress_bar: bool = False,
        reset_num_timesteps: bool = True,
        interrupt_checkpoint: str | os.PathLike[str] | None = None,
        distributed: bool = False,
    ) -> SelfAgent:
        """Train for ``total_timesteps`` timesteps, driving SB3 callbacks and logging.

        A timestep is one gradient step for offline algorithms and one env step for online ones
        (``n_envs`` per VecEnv step, as in SB3), each followed by its gradient steps.

        Args:
            total_timesteps: timesteps to train for.
            callback: an SB3 ``BaseCallback``, a list of them, a ``f(locals, globals)`` or None.
                ``on_step`` runs once per timestep (per VecEnv step online); False stops training.
            log_interval: dump the mean losses (and, online, the episode returns) to the logger
                every this many timesteps (0: never).
            progress_bar: show a progress bar over the timesteps.
            reset_num_timesteps: start ``num_timesteps`` (and, online, the env) afresh; False
                continues the count (and the episode in progress).
            interrupt_checkpoint: where to save a resumable checkpoint (weights, optimizer and RNG
                state) if training stops on Ctrl-C or an exception; ``load`` it and call
                ``learn(..., reset_num_timesteps=False)`` to continue.
            distributed: train data-parallel with the other processes ``torchrun`` started (offline
                algorithms): each rank samples its own batches and the gradients are averaged, so
                a step sees ``batch_size`` x world size transitions. Every rank must hold the same
                model (same seed, or the same checkpoint loaded). Rank 0 alone runs ``callback``,
                logs and writes ``interrupt_checkpoint``; the other ranks return the same weights.
                See docs/SCALING.md.

        Ctrl-C finishes the current step before stopping, so the model stays usable.
        """
        if not is_int(total_timesteps) or total_timesteps < 0:
            raise ValueError(f"total_timesteps must be an int >= 0, got {total_timesteps!r}")
        if not is_int(log_interval) or log_interval < 0:
            raise ValueError(f"log_interval must be an int >= 0, got {log_interval!r}")
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {distributed!r}")
        world = self.join_world() if distributed else World()
        main = world.is_main
        train(
            [self],
            int(total_timesteps),
            self.timestep,
            [make_callback(callback if main else None, progress_bar and main)],
            log_interval=int(log_interval) if main else 0,
            reset_num_timesteps=reset_num_timesteps,
            interrupt_checkpoint=interrupt_checkpoint if main else None,
            world=world,
        )
        return self

    def join_world(self) -> World:
        """Join the data-parallel run ``torchrun`` started and check that every rank holds this same
        model (rank 0's weights are then broadcast, so all start bit-identical)."""
        if self.online:
            raise ValueError(
                f"distributed=True trains the offline algorithms; {self.algorithm} collects its own experience "
                "from its env: train it on one process (or several seeds with a Ray sweep)"
            )
        local = scaling.local_cuda_device()
        if local is not None and self.device != local:
            raise ValueError(
                f"under torchrun each rank trains on its own GPU: this rank's is {local} (LOCAL_RANK), but the "
                f"model is on {self.device}; build it with device='auto' or device='cuda'"
            )
        world = scaling.init_distributed(self.device)
        if world.size > 1:
            mine = torch.tensor([self.seed, self.n_updates, self.num_timesteps], dtype=torch.int64)
            ranks = scaling.gather_all(mine.to(self.device), world)
            for rank, theirs in enumerate(ranks):
                if not torch.equal(theirs.cpu(), ranks[0].cpu()):
                    raise ValueError(
                        f"every rank must start from the same model: rank {rank} has (seed, n_updates, "
                        f"num_timesteps) {tuple(int(v) for v in theirs.tolist())}, rank 0 has "
                        f"{tuple(int(v) for v in ranks[0].tolist())}; build it with the same seed, or load the "
                        "same checkpoint, on every rank"
                    )
            scaling.broadcast_module(self.policy)
        return world

    def timestep(self) -> Timestep:
        """One timestep of :meth:`learn`: offline one gradient step; online one VecEnv step
        (``collect_step``) and the gradient steps it asks for. Counts them as SB3 does."""
        rollout = self.collect_step() if self.online else None
        if rollout is not None:
            self.num_timesteps += rollout.n_steps
            self._episode_num += int(np.sum(rollout.dones))
            self.ep_info_buffer.extend(info["episode"] for info in rollout.infos if "episode" in info)
        losses = []
        for _ in range(1 if rollout is None else rollout.gradient_steps):
            losses.append(self.train_step())
            self.n_updates += 1
        if rollout is None:  # offline the timestep is the gradient step, counted once done
            self.num_timesteps += 1
        return Timestep(losses, rollout)

    def loss_is_finite(
        self, name: str, loss: torch.Tensor, skip: bool, applied: str = "no weights were updated at this step"
    ) -> bool:
        """False (skip the rest of this step) or FloatingPointError when ``loss`` is NaN/inf.
        ``applied`` says truthfully what this step has already changed. One host read per loss:
        free on the CPU, a sync on a GPU."""
        loss = loss.detach()
        if bool(torch.isfinite(loss)):
            return True
        self.refuse_step(f"{name} is {float(loss)}", skip, applied)
        return False

    def refuse_step(self, what: str, skip: bool, applied: str = "no weights were updated at this step") -> None:
        """Warn that this step's batch is skipped (``skip``) or raise FloatingPointError, saying
        ``what`` was not finite and what the step had already ``applied``."""
        step = self.n_updates + 1
        if skip:
            warnings.warn(f"{what} at gradient step {step}; {applied}: skipping the batch", stacklevel=4)
            return
        raise FloatingPointError(
            f"{what} at gradient step {step}; {applied}. Check the data (rewards/observations scale), "
            "lower learning_rate or set grad_norm, or pass nonfinite_loss='skip'"
        )

    # checkpoints ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], include_optimizer: bool = False) -> None:
        """Write ``model.safetensors`` + ``config.json`` to the directory ``path`` (a ``.zip``
        archive of them when ``path`` ends in ``.zip``). ``include_optimizer`` adds the
        optimizer, scheduler and RNG state so :meth:`learn` can resume where it stopped."""
        config = build_config(
            algorithm=self.algorithm,
            hyperparameters=self.config.to_dict(),
            observation_space=self.observation_space,
            action_space=self.action_space,
            num_timesteps=self.num_timesteps,
            seed=self.seed,
            metadata=self.metadata,
        )
        checkpoint = Checkpoint(config, dict(self.policy.state_dict()))
        if include_optimizer:
            tensors, meta = self.training_state()
            for name, optimizer in self.optimizers().items():
                opt_tensors, opt_meta = optimizer_to_tensors(name, optimizer)
                tensors.update(opt_tensors)
                meta[name] = opt_meta
            meta["n_updates"] = self.n_updates
            checkpoint.optimizer_tensors, checkpoint.optimizer_meta = tensors, meta
        save_checkpoint(path, checkpoint)

    @classmethod
    def load(
        cls: type[SelfAgent],
        path: str | os.PathLike[str],
        env: Any = None,
        device: str | torch.device = "auto",
        include_optimizer: bool = True,
        *,
        buffer: OfflineBuffer | None = None,
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        seed: int | None = None,
        **overrides: Any,
    ) -> SelfAgent:
        """Load a model saved with :meth:`save`; no dataset needed, nothing unpickled.

        ``overrides`` replace saved hyperparameters that do not change network shapes (e.g.
        ``n_action_samples``); optimizer/RNG state is restored when present so ``learn`` resumes.
        Any other keyword is a TypeError naming it.

        ``buffer`` (offline algorithms) is the dataset to go on training on, as :meth:`set_buffer`
        after the load; with ``env`` (an online algorithm's, or an offline one's evaluation env) it
        makes resuming one line: ``DiffusionQL.load(ckpt, buffer=buffer).learn(n,
        reset_num_timesteps=False)`` continues a checkpoint saved with optimizer state (an
        interrupt checkpoint, or ``save(path, include_optimizer=True)``) exactly where it stopped.

        SB3's load keywords are accepted (keyword-only), so SB3 code and rl-zoo3 load these models:

        - ``custom_objects`` is ignored: SB3 replaces with it what it cannot unpickle, and nothing
          here is unpickled. Keys other than those rl-zoo3 always passes (``learning_rate``,
          ``lr_schedule``, ``clip_range``) warn; pass a hyperparameter to change as a keyword.
        - ``print_system_info`` prints this system's versions, then those the checkpoint records.
        - ``force_reset`` has nothing to do: a loaded model never holds an episode in progress (no
          observation is saved), so an online algorithm's next ``learn`` starts from a reset.
        - ``seed`` replaces the saved seed, as in the constructor (stochastic actions, QVPO's env
          resets); RNG state saved with the optimizer still wins, so a resumed ``learn`` is exact.
        - ``buffer_size`` and ``optimize_memory_usage`` (rl-zoo3 passes them to SB3's off-policy
          algorithms) are ignored unless they are hyperparameters (QVPO's ``buffer_size``).
        """
        flags = {"include_optimizer": include_optimizer, "print_system_info": print_system_info}
        hyperparameters = cls.config_class.field_names() | set(cls.config_class.renamed)
        overrides = load_keywords(
            cls.__name__, hyperparameters, overrides, custom_objects, {**flags, "force_reset": force_reset}
        )
        if seed is not None:
            seed = check_seed(seed)
        if print_system_info:
            show_system_info()
        checkpoint = load_checkpoint(path, include_optimizer=include_optimizer)
        if print_system_info:
            show_system_info(checkpoint.config)
        return cls.from_checkpoint(checkpoint, str(path), env=env, device=device, seed=seed, buffer=buffer, **overrides)

    @classmethod
    def from_checkpoint(
        cls: type[SelfAgent],
        checkpoint: Checkpoint,
        where: str,
        env: Any = None,
        device: str | torch.device = "auto",
        seed: int | None = None,
        buffer: OfflineBuffer | None = None,
        **overrides: Any,
    ) -> SelfAgent:
        """A model of this class from a parsed checkpoint; ``where`` names it in errors. ``seed``
        replaces the saved seed (the optimizer's saved RNG state, when loaded, still wins);
        ``buffer`` is the dataset to train on (:meth:`set_buffer`)."""
        if buffer is not None and not isinstance(buffer, OfflineBuffer):
            raise TypeError(f"buffer must be an OfflineBuffer or None, got {type(buffer).__name__}")
        if buffer is not None and cls.online:
            raise ValueError(
                f"{cls.__name__} collects its own experience: pass env=..., not buffer= (buffer is for the offline "
                "algorithms' datasets)"
            )
        saved, config = checked_config(
            checkpoint,
            where,
            algorithm=cls.algorithm,
            config_class=cls.config_class,
            policy_class=cls.policy_class,
            overrides=overrides,
        )
        try:
            model = cls(
                observation_space=saved.observation_space,
                action_space=saved.action_space,
                device=device,
                seed=saved.seed if seed is None else seed,
                **config.to_dict(),
            )
        except (MemoryError, RuntimeError) as error:  # sizes that match the file can still not fit
            if not _out_of_memory(error):  # a device or build failure says so itself
                raise
            raise CheckpointError(f"{where}: not enough memory to build the model it describes: {error}") from None
        model.metadata = dict(saved.metadata)
        model.policy.load_state_dict(checkpoint.tensors)
        model.num_timesteps = saved.num_timesteps
        if checkpoint.optimizer_tensors is not None:
            tensors, meta, model.n_updates = restore_training_state(
                checkpoint, where, model.optimizers(), model.training_state(), model.generator.device.type
            )
            try:
                model.load_training_state(tensors, meta)
            except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{where}/optimizer.safetensors does not match the model: {error!r}") from None
        if env is not None:
            model.set_env(env)
        if buffer is not None:
            model.set_buffer(buffer)
        model.policy.eval()
        return model

    def export(
        self,
        path: str | os.PathLike[str],
        *,
        deterministic: bool = True,
        n_action_samples: int | None = None,
        batch: int | str = "dynamic",
        opset: int | None = None,
    ) -> str:
        """Export acting to ``path``: ``.onnx`` (runs in onnxruntime with numpy only; needs
        ``pip install dql_agent[deploy]``) or ``.pt2`` (``torch.export.load``, AOTInductor for C++).

        The graph is ``predict``'s math (:meth:`dql_agent.policy.PolicyBase.forward`); inputs,
        outputs and metadata are described in :mod:`dql_agent.export`. ``deterministic=False``
        takes the chains' noise (and the pick's uniforms) as inputs; ``batch`` is "dynamic" or a
        fixed size; ``opset`` is the ONNX opset (default 18). Returns the path written.
        """
        from dql_agent.export import export_policy

        written = export_policy(
            self.policy,
            path,
            algorithm=self.algorithm,
            deterministic=deterministic,
            n_action_samples=n_action_samples,
            batch=batch,
            opset=opset,
        )
        return str(written)

    # Hugging Face Hub ----------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        eval_env: Any = None,
        n_eval_episodes: int = 10,
        video: bool = True,
        video_length: int = 1000,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        deterministic: bool = True,
    ) -> str:
        """Push to the Hub repo ``repo_id`` (created if missing); returns the commit URL.

        Uploads model.safetensors, config.json and a README.md model card; with ``eval_env``
        (a ``gymnasium.Env``, ideally made with ``render_mode="rgb_array"``) also results.json
        from ``evaluate_policy`` over ``n_eval_episodes`` (``deterministic``: the argmax over
        fixed-noise candidates; False samples as the official evaluation does; results.json and
        the card say which) and, with ``video``, a ``video_length``-frame replay.mp4.
        ``revision`` is the branch to commit to. See
        :func:`dql_agent.hub.push_to_hub`.
        """
        from dql_agent.hub import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            eval_env=eval_env,
            n_eval_episodes=n_eval_episodes,
            video=video,
            video_length=video_length,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            deterministic=deterministic,
        )

    @classmethod
    def load_from_hub(
        cls: type[SelfAgent],
        repo_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        device: str | torch.device = "auto",
        token: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
    ) -> SelfAgent:
        """Load a model from the Hub repo ``repo_id`` (or a local checkpoint directory).

        Works offline from the Hub cache (``HF_HUB_OFFLINE=1`` or ``local_files_only``) and never
        unpickles. A missing repo or file, a config.json of another algorithm or from a newer
        dql_agent, or weights that disagree with it raise an error naming which. See
        :func:`dql_agent.hub.load_from_hub`.
        """
        from dql_agent.hub import load_from_hub

        model: SelfAgent = load_from_hub(
            cls,
            repo_id,
            revision=revision,
            device=device,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        return model
