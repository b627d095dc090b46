"""The ``dql-agent`` command: demo, train, evaluate, record, push, export, sweep, serve.

    dql-agent demo                                   # Pendulum end to end, nothing downloaded
    dql-agent train DATASET [--algo dql|dice] [--env ENV] [--preset P] [--steps N] [--set key=value ...] -o DIR
    dql-agent train --algo qvpo --env ENV [--steps N] -o DIR       # online
    dql-agent train --resume DIR [--steps N]                        # continue an interrupted run
    torchrun --nproc-per-node N -m dql_agent.cli train DATASET --distributed -o DIR   # data-parallel
    dql-agent evaluate MODEL --env ENV [--episodes N] [--seed S]
    dql-agent record MODEL --env ENV -o replay.mp4 [--seed S]
    dql-agent push MODEL REPO_ID [--env ENV] [--seed S] [--local-dir DIR]   # --local-dir: no network
    dql-agent export MODEL -o policy.onnx [--stochastic] [--n-action-samples N]   # or policy.pt2
    dql-agent sweep SPEC.yaml [--address auto] [--resume] [--force]   # on Ray Tune: pip install dql_agent[ray]
    dql-agent serve MODEL [--host H --token-file F] [--tls-cert C --tls-key K]   # pip install dql_agent[serve]

DATASET is a Minari dataset id (local, or downloaded with --download) or a D4RL-style
``.npz``/``.hdf5`` file. MODEL is a directory written by ``save``, a ``.zip`` of one, or a Hub
repo id.

Outputs (-o, --json) are checked before any work: an existing one must be what the command
overwrites (a checkpoint directory or .zip for train, a file for record, export and --json) and
never the input. An env id read from a model or dataset that names a module (``module:Env-v0``,
which gym.make would import) is refused: pass it with --env yourself if you trust the module.

A mistake in the input (a missing or malformed file, a bad --set value, an unknown env) prints
one line, ``dql-agent: error: ...``, and exits with status 2; set DQL_AGENT_DEBUG=1 to see the
traceback instead. A sweep whose trials failed prints the table of the others, then each failed
trial and its error on stderr, and exits with status 1; one stopped before its runs finished
(Ctrl-C) prints its table and exits with status 130.

Ctrl-C (SIGINT) or SIGTERM during ``train`` finishes the gradient step in progress, saves the run
to -o with its optimizer state, prints the command that continues it (``train --resume``) and
exits with 128 + the signal (130, 143); anywhere else Ctrl-C prints ``dql-agent: interrupted`` and
exits with 130. Evaluations (evaluate, record, push, demo, and train's own) are seeded: episode i
resets with ``--seed`` + i (default 0), so they repeat exactly on the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

from dql_agent.registry import algorithms_by_short_name, load_buffer

# Settings of the demo, chosen so a 2-core CPU trains a policy that swings Pendulum up from an
# offline mix of good and noisy episodes in a few minutes (see README for the measured numbers):
# - hidden_dim 64: 4x fewer FLOPs than 256, enough for a 3-d observation;
# - gamma 0.95: with 0.99 the critic is still far from its fixed point after 10k steps (tau 0.005
#   propagates values slowly) and the Q-guided policy swings with it;
# - act_with_ema: the EMA actor averages out the remaining step-to-step policy oscillation.
DEMO_ENV = "Pendulum-v1"
DEMO_DATASET = "dql_agent/pendulum/mixed-v0"
DEMO_HYPERPARAMETERS: dict[str, Any] = {"hidden_dim": 64, "gamma": 0.95, "act_with_ema": True}
DEMO_STEPS = 12_000
DEBUG_ENV = "DQL_AGENT_DEBUG"
PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}  # --set spellings that are not JSON
SPACES_FROM = "--env (the spaces come from the env, else from the dataset)"
NOT_HYPERPARAMETERS = {  # constructor arguments --set must not reach, and what sets each
    "buffer": "the DATASET argument",
    "env": "--env",
    "device": "--device",
    "seed": "--seed",
    "observation_space": SPACES_FROM,
    "action_space": SPACES_FROM,
    "verbose": "no option (train logs at verbose=1)",
}


class CLIError(Exception):
    """A mistake in what the user passed: reported in one line, exit status 2."""


def _fail(message: str) -> NoReturn:
    print(f"dql-agent: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors in one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)")


def _parse_value(text: str) -> Any:
    """'3e-4' -> 3e-4, 'true' -> True, 'null' -> None, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def load_model(source: str, device: str = "auto"):  # noqa: ANN201 - an agent
    """A saved directory/zip or a Hub repo id, whatever the algorithm."""
    from dql_agent.hub import load_from_hub

    return load_from_hub(source, device=device)


