"""Sweeps on Ray Tune: datasets x seeds x hyperparameters, on one machine or a cluster, resumable.

::

    from dql_agent.integrations.ray import run_sweep

    result = run_sweep(
        algo="dql", datasets=["data/hopper-medium.npz", "mujoco/hopper/medium-v0"], env="Hopper-v5",
        seeds=[0, 1, 2], param_space={"eta": [0.5, 1.0, 2.5], "grad_norm": [1.0, 9.0]},
        total_timesteps=200_000, eval_every=10_000, eval_episodes=10,
        resources={"cpu": 1, "gpu": 0.25}, address=None, storage="./sweeps",
    )
    print(result.markdown)  # mean +/- std over seeds per dataset and configuration; the best per dataset

or ``dql-agent sweep SPEC.yaml [--address auto] [--resume] [--force]`` with the same fields in YAML.

Each Tune trial (:func:`train_trial`) trains one dataset x one hyperparameter setting x one seed
(or, with ``pack_seeds``, all seeds in one process through :class:`dql_agent.seeds.SeedStack`,
the engine of ``train_seeds``). It calls ``learn`` once per ``eval_every`` timesteps with a
:class:`~dql_agent.integrations.metrics.MetricsCallback`, then reports the interval's mean
losses (``train/*``) and the evaluation (``eval/mean_reward``, ``eval/normalized_score``,
``eval/success_rate``) to Tune with a checkpoint written by ``save(include_optimizer=True)``. A
trial that fails (its worker dies, an exception) restarts from its last checkpoint, up to
``max_failures`` times, and ends with the weights an uninterrupted run would have (bit for bit on
a CPU); ``resume=True`` (``--resume``) continues an interrupted sweep, and only with the spec it
was started with (stored in the sweep's folder as ``sweep_spec.json``: a difference is refused and
named).

Nothing starts before the whole spec is checked: every field's type (a bool is a bool, not the
string 'no'), every hyperparameter configuration built with the algorithm's own config, the grid's
size (at most ``max_trials`` trials), and the resources a trial asks for against the machine or
the cluster's nodes (``wait_for_resources`` lets trials wait for nodes that will join). The sweep
says how many trials it starts. When a trial fails (after its restarts), :meth:`SweepSpec.run`
writes the table of the others and raises :class:`SweepFailedError`, naming each failed trial and
its error; ``dql-agent sweep`` prints them and exits with status 1.

Lists in ``param_space`` are grids; ``{"loguniform": [1e-4, 1e-3]}`` (or any Tune search space
object, in Python) is sampled ``num_samples`` times; ``scheduler="asha"`` stops weak trials early.
Needs ``pip install dql_agent[ray]``; see docs/SCALING.md for clusters.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

try:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler
except ImportError as error:
    raise ImportError(f"dql_agent's sweeps need Ray Tune: pip install dql_agent[ray] ({error})") from error

from dql_agent.integrations.yaml_files import MAX_YAML_BYTES, load_yaml_file, read_regular_file
from dql_agent.report import report

__all__ = ["SweepFailedError", "SweepResult", "SweepSpec", "run_sweep", "summarize", "train_trial"]

FILE_SUFFIXES = (".npz", ".hdf5", ".h5")
"""A dataset named with one of these is a file (D4RL-style); anything else is a Minari id."""
SAMPLERS = ("uniform", "quniform", "loguniform", "qloguniform", "randn", "randint", "choice")
"""``{"<sampler>": [args]}`` in a param_space is ``tune.<sampler>(*args)`` (``choice``: the list)."""
METRICS = {
    "eval/mean_reward": "return",
    "eval/normalized_score": "normalized score",
    "eval/success_rate": "success rate",
}
"""The reported evaluation metrics the results table summarises, and their column titles."""
REPORTED_METRIC = re.compile(
    r"(seed_[0-9]+/)?(timesteps|" + "|".join(re.escape(key) for key in METRICS) + r"|train/[A-Za-z_][A-Za-z0-9_]*)"
)
"""What a trial reports (:func:`train_trial`), so what ``metric`` may name: a loss is ``train/<name>``."""
DEVICE_TYPES = ("cpu", "cuda", "mps")
"""The torch device types a trial trains on (``device``; ``auto`` picks CUDA when the trial has a GPU)."""
MAX_TRIALS = 10_000
"""A spec with more trials is refused unless its ``max_trials`` says otherwise: Tune builds every
trial before starting one, and a grid of 10^6 points sits for minutes with no word."""
FULL_GRID_CHECK = 1_000
"""Up to this many grid points, every configuration's config is built before Ray starts (a third of a
millisecond each); a larger grid is checked value by value."""
SPEC_FILE = "sweep_spec.json"
"""The spec a sweep was started with, in its folder: ``--resume`` compares it with the one given."""
RESUME_IGNORES = ("root", "storage", "name", "max_trials", "wait_for_resources")
"""Fields a resumed spec may change: where the sweep lives (its folder is the same) and the limits on
starting it; every other field must equal the stored one."""

DOWNLOAD_HINT = "set download: true in the sweep spec (download=True in Python) to fetch it"
"""How a sweep's reader downloads a missing Minari dataset (the missing-dataset message says it)."""
RESUME_HINT = "`dql-agent sweep SPEC.yaml --resume` (run_sweep(..., resume=True)) continues it"
_TUNE_HINTS = ("Tuner.restore(", "Trials did not complete", "Resume experiment with")
"""Tune's own log lines about resuming, which name its Python API: the sweep says it in its words."""

CallbackFactory = Callable[[dict[str, Any]], Sequence[Any]]
"""Extra SB3 callbacks for one model of a trial, from ``{"dataset", "seed", "hyperparameters"}``."""


