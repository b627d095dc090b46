"""D4RL-style datasets: a mapping of arrays, an ``.npz`` or an ``.hdf5`` file, in transition columns.

Keys: observations, actions, rewards, terminals, optional timeouts and next_observations.
Goal-conditioned observations are a dict of arrays per key: a sub-dict, ``observations/<key>``
members of an ``.npz`` (which cannot hold dicts), or an HDF5 group.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dql_agent.files import open_regular
from dql_agent.limits import MemoryBudgetError
from dql_agent.observations import nested
from dql_agent.readers.arrays import read_hdf5, read_npz
from dql_agent.transitions import REQUIRED_KEYS, column, episode_flags

USED_KEYS = (*REQUIRED_KEYS, "timeouts")
"""The members of a file that are read; any other (infos, metadata) is never looked into."""


def read_d4rl(data: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The transition columns of a D4RL-style mapping or file (see :meth:`OfflineBuffer.from_d4rl`).

    Without next_observations (raw D4RL files) they are taken from the following row, and the last
    row of each episode is dropped, as ``d4rl.qlearning_dataset`` does (:func:`derive_next_observations`).

    A file must be a regular file (a FIFO or device is refused without blocking on it); only the
    members named :data:`USED_KEYS` are read, each after its header is checked against what the
    file holds and the memory budget; an HDF5 dataset or link that would read another file is
    refused (see :mod:`dql_agent.readers.arrays`).
    """
    arrays, found = _read(data)
    missing = [k for k in REQUIRED_KEYS if k not in arrays and k != "next_observations"]
    if missing:
        raise KeyError(f"D4RL data is missing key(s) {missing}; found {sorted(found)}")
    if "next_observations" not in arrays:
        arrays = derive_next_observations(arrays)
    return {k: arrays[k] for k in USED_KEYS if k in arrays}


def _used(key: str) -> bool:
    return key.split("/")[0] in USED_KEYS  # npz members observations/<key> nest


def _read(data: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """The used columns, and every key the data has (for the message when one is missing)."""
    if isinstance(data, Mapping):
        arrays: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in data.items()}
        return arrays, list(arrays)
    path = os.fspath(data)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"D4RL file not found: {path}")
    if not path.endswith((".npz", ".hdf5", ".h5")):
        raise ValueError(f"D4RL file must end in .npz, .hdf5 or .h5, got {path}")
    handle = open_regular(path)  # a FIFO or device is refused here, never read
    try:
        with handle:
            if path.endswith(".npz"):
                if not zipfile.is_zipfile(handle):  # else numpy takes it for a pickle and suggests unpickling
                    raise ValueError("it is not a zip archive, as an .npz file is")
                handle.seek(0)
                arrays, keys = read_npz(handle, path, _used)
                return nested(arrays, "/"), keys  # .npz cannot hold dicts: keys a/b nest
            return read_hdf5(handle, path, _used)  # a group per dict key (goal-conditioned observations)
    except MemoryBudgetError:
        raise
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
        # h5py and numpy name neither the file nor what was expected of it
        raise ValueError(f"{path} is not a readable HDF5/NPZ dataset: {error}") from error


def _rows(value: Any, index: Any) -> Any:
    """``value[index]`` for an array or, key by key, a dict of arrays."""
    if isinstance(value, Mapping):
        return {k: _rows(v, index) for k, v in value.items()}
    return np.asarray(value)[index]


def _shift(value: Any) -> Any:
    """Each row's successor (the last row repeats), for an array or a dict of arrays."""
    if isinstance(value, Mapping):
        return {k: _shift(v) for k, v in value.items()}
    array = np.asarray(value)
    return np.concatenate([array[1:], array[-1:]], axis=0)


def _first_array(value: Any) -> Any:
    return _first_array(next(iter(value.values()))) if isinstance(value, Mapping) and value else value


def derive_next_observations(arrays: dict[str, Any]) -> dict[str, Any]:
    """Columns with next_observations taken from the following rows.

    Row i's successor is row i+1 unless row i ends by time limit (its successor is lost) or is
    the file's last row; those rows are dropped. A row that is both terminal and timeout is
    terminal, so it is kept (``qlearning_dataset`` drops it), and the kept row before a dropped
    one ends the episode (a timeout, still bootstrapped), so episode boundaries survive.
    """
    raw = arrays["observations"]
    obs = raw if isinstance(raw, Mapping) else column("observations", raw, None)
    first = column("observations", _first_array(obs), None)
    n = len(first)
    if n == 0:
        raise ValueError(f"the dataset is empty: observations has shape {first.shape}")
    for key in ("actions", "rewards", "terminals", "timeouts"):
        shape = np.shape(arrays.get(key, first))
        if not shape or shape[0] != n:
            raise ValueError(
                f"{key} has shape {shape}, expected {n} rows like observations {first.shape} "
                "(next_observations are taken from the following rows)"
            )
    terminals, timeouts = episode_flags(arrays["terminals"], arrays.get("timeouts"))
    keep = ~timeouts
    keep[-1] = bool(terminals[-1])  # a terminal last row needs no successor
    # A dropped row ended its episode: the kept row before it ends it now (a timeout: still
    # bootstrapped), so per-episode returns (Diffusion-DICE's reward scale) do not merge episodes.
    ends = np.zeros(n, dtype=bool)
    dropped = np.flatnonzero(~keep)
    before = dropped[dropped >= 1] - 1
    ends[before[keep[before] & ~terminals[before]]] = True
    out = {k: np.asarray(arrays[k])[keep] for k in ("actions", "rewards")}
    out["observations"], out["terminals"] = _rows(obs, keep), terminals[keep]
    out["next_observations"] = _rows(_shift(obs), keep)
    out["timeouts"] = ends[keep]
    return out