def _make_env(env_id: str, render: bool = False, imports: Sequence[str] = ()):  # noqa: ANN201 - gymnasium.Env
    """``gym.make(env_id)`` after importing the modules the user named (``--import``)."""
    import importlib

    import gymnasium as gym

    for module in imports:
        importlib.import_module(module)
    try:
        return gym.make(env_id, render_mode="rgb_array" if render else None)
    except (gym.error.NameNotFound, gym.error.NamespaceNotFound, gym.error.VersionNotFound) as error:
        raise CLIError(
            f"{error} If a package registers it (e.g. gymnasium_robotics for PointMaze), pass "
            f"--import PACKAGE or --env PACKAGE:{env_id.split(':')[-1]}"
        ) from error


def _env_from_file(env_id: Any, where: str) -> str:
    """An env id read from a file (``where``), refused if making it would import a module.

    ``gym.make("module:Env-v0")`` imports ``module``: only the user names one, with --env.
    """
    if not isinstance(env_id, str) or not env_id.strip():
        raise CLIError(f"{where} names no usable environment ({env_id!r}): pass --env ENV_ID")
    if ":" in env_id:
        module = env_id.split(":", 1)[0]
        raise CLIError(
            f"{where} names the environment {env_id!r}, and making it would import the module {module!r}; "
            f"dql-agent never imports a module named in a file: if you trust {module!r}, pass "
            f"--env {shlex.quote(env_id)} yourself"
        )
    return env_id


def _env_id_of(model: Any, env_id: str | None, source: str, imports: Sequence[str] = ()) -> str:
    """The env to make for ``model``: the user's --env, else the one its checkpoint records. A
    module recorded beside it (the user's ``--env MODULE:ENV`` at training) is imported only when
    the user names it again."""
    if env_id:  # typed by the user, who may name a module
        return env_id
    saved = model.metadata.get("env_id")
    if saved is None:
        raise CLIError("the model does not name its environment: pass --env ENV_ID")
    saved = _env_from_file(saved, f"the model {source}")
    module = model.metadata.get("env_module")
    if module and module not in imports:
        raise CLIError(
            f"the model {source} was trained on {saved!r}, which the module {module!r} registers; dql-agent "
            f"never imports a module named in a file: if you trust it, pass --import {shlex.quote(str(module))}"
        )
    return saved


def _is_checkpoint_zip(path: Path) -> bool:
    from dql_agent.checkpoint import CONFIG_FILE

    try:
        with zipfile.ZipFile(path) as archive:
            return CONFIG_FILE in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _overwrite_problem(path: Path, kind: Literal["checkpoint", "file", "folder"]) -> str | None:
    """Why the existing ``path`` must not be written over by an output of ``kind`` (None: it may)."""
    from dql_agent.checkpoint import CONFIG_FILE

    if kind == "folder":
        return None if path.is_dir() else "exists and is not a folder"
    if kind == "file":
        return "is a folder, not a file" if path.is_dir() else None
    if path.suffix == ".zip":
        if path.is_file() and _is_checkpoint_zip(path):
            return None
        return f"exists and is not a checkpoint archive (a .zip holding {CONFIG_FILE}) to overwrite"
    if not path.is_dir():
        return "exists and is a file, not a checkpoint directory"
    if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        return f"is a folder that holds files but no {CONFIG_FILE}, so not a checkpoint to overwrite"
    return None


def _check_output(
    output: str,
    kind: Literal["checkpoint", "file", "folder"],
    inputs: Sequence[str | None] = (),
    make_parents: bool = True,
) -> None:
    """Refuse, before any work, an output that could not be written or whose writing would destroy
    something: an input, or an existing path that is not what the command overwrites (a checkpoint
    for ``kind`` "checkpoint", a file for "file", a folder written into for "folder")."""
    path = Path(output).expanduser()
    for source in inputs:
        if source and path.exists() and Path(source).expanduser().exists() and path.samefile(source):
            raise CLIError(f"the output {output} is the input {source}: choose another output path")
    if path.exists():
        problem = _overwrite_problem(path, kind)
        if problem is not None:
            raise CLIError(f"the output {output} {problem}: choose a new path or remove it")
        if kind != "folder" and not os.access(path, os.W_OK):
            raise CLIError(f"cannot write {output}: it is not writable")
    # Files and checkpoints are written beside the output and renamed over it: the folder must be writable.
    folder = path if kind == "folder" and path.exists() else path.parent
    while make_parents and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        missing = "is not a folder" if folder.exists() else "does not exist"
        raise CLIError(f"cannot write {output}: {folder} {missing}")
    try:  # a real write: permission bits say nothing to root or of a read-only filesystem
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise CLIError(f"cannot write {output}: the folder {folder} is not writable") from None