@dataclass
class SweepSpec:
    """What to sweep: the fields of a YAML spec and the keywords of :func:`run_sweep`.

    Args:
        datasets: Minari ids (loaded from each worker's local store, or downloaded there with
            ``download``) or ``.npz``/``.hdf5`` paths (relative ones against ``root``; on a
            cluster, a path every node sees, e.g. on shared storage).
        algo: an offline algorithm's command-line name: ``dql`` or ``dice``.
        env: the env id to evaluate on (and to give a file dataset its spaces); None: each
            dataset's own ``env_id``.
        seeds: one trial per seed, or one trial for all of them with ``pack_seeds``.
        param_space: hyperparameters (fields of the algorithm's config, and ``preset``): a list is
            a grid, ``{"loguniform": [lo, hi]}`` (any of ``SAMPLERS``) or a Tune search space is
            sampled, anything else is a constant.
        total_timesteps: gradient steps per trial.
        eval_every: evaluate, report and checkpoint every this many steps (and at the end).
        eval_episodes: deterministic evaluation episodes.
        eval_seed: every evaluation resets its env with this seed (the same episodes each time).
        resources: per trial, e.g. ``{"cpu": 1, "gpu": 0.25}`` (Ray resource names).
        storage: folder of the sweep (``storage/name``): Tune's state, checkpoints, the tables.
            A relative path is taken against ``root``; on a cluster, shared storage.
        name: the sweep's folder under ``storage``.
        pack_seeds: train all seeds of a configuration in one trial (``dql`` only; for a GPU).
        num_samples: how many times to sample the param_space (each grid point that often).
        scheduler: None, ``"asha"`` or ``{"asha": {ASHAScheduler keywords}}``, or a Tune scheduler:
            early stopping on ``metric``. Off by default: a seed sweep wants every run.
        metric, mode: the reported metric the scheduler compares, and whether "max" or "min" is best.
        max_failures: restarts of a failed trial from its last checkpoint (-1: no limit).
        device: the trials' torch device ('auto': CUDA when the trial was given a GPU).
        download: let workers download Minari datasets they do not hold.
        root: what relative dataset paths and ``storage`` are taken against (YAML: its folder).
        tensorboard: every model of a trial also logs to TensorBoard in the trial's folder
            (``tensorboard/seed_<seed>``), with the tags a single run's ``tensorboard_log`` has
            (``train/*``, ``eval/*``); needs ``pip install dql_agent[tracking]``.
        wandb_project: report every trial's metrics to this Weights & Biases project (Tune's
            ``WandbLoggerCallback``: one W&B run per trial, grouped by the sweep's name); set
            ``WANDB_MODE=offline`` to write them locally. Needs ``pip install dql_agent[tracking]``.
        max_trials: refuse a sweep of more trials than this (datasets x seeds x grid points x
            ``num_samples``; default ``MAX_TRIALS``); None: no limit. Not compared on resume.
        wait_for_resources: start even when no node has the ``resources`` a trial asks for (Tune then
            waits until one joins, e.g. from an autoscaler); by default that is an error, since
            the trials would wait forever. Not compared on resume.
    """

    datasets: list[str]
    algo: str = "dql"
    env: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    param_space: dict[str, Any] = field(default_factory=dict)
    total_timesteps: int = 1_000_000
    eval_every: int = 10_000
    eval_episodes: int = 10
    eval_seed: int = 0
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    storage: str = "./sweeps"
    name: str = "sweep"
    pack_seeds: bool = False
    num_samples: int = 1
    scheduler: Any = None
    metric: str = "eval/mean_reward"
    mode: str = "max"
    max_failures: int = 2
    device: str = "auto"
    download: bool = False
    root: str = "."
    tensorboard: bool = False
    wandb_project: str | None = None
    max_trials: int | None = MAX_TRIALS
    wait_for_resources: bool = False

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> SweepSpec:
        """The spec in a YAML file; relative paths in it are taken against the file's folder.
        ``overrides`` replace fields of the file before the spec is checked (the command line's
        ``--device``, and ``--force``'s ``max_trials=None, wait_for_resources=True``).

        The file is read with bounds (:func:`~dql_agent.integrations.yaml_files.load_yaml_file`:
        a regular file of at most 1 MiB, nesting and aliases bounded, a key at most once); every
        problem, a YAML syntax error included, is a ValueError in one line naming the file."""
        data = load_yaml_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sweep spec is a YAML mapping of fields, got {type(data).__name__}")
        keys = [key for key in data if not isinstance(key, str)]
        if keys:
            raise ValueError(f"{path}: a sweep spec's fields are names, got the key(s) {keys}")
        known = {f.name for f in fields(cls)} - {"root"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; a sweep spec has {sorted(known)}")
        try:
            return cls(**{**data, **overrides, "root": str(Path(path).resolve().parent)})
        except (TypeError, ValueError) as error:  # a missing field, or one that cannot run
            raise ValueError(f"{path}: {error}") from None

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first field that cannot run, before Ray starts:
        every field's type (a bool is a bool: the string 'false' is an error), the ranges, the
        grid's size (at most ``max_trials`` trials) and every hyperparameter configuration, built
        with the algorithm's own config (see :meth:`check_hyperparameters`)."""
        cls = self._algorithm()
        self._check_lists()
        self._check_settings()
        self._check_run_options()
        if self.pack_seeds and not cls.stackable:
            packable = sorted(name for name, other in _offline_algorithms().items() if other.stackable)
            raise ValueError(
                f"pack_seeds trains the seeds through train_seeds' SeedStack, which packs {packable}, not {self.algo!r}"
            )
        self.check_tracking()
        self._check_param_names(cls)
        if self.max_trials is not None and self.trial_count() > self.max_trials:  # before building any config
            raise ValueError(
                f"the sweep has {self.size_text()}, more than max_trials={self.max_trials:,}: shrink the grid, or "
                "raise max_trials (null: no limit; dql-agent sweep --force) to start them all"
            )
        self.check_hyperparameters(cls)

    def _algorithm(self) -> Any:
        offline = _offline_algorithms()
        if not isinstance(self.algo, str) or self.algo not in offline:
            raise ValueError(f"algo must be an offline algorithm, one of {sorted(offline)}; got {self.algo!r}")
        return offline[self.algo]

    def _check_lists(self) -> None:
        """``datasets``, ``seeds`` and ``resources``: their containers, items and names."""
        from dql_agent.config import check_seed

        datasets = self.datasets
        if not isinstance(datasets, (list, tuple)) or not datasets or not all(_text(d) for d in datasets):
            raise TypeError(f"datasets must be a non-empty list of Minari ids or file paths, got {datasets!r}")
        if len(set(datasets)) != len(datasets):
            raise ValueError(f"datasets must name each dataset once, got {list(datasets)}")
        if not isinstance(self.seeds, (list, tuple)):
            raise TypeError(f"seeds must be a list of ints, got {self.seeds!r} ({type(self.seeds).__name__})")
        self.datasets, self.seeds = list(datasets), [check_seed(s, "seeds") for s in self.seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        resources = self.resources
        if not isinstance(resources, dict) or not all(
            _text(name) and _number(value) and 0 <= value < math.inf for name, value in resources.items()
        ):
            raise ValueError(f"resources must map Ray resource names to finite numbers >= 0, got {resources!r}")
        for lower, upper in (("cpu", "CPU"), ("gpu", "GPU")):
            if lower in resources and upper in resources:
                raise ValueError(f"resources name {lower!r} twice ({lower!r} and {upper!r}): give one")

    def _check_settings(self) -> None:
        """The scalar fields: bools, counts, names and paths."""
        from dql_agent.config import check_seed

        for name in ("pack_seeds", "download", "tensorboard", "wait_for_resources"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                hint = " (YAML's false/true, not a string)" if isinstance(value, str) else ""
                raise TypeError(f"{name} must be true or false{hint}, got {value!r} ({type(value).__name__})")
        for name, least in (("total_timesteps", 1), ("eval_every", 1), ("eval_episodes", 1), ("num_samples", 1)):
            value = getattr(self, name)
            if not _integer(value) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not _integer(self.max_failures) or self.max_failures < -1:
            raise ValueError(f"max_failures must be an int >= -1 (-1: no limit), got {self.max_failures!r}")
        if self.max_trials is not None and (not _integer(self.max_trials) or self.max_trials < 1):
            raise ValueError(f"max_trials must be an int >= 1 or null (no limit), got {self.max_trials!r}")
        self.eval_seed = check_seed(self.eval_seed, "eval_seed")
        if self.env is not None and not _text(self.env):
            raise TypeError(f"env must be a Gymnasium env id (a string) or null, got {self.env!r}")
        for name in ("storage", "root"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise TypeError(f"{name} must be a folder path, got {value!r}")
            setattr(self, name, os.fspath(value))
        name = self.name
        if not _text(name) or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
            raise ValueError(f"name must be a folder name (no '/', not '.' or '..'), got {name!r}")

    def _check_run_options(self) -> None:
        """``device``, ``metric``, ``mode`` and ``scheduler``."""
        device = self.device
        kind, _, index = device.partition(":") if isinstance(device, str) else ("", "", "")
        if device != "auto" and (kind not in DEVICE_TYPES or (index and (kind != "cuda" or not index.isdigit()))):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
        if kind == "cuda" and not self._request().get("GPU"):
            raise ValueError(
                f"device {device!r} needs a GPU per trial, and resources {self.resources} gives none (a trial sees "
                "only the GPUs Ray gives it): add gpu: 1 (or a fraction) to resources, or use device: auto"
            )
        if not isinstance(self.metric, str) or not REPORTED_METRIC.fullmatch(self.metric):
            raise ValueError(
                f"metric must be a reported metric: timesteps, {', '.join(METRICS)} or train/<loss> (e.g. "
                f"train/critic_loss), each also as seed_<seed>/... with pack_seeds; got {self.metric!r}"
            )
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        _scheduler(self)  # refuses an unknown one, and settings ASHA refuses

    def check_tracking(self) -> None:
        """``tensorboard`` and ``wandb_project``: their types, and their packages installed."""
        if not isinstance(self.tensorboard, bool):
            raise TypeError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        if self.wandb_project is not None and (not isinstance(self.wandb_project, str) or not self.wandb_project):
            raise ValueError(f"wandb_project must be a W&B project name or null, got {self.wandb_project!r}")
        for wanted, module in ((self.tensorboard, "tensorboard"), (self.wandb_project, "wandb")):
            if wanted and importlib.util.find_spec(module) is None:
                raise ImportError(
                    f"the sweep's {module} logging needs the {module} package: pip install dql_agent[tracking]"
                )

    def check_hyperparameters(self, cls: Any) -> None:
        """Build the algorithm's config (``cls.make_config``, as each trial does) for every
        configuration of ``param_space``: each grid point, with a sampled hyperparameter at the ends
        of its range (or each choice). A grid of more than ``FULL_GRID_CHECK`` points is checked
        value by value instead (each value of each hyperparameter, the others at their first).
        The error names the hyperparameter, the configuration and the value the config refused."""
        self._check_param_names(cls)
        candidates = {name: _candidates(name, value) for name, value in self.param_space.items()}
        candidates = {name: values for name, values in candidates.items() if values}  # sample_from: per trial
        for value in candidates.get("preset", []):
            if not isinstance(value, str):
                raise TypeError(f"param_space['preset'] must be a preset name (a string), got {value!r}")
        names = list(candidates)
        if math.prod(len(values) for values in candidates.values()) <= FULL_GRID_CHECK:
            points: Iterator[tuple[Any, ...]] = itertools.product(*candidates.values())
        else:
            first = [values[0] for values in candidates.values()]
            points = (
                (*first[:i], value, *first[i + 1 :]) for i, values in enumerate(candidates.values()) for value in values
            )
        several = any(len(values) > 1 for values in candidates.values())
        for point in points:
            hyperparameters = dict(zip(names, point, strict=True))
            try:
                cls.make_config(dict(hyperparameters))
            except (TypeError, ValueError, KeyError) as error:
                where = f" (in the configuration {hyperparameters})" if several else ""
                raise type(error)(f"param_space: {_message(error)}{where}") from None

    def _check_param_names(self, cls: Any) -> None:
        space = self.param_space
        if not isinstance(space, dict) or not all(isinstance(name, str) for name in space):
            raise TypeError(f"param_space must be a mapping of hyperparameter names, got {space!r}")
        allowed = cls.config_class.field_names() | ({"preset"} if cls.presets else set())
        unknown = sorted(set(space) - allowed)
        if unknown:
            raise ValueError(f"param_space: {unknown} are not {self.algo} hyperparameters ({sorted(allowed)})")

    def trial_count(self) -> int:
        """How many trials Tune will run: datasets x seeds (1 with ``pack_seeds``) x grid points x
        ``num_samples``."""
        return len(self.datasets) * (1 if self.pack_seeds else len(self.seeds)) * self._grid_points() * self.num_samples

    def _grid_points(self) -> int:
        return math.prod(len(_grid(value) or ()) for value in self.param_space.values() if _grid(value) is not None)

    def size_text(self) -> str:
        """The trial count and its factors, e.g. ``12 trial(s) (2 dataset(s) x 3 seed(s) x 2 configuration(s))``."""
        count, grid = self.trial_count(), self._grid_points()
        parts = [f"{len(self.datasets)} dataset(s)"]
        parts += [] if self.pack_seeds else [f"{len(self.seeds)} seed(s)"]
        parts += [f"{grid:,} configuration(s)"]
        parts += [f"num_samples={self.num_samples:,}"] if self.num_samples > 1 else []
        return f"{count:,} trial(s) ({' x '.join(parts)})"

    def _request(self) -> dict[str, float]:
        """What one trial asks Ray for, under Ray's resource names (CPU, GPU, memory, custom)."""
        named = {{"cpu": "CPU", "gpu": "GPU"}.get(name, name): float(value) for name, value in self.resources.items()}
        return {name: value for name, value in named.items() if value > 0}

    def check_resources(self, nodes: Sequence[dict[str, float]], where: str) -> None:
        """Refuse a trial that no node of ``nodes`` (their Ray resources) can hold: Tune would wait for
        one forever. ``wait_for_resources`` skips it (nodes that have them will join)."""
        if self.wait_for_resources:
            return
        request = self._request()
        if any(all(node.get(name, 0.0) >= value for name, value in request.items()) for node in nodes):
            return
        has = (
            "; ".join(", ".join(f"{name} {node.get(name, 0.0):g}" for name in request) for node in nodes) or "no nodes"
        )
        raise ValueError(
            f"resources {self.resources} per trial: no node of {where} has them ({has}); ask for less, or set "
            "wait_for_resources: true (dql-agent sweep --force) if nodes that have them will join"
        )

    # the stored spec, for --resume ---------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What makes this sweep this sweep, as JSON: every field but where it lives and the limits
        on starting it (``RESUME_IGNORES``), with file datasets as absolute paths."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RESUME_IGNORES}
        root = str(Path(self.root).resolve())
        values["datasets"] = [_dataset_source(name, root) for name in self.datasets]
        return cast(dict[str, Any], json.loads(json.dumps(values, default=_describe)))

    def write_spec(self) -> Path:
        """Store :meth:`fingerprint` in the sweep's folder (``SPEC_FILE``), for ``--resume`` to compare."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / SPEC_FILE
        text = json.dumps({"dql_agent_sweep_spec": 1, "spec": self.fingerprint()}, indent=2, sort_keys=True)
        temporary = target.with_name(f".{SPEC_FILE}.tmp")
        temporary.write_text(text + "\n")
        os.replace(temporary, target)
        return target

    def check_resumed(self) -> None:
        """Refuse to resume the sweep at :attr:`path` when it was started from another spec, naming
        each difference. A folder without ``SPEC_FILE`` (a sweep started by an older dql_agent)
        cannot be compared: a warning says so."""
        stored_file = self.path / SPEC_FILE
        if not stored_file.exists():
            warnings.warn(
                f"{self.path} holds no {SPEC_FILE} (a sweep started before dql_agent recorded its spec): cannot "
                "check that it is this spec's sweep; resuming it as it was started",
                stacklevel=3,
            )
            return
        try:
            stored = json.loads(read_regular_file(stored_file, limit=8 * MAX_YAML_BYTES))["spec"]  # indented JSON
            if not isinstance(stored, dict):
                raise TypeError(f"the spec there is a {type(stored).__name__}")
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{stored_file}: cannot read the spec this sweep was started with ({error})") from None
        differences = _differences(stored, self.fingerprint())
        if differences:
            raise ValueError(
                f"{self.path} holds a sweep started from another spec: {'; '.join(differences)}. Resume it with the "
                "spec it was started with, or give this spec another name or storage"
            )

    # running -------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The sweep's folder: ``storage/name``."""
        return (Path(self.root) / self.storage).resolve() / self.name

    def run(
        self,
        address: str | None = None,
        resume: bool = False,
        callbacks: CallbackFactory | None = None,
        verbose: int = 1,
    ) -> SweepResult:
        """Run (or, with ``resume``, continue) the sweep; see :func:`run_sweep`."""
        self.check()  # again: fields may have been set since the spec was made
        restore = tune.Tuner.can_restore(self.path)
        if restore and not resume:
            raise ValueError(
                f"{self.path} already holds a sweep: continue it with resume=True (dql-agent sweep --resume) "
                "or choose another name or storage"
            )
        if restore:
            self.check_resumed()
        elif resume and verbose:
            report(f"nothing to resume at {self.path}: starting the sweep")
        started = not ray.is_initialized()
        if started and address is None:  # on a cluster the data need only exist where the trials run
            self.check_datasets()
            self.check_resources([_this_machine()], "this machine")
        report(f"sweep {self.name}: {self.size_text()} in {self.path}")  # whatever Tune's verbosity: before a long wait
        if started:
            ray.init(address=address)  # None: a local Ray on this machine
        try:
            self.check_resources(_ray_nodes(), "the Ray cluster")
            trainable = tune.with_resources(tune.with_parameters(train_trial, callbacks=callbacks), self.resources)
            if restore:
                tuner = tune.Tuner.restore(str(self.path), trainable=trainable, resume_errored=True)
            else:
                self.write_spec()
                tuner = self.tuner(trainable, verbose)
            with _tune_hints_replaced():
                grid = tuner.fit()
        finally:
            if started:
                ray.shutdown()
        result = summarize(grid, self.path, eval_every=self.eval_every)
        if result.failed:
            raise SweepFailedError(result)
        return result

    def check_datasets(self) -> None:
        """The datasets this machine's trials will read: files that exist, Minari ids stored locally
        (or, with ``download``, a Minari remote that answers). Raises the error a trial would raise
        (FileNotFoundError, or the Hub's one-line HubUnreachableError), before Ray starts."""
        from dql_agent.readers.minari import check_available, download_hint

        for name in self.datasets:
            if name.endswith(FILE_SUFFIXES):
                path = Path(self.root) / name
                if not path.exists():
                    raise FileNotFoundError(f"dataset file {name} not found (relative to {self.root})")
                if not path.is_file():  # a folder, a FIFO, a device: a trial would fail or block on it
                    raise ValueError(f"dataset file {name} (relative to {self.root}) is not a regular file")
                continue
            with download_hint(DOWNLOAD_HINT):
                check_available(name, self.download)

    def tuner(self, trainable: Any, verbose: int = 1) -> tune.Tuner:
        """The Tune ``Tuner`` of this sweep around ``trainable`` (:func:`train_trial` with resources)."""
        scheduler = _scheduler(self)
        return tune.Tuner(
            trainable,
            param_space=self.trial_space(),
            tune_config=tune.TuneConfig(
                num_samples=self.num_samples,
                scheduler=scheduler,
                metric=self.metric if scheduler else None,
                mode=self.mode if scheduler else None,
                trial_dirname_creator=_trial_dirname,
                reuse_actors=True,  # a trial after another in the same slot skips the worker start and imports
            ),
            run_config=tune.RunConfig(
                name=self.name,
                storage_path=str(self.path.parent),
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # resuming needs only the last
                verbose=verbose,
                callbacks=self.tune_callbacks(),
            ),
        )

    def tune_callbacks(self) -> list[Any]:
        """Tune's own loggers this sweep asks for (W&B: one run per trial)."""
        if self.wandb_project is None:
            return []
        from ray.air.integrations.wandb import WandbLoggerCallback

        # The logging actors do not inherit the driver's environment: its WANDB_MODE goes along.
        mode: dict[str, Any] = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        return [WandbLoggerCallback(project=self.wandb_project, group=self.name, **mode)]

    def trial_space(self) -> dict[str, Any]:
        """Tune's param_space: the grid over datasets and seeds, the hyperparameters, the settings."""
        settings = (
            "algo",
            "total_timesteps",
            "eval_every",
            "eval_episodes",
            "eval_seed",
            "device",
            "download",
            "tensorboard",
        )
        return {
            **{name: getattr(self, name) for name in settings},
            "env_id": self.env,  # not "env": Tune would put it in every trial's name
            "root": str(Path(self.root).resolve()),
            "sweep_path": str(self.path),
            "dataset": tune.grid_search(self.datasets),
            "seeds": [*self.seeds] if self.pack_seeds else tune.grid_search([[s] for s in self.seeds]),
            "hyperparameters": {key: _search_space(value) for key, value in self.param_space.items()},
        }


class _DropTuneHints(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(hint in text for hint in _TUNE_HINTS)


@contextlib.contextmanager
def _tune_hints_replaced() -> Iterator[None]:
    """Drop Tune's own lines about an interrupted run (``Resume experiment with:
    Tuner.restore(path=..., trainable=...)``, ``Trials did not complete: [...]``): the sweep's
    notes say which runs are unfinished and how to continue them, with ``--resume``."""
    loggers = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune")]
    hints = _DropTuneHints()
    for logger in loggers:
        logger.addFilter(hints)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hints)


def _search_space(value: Any) -> Any:
    if isinstance(value, list):
        return tune.grid_search(value)
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS:
        sampler, args = next(iter(value.items()))
        return getattr(tune, sampler)(args) if sampler == "choice" else getattr(tune, sampler)(*args)
    return value


def _scheduler(spec: SweepSpec) -> TrialScheduler | None:
    chosen: Any = spec.scheduler
    if chosen is None or isinstance(chosen, TrialScheduler):
        return chosen
    options: Any = {}
    if isinstance(chosen, dict) and list(chosen) == ["asha"]:
        chosen, options = "asha", chosen["asha"] or {}
        if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
            raise ValueError(
                f"scheduler: the options of asha must map ASHAScheduler keywords to values, got {options!r}"
            )
    if chosen != "asha":
        raise ValueError(f"scheduler must be None, 'asha', {{'asha': {{...}}}} or a Tune scheduler, got {chosen!r}")
    # Milestones in timesteps, from the first evaluation on.
    defaults = {"time_attr": "timesteps", "max_t": spec.total_timesteps, "grace_period": spec.eval_every}
    settings = {**defaults, "reduction_factor": 3, **options}
    try:
        return ASHAScheduler(**settings)
    except (TypeError, ValueError, AssertionError) as error:  # ASHAScheduler checks its settings with asserts
        raise ValueError(f"scheduler: ASHAScheduler refuses {settings}: {_message(error)}") from None


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # the default joins every config value: too long for a path


# checking a spec -------------------------------------------------------------------------------------
def _offline_algorithms() -> dict[str, Any]:
    from dql_agent.registry import algorithms_by_short_name

    return {name: cls for name, cls in algorithms_by_short_name().items() if not cls.online}


def _text(value: Any) -> bool:
    """A non-empty string."""
    return isinstance(value, str) and bool(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _message(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
    return str(text).strip() or type(error).__name__


def _grid(value: Any) -> list[Any] | None:
    """The values of a grid (a list, or Tune's ``{"grid_search": [...]}``); None for anything else."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and list(value) == ["grid_search"]:
        values = value["grid_search"]
        return values if isinstance(values, list) else []
    return None


def _candidates(name: str, value: Any) -> list[Any]:
    """The values of hyperparameter ``name`` to build configs with: a grid's values, a search
    space's ends (or choices), a constant; none for a function of the trial's config."""
    from ray.tune.search.sample import Domain

    grid = _grid(value)
    if grid is not None:
        if not grid:
            raise ValueError(f"param_space[{name!r}] is an empty grid, got {value!r}: give it at least one value")
        return list(grid)
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS:
        sampler, args = next(iter(value.items()))
        try:
            value = _search_space(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"param_space[{name!r}]: {{{sampler}: {args!r}}} is not a Tune search space ({_message(error)})"
            ) from None
    if isinstance(value, Domain):
        return _domain_candidates(name, value)
    return [value]


def _domain_candidates(name: str, domain: Any) -> list[Any]:
    from ray.tune.search.sample import Categorical, Float, Integer

    if isinstance(domain, Categorical):
        if not domain.categories:
            raise ValueError(f"param_space[{name!r}] chooses among no values: give it at least one")
        return list(domain.categories)
    if not isinstance(domain, (Float, Integer)):
        return []  # sample_from: a function of the trial's config, only Tune can compute it
    lower, upper = domain.lower, domain.upper
    ends = [end for end in (lower, upper) if _number(end) and math.isfinite(end)]
    if len(ends) == 2 and not lower < upper:
        raise ValueError(f"param_space[{name!r}]: the lower bound {lower!r} must be below the upper bound {upper!r}")
    if isinstance(domain, Integer) and len(ends) == 2:
        ends[1] = upper - 1  # randint's upper end is excluded
    mean = getattr(domain.get_sampler(), "mean", None)  # randn: unbounded, its mean stands for it
    return ends or ([mean] if mean is not None else [])


def _describe(value: Any) -> Any:
    """A stable JSON stand-in for what JSON cannot hold (Tune search spaces and schedulers)."""
    from ray.tune.search.sample import Domain

    if isinstance(value, Domain):
        sampler = value.get_sampler()
        described = {"tune": type(value).__name__, "sampler": type(sampler).__name__}
        for attr in ("lower", "upper", "categories"):
            if getattr(value, attr, None) is not None:
                described[attr] = getattr(value, attr)
        described |= {k: v for k, v in vars(sampler).items() if isinstance(v, (int, float, str))}
        return described
    return {"python": f"{type(value).__module__}.{type(value).__qualname__}"}


def _differences(stored: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: X there, Y in this spec`` for each field that differs (param_space by name)."""
    missing = object()
    found = []
    for key in sorted(set(stored) | set(given)):
        there, here = stored.get(key, missing), given.get(key, missing)
        if there == here:
            continue
        if key == "param_space" and not prefix and isinstance(there, dict) and isinstance(here, dict):
            found += _differences(there, here, prefix="param_space")
            continue
        name = f"{prefix}[{key!r}]" if prefix else key
        shown = ["(absent)" if value is missing else json.dumps(value) for value in (there, here)]
        found.append(f"{name}: {shown[0]} there, {shown[1]} in this spec")
    return found


def _this_machine() -> dict[str, float]:
    """At most what a local Ray started here has: its default CPUs and GPUs, and the memory."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count()), "memory": float(memory)}


def _ray_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster this process is connected to."""
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def run_sweep(
    *,
    address: str | None = None,
    resume: bool = False,
    callbacks: CallbackFactory | None = None,
    verbose: int = 1,
    **spec: Any,
) -> SweepResult:
    """Run a sweep on Ray Tune and write its results table; see the module docstring.

    Args:
        address: None starts a local Ray (unless one is running in this process: it is used);
            ``"auto"`` or ``"ray://host:10001"`` joins a cluster.
        resume: continue the interrupted sweep at ``storage/name`` (its unfinished and failed
            trials, from their last checkpoints); without it an existing sweep there is an error.
        callbacks: extra SB3 callbacks per model, ``callbacks({"dataset", "seed",
            "hyperparameters"}) -> list``; called in the worker (e.g. one that stops early).
        verbose: Tune's progress output (0 silent, 1, 2).
        **spec: the fields of :class:`SweepSpec` (``datasets``, ``algo``, ``env``, ``seeds``,
            ``param_space``, ``total_timesteps``, ``eval_every``, ``eval_episodes``, ``resources``,
            ``storage``, ...). Relative paths are taken against the working directory.

    Returns:
        The :class:`SweepResult`: table rows, the best configuration per dataset, and where the
        CSV and Markdown tables, the learning curves and Tune's files are.
    """
    return SweepSpec(**spec).run(address=address, resume=resume, callbacks=callbacks, verbose=verbose)


# the trial -----------------------------------------------------------------------------------------
def train_trial(config: dict[str, Any], callbacks: CallbackFactory | None = None) -> None:
    """Ray Tune function trainable: one configuration on one dataset, for one seed or several packed.

    ``config`` is a point of :meth:`SweepSpec.trial_space`. Starts from ``tune.get_checkpoint()``
    when Tune restarts the trial, else from scratch; every ``eval_every`` steps it reports
    ``timesteps``, ``train/*`` (the interval's mean losses) and ``eval/*``, with a checkpoint of
    each model (``seed_<seed>/``, saved with ``include_optimizer=True``). With several seeds each
    metric is reported per seed (``seed_<seed>/eval/mean_reward``) and as their mean.
    """
    from dql_agent.metrics import MetricsCallback
    from dql_agent.registry import algorithms_by_short_name, load_buffer
    from dql_agent.seeds import SeedStack

    cls = algorithms_by_short_name()[config["algo"]]
    total, every, seeds = int(config["total_timesteps"]), int(config["eval_every"]), list(config["seeds"])
    from dql_agent.readers.minari import download_hint

    with download_hint(DOWNLOAD_HINT):
        buffer = load_buffer(_dataset_source(config["dataset"], config["root"]), config["download"], config["env_id"])
    env_id = config["env_id"] or _dataset_env(buffer, config["dataset"])
    hyperparameters = dict(config["hyperparameters"])
    if getattr(cls.make_config(dict(hyperparameters)), "lr_decay_steps", 0) is None:
        # None means "the first learn call's length", and each evaluation interval is a learn call.
        hyperparameters["lr_decay_steps"] = total

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        models = [cls(buffer, seed=seed, device=config["device"], **hyperparameters) for seed in seeds]
    else:
        with checkpoint.as_directory() as folder:
            models = [cls.load(Path(folder) / f"seed_{seed}", device=config["device"]) for seed in seeds]
        for model in models:
            model.set_buffer(buffer)
    for model in models[1:]:  # as train_seeds: one copy of the training data on the device
        model.replay_buffer = models[0].replay_buffer

    if config.get("tensorboard"):  # the SB3 logger's TensorBoard output, as a single run writes it
        from stable_baselines3.common.logger import configure

        # In the sweep's storage (what the tables read), not the worker's scratch folder that Tune
        # gives a restarted trial: the trial's folder there is trial_<id> (_trial_dirname).
        trial_dir = Path(config["sweep_path"]) / f"trial_{tune.get_context().get_trial_id()}"
        for seed, model in zip(seeds, models, strict=True):
            model.set_logger(configure(str(trial_dir / "tensorboard" / f"seed_{seed}"), ["tensorboard"]))
    recorders = [MetricsCallback(env_id, every, config["eval_episodes"], config["eval_seed"]) for _ in models]
    info = {"dataset": config["dataset"], "hyperparameters": hyperparameters}
    extras = [list(callbacks({**info, "seed": seed})) if callbacks else [] for seed in seeds]
    model_callbacks = [[recorder, *extra] for recorder, extra in zip(recorders, extras, strict=True)]
    stack = SeedStack(cast(Any, models)) if len(models) > 1 else None
    while (step := models[0].num_timesteps) < total:
        n = min(every - step % every, total - step)
        if stack is not None:
            stack.learn(n, log_interval=every, callbacks=model_callbacks)
        else:
            models[0].learn(n, callback=model_callbacks[0], log_interval=every, reset_num_timesteps=False)
        step = models[0].num_timesteps
        metrics: dict[str, Any] = {"timesteps": step}
        records = [
            {k: v for k, v in r.records.get(step, {}).items() if k.startswith(("train/", "eval/"))} for r in recorders
        ]
        if len(models) == 1:
            metrics.update(records[0])
        else:
            for seed, record in zip(seeds, records, strict=True):
                metrics.update({f"seed_{seed}/{key}": value for key, value in record.items()})
            for key in set.intersection(*(set(r) for r in records)):
                metrics[key] = sum(r[key] for r in records) / len(records)
        with tempfile.TemporaryDirectory() as folder:
            for model in models:
                model.save(Path(folder) / f"seed_{model.seed}", include_optimizer=True)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _dataset_source(name: str, root: str) -> str:
    return str(Path(root) / name) if name.endswith(FILE_SUFFIXES) else name


def _dataset_env(buffer: Any, name: str) -> str:
    env_id = buffer.metadata.get("env_id")
    if not isinstance(env_id, str):
        raise ValueError(f"dataset {name} names no env to evaluate on: give the sweep an env")
    if ":" in env_id:  # gym.make would import the module a file names
        raise ValueError(f"dataset {name} names the env {env_id!r} with a module: give it as env if you trust it")
    return env_id


# results -------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What a sweep produced; ``markdown`` is the table ``dql-agent sweep`` prints."""

    path: Path
    """The sweep's folder (Tune's state, one folder per trial with its checkpoints, the tables)."""
    rows: list[dict[str, Any]]
    """One per dataset and configuration: ``dataset``, the hyperparameters, ``seeds``,
    ``timesteps`` (of the last evaluation), ``<metric>_mean`` and ``<metric>_std`` over seeds for
    ``mean_reward``, ``normalized_score`` and ``success_rate`` (None where not reported), ``best``."""
    best: dict[str, dict[str, Any]]
    """The best row per dataset: the highest mean normalized score, else the highest mean return."""
    markdown: str
    files: list[Path]
    """``results.csv``, ``results.md``, ``curves.csv`` and, with matplotlib, ``curves_<dataset>.png``."""
    notes: list[str]
    """What the table lacks: trials that reported nothing, unfinished runs, plots skipped."""
    grid: Any = field(repr=False, default=None)
    """Tune's ``ResultGrid``."""
    failed: list[str] = field(default_factory=list)
    """One line per trial that ended with an error (after its ``max_failures`` restarts): the
    trial, its dataset, seeds and hyperparameters, and the error's last line."""
    trials: int = 0
    """How many trials the sweep has."""
    unfinished: int = 0
    """Runs (a seed of a trial) that ended before ``total_timesteps`` without an error, or reported
    nothing: an interrupted sweep's (``--resume`` continues them), or ones a scheduler stopped."""


class SweepFailedError(RuntimeError):
    """Trials of a sweep failed: :meth:`SweepSpec.run` raises it after writing the tables of the
    others. ``result`` is the :class:`SweepResult`; the message lists each failed trial and why."""

    def __init__(self, result: SweepResult) -> None:
        self.result = result
        lines = "\n".join(f"  {line}" for line in result.failed)
        super().__init__(f"{len(result.failed)} of {result.trials} trial(s) failed:\n{lines}")


@dataclass
class _Curve:
    """The evaluations of one seed of one trial."""

    dataset: str
    setting: str  # the hyperparameters as sorted JSON: one configuration
    seed: int
    total_timesteps: int
    points: list[dict[str, float]]  # {"timesteps", and the METRICS reported}


def _curves(grid: Any, notes: list[str], eval_every: int | None = None) -> list[_Curve]:
    curves = []
    for result in grid:
        frame, config = result.metrics_dataframe, result.config
        if frame is None or frame.empty or "timesteps" not in frame:
            notes.append(_no_report_note(result, eval_every))
            continue
        # A trial restarted from a checkpoint may report a step again: the last report wins.
        frame = frame.drop_duplicates("timesteps", keep="last").sort_values("timesteps")
        seeds = list(config["seeds"])
        setting = json.dumps(config["hyperparameters"], sort_keys=True)
        for seed in seeds:
            prefix = f"seed_{seed}/" if len(seeds) > 1 else ""
            columns = {key: prefix + key for key in METRICS if prefix + key in frame}
            points = [
                {"timesteps": int(row["timesteps"])} | {k: float(row[c]) for k, c in columns.items()}
                for _, row in frame.iterrows()
            ]
            curves.append(_Curve(config["dataset"], setting, seed, config["total_timesteps"], points))
    return curves


def _no_report_note(result: Any, eval_every: int | None) -> str:
    """Why a trial has no row: it failed (its error's last line), or it had not reached its first
    evaluation when the sweep stopped."""
    config = result.config or {}
    what = f"trial {Path(str(result.path)).name} ({config.get('dataset')}, seeds {config.get('seeds')})"
    if result.error is not None:
        lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
        return f"{what} failed before its first evaluation: {lines[-1] if lines else type(result.error).__name__}"
    every = eval_every or config.get("eval_every")
    return f"{what} had not reached its first evaluation ({every} steps) when the sweep stopped: {RESUME_HINT}"


def _failure(result: Any) -> str:
    """One line: which trial failed (dataset, seeds, hyperparameters) and its error's last line."""
    config = result.config or {}
    lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
    why = lines[-1] if lines else type(result.error).__name__
    settings = json.dumps(config.get("hyperparameters"), sort_keys=True)
    return (
        f"trial {Path(str(result.path)).name} ({config.get('dataset')}, seeds {config.get('seeds')}, {settings}): {why}"
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population std, as np.std


def summarize(grid: Any, path: str | os.PathLike[str], eval_every: int | None = None) -> SweepResult:
    """The results of a finished (or interrupted) sweep from Tune's ``ResultGrid``, written to ``path``:
    ``results.csv``, ``results.md``, ``curves.csv`` and, with matplotlib, ``curves_<dataset>.png``.

    ``run`` calls it; for a sweep's folder later:
    ``summarize(tune.Tuner.restore(path, train_trial).get_results(), path)``."""
    path = Path(path)
    notes: list[str] = []
    curves = _curves(grid, notes, eval_every)
    groups: dict[tuple[str, str], list[_Curve]] = {}
    for curve in curves:
        if curve.points:
            groups.setdefault((curve.dataset, curve.setting), []).append(curve)
    names = sorted({name for _, setting in groups for name in json.loads(setting)})
    rows: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    top: dict[str, float] = {}
    for (dataset, setting), group in groups.items():
        finals = [curve.points[-1] for curve in group]
        steps = sorted({int(final["timesteps"]) for final in finals})
        row = {"dataset": dataset, **{name: json.loads(setting).get(name) for name in names}}
        row |= {"seeds": len(group), "timesteps": steps[0] if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"}
        for key in METRICS:
            values = [final[key] for final in finals if not math.isnan(final.get(key, math.nan))]
            row[f"{key[5:]}_mean"], row[f"{key[5:]}_std"] = _mean_std(values) if values else (None, None)
        score = row["mean_reward_mean"] if row["normalized_score_mean"] is None else row["normalized_score_mean"]
        if score is not None and score > top.get(dataset, -math.inf):
            best[dataset], top[dataset] = row, score
        rows.append(row)
    for row in rows:
        row["best"] = best.get(row["dataset"]) is row
    short = sum(curve.points[-1]["timesteps"] < curve.total_timesteps for curve in curves if curve.points)
    if short or grid.num_errors:
        notes.append(
            f"{short} run(s) ended before total_timesteps (interrupted, or stopped by the scheduler) and "
            f"{grid.num_errors} trial(s) failed: resume=True (dql-agent sweep --resume) continues an interrupted "
            "sweep from the last checkpoints"
        )
    # The table shows the hyperparameters that differ between its rows; the CSV has them all.
    varying = [name for name in names if len({json.dumps(row[name]) for row in rows}) > 1]
    markdown = _markdown(rows, names, varying, best)
    files = _write(path, rows, curves, markdown)
    files += _plot(path, groups, varying, notes)
    failed = [_failure(result) for result in grid if result.error is not None]
    return SweepResult(
        path=path,
        rows=rows,
        best=best,
        markdown=markdown,
        files=files,
        notes=notes,
        grid=grid,
        failed=failed,
        trials=len(grid),
        unfinished=short + sum(not curve.points for curve in curves),
    )


def _cell(row: dict[str, Any], key: str) -> str:
    mean, std = row[f"{key[5:]}_mean"], row[f"{key[5:]}_std"]
    return "" if mean is None else f"{mean:.1f} ± {std:.1f}"


def _markdown(rows: list[dict[str, Any]], names: list[str], varying: list[str], best: dict[str, Any]) -> str:
    shown = [key for key in METRICS if any(row[f"{key[5:]}_mean"] is not None for row in rows)]
    head = ["dataset", *varying, "seeds", "timesteps", *(METRICS[key] for key in shown), "best"]
    fixed = ", ".join(f"{name}={rows[0][name]}" for name in names if name not in varying)
    lines = [f"Same in every row: {fixed}", ""] if fixed else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[key]) for key in ("dataset", *varying, "seeds", "timesteps")]
        cells += [_cell(row, key) for key in shown] + ["**best**" if row["best"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± std (ddof=0) over seeds of each run's last evaluation. Best configuration per dataset:"]
    key = "eval/normalized_score" if "eval/normalized_score" in shown else "eval/mean_reward"
    for dataset, row in best.items():
        setting = ", ".join(f"{name}={row[name]}" for name in varying) or "the only configuration"
        lines.append(f"- {dataset}: {setting} ({_cell(row, key)} {METRICS[key]})")
    return "\n".join(lines) + "\n"


def _write(path: Path, rows: list[dict[str, Any]], curves: list[_Curve], markdown: str) -> list[Path]:
    path.mkdir(parents=True, exist_ok=True)
    files = [path / "results.csv", path / "results.md", path / "curves.csv"]
    with files[0].open("w", newline="") as out:
        table = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["dataset"])
        table.writeheader()
        table.writerows(rows)
    files[1].write_text(markdown)
    with files[2].open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["dataset", "hyperparameters", "seed", "timesteps", *METRICS])
        for c in curves:
            for p in c.points:
                writer.writerow([c.dataset, c.setting, c.seed, p["timesteps"], *(p.get(key, "") for key in METRICS)])
    return files


def _plot(path: Path, groups: dict[tuple[str, str], list[_Curve]], varying: list[str], notes: list[str]) -> list[Path]:
    """One PNG per dataset: a line per configuration, its mean over seeds and a ±std band."""
    try:
        import matplotlib
    except ImportError:
        notes.append("matplotlib is not installed: no learning-curve PNGs (pip install matplotlib); see curves.csv")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for dataset in dict.fromkeys(name for name, _ in groups):
        mine = {setting: group for (name, setting), group in groups.items() if name == dataset}
        every = [point for group in mine.values() for curve in group for point in curve.points]
        key = "eval/normalized_score" if all("eval/normalized_score" in p for p in every) else "eval/mean_reward"
        figure, axes = plt.subplots(figsize=(6, 4))
        for setting, group in mine.items():
            steps = sorted(set.intersection(*({p["timesteps"] for p in c.points if key in p} for c in group)))
            at = [{p["timesteps"]: p[key] for p in c.points if key in p} for c in group]
            stats = [_mean_std([values[step] for values in at]) for step in steps]
            label = ", ".join(f"{k}={json.loads(setting).get(k)}" for k in varying) or "all runs"
            axes.plot(steps, [m for m, _ in stats], label=label)
            axes.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
        axes.set(xlabel="gradient steps", ylabel=METRICS[key], title=dataset)
        axes.legend(fontsize="small")
        figure.tight_layout()
        files.append(path / f"curves_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in dataset)}.png")
        figure.savefig(files[-1], dpi=100)
        plt.close(figure)
    return files
