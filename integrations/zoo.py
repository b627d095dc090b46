"""rl-zoo3's ``enjoy`` and ``record_video`` on dql_agent models.

    python -m dql_agent.integrations.zoo enjoy --algo dql --env Pendulum-v1 -f logs/ --no-render -n 200
    python -m dql_agent.integrations.zoo record_video --algo dql --env Pendulum-v1 -f logs/ -n 200

The entry point adds dql_agent's algorithms to ``rl_zoo3.ALGOS`` under their short names ('dql',
'dice', 'qvpo'), then runs rl-zoo3's own script with the remaining arguments. The scripts load
``<folder>/<algo>/<Env>_<n>/<Env>.zip`` (the highest ``n`` unless ``--exp-id``) with
``ALGOS[algo].load(path, custom_objects=..., seed=...)``, which :meth:`BaseAgent.load` accepts;
:func:`save_to_zoo` puts a model there. No ``config.yml`` or ``args.yml`` is written: the scripts
read them only when present (env wrappers, normalisation and env kwargs, none of which apply).

Needs ``pip install dql_agent[zoo]`` (rl_zoo3, and requests, which rl_zoo3's enjoy imports).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import runpy
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dql_agent.base import BaseAgent
from dql_agent.registry import algorithms_by_short_name
from dql_agent.video import render_headless

SCRIPTS = ("enjoy", "record_video")
"""The rl-zoo3 scripts this entry point runs (``train`` builds SB3 algorithms from an env alone)."""
USAGE = (
    f"usage: python -m dql_agent.integrations.zoo {{{','.join(SCRIPTS)}}} [rl-zoo3 arguments]\n"
    "  e.g. python -m dql_agent.integrations.zoo enjoy --algo dql --env Pendulum-v1 -f logs/ --no-render"
)


@contextlib.contextmanager
def zoo_extra() -> Iterator[None]:
    """Turn a missing package of the zoo extra into an ImportError saying how to install it."""
    try:
        yield
    except ImportError as error:
        message = f"{error}: rl-zoo3 on dql_agent models needs the zoo extra: pip install dql_agent[zoo]"
        raise ImportError(message) from error


def register_algorithms() -> dict[str, type[BaseAgent]]:
    """Add every dql_agent algorithm to ``rl_zoo3.ALGOS`` under its ``short_name``; returns them.

    A short name rl-zoo3 already gives another class is a ValueError (nothing is replaced).
    """
    with zoo_extra():
        algos: dict[str, Any] = importlib.import_module("rl_zoo3").ALGOS
    ours = algorithms_by_short_name()
    clashes = sorted(name for name, cls in ours.items() if algos.get(name, cls) is not cls)
    if clashes:
        raise ValueError(f"rl_zoo3.ALGOS already has {clashes} for other classes; dql_agent's would replace them")
    algos.update(ours)
    return ours


def zoo_env_name(env_id: str) -> str:
    """The name rl-zoo3 gives ``env_id``'s folders and files (``huggingface_sb3.EnvironmentName``)."""
    with zoo_extra():
        from huggingface_sb3 import EnvironmentName
    return str(EnvironmentName(env_id))