def _check_suffix(output: str, suffixes: Sequence[str]) -> None:
    if Path(output).suffix.lower() not in suffixes:
        raise CLIError(f"the output {output} must end in {' or '.join(suffixes)}")


def _check_device(device: str) -> None:
    """Refuse a CUDA device torch cannot use (torch would fail later with an AssertionError)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available to torch here; use --device cpu or auto")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that report a mistake in the input (their message says it all), not a bug."""
    types: list[type[BaseException]] = [CLIError, ValueError, TypeError, KeyError, OSError, ImportError, EOFError]
    types.append(FloatingPointError)  # a non-finite loss: its message says which data or setting to change
    # Only a library already imported can have raised its errors: none is imported here.
    gym_error = sys.modules.get("gymnasium.error")
    if gym_error is not None:
        types.append(gym_error.Error)  # e.g. NameNotFound for --env Bogus-v9
    hub_errors = sys.modules.get("huggingface_hub.errors")
    http_error = getattr(hub_errors, "HTTPError", None)  # the Hub client's HTTP base error: connection failures
    if isinstance(http_error, type) and issubclass(http_error, BaseException):
        types.append(http_error)
    return tuple(types)


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) would quote it
    else:
        text = str(error)
    return text.strip() or type(error).__name__


def _print_evaluation(results: dict[str, Any]) -> None:
    line = f"mean return {results['mean_reward']:.1f} +/- {results['std_reward']:.1f}"
    protocol = "deterministic" if results["is_deterministic"] else "stochastic"
    line += f" over {results['n_eval_episodes']} {protocol} episodes"
    if results.get("normalized_score") is not None:
        line += f" (normalized score {results['normalized_score']:.1f})"
    if results.get("success_rate") is not None:
        line += f", success rate {100 * results['success_rate']:.0f}%"
    print(line)


# subcommands --------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> None:
    """Build a Pendulum dataset, train, evaluate against the data, save, write the Hub folder."""
    _check_output(args.output, "folder")
    output = Path(args.output).resolve()
    os.environ["MINARI_DATASETS_PATH"] = str(output / "datasets")  # keep ~/.minari untouched
    import gymnasium as gym
    import torch

    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.demo_data import build_pendulum_dataset
    from dql_agent.hub import write_hub_folder

    # One thread: the demo's 64-wide MLPs gain nothing from intra-op parallelism, and on a
    # 2-core machine with any other load two OpenMP threads spin-wait on each other (measured
    # here: 1 thread 83-88 gradient steps/s, 2 threads about 1 step/s while another process ran).
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"[1/5] building the offline dataset {DEMO_DATASET} in {output / 'datasets'}")
    info = build_pendulum_dataset(DEMO_DATASET, seed=args.seed)
    print(
        f"      {info.dataset.total_episodes} episodes, {info.dataset.total_steps} steps; mean return of its good "
        f"half {info.good_return:.1f}, noisy half {info.noisy_return:.1f}; random actions {info.random_return:.1f}"
    )
    buffer = OfflineBuffer.from_minari(info.dataset)
    model = DiffusionQL(buffer, env=DEMO_ENV, device=args.device, seed=args.seed, **DEMO_HYPERPARAMETERS)
    print(f"[2/5] training Diffusion-QL for {args.steps} gradient steps on {model.device}")
    model.learn(args.steps, progress_bar=True)
    print(f"[3/5] evaluating with stable_baselines3 evaluate_policy ({args.episodes} episodes, seeds {args.seed}+i)")
    results, table = demo_table(model, info, args.episodes, args.seed)
    print(table)
    model.save(output / "model")
    print(f"[4/5] saved the model to {output / 'model'}")
    hub_dir = write_hub_folder(
        model,
        output / "hub",
        eval_env=gym.make(DEMO_ENV, render_mode="rgb_array"),
        video=not args.no_video,
        video_length=200,
        results=results,
        seed=args.seed,
    )
    print(f"[5/5] wrote the Hub-ready folder (card, results, video) to {hub_dir}")
    print(f"      push it with: dql-agent push {hub_dir} <user>/<repo>")
    print(f"done in {time.time() - start:.0f}s")
    beat_noisy = results["mean_reward"] > info.noisy_return
    beat_random = results["mean_reward"] > info.random_return
    if not (beat_noisy and beat_random):
        print("warning: the agent did not beat both the noisy half and random actions", file=sys.stderr)


def demo_table(model: Any, info: Any, episodes: int, seed: int) -> tuple[dict[str, Any], str]:
    """The demo's evaluation and the table it prints: ``evaluate`` with episode i reset with
    ``seed + i``, beside the dataset's halves and random actions (a PendulumDatasetInfo). The same
    model and seed give the same table on the same machine."""
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor

    from dql_agent.evaluation import evaluate

    results = evaluate(model, Monitor(gym.make(DEMO_ENV)), n_eval_episodes=episodes, seed=seed)
    lines = [
        f"      Diffusion-QL       {results['mean_reward']:8.1f} +/- {results['std_reward']:.1f}",
        f"      dataset noisy half {info.noisy_return:8.1f}",
        f"      random actions     {info.random_return:8.1f}",
        f"      dataset good half  {info.good_return:8.1f}",
    ]
    return results, "\n".join(lines)


