"""Minari datasets in, with the episode alignment done right.

A Minari episode of ``T`` steps stores ``T + 1`` observations (the reset observation plus one
per step) and ``T`` actions, rewards, terminations and truncations. Flat transition arrays
therefore take ``observations = obs[:-1]`` and ``next_observations = obs[1:]`` *per episode*.
Concatenating the ``T + 1`` observations of all episodes first (as d3rlpy's ``get_minari`` does)
shifts every later episode by one step; :func:`minari_to_transitions` never does that.

Writing datasets is :func:`dql_agent.integrations.minari.write_minari_dataset`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

from dql_agent.files import describe_mode, is_inside, open_regular, read_exactly, regular_size
from dql_agent.limits import check_budget
from dql_agent.observations import as_float32, check_observation_space, flatten, has_images, raw_tree, tree_from_arrays
from dql_agent.readers.arrays import walk_hdf5
from dql_agent.transitions import episode_flags, flat_rows

__all__ = [
    "MinariDatasetNotFoundError",
    "check_available",
    "check_dataset_files",
    "check_dataset_id",
    "download_hint",
    "load_minari_dataset",
    "minari_metadata",
    "minari_to_transitions",
]

# Minari ids are "(namespace/)name-vN"; minari itself crashes with a TypeError without "-vN".
_VERSIONED_ID = re.compile(r"-v\d+$")

_FLOAT_KEYS = ("observations", "next_observations", "actions", "rewards")
METADATA_FILE, HDF5_FILE = "metadata.json", "main_data.hdf5"  # minari's names
_EPISODE_GROUP = re.compile(r"episode_\d+")
MAX_METADATA_BYTES = 64 * 2**20
"""metadata.json holds ids, spaces and scores: kilobytes; a space of many keys stays well under this."""
MAX_FOLDER_DEPTH = 8
"""Deepest folders in a dataset's data (an arrow store is data/<episode>/<files>)."""

DEFAULT_REMOTE = "hf://farama-minari"  # minari's own default for $MINARI_REMOTE
_DOWNLOAD_HINT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "minari_download_hint", default="pass download=True to fetch it"
)


class MinariDatasetNotFoundError(FileNotFoundError):
    """A Minari dataset that is not stored locally (and was not to be downloaded).

    ``dataset_id`` and ``path`` (the folder searched) say which; the message says how to fetch it
    in the words of the caller (``download=True`` in Python, ``--download`` on the command line)."""

    def __init__(self, message: str, dataset_id: str, path: Path) -> None:
        super().__init__(message)
        self.dataset_id, self.path = dataset_id, path


@contextlib.contextmanager
def download_hint(text: str) -> Iterator[None]:
    """Within the block, a missing dataset's message tells its reader ``text`` (how to download
    in their interface, e.g. "pass --download to fetch it") instead of ``download=True``."""
    token = _DOWNLOAD_HINT.set(text)
    try:
        yield
    finally:
        _DOWNLOAD_HINT.reset(token)


def check_dataset_id(dataset_id: str) -> None:
    valid = isinstance(dataset_id, str) and _VERSIONED_ID.search(dataset_id) is not None
    if valid:
        try:
            parse_dataset_id(dataset_id)  # minari's own grammar, e.g. namespaces of 2+ characters
        except ValueError:
            valid = False
    if not valid:
        raise ValueError(
            f"dataset id {dataset_id!r} is not a Minari id: expected '(namespace/)name-vN' "
            "(letters, digits, '-' and '_'), e.g. 'mujoco/hopper/medium-v0'"
        )


