"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``optimizer.safetensors``), no pickle.

A checkpoint is a directory, or the same files in a ``.zip`` archive when the path ends in
``.zip`` (SB3's ``CheckpointCallback`` names its saves ``*.zip``).

Saving never destroys the last good checkpoint: a ``.zip`` is written to a temporary name,
fsynced and renamed over the old one; a directory is written whole as a hidden sibling
(``.NAME.*.saving``) and swapped in with one atomic exchange (Linux ``renameat2``; elsewhere two
renames, and a load finds the moved-aside old copy if a crash falls between them). A failed,
killed or concurrent save therefore leaves the old checkpoint or the new one, never a mix.
config.json records the SHA-256 of the weights and of the optimizer state, so nothing stale or
torn is ever paired with it.

Loading parses JSON and safetensors only: nothing in a checkpoint can run code. Sizes are bounded
before anything is allocated (config.json, what a zip entry may inflate to), and every tensor is
checked for name, shape, dtype and finiteness before a model takes it.
"""

from __future__ import annotations

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
import shutil
import stat
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dql_agent.config import check_seed, to_json_safe
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
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsynced and renamed:
    a crash leaves the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=SAVING_SUFFIX))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for name, data in files.items():
            _write_synced(staging / name, data)
        if path.is_dir():  # a model card, results or video saved beside the weights stay with them
            for extra in path.iterdir():
                if extra.name not in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE):
                    _link_or_copy(extra, staging / extra.name)
        _fsync_path(staging)
        _swap_in(staging, path)
        _fsync_path(path.parent)
        for aside in path.parent.glob(f".{path.name}.*{OLD_SUFFIX}"):  # a cut-off save's copy, now superseded
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the old version


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~_umask())


def _link_or_copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(source, target)


def _link_or_copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)  # no data copied: the file is shared until one side replaces it
    except OSError:
        shutil.copy2(source, target)


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
def _read_files(path: Path) -> dict[str, bytes]:
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
        for _ in range(3):
            try:
                return _read_directory(path)
            except FileNotFoundError:  # a concurrent save swapped the directory while we read it
                continue
        return _read_directory(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a zip archive of one")
    try:
        with zipfile.ZipFile(path) as archive:
            return {
                info.filename: _read_zip_entry(archive, info, path)
                for info in archive.infolist()
                if info.filename in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE)
            }
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error) as error:
        raise CheckpointError(f"{path} is a corrupted zip archive: {error}") from None


def _read_directory(path: Path) -> dict[str, bytes]:
    """The checkpoint files of one directory, all read through one handle on it: a save swapping
    a new directory in meanwhile cannot pair this config.json with that one's weights."""
    directory = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        present = set(os.listdir(directory))
        names = [name for name in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE) if name in present]
        return {name: _read_file(path, name, directory) for name in names}
    finally:
        os.close(directory)


def _read_file(folder: Path, name: str, directory: int) -> bytes:
    where = folder / name
    fd = os.open(name, os.O_RDONLY, dir_fd=directory)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointError(f"{where} is not a regular file")
    if name == CONFIG_FILE and info.st_size > MAX_CONFIG_BYTES:
        os.close(fd)
        raise CheckpointError(f"{where} is {info.st_size:,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}")
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError as error:
            raise CheckpointError(f"cannot read {where}: {error}") from None


def _read_zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
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
    return archive.read(info)


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
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where} has an unreadable header: {error}") from None


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
    digest = hashlib.sha256(weights).hexdigest()
    if digest != config["model_sha256"]:
        raise CheckpointError(
            f"{where} does not match {CONFIG_FILE} (its sha256 is {digest[:12]}..., config.json expects "
            f"{config['model_sha256'][:12]}...): the file is corrupted or a save was interrupted"
        )


def _verify_optimizer(config: dict[str, Any], data: bytes, where: str) -> None:
    """The optimizer state must be the one saved with this config.json (version 1 did not record it)."""
    if config["format_version"] < ADDED_IN_VERSION["optimizer_sha256"]:
        return
    expected = config["optimizer_sha256"]
    if expected is None:
        raise CheckpointError(
            f"{where} is not part of this checkpoint ({CONFIG_FILE}'s optimizer_sha256 is null: it records no "
            "optimizer state): it is stale or was copied in; delete it, or load with include_optimizer=False"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise CheckpointError(
            f"{where} does not match {CONFIG_FILE} (its sha256 is {digest[:12]}..., config.json expects "
            f"{expected[:12]}...): the optimizer state is corrupted, stale or from another save"
        )


def load_checkpoint(path: str | os.PathLike, include_optimizer: bool = True) -> Checkpoint:
    """Read a checkpoint directory or zip; every problem is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    files = _read_files(path)
    for name in (CONFIG_FILE, MODEL_FILE):
        if name not in files:
            raise FileNotFoundError(f"checkpoint {path} has no {name}")
    config = parse_config(files[CONFIG_FILE], str(path / CONFIG_FILE))
    verify_weights(config, files[MODEL_FILE], str(path / MODEL_FILE))
    tensors = parse_safetensors(files[MODEL_FILE], str(path / MODEL_FILE))
    checkpoint = Checkpoint(config, tensors)
    if include_optimizer and OPTIMIZER_FILE in files:
        where = str(path / OPTIMIZER_FILE)
        _verify_optimizer(config, files[OPTIMIZER_FILE], where)
        checkpoint.optimizer_tensors = parse_safetensors(files[OPTIMIZER_FILE], where)
        try:
            checkpoint.optimizer_meta = json.loads(
                _safetensors_metadata(files[OPTIMIZER_FILE], where).get("state", "{}")
            )
        except ValueError as error:
            raise CheckpointError(f"{where} has unreadable training state: {error}") from None
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