def _check_overrides(overrides: dict[str, Any]) -> None:
    for key in overrides:
        if key in NOT_HYPERPARAMETERS:
            raise CLIError(f"--set {key}: {key} is not a hyperparameter; it is set by {NOT_HYPERPARAMETERS[key]}")
    log = overrides.get("tensorboard_log")
    if log is not None:
        # SB3 would fail only when learn() starts, with an AssertionError.
        if importlib.util.find_spec("tensorboard") is None:
            raise CLIError("--set tensorboard_log needs the tensorboard package: pip install tensorboard")
        if isinstance(log, str):
            _check_output(log, "folder")


def _literal_hint(error: Exception, overrides: dict[str, Any]) -> str:
    """``error``'s message, plus the JSON spelling of a --set value written as a Python literal."""
    fixes = [
        f"--set {key}={PYTHON_LITERALS[value]}"
        for key, value in overrides.items()
        if isinstance(value, str) and value in PYTHON_LITERALS and key in str(error)
    ]
    hint = f" (--set values are JSON: {', '.join(fixes)})" if fixes else ""
    return _message(error) + hint


def cmd_train(args: argparse.Namespace) -> None:
    """Train, or with --resume continue an interrupted run; save; evaluate."""
    if args.resume is not None:
        _resume_train(args)
        return
    if args.output is None:
        raise CLIError("train needs -o DIR, the checkpoint to write (or --resume DIR to continue an interrupted run)")
    _check_steps(args.steps)
    _check_output(args.output, "checkpoint", [args.dataset])
    cls = algorithms_by_short_name()[args.algo]
    overrides = _parse_overrides(args.set)
    _check_overrides(overrides)
    _set_threads(args.threads)
    if args.preset is not None:
        if not cls.presets:
            with_presets = sorted(name for name, other in algorithms_by_short_name().items() if other.presets)
            raise CLIError(f"--algo {args.algo} has no presets (--preset is for {', '.join(with_presets)})")
        overrides["preset"] = args.preset
    if cls.online:  # it collects its own data from the env
        if args.dataset is not None or args.env is None:
            raise CLIError(f"--algo {args.algo} trains online: pass --env ENV_ID and no DATASET")
        env = args.env
        data: Any = env
    else:
        if args.dataset is None:
            raise CLIError(f"--algo {args.algo} trains offline: pass a DATASET (Minari id or .npz/.hdf5)")
        data = _load_dataset(args)
        env = args.env
        if not env and data.metadata.get("env_id") is not None:
            env = _env_from_file(data.metadata["env_id"], f"the dataset {args.dataset}")
    if env is not None:  # made here (with --import) so the model records the plain id
        env_module, _, plain_id = env.rpartition(":")
        env_module = env_module or ",".join(args.imports)
        made = _make_env(env, imports=args.imports)
        if cls.online:
            data = made
    try:
        kwargs = {} if cls.online else {"env": made if env is not None else None}
        model = cls(data, **kwargs, device=args.device, seed=args.seed, verbose=1, **overrides)
    except (ValueError, TypeError) as error:
        raise CLIError(_literal_hint(error, overrides)) from error
    if env is not None:
        # The plain id, and apart from it the module the user named: later commands import it only
        # when the user names it again (--import), never because a file says so.
        model.metadata["env_id"] = plain_id
        if env_module:
            model.metadata["env_module"] = env_module
    steps = DEFAULT_TRAIN_STEPS if args.steps is None else args.steps
    model.metadata[RUN_KEY] = {
        "dataset": None if args.dataset is None else _dataset_record(args.dataset),
        "download": bool(args.download),
        "total_timesteps": int(steps),
        "include_optimizer": bool(args.include_optimizer),
        "episodes": int(args.episodes),
        "stochastic": bool(args.stochastic),
        "eval_seed": int(args.eval_seed),
        "log_interval": int(args.log_interval),
    }
    _train_save_evaluate(model, args, args.output, env, resumed=False)


RUN_KEY = "dql_agent_train"  # an interrupt checkpoint's metadata: how `dql-agent train` was asked to run, for --resume
DEFAULT_TRAIN_STEPS = 1_000_000
RESUME_FIXED = {"algo": "--algo", "preset": "--preset", "set": "--set", "seed": "--seed"}


def _check_steps(steps: int | None) -> None:
    if steps is not None and steps < 0:
        raise CLIError(f"--steps is the run's total timesteps, an int >= 0; got {steps}")