def load_minari_dataset(dataset_or_id: str | minari.MinariDataset, download: bool = False) -> minari.MinariDataset:
    """Return a :class:`minari.MinariDataset`, loading it from the local store when given an id.

    Args:
        dataset_or_id: a ``MinariDataset`` (returned as is) or an id such as
            ``"mujoco/hopper/medium-v0"``.
        download: fetch the dataset from Minari's remote (``MINARI_REMOTE``, default the
            ``farama-minari`` Hugging Face organisation) when it is not stored locally.

    Raises:
        ValueError: the id lacks the ``-vN`` version suffix.
        MinariDatasetNotFoundError: (a ``FileNotFoundError``) the dataset is not stored locally and
            ``download`` is False. The message names the directory searched
            (``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``) and how to download it.
        HubUnreachableError: (a ``ConnectionError``) ``download`` is True, the dataset is not
            local, and Minari's remote (a Hugging Face Hub endpoint) cannot be reached or
            ``HF_HUB_OFFLINE`` is set; the message says how to work offline. Found within seconds
            (one probe of the endpoint), not after the client's retries.
    """
    if isinstance(dataset_or_id, minari.MinariDataset):
        return dataset_or_id
    check_dataset_id(dataset_or_id)
    path = Path(get_dataset_path(dataset_or_id))
    if not (path / "data").exists():
        if not download:
            raise _not_found(dataset_or_id, path)
        return _download(dataset_or_id, path)
    _refuse_spaces_from_code(path / "data", dataset_or_id)
    return minari.load_dataset(dataset_or_id, download=download)


def check_available(dataset_id: str, download: bool = False) -> None:
    """Raise now what :func:`load_minari_dataset` would raise for a dataset that is not local:
    :class:`MinariDatasetNotFoundError` without ``download``, :class:`HubUnreachableError` when
    Minari's Hub remote cannot be reached or offline mode is on (one probe, seconds). A local
    dataset, or one that can be downloaded, passes (nothing is downloaded)."""
    check_dataset_id(dataset_id)
    path = Path(get_dataset_path(dataset_id))
    if (path / "data").exists():
        return
    if not download:
        raise _not_found(dataset_id, path)
    _probe_remote(dataset_id, path)


