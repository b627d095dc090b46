"""The SB3-style surface shared by every algorithm: predict, learn's loop, logger, env, save/load.

Compatibility is by protocol, not inheritance (SB3's ``BaseAlgorithm`` insists on an env and on
pickled zips): ``evaluate_policy`` needs ``predict``; SB3 callbacks need ``num_timesteps``,
``logger``, ``get_env()``, ``get_vec_normalize_env()`` and ``save()``. Each algorithm class
builds its networks and writes its own update in full; this base only drives them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from gymnasium import spaces

from dql_agent.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    check_tensors,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from dql_agent.spaces import flat_dim, space_from_json, space_to_json, spaces_equal

if TYPE_CHECKING:
    from dql_agent.buffer import OfflineBuffer

SelfAgent = TypeVar("SelfAgent", bound="BaseAgent")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error


def draw_seed() -> int:
    """A fresh seed when the user gave none, so the run can still be reproduced from config.json."""
    return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))


def resolve_spaces(
    buffer: OfflineBuffer | None, env: Any, observation_space: spaces.Space | None, action_space: spaces.Box | None
) -> tuple[spaces.Space, spaces.Box]:
    """The model's spaces: explicit ones win, then the env's, then the buffer's; dimensions must agree."""
    env_spaces = (None, None)
    if env is not None:
        if isinstance(env, str):
            import gymnasium as gym

            probe = gym.make(env)
            env_spaces = (probe.observation_space, probe.action_space)
            probe.close()
        else:
            env_spaces = (env.observation_space, env.action_space)
    buffer_spaces = (buffer.observation_space, buffer.action_space) if buffer is not None else (None, None)
    obs_space = next((s for s in (observation_space, env_spaces[0], buffer_spaces[0]) if s is not None), None)
    act_space = next((s for s in (action_space, env_spaces[1], buffer_spaces[1]) if s is not None), None)
    if obs_space is None or act_space is None:
        raise ValueError("cannot tell the spaces: pass buffer=, env=, or observation_space= and action_space=")
    if buffer is not None:
        if flat_dim(obs_space) != buffer.obs_dim:
            raise ValueError(
                f"observation_space flattens to {flat_dim(obs_space)} dims, "
                f"but the buffer's observations have {buffer.obs_dim}"
            )
        if int(torch.tensor(act_space.shape).prod()) != buffer.action_dim:
            raise ValueError(
                f"action_space has shape {act_space.shape}, but the buffer's actions have dim {buffer.action_dim}"
            )
    return obs_space, act_space