def _threads(text: str) -> int:
    """``--threads``: an int >= 1 (torch refuses 0 and negative counts with a RuntimeError)."""
    try:
        threads = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if threads < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {threads}")
    return threads


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _load_dataset(args: argparse.Namespace, spaces: dict[str, Any] | None = None) -> Any:
    """The DATASET argument as an OfflineBuffer (a file takes ``spaces``, else --env's); a missing
    Minari dataset's message names --download, the command-line way to fetch it."""
    from dql_agent.readers.minari import download_hint

    spaces = dict(spaces or {})
    if not spaces and args.env:  # a file takes the env's spaces
        spaces_env = _make_env(args.env, imports=args.imports)
        spaces = {"observation_space": spaces_env.observation_space, "action_space": spaces_env.action_space}
        spaces_env.close()
    with download_hint("pass --download to fetch it"):
        return load_buffer(args.dataset, download=args.download, **spaces)


def _dataset_record(dataset: str) -> str:
    """A dataset as --resume finds it again: a file by its absolute path, a Minari id as it is."""
    if dataset.endswith((".npz", ".hdf5", ".h5")):
        return str(Path(dataset).expanduser().resolve())
    return dataset


def _train_save_evaluate(model: Any, args: argparse.Namespace, output: str, env: str | None, resumed: bool) -> None:
    """Train up to the run's total, save to ``output``, evaluate. Ctrl-C or SIGTERM ends the step
    in progress, saves a resumable checkpoint to ``output`` and exits with 128 + the signal."""
    from dql_agent.sb3 import TimestepProgressBar
    from dql_agent.scaling import is_main_process

    run = model.metadata[RUN_KEY]
    total = int(run["total_timesteps"])
    bar = None if args.no_progress else TimestepProgressBar()
    try:
        model.learn(
            max(total - model.num_timesteps, 0),
            callback=bar,
            log_interval=int(run["log_interval"]),
            reset_num_timesteps=not resumed,
            distributed=bool(getattr(args, "distributed", False)),
        )
    except KeyboardInterrupt as interrupt:
        if bar is not None:
            bar.close()  # before the message, and while the interpreter can still draw it
        if not is_main_process():  # rank 0 saves the run; the others hold the same weights
            raise SystemExit(128 + int(getattr(interrupt, "signum", 2))) from None
        _save_interrupted(model, output, total, interrupt)
    finally:
        if bar is not None:
            bar.close()
    if not is_main_process():
        return
    del model.metadata[RUN_KEY]  # only an unfinished run needs it; a finished model names no local paths
    model.save(output, include_optimizer=bool(run["include_optimizer"]))
    print(f"saved to {output}")
    if env is not None and int(run["episodes"]) > 0:
        from stable_baselines3.common.monitor import Monitor

        from dql_agent.evaluation import evaluate

        eval_env = Monitor(_make_env(env, imports=args.imports))
        deterministic = not run["stochastic"]
        results = evaluate(model, eval_env, int(run["episodes"]), deterministic, seed=int(run["eval_seed"]))
        _print_evaluation(results)


def _save_interrupted(model: Any, output: str, total: int, interrupt: KeyboardInterrupt) -> NoReturn:
    """Save the interrupted run with its optimizer state, say how to continue, exit 128 + signal."""
    import signal

    signum = int(getattr(interrupt, "signum", signal.SIGINT))
    name = signal.Signals(signum).name
    status = 128 + signum
    done = f"timestep {model.num_timesteps:,} of {total:,}"
    if not getattr(interrupt, "step_finished", True):
        print(f"dql-agent: {name} again: stopped in the middle of a step at {done}; nothing saved", file=sys.stderr)
        raise SystemExit(status)
    try:
        model.save(output, include_optimizer=True)
    except KeyboardInterrupt:
        print(f"dql-agent: interrupted again while saving: {output} is as it was before", file=sys.stderr)
        raise SystemExit(status) from None
    print(f"{name}: training stopped after {done}.")
    print(f"Saved a resumable checkpoint (weights, optimizer and RNG state) to {output}; continue with:")
    print(f"    dql-agent train --resume {shlex.quote(str(output))}")
    if model.online:
        print(
            f"({model.algorithm}'s replay buffer and the episode in progress are not in the checkpoint: the resumed "
            "run starts a new buffer from a fresh reset, so it does not repeat an uninterrupted run exactly)"
        )
    raise SystemExit(status)