def _not_found(dataset_id: str, path: Path) -> MinariDatasetNotFoundError:
    root = "$MINARI_DATASETS_PATH" if "MINARI_DATASETS_PATH" in os.environ else "the default"
    return MinariDatasetNotFoundError(
        f"Minari dataset {dataset_id!r} is not stored locally: looked in {path} ({root} "
        "root; datasets live under $MINARI_DATASETS_PATH, else ~/.minari/datasets). "
        f"{_sentence(_DOWNLOAD_HINT.get())}, or run `minari download {dataset_id}`.",
        dataset_id,
        path,
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _probe_remote(dataset_id: str, path: Path) -> str | None:
    """The Hub endpoint behind Minari's remote (None for a remote that is not on the Hub), after
    checking it can be reached: else :class:`HubUnreachableError`."""
    from dql_agent.hub_access import connection_error, offline_mode, reason

    if not os.environ.get("MINARI_REMOTE", DEFAULT_REMOTE).startswith("hf://"):
        return None
    from huggingface_hub import constants

    endpoint = str(constants.ENDPOINT)
    if offline_mode():
        raise _unreachable(dataset_id, path, endpoint, "HF_HUB_OFFLINE is set (unset it to download)")
    error = connection_error(endpoint)
    if error is not None:
        raise _unreachable(dataset_id, path, endpoint, f"no connection to {endpoint} ({reason(error)})") from None
    return endpoint


def _download(dataset_id: str, path: Path) -> minari.MinariDataset:
    """Download a dataset with minari, then load it, with a Hub remote's offline and unreachable
    cases as one :class:`HubUnreachableError` (other remotes, e.g. ``gcp://``, are left to minari)."""
    from dql_agent.hub_access import is_connection_error, reason

    endpoint = _probe_remote(dataset_id, path)
    if endpoint is None:
        return minari.load_dataset(dataset_id, download=True)
    try:
        minari.download_dataset(dataset_id)
    except Exception as failure:
        if not is_connection_error(failure):
            raise
        why = f"the connection to {endpoint} failed ({reason(failure)})"
        raise _unreachable(dataset_id, path, endpoint, why) from None
    _refuse_spaces_from_code(path / "data", dataset_id)  # before minari reads it
    return minari.load_dataset(dataset_id)


def _unreachable(dataset_id: str, path: Path, endpoint: str, why: str) -> Exception:
    from dql_agent.hub_access import HubUnreachableError

    return HubUnreachableError(
        f"cannot download Minari dataset {dataset_id!r} from {os.environ.get('MINARI_REMOTE', DEFAULT_REMOTE)}: "
        f"{why}. To work offline, download it where there is a network (`minari download {dataset_id}`) and copy "
        f"it to {path} (or point $MINARI_DATASETS_PATH at a copy), or train on your own data (a Minari dataset "
        "written with dql_agent.integrations.minari.write_minari_dataset, or a D4RL-style .npz)",
        endpoint,
        dataset_id,
    )


def _refuse_spaces_from_code(data_path: Path, dataset_id: str) -> None:
    """Check a local dataset before minari opens any of it (:func:`check_dataset_files`), and
    refuse one whose metadata lacks its spaces: minari would then make the env named in its
    ``env_spec`` (importing its entry point's module), code named in a file."""
    metadata = check_dataset_files(data_path, dataset_id)
    missing = [key for key in ("observation_space", "action_space") if key not in metadata]
    if missing:
        raise ValueError(
            f"Minari dataset {dataset_id!r} stores no {' or '.join(missing)} in {data_path}/metadata.json; "
            "minari would build them by making the env its env_spec names, which imports code named in a "
            "file. Recreate the dataset with its spaces (minari.create_dataset_from_buffers(..., "
            "observation_space=..., action_space=...))"
        )


def check_dataset_files(data_path: Path, dataset_id: str) -> dict[str, Any]:
    """Check the files of a local Minari dataset (its ``data`` folder) before minari reads them;
    returns the parsed ``metadata.json``.

    Minari opens its files with plain ``open`` and trusts what they declare. Here, first: every
    entry is a folder or a regular file (a FIFO would block minari forever, a device feed it
    endless bytes), no link leads out of the dataset; ``metadata.json`` is at most
    :data:`MAX_METADATA_BYTES`, its ``total_episodes`` and ``total_steps`` are ints >= 0 and
    ``total_episodes`` is the number of episodes the data holds (minari allocates an index of that
    many); the spaces' declared shapes fit the memory budget; an HDF5 store holds no external
    links, external storage or virtual datasets, every dataset stores what it declares, and all of
    them together fit the memory budget (:mod:`dql_agent.readers.arrays`)."""
    where = f"Minari dataset {dataset_id!r}"
    root = data_path.parent
    _check_entries(data_path, root, where)
    with open_regular(
        data_path / METADATA_FILE,
        within=root,
        within_label=f"the dataset folder {root}",
        name=f"{data_path}/{METADATA_FILE}",
    ) as f:
        size = regular_size(f)
        if size > MAX_METADATA_BYTES:
            raise ValueError(
                f"{where}: {data_path}/{METADATA_FILE} is {size:,} bytes; at most {MAX_METADATA_BYTES:,} are read"
            )
        text = read_exactly(f, size, f"{data_path}/{METADATA_FILE}")
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{where}: {data_path}/{METADATA_FILE} is not valid JSON: {error!r}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: {data_path}/{METADATA_FILE} must hold a JSON object, got {type(metadata).__name__}")
    for key in ("total_episodes", "total_steps"):
        value = metadata.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {METADATA_FILE} {key} must be an int >= 0, got {value!r}")
    for key in ("observation_space", "action_space"):
        if key in metadata:
            _check_space_size(metadata[key], f"{where}: {METADATA_FILE} {key}")
    held = _count_episodes(data_path, metadata.get("data_format", "hdf5"), where)
    if metadata.get("total_episodes", 0) != held:
        raise ValueError(
            f"{where}: {METADATA_FILE} declares total_episodes {metadata.get('total_episodes', 0):,}, but the data "
            f"in {data_path} holds {held:,} episodes"
        )
    return metadata


def _check_entries(folder: Path, root: Path, where: str, depth: int = 0) -> None:
    """Every entry under ``folder`` is a folder or a regular file, and no link leaves ``root``."""
    if depth > MAX_FOLDER_DEPTH:
        raise ValueError(f"{where}: {folder} nests folders deeper than {MAX_FOLDER_DEPTH} levels; refused")
    for entry in os.scandir(folder):
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            if not is_inside(entry.path, root):
                real = os.path.realpath(entry.path)
                raise ValueError(f"{where}: {entry.path} is a link that leads out of the dataset (to {real}); refused")
            mode = os.stat(entry.path).st_mode
        if stat.S_ISDIR(mode):
            if not entry.is_symlink():  # a link inside the dataset is checked where it leads
                _check_entries(Path(entry.path), root, where, depth + 1)
        elif not stat.S_ISREG(mode):
            raise ValueError(f"{where}: {entry.path} is not a regular file: it is {describe_mode(mode)}; refused")


def _check_space_size(serialized: Any, where: str) -> None:
    """A serialized space's Box shapes, whose bounds minari allocates, fit the memory budget."""
    try:
        space = json.loads(serialized) if isinstance(serialized, str) else serialized
        elements = _space_elements(space)
    except (ValueError, RecursionError, TypeError, OverflowError) as error:
        raise ValueError(f"{where} is not a serialized space: {error!r}") from None
    check_budget(f"{where} (the bounds of {elements:,} elements)", 16 * elements)


def _space_elements(space: Any) -> int:
    if not isinstance(space, dict):
        return 0
    total = 0
    shape = space.get("shape")
    if isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        total += math.prod(max(n, 0) for n in shape)
    for sub in (space.get("subspaces") or {}).values() if isinstance(space.get("subspaces"), dict) else []:
        total += _space_elements(sub)
    return total


def _count_episodes(data_path: Path, data_format: Any, where: str) -> int:
    """The episodes the data holds, after checking an HDF5 store (see :func:`check_dataset_files`)."""
    if data_format == "arrow":
        return sum(1 for entry in os.scandir(data_path) if entry.is_dir() and entry.name.isdigit())
    if data_format != "hdf5":
        raise ValueError(f"{where}: {METADATA_FILE} data_format must be 'hdf5' or 'arrow', got {data_format!r}")
    import h5py

    name = f"{data_path}/{HDF5_FILE}"
    with open_regular(data_path / HDF5_FILE, name=name, within=data_path.parent, within_label="the dataset") as handle:
        try:
            with h5py.File(handle, "r") as f:
                check_budget(f"reading {name}", sum(nbytes for _, _, nbytes in walk_hdf5(f, name)))
                return sum(1 for key in f if _EPISODE_GROUP.fullmatch(key))
        except OSError as error:  # h5py's words for a file that is not HDF5
            raise ValueError(f"{where}: {name} is not a readable HDF5 file: {error}") from None


def minari_to_transitions(dataset: str | minari.MinariDataset) -> dict[str, Any]:
    """Flatten a Minari dataset into transition arrays, aligned per episode.

    For each episode of ``T`` steps, ``observations`` are its ``obs[:-1]`` and
    ``next_observations`` its ``obs[1:]``, so no transition crosses an episode boundary.

    Observation spaces may be a Box or a Dict of Boxes (nested Dicts too, as in goal-conditioned
    robotics with ``achieved_goal``/``desired_goal``/``observation``). Dicts are flattened exactly
    like ``gymnasium.spaces.flatten(dataset.observation_space, obs)``: each Box in C order, the
    sub-spaces concatenated in the Dict space's key order, which gymnasium sorts alphabetically
    for plain dicts (so ``achieved_goal, desired_goal, observation``).

    Camera datasets (a uint8 [0, 255] image Box, alone or in the Dict) are not flattened: their
    ``observations`` and ``next_observations`` are observation trees (see
    :mod:`dql_agent.observations`), a dict from key to (N, *shape) arrays, uint8 images kept uint8.

    Args:
        dataset: a ``MinariDataset`` or a local dataset id.

    Returns:
        ``observations`` (N, obs_dim) float32, ``actions`` (N, act_dim) float32, ``rewards`` (N,)
        float32, ``next_observations`` (N, obs_dim) float32, ``terminals`` (N,) bool (from
        ``terminations``) and ``timeouts`` (N,) bool (from ``truncations``), N = total steps. A
        step both terminated and truncated (gymnasium's ``TimeLimit`` reports both when the
        limit falls on a terminal step) is terminal, with ``timeouts`` False, as in
        :class:`~dql_agent.OfflineBuffer`.

    Raises:
        TypeError: the observation or action space is not a Box (or a Dict of Boxes for
            observations), e.g. Discrete, Tuple or Text; or complex/non-numeric stored data.
        ValueError: an episode does not hold ``T + 1`` observations for ``T`` actions; NaN/inf or
            values too large for float32 (naming the key and the first row); terminations or
            truncations that are neither bool nor 0/1.
    """
    dataset = load_minari_dataset(dataset)
    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(act_space, gym.spaces.Box):
        raise TypeError(f"action space {act_space} is not supported: expected a Box, got {type(act_space).__name__}")
    check_observation_space(obs_space)

    columns: dict[str, list[np.ndarray]] = {
        "observations": [],
        "next_observations": [],
        "actions": [],
        "rewards": [],
        "terminals": [],
        "timeouts": [],
    }
    images = has_images(obs_space)
    trees: dict[str, dict[str, list[np.ndarray]]] = {"observations": {}, "next_observations": {}}
    for episode in dataset.iterate_episodes():
        n_steps = len(episode.rewards)
        if images:  # kept by key, images as uint8 (a float32 copy of a camera dataset is 4x larger)
            tree = tree_from_arrays(obs_space, episode.observations, f"episode {episode.id} observations")
            rows = len(next(iter(tree.values())))
        else:
            # (T+1, obs_dim), checked and cast once over all episodes below
            obs = flatten(obs_space, raw_tree(obs_space, episode.observations, f"episode {episode.id} observations"))
            rows = obs.shape[0]
        if rows != n_steps + 1:
            raise ValueError(
                f"episode {episode.id}: expected {n_steps + 1} observations for {n_steps} steps, got {rows}"
            )
        if images:
            for key, value in tree.items():
                trees["observations"].setdefault(key, []).append(value[:-1])
                trees["next_observations"].setdefault(key, []).append(value[1:])
        else:
            columns["observations"].append(obs[:-1])
            columns["next_observations"].append(obs[1:])
        columns["actions"].append(flat_rows("actions", episode.actions, act_space.shape))
        columns["rewards"].append(np.asarray(episode.rewards))
        columns["terminals"].append(np.asarray(episode.terminations))
        columns["timeouts"].append(np.asarray(episode.truncations))

    if not columns["rewards"]:
        raise ValueError(f"Minari dataset {dataset.spec.dataset_id!r} holds no episodes")
    # Cast and check once over all episodes, with OfflineBuffer's own checks, so rows in errors
    # are transition rows.
    out: dict[str, Any] = {
        key: as_float32(key, np.concatenate(columns[key])) for key in _FLOAT_KEYS if not (images and "obs" in key)
    }
    if images:
        for name, tree_parts in trees.items():
            out[name] = {key: np.concatenate(parts) for key, parts in tree_parts.items()}
    out["terminals"], out["timeouts"] = episode_flags(
        np.concatenate(columns["terminals"]), np.concatenate(columns["timeouts"])
    )
    return out


def minari_metadata(dataset: minari.MinariDataset) -> dict[str, Any]:
    """The dataset id, reference scores and env id a buffer carries into checkpoints and cards."""
    meta = dataset.storage.metadata
    out: dict[str, Any] = {"dataset_id": dataset.spec.dataset_id}
    for key in ("ref_min_score", "ref_max_score"):
        if meta.get(key) is not None:
            out[key] = float(meta[key])
    env_spec = dataset.spec.env_spec
    if env_spec is not None:
        out["env_id"] = env_spec.id
    return out