def save_to_zoo(model: BaseAgent, folder: str | os.PathLike[str] = "logs", env_id: str | None = None) -> Path:
    """Save ``model`` where rl-zoo3's enjoy and record_video look: ``<folder>/<algo>/<Env>_<n>/<Env>.zip``.

    ``n`` is one past the highest run number there, so the scripts load this model unless given
    ``--exp-id``. ``env_id`` defaults to the env the model was made for (``model.metadata['env_id']``,
    else its env's spec). Returns the path of the zip.
    """
    if env_id is None:
        env_id = model.metadata.get("env_id")
    if env_id is None and model.get_env() is not None:
        spec = model.get_env().get_attr("spec")[0]
        env_id = None if spec is None else spec.id
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"pass env_id=...: the model records no env id (got {env_id!r})")
    env_name = zoo_env_name(env_id)
    algo_dir = Path(folder) / model.short_name
    # rl-zoo3 (get_latest_run_id) takes the highest <Env>_<digits> entry; mkdir claims the number.
    runs = re.compile(re.escape(env_name) + r"_([0-9]+)")
    taken = (runs.fullmatch(path.name) for path in algo_dir.glob(f"{env_name}_*")) if algo_dir.is_dir() else ()
    n = max((int(match[1]) for match in taken if match), default=0) + 1
    while True:
        run_dir = algo_dir / f"{env_name}_{n}"
        try:
            run_dir.mkdir(parents=True)
            break
        except FileExistsError:  # a concurrent save took it
            n += 1
    path = run_dir / f"{env_name}.zip"
    model.save(path)
    return path


def _usage_error(message: str) -> SystemExit:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return SystemExit(2)


def check_run_folder(script_args: Sequence[str]) -> None:
    """Refuse, in one line, a ``-f/--folder`` (or its ``<algo>`` folder) that does not exist.

    rl-zoo3 would assert it (an AssertionError with a traceback) or, for its default folder
    ``rl-trained-agents``, try to download the run from the ``sb3`` Hub organisation, which holds
    no dql_agent models."""
    parser = argparse.ArgumentParser(add_help=False)  # rl-zoo3's own names and defaults for these two
    parser.add_argument("-f", "--folder", default="rl-trained-agents")
    parser.add_argument("--algo", default=None)
    known, _ = parser.parse_known_args(list(script_args))
    folder = Path(known.folder)
    where = "save_to_zoo(model, folder) writes <folder>/<algo>/<Env>_<n>/<Env>.zip"
    if not folder.is_dir():
        given = "rl-zoo3's default -f" if known.folder == parser.get_default("folder") else "-f/--folder"
        raise _usage_error(f"{given} {known.folder}: no such folder; {where}")
    if known.algo is not None and not (folder / known.algo).is_dir():
        raise _usage_error(f"-f/--folder {known.folder} holds no {known.algo}/ folder of runs; {where}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dql_agent.integrations.zoo {enjoy,record_video} [rl-zoo3 arguments]``.

    Registers dql_agent's algorithms (:func:`register_algorithms`) and runs the rl-zoo3 script
    with ``sys.argv`` set to its arguments (restored afterwards).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if not args or args[0] not in SCRIPTS:
        print(f"{USAGE}\nerror: the first argument must be one of {list(SCRIPTS)}", file=sys.stderr)
        raise SystemExit(2)
    with zoo_extra():  # a missing extra first, without importing rl_zoo3 (it patches gymnasium)
        if importlib.util.find_spec("rl_zoo3") is None:
            raise ImportError("No module named 'rl_zoo3'")
    check_run_folder(args[1:])
    register_algorithms()
    render_headless()  # rl-zoo3's rendering goes through pygame's SDL too
    script = f"rl_zoo3.{args[0]}"
    saved_argv = sys.argv
    sys.argv = [script, *args[1:]]  # rl-zoo3's scripts parse sys.argv
    try:
        with zoo_extra():
            if script == "rl_zoo3.enjoy":
                importlib.import_module(script).enjoy()
            else:  # record_video is a script body under `if __name__ == "__main__"`, not a function
                runpy.run_module(script, run_name="__main__")
    except (AssertionError, ValueError) as error:
        # rl-zoo3 checks its arguments with asserts and ValueErrors (a missing --exp-id run folder,
        # no <Env>.zip in it): the user's mistakes, said in one line. Raised anywhere else (in
        # dql_agent's code that rl-zoo3 called) it is not rl-zoo3's check, and propagates.
        frames = traceback.extract_tb(error.__traceback__)
        if not frames or "rl_zoo3" not in Path(frames[-1].filename).parts:
            raise
        raise _usage_error(f"rl-zoo3 {args[0]}: {error}") from None
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