class _InterruptFlag:
    requested = False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[_InterruptFlag]:
    """Turn Ctrl-C into a flag that ``learn`` checks between gradient steps.

    A step is never cut in half (critic updated, actor not), so an interrupted run saves a state
    that resumes exactly. A second Ctrl-C interrupts at once. Only the main thread can own SIGINT;
    elsewhere this does nothing.
    """
    flag = _InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class BaseAgent:
    """Shared SB3-style surface. Subclasses define ``config_class``, ``algorithm`` and
    ``_train_step()``, and set ``config``, ``policy``, ``device``, ``seed``, ``metadata`` and
    their optimizers (returned by ``_optimizers()``) in ``__init__``."""

    algorithm: ClassVar[str]
    config_class: ClassVar[type]
    policy: torch.nn.Module
    device: torch.device
    seed: int
    metadata: dict[str, Any]

    # SB3 attributes --------------------------------------------------------------------------
    def _init_surface(self, env: Any, verbose: int, tensorboard_log: str | None) -> None:
        self.num_timesteps = 0
        self._n_updates = 0
        self.verbose = verbose
        self.tensorboard_log = tensorboard_log
        self._logger = None
        self.env = None
        if env is not None:
            self.set_env(env)

    @property
    def observation_space(self) -> spaces.Space:
        return self.policy.observation_space

    @property
    def action_space(self) -> spaces.Box:
        return self.policy.action_space

    @property
    def logger(self):  # noqa: ANN201 - an SB3 Logger; SB3 is imported lazily
        """The SB3 logger (``stdout`` when ``verbose >= 1``); replace it with :meth:`set_logger`."""
        if self._logger is None:
            from dql_agent.integrations.sb3 import default_logger

            self._logger = default_logger(self.verbose, self.tensorboard_log)
        return self._logger

    def set_logger(self, logger: Any) -> None:
        """Use an SB3 ``Logger`` (e.g. ``stable_baselines3.common.logger.configure(dir, ['csv'])``)."""
        self._logger = logger

    def get_env(self):  # noqa: ANN201 - an SB3 VecEnv or None
        """The evaluation env as an SB3 VecEnv (None when the model was built without one)."""
        return self.env

    def set_env(self, env: Any) -> None:
        """Attach an env id, ``gymnasium.Env`` or VecEnv; its spaces must match the model's."""
        from dql_agent.integrations.sb3 import wrap_env

        vec_env = wrap_env(env)
        self.check_env_spaces(vec_env.observation_space, vec_env.action_space)
        self.env = vec_env

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
        """SB3's ``predict``: see :meth:`DiffusionQLPolicy.predict`."""
        return self.policy.predict(observation, state, episode_start, deterministic)

    def _training_view(self, buffer: OfflineBuffer, rewards: torch.Tensor) -> OfflineBuffer:
        """``buffer`` as the update sees it, on the training device once: observations normalised
        (when configured; the statistics go into the policy), actions scaled to [-1, 1], ``rewards``
        (already transformed) in place of the raw ones."""
        policy = self.policy
        if buffer.obs_dim != policy.obs_dim or buffer.action_dim != policy.action_dim:
            raise ValueError(
                f"buffer has obs_dim={buffer.obs_dim}, action_dim={buffer.action_dim}; the model expects "
                f"obs_dim={policy.obs_dim}, action_dim={policy.action_dim}"
            )
        if getattr(self.config, "normalize_observations", False):
            mean, std = buffer.observation_stats()
            policy.obs_mean.copy_(mean)
            policy.obs_std.copy_(std)
        low = torch.as_tensor(self.action_space.low, dtype=torch.float32).reshape(1, -1)
        high = torch.as_tensor(self.action_space.high, dtype=torch.float32).reshape(1, -1)
        return buffer.replace(
            observations=policy.normalize_observations(buffer.observations.to(self.device)),
            next_observations=policy.normalize_observations(buffer.next_observations.to(self.device)),
            actions=(2.0 * (buffer.actions - low) / (high - low) - 1.0).clamp(-1.0, 1.0),
            rewards=rewards,
        ).to(self.device)

    # training loop -----------------------------------------------------------------------------
    def _check_can_learn(self) -> None:
        """Raise if the model cannot train (e.g. no dataset)."""

    def _train_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def learn(
        self: SelfAgent,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1000,
        progress_bar: bool = False,
        reset_num_timesteps: bool = True,
        interrupt_checkpoint: str | os.PathLike | None = None,
    ) -> SelfAgent:
        """Take ``total_timesteps`` gradient steps, driving SB3 callbacks and logging.

        Args:
            total_timesteps: gradient steps to take (offline: one timestep = one update).
            callback: an SB3 ``BaseCallback``, a list of them, a ``f(locals, globals)`` or None.
                A callback returning False stops training.
            log_interval: dump the mean losses to the logger every this many steps (0: never).
            progress_bar: show a progress bar over the gradient steps.
            reset_num_timesteps: start ``num_timesteps`` from 0 (False continues the count).
            interrupt_checkpoint: where to save a resumable checkpoint (weights, optimizer and RNG
                state) if training stops on Ctrl-C or an exception; ``load`` it and call
                ``learn(..., reset_num_timesteps=False)`` to continue exactly.

        Ctrl-C finishes the current gradient step before stopping, so the model stays usable.
        """
        if not isinstance(total_timesteps, (int, np.integer)) or total_timesteps < 0:
            raise ValueError(f"total_timesteps must be an int >= 0, got {total_timesteps!r}")
        self._check_can_learn()
        from dql_agent.integrations.sb3 import make_callback

        if reset_num_timesteps:
            self.num_timesteps = 0
        total_timesteps = int(total_timesteps) + self.num_timesteps
        callback = make_callback(callback, progress_bar)
        callback.init_callback(self)
        callback.on_training_start(locals(), globals())
        self.policy.train()
        sums: dict[str, torch.Tensor] = {}
        n_summed, start = 0, time.time()
        try:
            with deferred_interrupt() as interrupt:
                while self.num_timesteps < total_timesteps:
                    losses = self._train_step()
                    self.num_timesteps += 1
                    self._n_updates += 1
                    for key, value in losses.items():  # summed on the device: no host sync per step
                        sums[key] = sums[key] + value if key in sums else value.clone()
                    n_summed += 1
                    callback.update_locals(locals())
                    if not callback.on_step():
                        break
                    if log_interval and self.num_timesteps % log_interval == 0:
                        self._dump_logs(sums, n_summed, start)
                        sums, n_summed = {}, 0
                    if interrupt.requested:
                        raise KeyboardInterrupt(f"training interrupted after gradient step {self._n_updates}")
        except BaseException:
            self.policy.eval()
            if interrupt_checkpoint is not None:
                self.save(interrupt_checkpoint, include_optimizer=True)
                warnings.warn(
                    f"training stopped at gradient step {self._n_updates}; resumable checkpoint saved to "
                    f"{interrupt_checkpoint}",
                    stacklevel=2,
                )
            raise
        if n_summed and log_interval:
            self._dump_logs(sums, n_summed, start)
        self.policy.eval()
        callback.on_training_end()
        return self

    def _loss_is_finite(self, name: str, loss: torch.Tensor, skip: bool) -> bool:
        """False (skip this batch) or FloatingPointError when ``loss`` is NaN/inf, before any
        weight sees it. One host read per loss: free on the CPU, a sync on a GPU."""
        loss = loss.detach()
        if bool(torch.isfinite(loss)):
            return True
        step = self._n_updates + 1
        if skip:
            warnings.warn(f"{name} is {float(loss)} at gradient step {step}: skipping the batch", stacklevel=3)
            return False
        raise FloatingPointError(
            f"{name} is {float(loss)} at gradient step {step}; no weights were updated with it. Check the data "
            "(rewards/observations scale), lower learning_rate or set grad_norm, or pass nonfinite_loss='skip'"
        )

    def _dump_logs(self, sums: dict[str, torch.Tensor], n: int, start: float) -> None:
        for key, value in sums.items():
            self.logger.record(f"train/{key}", float(value) / n)
        self.logger.record("train/n_updates", self._n_updates)
        elapsed = max(time.time() - start, 1e-9)
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
        self.logger.record("time/fps", int(self.num_timesteps / elapsed))
        self.logger.dump(step=self.num_timesteps)

    # checkpoints -------------------------------------------------------------------------------
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Extra tensors (RNG states) and JSON state (schedulers) needed to resume exactly."""
        return {}, {}

    def _load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def save(self, path: str | os.PathLike, include_optimizer: bool = False) -> None:
        """Write ``model.safetensors`` + ``config.json`` to the directory ``path`` (a ``.zip``
        archive of them when ``path`` ends in ``.zip``). ``include_optimizer`` adds the
        optimizer, scheduler and RNG state so :meth:`learn` can resume where it stopped."""
        from dql_agent import __version__

        config = {
            "format_version": FORMAT_VERSION,
            "library": "dql_agent",
            "library_version": __version__,
            "algorithm": self.algorithm,
            "config": self.config.to_dict(),
            "observation_space": space_to_json(self.observation_space),
            "action_space": space_to_json(self.action_space),
            "num_timesteps": int(self.num_timesteps),
            "seed": self.seed,
            "metadata": self.metadata,
        }
        checkpoint = Checkpoint(config, dict(self.policy.state_dict()))
        if include_optimizer:
            tensors, meta = self._training_state()
            for name, optimizer in self._optimizers().items():
                opt_tensors, opt_meta = optimizer_to_tensors(name, optimizer)
                tensors.update(opt_tensors)
                meta[name] = opt_meta
            meta["n_updates"] = self._n_updates
            checkpoint.optimizer_tensors, checkpoint.optimizer_meta = tensors, meta
        save_checkpoint(path, checkpoint)

    @classmethod
    def load(
        cls: type[SelfAgent],
        path: str | os.PathLike,
        env: Any = None,
        device: str | torch.device = "auto",
        include_optimizer: bool = True,
        **overrides: Any,
    ) -> SelfAgent:
        """Load a model saved with :meth:`save`; no dataset needed, nothing unpickled.

        ``overrides`` replace saved hyperparameters that do not change network shapes (e.g.
        ``n_action_samples``); optimizer/RNG state is restored when present so ``learn`` resumes.
        """
        checkpoint = load_checkpoint(path, include_optimizer=include_optimizer)
        return cls._from_checkpoint(checkpoint, str(path), env=env, device=device, **overrides)

    @classmethod
    def _from_checkpoint(
        cls: type[SelfAgent],
        checkpoint: Checkpoint,
        where: str,
        env: Any = None,
        device: str | torch.device = "auto",
        **overrides: Any,
    ) -> SelfAgent:
        saved = checkpoint.config
        if saved["algorithm"] != cls.algorithm:
            raise CheckpointError(
                f"{where}/config.json holds a {saved['algorithm']} model; load it with that class "
                f"(or dql_agent.load_from_hub, which picks the class) instead of {cls.algorithm}"
            )
        try:
            config = cls.config_class.from_dict({**saved["config"], **overrides})
            observation_space = space_from_json(saved["observation_space"], "observation_space")
            action_space = space_from_json(saved["action_space"], "action_space")
            model = cls._build_empty(config, observation_space, action_space, device, saved["seed"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{where}/config.json: {error}") from None
        model.metadata = dict(saved["metadata"])
        expected = model.policy.state_dict()
        check_tensors(expected, checkpoint.tensors, f"{where}/model.safetensors")
        model.policy.load_state_dict(checkpoint.tensors)
        model.num_timesteps = saved["num_timesteps"]
        if checkpoint.optimizer_tensors is not None:
            meta = checkpoint.optimizer_meta
            try:
                for name, optimizer in model._optimizers().items():
                    optimizer_from_tensors(name, optimizer, checkpoint.optimizer_tensors, meta[name])
                model._n_updates = int(meta["n_updates"])
                model._load_training_state(checkpoint.optimizer_tensors, meta)
            except (KeyError, ValueError, RuntimeError, TypeError) as error:
                raise CheckpointError(f"{where}/optimizer.safetensors does not match the model: {error!r}") from None
        if env is not None:
            model.set_env(env)
        model.policy.eval()
        return model

    @classmethod
    def _build_empty(
        cls: type[SelfAgent],
        config: Any,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        device: str | torch.device,
        seed: int | None,
    ) -> SelfAgent:
        """A model with the given config and spaces and no data, to load weights into."""
        return cls(
            observation_space=observation_space,
            action_space=action_space,
            device=device,
            seed=seed,
            **config.to_dict(),
        )

    # Hugging Face Hub --------------------------------------------------------------------------
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
    ) -> str:
        """Push to the Hub repo ``repo_id`` (created if missing); returns the commit URL.

        Uploads model.safetensors, config.json and a README.md model card; with ``eval_env``
        (a ``gymnasium.Env``, ideally made with ``render_mode="rgb_array"``) also results.json
        from a deterministic ``evaluate_policy`` over ``n_eval_episodes`` and, with ``video``,
        a ``video_length``-frame replay.mp4. ``revision`` is the branch to commit to. See
        :func:`dql_agent.integrations.hub.push_to_hub`.
        """
        from dql_agent.integrations.hub import push_to_hub

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
        )

    @classmethod
    def load_from_hub(
        cls: type[SelfAgent],
        repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        device: str | torch.device = "auto",
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> SelfAgent:
        """Load a model from the Hub repo ``repo_id`` (or a local checkpoint directory).

        Works offline from the Hub cache (``HF_HUB_OFFLINE=1`` or ``local_files_only``) and never
        unpickles. A missing repo or file, a config.json of another algorithm or from a newer
        dql_agent, or weights that disagree with it raise an error naming which. See
        :func:`dql_agent.integrations.hub.load_from_hub`.
        """
        from dql_agent.integrations.hub import load_from_hub

        return load_from_hub(
            cls,
            repo_id,
            revision=revision,
            device=device,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
