"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``optimizer.safetensors``), no pickle.

A checkpoint is a directory, or the same files in a ``.zip`` archive when the path ends in
``.zip`` (SB3's ``CheckpointCallback`` names its saves ``*.zip``).

Saving never destroys the last good checkpoint: a ``.zip`` is written to a temporary name,
fsynced and renamed over the old one; a directory is written whole as a hidden sibling
(``.NAME.*.saving``) and swapped in with one atomic exchange (Linux ``renameat2``; elsewhere two
renames, and a load finds the moved-aside old copy if a crash falls between them). A failed,
killed or concurrent save therefore leaves the old checkpoint or the new one, never a mix, and
a reader beside a writer always reads a whole one. A save keeps the regular files (and folders of
them) that a user put beside the weights, never a link; the temporary files and folders of killed
saves are removed by the next save of the same name (a live save's stay locked, see
:data:`STALE_AFTER_S`). config.json records the SHA-256 of the weights and of the optimizer
state, so nothing stale or torn is ever paired with it.

Loading parses JSON and safetensors only: nothing in a checkpoint can run code. Only regular files
are read (a FIFO or a device is refused without blocking, a link out of the checkpoint folder is
refused), and sizes are bounded before anything is allocated: config.json's, what a zip entry may
inflate to, every weight file's by the memory budget of :mod:`dql_agent.limits` and, for a large
one, by its safetensors header and its SHA-256, checked as it streams from disk. Every tensor is
then checked for name, shape, dtype and finiteness before a model takes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: stale temporary folders of killed saves are then left in place
    fcntl = None  # type: ignore[assignment]

import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dql_agent.config import check_seed, to_json_safe
from dql_agent.files import describe_mode, open_regular, read_exactly, regular_size
from dql_agent.limits import MemoryBudgetError, check_budget
from dql_agent.spaces import space_from_json, space_to_json

FORMAT_VERSION = 2
"""2 added ``optimizer_sha256``; version-1 checkpoints still load (their optimizer state unhashed)."""
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_KEYS = (
    "format_version",
    "library",
    "library_version",
    "algorithm",
    "config",
    "observation_space",
    "action_space",
    "num_timesteps",
    "seed",
    "metadata",
    "model_sha256",
    "optimizer_sha256",
)
ADDED_IN_VERSION = {"optimizer_sha256": 2}
"""Keys a checkpoint of an older format_version may lack."""
MAX_CONFIG_BYTES = 16 * 2**20
"""config.json is a few kB; anything near this is not one."""
MAX_DEFLATE_RATIO = 4
"""Float weights deflate by well under 2x: a zip entry claiming more is refused before inflating."""
SAVING_SUFFIX, OLD_SUFFIX = ".saving", ".old"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted or incompatible; the message names the file."""


def library_version() -> str:
    """This dql_agent's version, from the installed package's metadata."""
    try:
        return importlib.metadata.version("dql_agent")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


# config.json -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedConfig:
    """config.json as a model is rebuilt from it (the checks of :func:`parse_config` passed)."""

    algorithm: str
    hyperparameters: dict[str, Any]
    observation_space: spaces.Space
    action_space: spaces.Box
    num_timesteps: int
    seed: int
    metadata: dict[str, Any]


def build_config(
    *,
    algorithm: str,
    hyperparameters: dict[str, Any],
    observation_space: spaces.Space,
    action_space: spaces.Box,
    num_timesteps: int,
    seed: int,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """The config.json of a model, every key of ``CONFIG_KEYS`` but ``model_sha256`` (added by
    :func:`save_checkpoint` once the weights are serialised)."""
    return {
        "format_version": FORMAT_VERSION,
        "library": "dql_agent",
        "library_version": library_version(),
        "algorithm": algorithm,
        "config": hyperparameters,
        "observation_space": space_to_json(observation_space),
        "action_space": space_to_json(action_space),
        "num_timesteps": int(num_timesteps),
        "seed": seed,
        "metadata": to_json_safe(metadata, "metadata"),
    }


def read_config(config: dict[str, Any], where: str) -> SavedConfig:
    """The parts of a parsed config.json a model is rebuilt from; bad spaces or seed are a
    CheckpointError naming ``where``."""
    try:
        observation_space = space_from_json(config["observation_space"], "observation_space")
        action_space = space_from_json(config["action_space"], "action_space")
    except ValueError as error:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: {error}") from None
    try:
        seed = check_seed(config["seed"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: {error}") from None
    if not isinstance(action_space, spaces.Box):
        raise CheckpointError(f"{where}/{CONFIG_FILE}: action_space must be a Box, got {type(action_space).__name__}")
    return SavedConfig(
        algorithm=config["algorithm"],
        hyperparameters=dict(config["config"]),
        observation_space=observation_space,
        action_space=action_space,
        num_timesteps=config["num_timesteps"],
        seed=seed,
        metadata=dict(config["metadata"]),
    )


@dataclass
class Checkpoint:
    """The parsed contents of a checkpoint."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor] | None = None
    optimizer_meta: dict[str, Any] = field(default_factory=dict)


# writing ---------------------------------------------------------------------------------------
STALE_AFTER_S = 10.0
"""A save's temporary file or folder (``.NAME.*.tmp``, ``.NAME.*.saving``) that no process holds
locked and that has not changed for this long is a killed save's: the next save of NAME removes
it. A live save holds an ``flock`` on its own for its whole life, so it is never taken for one;
the delay covers the instant between creating it and locking it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsynced and renamed:
    a crash leaves the old file or the new one, never a torn one. The temporary file stays locked
    until it is renamed; those of killed writes are removed here (see :data:`STALE_AFTER_S`)."""
    _remove_stale(path.parent, re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _hold(fd)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is as readable as any file
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # still locked: no cleaner can take it for a killed write's
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to a directory (or a ``.zip`` file); returns the path written.

    ``config.json`` records the SHA-256 of ``model.safetensors`` and of ``optimizer.safetensors``
    (None without one). The old checkpoint at ``path`` stays loadable until the new one is whole
    (see the module docstring).
    """
    path = Path(path)
    weights = weights_bytes(checkpoint.tensors)
    files = {MODEL_FILE: weights}
    optimizer_sha256 = None
    if checkpoint.optimizer_tensors is not None:
        meta = {"format": "pt", "state": json.dumps(checkpoint.optimizer_meta)}
        files[OPTIMIZER_FILE] = save_safetensors_bytes(_contiguous(checkpoint.optimizer_tensors), metadata=meta)
        optimizer_sha256 = hashlib.sha256(files[OPTIMIZER_FILE]).hexdigest()
    config = {
        **checkpoint.config,
        "model_sha256": hashlib.sha256(weights).hexdigest(),
        "optimizer_sha256": optimizer_sha256,
    }
    files[CONFIG_FILE] = json.dumps(config, indent=2, allow_nan=False).encode()
    if path.suffix == ".zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        atomic_write(path, buffer.getvalue())
        return path
    _write_directory(path, files)
    return path


def _write_directory(path: Path, files: dict[str, bytes]) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint directory to {path}: a file of that name exists")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        # Swapping a folder of unrelated files (a project, a home directory) is never what was meant.
        raise FileExistsError(
            f"refusing to save into {path}: it holds files but no {CONFIG_FILE}, so it is not a checkpoint; "
            "pass a new or empty directory"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}{re.escape(SAVING_SUFFIX)}"))
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=SAVING_SUFFIX))
    lock = None
    try:
        lock = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        _hold(lock)  # held until the end: a later save never takes this folder for a killed save's
        os.chmod(staging, 0o777 & ~_umask())
        for name, data in files.items():
            _write_synced(staging / name, data)
        if path.is_dir():  # a model card, results or video saved beside the weights stay with them
            left_out = _carry_over(path, staging)
            if left_out:
                warnings.warn(
                    f"saving {path}: left out {', '.join(left_out)}: a save keeps the regular files and folders "
                    "beside the model, never links or special files",
                    stacklevel=4,
                )
        _fsync_path(staging)
        _swap_in(staging, path)
        _fsync_path(path.parent)
        for aside in path.parent.glob(f".{path.name}.*{OLD_SUFFIX}"):  # a cut-off save's copy, now superseded
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the old version
        if lock is not None:
            os.close(lock)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~_umask())


def _carry_over(source: Path, target: Path) -> list[str]:
    """Hard-link (else copy) into ``target`` what a user put beside the weights in ``source``:
    regular files, and folders of them, never following a link; returns what was left out."""
    left_out: list[str] = []
    for entry in os.scandir(source):
        if entry.name not in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE):
            _carry(entry, target / entry.name, left_out)
    return left_out


def _carry(entry: os.DirEntry[str], target: Path, left_out: list[str]) -> None:
    if entry.is_symlink():  # a link may lead anywhere (a dataset, the folder itself): not the model's
        left_out.append(f"{entry.path} (a link)")
    elif entry.is_file(follow_symlinks=False):
        _link_or_copy_file(entry.path, target)
    elif entry.is_dir(follow_symlinks=False):
        target.mkdir()
        for child in os.scandir(entry.path):
            _carry(child, target / child.name, left_out)
    else:
        left_out.append(f"{entry.path} ({describe_mode(entry.stat(follow_symlinks=False).st_mode)})")


def _link_or_copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target, follow_symlinks=False)  # no data copied: shared until one side replaces it
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _hold(fd: int) -> None:
    """Lock ``fd`` (a save's temporary file or folder) for as long as it is open."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _remove_stale(folder: Path, pattern: re.Pattern[str]) -> None:
    """Remove the temporary files and folders of killed saves in ``folder`` whose names match
    ``pattern``: unlocked, and unchanged for :data:`STALE_AFTER_S`. Without ``fcntl`` (Windows)
    nothing can tell a live save's from a dead one's, and nothing is removed."""
    if fcntl is None:
        return
    try:
        entries = [entry for entry in os.scandir(folder) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if time.time() - info.st_mtime < STALE_AFTER_S or not (
                stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)
            ):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live save holds it
            os.close(fd)
            continue
        try:
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the renames are still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, looked up once (``find_library`` runs a subprocess), or None."""
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(staging: Path, path: Path) -> None:
    """Make ``staging`` the directory at ``path``; the old one, if any, ends up at ``staging``."""
    if not path.exists():
        try:
            os.rename(staging, path)
            return
        except OSError as error:  # another writer created it meanwhile: swap with theirs
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(staging, path):
        return
    # No atomic exchange here: move the old copy aside, then the new one in. A crash between the
    # two renames leaves no directory at ``path``, and _read_files loads the moved-aside copy.
    aside = path.with_name(f".{path.name}.{os.getpid()}{OLD_SUFFIX}")
    os.rename(path, aside)
    os.rename(staging, path)
    os.rename(aside, staging)


def weights_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes of ``model.safetensors`` for these weights (config.json records their SHA-256)."""
    return save_safetensors_bytes(_contiguous(tensors), metadata={"format": "pt"})


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# reading ---------------------------------------------------------------------------------------
HASH_FIRST_BYTES = 64 * 2**20
"""A weight file larger than this has its layout checked against its size and is hashed as it
streams from disk, and compared with config.json, before it is read into memory: a file that is
not the one saved (a sparse 8 GB file, another model's) is refused without allocating its size.
Smaller ones are read, then hashed."""
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on its JSON header."""
DIRECTORY_READ_TRIES = 10
"""Reads of a checkpoint folder that a concurrent save swapped out while it was read, before the
last error is raised (one swap per save: a reader meets a few at most)."""
_STREAM_CHUNK = 2**20


@dataclass
class _Files:
    """A checkpoint's files as read: config.json parsed and checked, the weight files' bytes
    matching the SHA-256 it records."""

    config: dict[str, Any]
    weights: bytes
    optimizer: bytes | None


class _Missing(FileNotFoundError):
    """A checkpoint file absent from the folder's listing (retried if a save swapped the folder)."""


def _read_files(path: Path, include_optimizer: bool) -> _Files:
    shown = path  # errors name the path the caller gave
    if not path.exists() and path.suffix != ".zip" and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    if not path.exists():
        aside = sorted(path.parent.glob(f".{path.name}.*{OLD_SUFFIX}")) if path.parent.is_dir() else []
        if aside:  # a save without atomic exchange was cut between its two renames
            warnings.warn(f"{path} is missing; loading the copy a cut-off save moved aside, {aside[-1]}", stacklevel=4)
            path = aside[-1]
        else:
            raise FileNotFoundError(
                f"no checkpoint at {path} (expected a directory with {MODEL_FILE} and {CONFIG_FILE}, or a .zip)"
            )
    if path.is_dir():
        return _read_directory(path, shown, include_optimizer)
    return _read_zip(path, shown, include_optimizer)


def _read_directory(path: Path, shown: Path, include_optimizer: bool) -> _Files:
    """The checkpoint in the folder ``path``, all files read through one handle on it: a save
    swapping a new folder in meanwhile cannot pair this config.json with that one's weights.

    A save removes the old folder after swapping the new one in; a reader that opened the old one
    may then see it half removed. Whatever is missing is re-read from the folder now at ``path``
    (:data:`DIRECTORY_READ_TRIES` times), unless ``path`` is still the folder that was read."""
    for attempt in range(1, DIRECTORY_READ_TRIES + 1):
        try:
            directory = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # between the two renames of a save without atomic exchange
            if attempt == DIRECTORY_READ_TRIES:
                raise
            continue
        try:
            opened = os.fstat(directory)
            try:
                files = _read_folder(path, shown, directory, include_optimizer)
            except FileNotFoundError:
                if attempt < DIRECTORY_READ_TRIES and _swapped(path, opened):
                    continue
                raise
            expected_optimizer = include_optimizer and files.config.get("optimizer_sha256") is not None
            if files.optimizer is None and expected_optimizer and _swapped(path, opened):
                continue  # removed from the old folder before we listed it
            return files
        finally:
            os.close(directory)
    raise AssertionError("unreachable: the last try returns or raises")


def _swapped(path: Path, opened: os.stat_result) -> bool:
    """Whether ``path`` no longer names the folder that was opened (``opened`` is its fstat)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _read_folder(path: Path, shown: Path, directory: int, include_optimizer: bool) -> _Files:
    present = set(os.listdir(directory))
    for name in (CONFIG_FILE, MODEL_FILE):
        if name not in present:
            raise _Missing(f"checkpoint {shown} has no {name}")

    def open_file(name: str) -> BinaryIO:
        return open_regular(
            name,
            name=str(shown / name),
            within=path,
            within_label=f"the checkpoint folder {shown}",
            dir_fd=directory,
            error=CheckpointError,
        )

    where = str(shown / CONFIG_FILE)
    with open_file(CONFIG_FILE) as f:
        size = regular_size(f)
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{where} is {size:,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}")
        config = parse_config(_read_or_refuse(f, size, where), where)
    where = str(shown / MODEL_FILE)
    with open_file(MODEL_FILE) as f:
        weights = _read_weights(_rewinding(f), regular_size(f), where, _weights_digest(config, where))
    optimizer = None
    if include_optimizer and OPTIMIZER_FILE in present:
        where = str(shown / OPTIMIZER_FILE)
        expected = _optimizer_digest(config, where)
        with open_file(OPTIMIZER_FILE) as f:
            optimizer = _read_weights(_rewinding(f), regular_size(f), where, expected)
    return _Files(config, weights, optimizer)


def _read_or_refuse(handle: IO[bytes], size: int, where: str) -> bytes:
    try:
        return read_exactly(handle, size, where, CheckpointError)
    except OSError as error:  # e.g. EIO on a failing disk
        raise CheckpointError(f"cannot read {where}: {error}") from None


def _rewinding(handle: BinaryIO) -> Callable[[], contextlib.AbstractContextManager[IO[bytes]]]:
    """Opens ``handle`` anew for each pass over it: rewound, and left open."""

    def rewound() -> contextlib.AbstractContextManager[IO[bytes]]:
        handle.seek(0)
        return contextlib.nullcontext(handle)

    return rewound


def _read_zip(path: Path, shown: Path, include_optimizer: bool) -> _Files:
    handle = open_regular(path, error=CheckpointError)
    missing = None
    with handle:
        if not zipfile.is_zipfile(handle):
            raise CheckpointError(f"{path} is neither a checkpoint directory nor a zip archive of one")
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                entries = {info.filename: info for info in archive.infolist()}
                missing = next((name for name in (CONFIG_FILE, MODEL_FILE) if name not in entries), None)
                if missing is None:
                    return _read_entries(archive, entries, path, shown, include_optimizer)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error) as error:
            raise CheckpointError(f"{path} is a corrupted zip archive: {error}") from None
    raise FileNotFoundError(f"checkpoint {shown} has no {missing}")


def _read_entries(
    archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], path: Path, shown: Path, include_optimizer: bool
) -> _Files:
    info = entries[CONFIG_FILE]
    _check_zip_entry(info, path)
    config = parse_config(archive.read(info), str(shown / CONFIG_FILE))
    where = str(shown / MODEL_FILE)
    info = entries[MODEL_FILE]
    _check_zip_entry(info, path)
    weights = _read_weights(
        functools.partial(archive.open, info), info.file_size, where, _weights_digest(config, where)
    )
    optimizer = None
    if include_optimizer and OPTIMIZER_FILE in entries:
        where = str(shown / OPTIMIZER_FILE)
        info = entries[OPTIMIZER_FILE]
        _check_zip_entry(info, path)
        expected = _optimizer_digest(config, where)
        optimizer = _read_weights(functools.partial(archive.open, info), info.file_size, where, expected)
    return _Files(config, weights, optimizer)


def _check_zip_entry(info: zipfile.ZipInfo, path: Path) -> None:
    where = f"{path}:{info.filename}"
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{where} is encrypted; dql_agent reads only plain (stored or deflated) zip entries")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(
            f"{where} uses zip compression method {info.compress_type}; expected 0 (stored) or 8 (deflated)"
        )
    limit = MAX_CONFIG_BYTES if info.filename == CONFIG_FILE else MAX_DEFLATE_RATIO * info.compress_size + 2**20
    if info.file_size > limit:
        # zipfile stops inflating at the declared size, so checking it bounds the memory used.
        raise CheckpointError(
            f"{where} would inflate from {info.compress_size:,} to {info.file_size:,} bytes, more than the "
            f"{limit:,} allowed (config.json: {MAX_CONFIG_BYTES:,}; weights: {MAX_DEFLATE_RATIO}x): not a saved model"
        )


_Digest = tuple[str | None, Callable[[str], CheckpointError]]
"""The SHA-256 a weight file must have (None: not recorded) and the error for one that differs."""


def _weights_digest(config: dict[str, Any], where: str) -> _Digest:
    expected = config["model_sha256"]
    return expected, lambda digest: CheckpointError(
        f"{where} does not match {CONFIG_FILE} (its sha256 is {digest[:12]}..., config.json expects "
        f"{expected[:12]}...): the file is corrupted or a save was interrupted"
    )


def _optimizer_digest(config: dict[str, Any], where: str) -> _Digest:
    """The optimizer state must be the one saved with this config.json (version 1 did not record it)."""
    expected = config["optimizer_sha256"] if config["format_version"] >= ADDED_IN_VERSION["optimizer_sha256"] else None
    if config["format_version"] >= ADDED_IN_VERSION["optimizer_sha256"] and expected is None:
        raise CheckpointError(
            f"{where} is not part of this checkpoint ({CONFIG_FILE}'s optimizer_sha256 is null: it records no "
            "optimizer state): it is stale or was copied in; delete it, or load with include_optimizer=False"
        )
    return expected, lambda digest: CheckpointError(
        f"{where} does not match {CONFIG_FILE} (its sha256 is {digest[:12]}..., config.json expects "
        f"{str(expected)[:12]}...): the optimizer state is corrupted, stale or from another save"
    )


def _read_weights(
    open_stream: Callable[[], contextlib.AbstractContextManager[IO[bytes]]], size: int, where: str, digest: _Digest
) -> bytes:
    """The ``size`` bytes of a weight file, once they fit the memory budget and match the SHA-256
    config.json records; a file over :data:`HASH_FIRST_BYTES` is checked as it streams first."""
    try:
        check_budget(f"reading {where}", size)
    except MemoryBudgetError as error:
        raise CheckpointError(str(error)) from None
    expected, mismatch = digest
    if size > HASH_FIRST_BYTES:
        with open_stream() as stream:
            _check_layout(stream, size, where)
        if expected is not None:
            with open_stream() as stream:
                found = _stream_digest(stream, size, where)
            if found != expected:
                raise mismatch(found)
    with open_stream() as stream:
        data = _read_or_refuse(stream, size, where)
    found = hashlib.sha256(data).hexdigest()
    if expected is not None and found != expected:  # also what changed between the passes
        raise mismatch(found)
    return data


def _check_layout(stream: IO[bytes], size: int, where: str) -> None:
    """The safetensors header's tensors end where the file does (a padded, sparse or cut file does
    not), read without reading the tensors."""
    bad = f"{where} is not a valid safetensors file (truncated or corrupted?)"
    length = int.from_bytes(stream.read(8), "little")
    if length < 2 or length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{bad}: its header length is {length:,} bytes, in a file of {size:,}")
    try:
        header = json.loads(stream.read(length))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise CheckpointError(f"{bad}: unreadable header: {error!r}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
            raise CheckpointError(f"{bad}: tensor {key!r} has data_offsets {offsets!r}")
        end = max(end, int(offsets[1]))
    if 8 + length + end != size:
        raise CheckpointError(
            f"{bad}: its header declares {end:,} bytes of tensors, the file holds {size - 8 - length:,} after "
            "the header"
        )


def _stream_digest(stream: IO[bytes], size: int, where: str) -> str:
    digest, left = hashlib.sha256(), size
    while left > 0:
        chunk = stream.read(min(_STREAM_CHUNK, left))
        if not chunk:
            raise CheckpointError(f"{where} shrank while it was read (expected {size:,} bytes)")
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def parse_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{where} is not a valid safetensors file (truncated or corrupted?): {error}") from None


def _safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    # Header: 8-byte little-endian length, then that many bytes of JSON.
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{where} has an unreadable header: {error!r}") from None


def parse_config(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check a ``config.json``: known keys only, all present, a supported version."""
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{where} is {len(data):,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}")
    try:
        config = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where} is not valid JSON: {error}") from None
    except RecursionError:
        raise CheckpointError(f"{where} is nested too deeply to be a config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: format_version must be an int, got {version!r}")
    if version < 1:
        raise CheckpointError(f"{where}: format_version must be >= 1, got {version}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format_version {version}, newer than this dql_agent supports "
            f"({FORMAT_VERSION}); written by dql_agent {config.get('library_version')!r}: upgrade dql_agent"
        )
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"{where} has unknown key(s) {unknown}; expected {list(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in config and version >= ADDED_IN_VERSION.get(k, 1)]
    if missing:
        raise CheckpointError(f"{where} is missing key(s) {missing}")
    for key, kind in (
        ("config", dict),
        ("observation_space", dict),
        ("action_space", dict),
        ("metadata", dict),
        ("algorithm", str),
        ("num_timesteps", int),
        ("model_sha256", str),
    ):
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise CheckpointError(f"{where}: {key} must be a {kind.__name__}, got {type(config[key]).__name__}")
    if config["num_timesteps"] < 0:
        raise CheckpointError(f"{where}: num_timesteps must be >= 0, got {config['num_timesteps']}")
    for key in ("model_sha256", "optimizer_sha256"):
        digest = config.get(key)
        if not (digest is None and key == "optimizer_sha256") and not _is_sha256(digest):
            raise CheckpointError(f"{where}: {key} must be a 64-digit hex SHA-256, got {digest!r}")
    return config


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def verify_weights(config: dict[str, Any], weights: bytes, where: str) -> None:
    """The weights must be the ones config.json was saved with (catches torn saves and bit rot)."""
    expected, mismatch = _weights_digest(config, where)
    digest = hashlib.sha256(weights).hexdigest()
    if digest != expected:
        raise mismatch(digest)


def load_checkpoint(path: str | os.PathLike, include_optimizer: bool = True) -> Checkpoint:
    """Read a checkpoint directory or zip; every problem is a :class:`CheckpointError` naming the
    file. Only regular files are read (a FIFO or device is refused, not opened for reading), none
    through a link that leaves the checkpoint folder, and none larger than the memory budget
    (:mod:`dql_agent.limits`); the weights are checked against config.json's SHA-256 before they are
    parsed, and the optimizer state is not read at all without ``include_optimizer``."""
    path = Path(path)
    files = _read_files(path, include_optimizer)
    tensors = parse_safetensors(files.weights, str(path / MODEL_FILE))
    checkpoint = Checkpoint(files.config, tensors)
    if files.optimizer is not None:
        where = str(path / OPTIMIZER_FILE)
        checkpoint.optimizer_tensors = parse_safetensors(files.optimizer, where)
        try:
            meta = json.loads(_safetensors_metadata(files.optimizer, where).get("state", "{}"))
        except ValueError as error:
            raise CheckpointError(f"{where} has unreadable training state: {error}") from None
        except RecursionError:
            raise CheckpointError(f"{where}: its training state is nested too deeply to be a saved one") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: its training state must be a JSON object, got {type(meta).__name__}")
        checkpoint.optimizer_meta = meta
    return checkpoint


def check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Same names, shapes and dtypes, every float finite, or a CheckpointError listing the
    differences. ``expected`` may live on the meta device (nothing allocated)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in expected
        if k in found and expected[k].shape != found[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shapes disagree with config.json: " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    for name, tensor in found.items():
        if tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"{where}: tensor {name} has dtype {tensor.dtype}, expected {expected[name].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf values")


def check_json_like(expected: Any, found: Any, where: str) -> None:
    """``found`` has the structure and value types of ``expected`` (ints and floats interchange;
    numbers finite; a dict may lack keys, as one saved by an older torch does, but has no others):
    optimizer param groups and scheduler states from a file are checked against a fresh model's
    before torch takes them."""
    if isinstance(expected, dict):
        if not isinstance(found, dict) or not set(found) <= set(expected):
            raise CheckpointError(f"{where}: expected keys {sorted(expected)}, found {_describe(found)}")
        for key in found:
            check_json_like(expected[key], found[key], f"{where}.{key}")
        if "params" in expected and found.get("params", expected["params"]) != expected["params"]:
            raise CheckpointError(f"{where}.params: expected {expected['params']}, found {found['params']}")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(found, (list, tuple)) or len(found) != len(expected):
            raise CheckpointError(f"{where}: expected {len(expected)} entries, found {_describe(found)}")
        for i, (e, f) in enumerate(zip(expected, found, strict=True)):
            check_json_like(e, f, f"{where}[{i}]")
    elif isinstance(expected, bool) or expected is None or isinstance(expected, str):
        if type(found) is not type(expected):
            raise CheckpointError(f"{where}: expected {expected!r}-like {type(expected).__name__}, found {found!r}")
    elif isinstance(expected, (int, float)):
        if isinstance(found, bool) or not isinstance(found, (int, float)) or not math.isfinite(found):
            raise CheckpointError(f"{where}: expected a finite number, found {found!r}")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"keys {sorted(value)[:8]}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} entries"
    return repr(value)[:80]


# optimizer state <-> flat tensors ----------------------------------------------------------------
def optimizer_to_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` into named tensors plus JSON-safe param groups."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}.{index}.{key}"] = tensor
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_from_tensors(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str
) -> None:
    """Inverse of :func:`optimizer_to_tensors`, loaded into ``optimizer`` once every tensor's
    parameter index, shape and finiteness and the param groups' structure are checked (torch's
    ``load_state_dict`` checks none of them)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    prefix = f"{name}."
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        index_text, _, field_name = key[len(prefix) :].partition(".")
        if not index_text.isdigit() or int(index_text) >= len(params) or not field_name:
            raise CheckpointError(f"{where}: tensor {key} names no parameter of {name} ({len(params)} parameters)")
        param = params[int(index_text)]
        if tensor.ndim and tensor.shape != param.shape:
            raise CheckpointError(
                f"{where}: tensor {key} has shape {tuple(tensor.shape)}, its parameter {tuple(param.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: tensor {key} holds NaN or inf values")
        state.setdefault(int(index_text), {})[field_name] = tensor
    fresh_groups = optimizer_to_tensors(name, optimizer)[1]["param_groups"]
    check_json_like(fresh_groups, meta.get("param_groups"), f"{where}: {name}.param_groups")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# restoring a model ------------------------------------------------------------------------------
def checked_config(
    checkpoint: Checkpoint,
    where: str,
    *,
    algorithm: str,
    config_class: Any,
    policy_class: Any,
    overrides: dict[str, Any],
) -> tuple[SavedConfig, Any]:
    """config.json's contents and the algorithm config they build (saved hyperparameters with
    ``overrides`` on top), once the weights are known to fit the policy that config describes.

    The policy is built on the meta device (no memory): its tensors are compared with the file's
    before the real model allocates anything. Every problem is a CheckpointError naming ``where``.
    """
    saved = read_config(checkpoint.config, where)
    if saved.algorithm != algorithm:
        raise CheckpointError(
            f"{where}/config.json holds a {saved.algorithm} model; load it with that class "
            f"(or dql_agent.load_from_hub, which picks the class) instead of {algorithm}"
        )
    try:
        config = config_class.from_saved({**saved.hyperparameters, **overrides})
        with torch.device("meta"):
            expected = policy_class(saved.observation_space, saved.action_space, config).state_dict()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}/config.json: {error}") from None
    check_tensors(expected, checkpoint.tensors, f"{where}/{MODEL_FILE}")
    return saved, config


def restore_training_state(
    checkpoint: Checkpoint,
    where: str,
    optimizers: dict[str, torch.optim.Optimizer],
    fresh: tuple[dict[str, torch.Tensor], dict[str, Any]],
    rng_device: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Load the saved optimizer states into ``optimizers`` and check the rest of the training state
    (RNG states, schedulers) against ``fresh``, what a new model of the same config holds; returns
    the checked tensors and JSON state for the model's ``load_training_state``, and ``n_updates``.

    A training RNG state saved by a generator of another device type (``rng_device``: where this
    model's generator lives) means nothing here: it is dropped, with a warning, and the update's
    random draws start a fresh stream.
    """
    where = f"{where}/{OPTIMIZER_FILE}"
    assert checkpoint.optimizer_tensors is not None  # the caller checks there is training state
    tensors, meta = checkpoint.optimizer_tensors, checkpoint.optimizer_meta
    fresh_tensors, fresh_meta = dict(fresh[0]), fresh[1]
    try:
        for name, optimizer in optimizers.items():
            optimizer_from_tensors(name, optimizer, tensors, meta[name], where)
        n_updates = meta["n_updates"]
        if isinstance(n_updates, bool) or not isinstance(n_updates, int) or n_updates < 0:
            raise CheckpointError(f"{where}: n_updates must be an int >= 0, got {n_updates!r}")
        saved_device = meta.get("rng_device", rng_device)  # absent before 0.2
        if saved_device != rng_device:
            warnings.warn(
                f"{where}: the training RNG state is a {saved_device} generator's and this model trains on "
                f"{rng_device}: its random draws start a fresh stream",
                stacklevel=4,
            )
            tensors = {k: v for k, v in tensors.items() if k != "rng.train"}
            fresh_tensors.pop("rng.train")
        found_meta = {key: meta[key] for key in fresh_meta if key != "rng_device" or key in meta}
        check_json_like({k: fresh_meta[k] for k in found_meta}, found_meta, where)
        for key, tensor in fresh_tensors.items():
            found = tensors[key]
            if found.shape != tensor.shape or found.dtype != tensor.dtype:
                raise CheckpointError(
                    f"{where}: {key} has shape {tuple(found.shape)} and dtype {found.dtype}, "
                    f"expected {tuple(tensor.shape)} and {tensor.dtype}"
                )
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{where} does not match the model: {error!r}") from None
    return tensors, meta, int(n_updates)