def _resume_train(args: argparse.Namespace) -> None:
    """``train --resume DIR``: the run recorded in DIR's checkpoint, continued to its total."""
    from dql_agent.checkpoint import load_checkpoint

    given = [flag for key, flag in RESUME_FIXED.items() if getattr(args, key) not in (None, [], "dql")]
    if given:
        raise CLIError(
            f"--resume continues the run as it was started; {', '.join(given)} cannot change it (train a new "
            "run with -o instead)"
        )
    _check_steps(args.steps)
    source = args.resume
    output = args.output or source
    _check_output(output, "checkpoint")
    _set_threads(args.threads)
    checkpoint = load_checkpoint(source, include_optimizer=True)
    if checkpoint.optimizer_tensors is None:
        raise CLIError(
            f"{source} holds no optimizer state, so training cannot continue exactly from it: resume from the "
            "checkpoint an interrupted `dql-agent train` saved (or one saved with --include-optimizer)"
        )
    metadata = checkpoint.config.get("metadata") or {}
    run = metadata.get(RUN_KEY)
    cls = _algorithm_of(checkpoint.config.get("algorithm"))
    if not isinstance(run, dict):
        if args.steps is None or (args.dataset is None and not cls.online):
            raise CLIError(
                f"{source} records no unfinished `dql-agent train` run (it is a finished one, or a checkpoint saved "
                f"from Python), so it does not say what to train on: pass {'' if cls.online else 'the DATASET and '}"
                "--steps TOTAL (the run's new total timesteps)"
            )
        run = {
            "dataset": None if cls.online else _dataset_record(args.dataset),
            "download": bool(args.download),
            "include_optimizer": bool(args.include_optimizer),
            "episodes": int(args.episodes),
            "stochastic": bool(args.stochastic),
            "eval_seed": int(args.eval_seed),
            "log_interval": int(args.log_interval),
        }
    run = {**run, "total_timesteps": int(args.steps if args.steps is not None else run["total_timesteps"])}
    done = int(checkpoint.config.get("num_timesteps", 0))
    if done >= run["total_timesteps"]:
        raise CLIError(
            f"the run in {source} is finished ({done:,} of {run['total_timesteps']:,} timesteps): pass --steps TOTAL "
            "above that to train it further"
        )
    model = cls.from_checkpoint(checkpoint, str(source), device=args.device)
    env = _env_id_of(model, args.env, source, args.imports) if (cls.online or model.metadata.get("env_id")) else None
    made_env = _make_env(env, imports=args.imports) if env is not None else None
    if not cls.online:  # the dataset, as the run recorded it or as given now; a file takes the model's spaces
        args.dataset = _dataset_record(args.dataset) if args.dataset is not None else run["dataset"]
        args.download = args.download or bool(run["download"])
        spaces = {"observation_space": model.observation_space, "action_space": model.action_space}
        model.set_buffer(_load_dataset(args, spaces))
        run["dataset"] = args.dataset
    if made_env is not None:
        model.set_env(made_env)
    model.metadata[RUN_KEY] = run
    print(f"resuming {source} at timestep {done:,} of {run['total_timesteps']:,}")
    _train_save_evaluate(model, args, output, env, resumed=True)


