"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``optimizer.safetensors``), no pickle.

A checkpoint is a directory, or the same files in a ``.zip`` archive when the path ends in
``.zip`` (SB3's ``CheckpointCallback`` names its saves ``*.zip``). Every file is written to a
temporary name in the same directory, fsynced and renamed, so a crash mid-save leaves the
previous file intact. Loading parses JSON and safetensors only: nothing in a checkpoint can run
code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from dql_agent.spaces import space_from_json, space_to_json

FORMAT_VERSION = 1
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
)


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
        "metadata": metadata,
    }


def read_config(config: dict[str, Any], where: str) -> SavedConfig:
    """The parts of a parsed config.json a model is rebuilt from; bad spaces or seed are a
    CheckpointError naming ``where``."""
    try:
        observation_space = space_from_json(config["observation_space"], "observation_space")
        action_space = space_from_json(config["action_space"], "action_space")
    except ValueError as error:
        raise CheckpointError(f"{where}/{CONFIG_FILE}: {error}") from None
    seed = config["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CheckpointError(f"{where}/{CONFIG_FILE}: seed must be an int, got {seed!r}")
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

    ``config.json`` records the SHA-256 of ``model.safetensors``. In a directory the weights are
    renamed into place first and the config last, so a crash between the two renames (the only
    window where the files disagree) is caught on load instead of pairing a config with other
    weights.
    """
    path = Path(path)
    weights = weights_bytes(checkpoint.tensors)
    config = {**checkpoint.config, "model_sha256": hashlib.sha256(weights).hexdigest()}
    files = {MODEL_FILE: weights}
    if checkpoint.optimizer_tensors is not None:
        meta = {"format": "pt", "state": json.dumps(checkpoint.optimizer_meta)}
        files[OPTIMIZER_FILE] = save_safetensors_bytes(_contiguous(checkpoint.optimizer_tensors), metadata=meta)
    files[CONFIG_FILE] = json.dumps(config, indent=2).encode()
    if path.suffix == ".zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        atomic_write(path, buffer.getvalue())
        return path
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(path / name, data)
    if checkpoint.optimizer_tensors is None:
        (path / OPTIMIZER_FILE).unlink(missing_ok=True)  # never leave a stale optimizer state behind
    return path


def weights_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The bytes of ``model.safetensors`` for these weights (config.json records their SHA-256)."""
    return save_safetensors_bytes(_contiguous(tensors), metadata={"format": "pt"})


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# reading ---------------------------------------------------------------------------------------
def _read_files(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir() if p.name in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE)}
    if not path.exists() and path.suffix != ".zip" and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path} (expected a directory with {MODEL_FILE} and {CONFIG_FILE}, or a .zip)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a zip archive of one")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            return {n: archive.read(n) for n in (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE) if n in names}
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path} is a corrupted zip archive: {error}") from None


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
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: format_version must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format_version {version}, newer than this dql_agent supports "
            f"({FORMAT_VERSION}); written by dql_agent {config.get('library_version')!r}: upgrade dql_agent"
        )
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"{where} has unknown key(s) {unknown}; expected {list(CONFIG_KEYS)}")
    missing = [k for k in CONFIG_KEYS if k not in config]
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
    return config


def verify_weights(config: dict[str, Any], weights: bytes, where: str) -> None:
    """The weights must be the ones config.json was saved with (catches torn saves and bit rot)."""
    digest = hashlib.sha256(weights).hexdigest()
    if digest != config["model_sha256"]:
        raise CheckpointError(
            f"{where} does not match {CONFIG_FILE} (its sha256 is {digest[:12]}..., config.json expects "
            f"{config['model_sha256'][:12]}...): the file is corrupted or a save was interrupted"
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
        checkpoint.optimizer_tensors = parse_safetensors(files[OPTIMIZER_FILE], where)
        try:
            checkpoint.optimizer_meta = json.loads(
                _safetensors_metadata(files[OPTIMIZER_FILE], where).get("state", "{}")
            )
        except ValueError as error:
            raise CheckpointError(f"{where} has unreadable training state: {error}") from None
    return checkpoint


def check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Same names and shapes, or a CheckpointError listing the differences."""
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
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_tensors`, loaded into ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    prefix = f"{name}."
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            index, field_name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field_name] = tensor
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
