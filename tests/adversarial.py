"""What the robustness tests (tests/test_robust_*.py) share: running ``dql-agent`` in this process
with a deadline, a deadline for any block that could hang, a process that saves in a loop, and
small checkpoints and array files to corrupt.

Test files import these from here, never from each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dql_agent import OfflineBuffer


def cli(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``dql-agent ARGS`` offline, with one torch thread, in ``cwd``.

    In this process through ``dql_agent.cli.main`` (a subprocess costs ~3 s of imports per case),
    except when ``env`` sets PYTHONPATH: the import tests run a real ``python -m dql_agent.cli``.
    """
    environ = {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MINARI_DATASETS_PATH": str(cwd / "minari"),
        **(env or {}),
    }
    if "PYTHONPATH" in environ:
        full = {k: v for k, v in os.environ.items() if k != "DQL_AGENT_DEBUG"} | environ
        command = [sys.executable, "-m", "dql_agent.cli", *map(str, args)]
        return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    return run_in_process([str(a) for a in args], cwd, environ, timeout)


def run_in_process(args: list[str], cwd: Path, environ: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    from dql_agent.cli import main

    def too_slow(signum: int, frame: object) -> None:  # an output checked after training would hang here
        raise TimeoutError(f"dql-agent {' '.join(args)} ran past {timeout} s")

    saved_environ, saved_cwd = dict(os.environ), os.getcwd()
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        os.environ.pop("DQL_AGENT_DEBUG", None)
        os.environ.update(environ)
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # what a user would see as a traceback
        stderr.write(traceback.format_exc())
        code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
    return subprocess.CompletedProcess(["dql-agent", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dql-agent: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: float = 20.0) -> Iterator[None]:
    """Fail (TimeoutError) instead of blocking: a read of a FIFO that was opened would wait here."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tiny_buffer(n: int = 40) -> OfflineBuffer:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    return OfflineBuffer(obs, rng.uniform(-1, 1, (n, 1)), rng.normal(size=n), obs, np.zeros(n, bool))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def zip_of(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in folder.iterdir():
            archive.writestr(file.name, file.read_bytes())
    return path


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def d4rl_arrays(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
        "terminals": np.zeros(n, bool),
    }


def npy(shape: tuple[int, ...], dtype: str, data: bytes) -> bytes:
    """An .npy file's bytes: a real header declaring ``shape`` and ``dtype``, then ``data``."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + data


def write_npz(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


def npy_of(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


SAVE_LOOP = textwrap.dedent("""
    import sys
    import numpy as np
    from dql_agent import DiffusionQL, OfflineBuffer
    path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(32, 3)).astype(np.float32)
    buffer = OfflineBuffer(obs, rng.uniform(-1, 1, (32, 2)), rng.normal(size=32), obs, np.zeros(32, bool))
    model = DiffusionQL(buffer, seed=seed, device="cpu", hidden_dim=256, n_hidden=3).learn(1)
    print("ready", flush=True)
    step = 0
    while step != count:  # count < 0: until killed
        model.num_timesteps = 1000 * seed + step
        model.save(path, include_optimizer=True)
        if step == 0:
            print("saved", flush=True)
        step += 1
""")


def start_saver(path, seed: int, count: int = -1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SAVE_LOOP, str(path), str(seed), str(count)], stdout=subprocess.PIPE, text=True, env=env
    )