def _algorithm_of(name: Any) -> Any:
    """The registered class of the algorithm a config.json names."""
    from dql_agent.registry import algorithm_class

    if not isinstance(name, str):
        raise CLIError(f"the checkpoint names no algorithm ({name!r})")
    return algorithm_class(name)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from stable_baselines3.common.monitor import Monitor

    from dql_agent.evaluation import evaluate

    if args.json:
        _check_output(args.json, "file", [args.model], make_parents=False)
    model = load_model(args.model, args.device)
    env_id = _env_id_of(model, args.env, args.model, args.imports)
    env = Monitor(_make_env(env_id, imports=args.imports))
    results = evaluate(model, env, n_eval_episodes=args.episodes, deterministic=not args.stochastic, seed=args.seed)
    _print_evaluation(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def cmd_record(args: argparse.Namespace) -> None:
    from dql_agent.video import record_video

    _check_suffix(args.output, [".mp4"])
    _check_output(args.output, "file", [args.model])
    model = load_model(args.model, args.device)
    env = _make_env(_env_id_of(model, args.env, args.model, args.imports), render=True, imports=args.imports)
    path = record_video(model, env, args.output, n_episodes=args.episodes, max_steps=args.max_steps, seed=args.seed)
    env.close()
    print(f"wrote {path}")


def cmd_push(args: argparse.Namespace) -> None:
    """Push to the Hub, or with --local-dir write the same folder locally (no network)."""
    if args.local_dir is not None:
        if args.private or args.revision:
            raise CLIError("--private and --revision apply to a push to the Hub, not to --local-dir")
        _check_output(args.local_dir, "folder", [args.model])
    model = load_model(args.model, args.device)
    eval_env = None
    if args.episodes > 0:
        env_id = _env_id_of(model, args.env, args.model, args.imports)
        eval_env = _make_env(env_id, render=not args.no_video, imports=args.imports)
    options: dict[str, Any] = {
        "eval_env": eval_env,
        "n_eval_episodes": args.episodes,
        "video": not args.no_video,
        "video_length": args.video_length,
        "deterministic": not args.stochastic,
        "seed": args.seed,
        "install": _install_line(args.install),
    }
    if args.local_dir is not None:
        from dql_agent.hub import write_hub_folder

        folder = write_hub_folder(model, args.local_dir, repo_id=args.repo_id, **options)
        print(f"wrote the Hub folder to {folder}; push it once online with: dql-agent push {folder} {args.repo_id}")
        return
    from dql_agent.hub import push_to_hub

    url = push_to_hub(model, args.repo_id, private=args.private or None, revision=args.revision, **options)
    print(f"pushed: {url}")


def _install_line(given: str | None) -> str:
    """The card's install command: --install, else the package's own (:func:`install_command`),
    with a note when that names a folder only this machine can install from."""
    from dql_agent.hub import INSTALL_ENV, install_command

    if given is not None and given.strip():
        return given.strip()
    command, origin = install_command()
    if origin == "local":
        print(
            f"note: the model card's install line is `{command}`, a folder on this machine; set {INSTALL_ENV} "
            "(or --install) to a command readers can run, e.g. "
            'pip install "dql_agent @ git+https://github.com/OWNER/dql_agent@TAG"'
        )
    return command


def cmd_export(args: argparse.Namespace) -> None:
    from dql_agent.export import FORMATS, read_metadata

    _check_suffix(args.output, sorted(FORMATS))
    _check_output(args.output, "file", [args.model], make_parents=False)
    model = load_model(args.model, args.device)
    path = model.export(args.output, deterministic=not args.stochastic, n_action_samples=args.n_action_samples)
    meta = read_metadata(path)
    inputs = ", ".join(meta["inputs"])
    print(f"wrote {path}: {meta['algorithm']}, inputs {inputs} -> action {meta['action_shape']}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run the sweep a YAML spec describes (dql_agent.integrations.ray.SweepSpec), print its table.

    Trials that failed are listed on stderr after the table, and the command exits with status 1;
    a sweep stopped before its runs finished (Ctrl-C) exits with status 130, as ``train`` does."""
    from dql_agent.integrations.ray import SweepFailedError, SweepSpec

    overrides: dict[str, Any] = {} if args.device == "auto" else {"device": args.device}
    if args.force:  # the grid's size and the resources no node has now: the user knows better
        overrides |= {"max_trials": None, "wait_for_resources": True}
    spec = SweepSpec.from_yaml(args.spec, **overrides)
    try:
        result = spec.run(address=args.address, resume=args.resume, verbose=args.verbose)
    except SweepFailedError as error:
        _print_sweep(error.result)
        print(f"dql-agent: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    _print_sweep(result)
    if result.unfinished and spec.scheduler is None:  # without a scheduler only a stop ends a run early
        print(
            f"dql-agent: error: the sweep stopped before {result.unfinished} run(s) finished; "
            f"dql-agent sweep {args.spec} --resume continues it",
            file=sys.stderr,
        )
        raise SystemExit(130)


def _print_sweep(result: Any) -> None:
    print(result.markdown)
    for note in result.notes:
        print(f"note: {note}")
    print("results: " + ", ".join(str(f) for f in result.files))
    print(f"sweep folder (Tune's state, trials, checkpoints): {result.path}")


STOCHASTIC_HELP = (
    "evaluate with predict(deterministic=False): sample by softmax over fresh candidates, as the official "
    "Diffusion-QL evaluation does (default: the argmax over fixed-noise candidates)"
)
EVAL_SEED_HELP = (
    "episode i of the evaluation resets with SEED + i, so the numbers repeat exactly on the same machine "
    "(results.json records the seeds)"
)
INSTALL_HELP = (
    "the install command the model card gives readers (default: $DQL_AGENT_INSTALL, else where this dql_agent "
    "was installed from)"
)
IMPORT_HELP = (
    "import MODULE before making the env (a package that registers envs, e.g. gymnasium_robotics); "
    "--env MODULE:ENV_ID does the same"
)


def cmd_serve(args: argparse.Namespace) -> None:
    from dql_agent.server import run_serve  # an ImportError names the serve extra

    run_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dql-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda'")
        p.set_defaults(func=func)
        return p

    p = add("demo", cmd_demo, "Pendulum end to end: dataset, training, evaluation, Hub folder")
    p.add_argument("-o", "--output", default="dql_demo", help="folder for the dataset, model and Hub folder")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="gradient steps")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset, the training and the evaluation's episodes")
    p.add_argument("--no-video", action="store_true", help="skip replay.mp4")
    p.add_argument("--threads", type=_threads, default=1, help="torch CPU threads (1 suits the demo's small networks)")

    p = add("train", cmd_train, "train an agent: offline on a Minari id or D4RL .npz/.hdf5 file, or online (qvpo)")
    p.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    p.add_argument("dataset", nargs="?", help="Minari id or .npz/.hdf5 file (offline algorithms)")
    algos = algorithms_by_short_name()
    help_algo = ", ".join(
        f"{n} ({c.algorithm}, {'online' if c.online else 'offline'})" for n, c in sorted(algos.items())
    )
    p.add_argument("--algo", choices=sorted(algos), default="dql", help=help_algo)
    p.add_argument("-o", "--output", help="model directory (or .zip) to write; an interrupted run saves here too")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run whose interrupt checkpoint is DIR (written back to DIR, or to -o), to its total --steps",
    )
    p.add_argument("--env", help="env id for spaces and evaluation (default: the dataset's)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    p.add_argument("--preset", help="task preset, e.g. hopper-medium")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"the run's total timesteps (gradient steps offline; default {DEFAULT_TRAIN_STEPS:,})",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hyperparameter override")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes after training (0: none)")
    p.add_argument("--eval-seed", type=int, default=0, help=EVAL_SEED_HELP)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--download", action="store_true", help="download a Minari dataset that is not local")
    p.add_argument("--include-optimizer", action="store_true", help="save optimizer state to resume")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="train data-parallel with the other processes torchrun started (torchrun --nproc-per-node N -m "
        "dql_agent.cli train ...): gradients averaged over the ranks; rank 0 alone saves, logs and evaluates",
    )

    p = add("evaluate", cmd_evaluate, "evaluate a saved or Hub model with SB3's evaluate_policy")
    p.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    p.add_argument("model")
    p.add_argument("--env", help="env id (default: the one the model was trained for)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help=EVAL_SEED_HELP)
    p.add_argument("--json", help="also write the results to this JSON file")

    p = add("record", cmd_record, "record a rollout video (mp4)")
    p.add_argument("model")
    p.add_argument("-o", "--output", default="replay.mp4")
    p.add_argument("--env", help="env id (default: the one the model was trained for)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the first reset; later episodes follow from the env's RNG"
    )

    p = add("push", cmd_push, "push a model with its card, results and video to the Hugging Face Hub")
    p.add_argument("--stochastic", action="store_true", help=STOCHASTIC_HELP)
    p.add_argument("model")
    p.add_argument("repo_id")
    p.add_argument("--env", help="env id for evaluation and video (default: the model's)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (0: push without results)")
    p.add_argument("--seed", type=int, default=0, help=EVAL_SEED_HELP)
    p.add_argument("--install", metavar="COMMAND", help=INSTALL_HELP)
    p.add_argument("--no-video", action="store_true")
    p.add_argument("--video-length", type=int, default=1000)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument(
        "--local-dir", metavar="DIR", help="write the Hub folder (card, results, video) here instead: no network"
    )

    p = add("export", cmd_export, "export acting to ONNX (.onnx) or torch.export (.pt2) for a robot's runtime")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="policy.onnx or policy.pt2")
    p.add_argument("--stochastic", action="store_true", help="take the noise (and uniforms) as inputs")
    p.add_argument("--n-action-samples", type=int, default=None, help="candidates per observation")

    p = add("sweep", cmd_sweep, "run a sweep of datasets x seeds x hyperparameters on Ray Tune (dql_agent[ray])")
    p.add_argument("spec", help="YAML spec: the fields of dql_agent.integrations.ray.SweepSpec")
    p.add_argument("--address", default=None, help="Ray cluster to join: 'auto', 'ray://HOST:10001' (default: local)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep at storage/name")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune's progress output")
    p.add_argument(
        "--force",
        action="store_true",
        help="start a grid larger than the spec's max_trials, and trials whose resources no node has yet (Tune "
        "waits for nodes to join): the spec's max_trials: null and wait_for_resources: true",
    )

    p = add("serve", cmd_serve, "serve a policy to RemotePolicy clients over websockets (dql_agent[serve])")
    try:
        from dql_agent.server import add_serve_arguments
    except ImportError:  # the serve extra is missing: cmd_serve names it
        p.add_argument("arguments", nargs=argparse.REMAINDER)
    else:
        add_serve_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dql-agent`` console script.

    A user error exits with status 2 and one line on stderr (``DQL_AGENT_DEBUG=1``: the
    traceback); any other exception is a bug and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        _check_device(args.device)
        args.func(args)
    except KeyboardInterrupt:  # outside training (which saves and exits itself): nothing to keep
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print("dql-agent: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not isinstance(error, _user_error_types()):
            raise
        _fail(_message(error))


if __name__ == "__main__":
    main()
