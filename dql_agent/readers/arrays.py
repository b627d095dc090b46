"""Array files whose headers are checked before anything is read: ``.npz`` members, HDF5 datasets.

A file's header declares what reading it will allocate: an ``.npy`` member's shape and dtype, an
HDF5 dataset's extent. Here every declaration is checked against what the file really holds, and
the total against the memory budget (:mod:`dql_agent.limits`), before a byte of data is read; only
the members a reader uses are looked at, so a file with a huge unused member loads.

- **npz**: each used member's ``.npy`` header (shape, dtype) must describe exactly the member's
  uncompressed size as the zip records it (zipfile never inflates past that), and no member may
  hold Python objects (nothing is unpickled).
- **HDF5**: a dataset stored in another file (external storage, a virtual dataset) and an external
  link are refused: reading them would read files other than the one named. A contiguous dataset
  must store all it declares, inside the file; a chunked one must have every chunk written (else
  HDF5 would make up the rest from the fill value). Variable-length numeric rows (Minari's camera
  frames) are counted by reading them a bounded block at a time; strings and references are
  refused. Groups are walked once each: a group linked into itself is refused, not followed
  forever.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from dql_agent.limits import check_budget, memory_budget_bytes

__all__ = ["MAX_GROUP_DEPTH", "read_hdf5", "read_npz", "walk_hdf5"]

MAX_GROUP_DEPTH = 32
"""Deepest nesting of HDF5 groups read (goal-conditioned observations nest two or three levels)."""
_NPY_SUFFIX = ".npy"


# npz -------------------------------------------------------------------------------------------
def read_npz(handle: BinaryIO, name: str, used: Callable[[str], bool]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the members of an ``.npz`` (an open zip file) whose keys ``used`` accepts, and
    every member's key (``.npy`` dropped, as ``np.load`` names them). ``name`` names the file in
    errors (ValueError, or :class:`~dql_agent.limits.MemoryBudgetError` past the budget)."""
    with zipfile.ZipFile(handle) as archive:
        members = {_npz_key(info.filename): info for info in archive.infolist()}
        wanted = {key: info for key, info in members.items() if used(key)}
        total = sum(_npy_bytes(archive, info, name) for info in wanted.values())
        check_budget(f"reading {name} (members {', '.join(sorted(wanted))})", total)
        arrays = {}
        for key, info in wanted.items():
            with archive.open(info) as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)  # never unpickle
    return arrays, list(members)


def _npz_key(filename: str) -> str:
    return filename[: -len(_NPY_SUFFIX)] if filename.endswith(_NPY_SUFFIX) else filename


def _npy_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> int:
    """The data bytes a member's ``.npy`` header declares, once they match the member's size."""
    where = f"member {info.filename!r}"
    if info.flag_bits & 0x1:
        raise ValueError(f"{where} is encrypted")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
        except ValueError as error:
            raise ValueError(f"{where} is not a .npy array ({error})") from None
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:  # 3.0 only adds UTF-8 field names of structured arrays, which are no dataset column
            raise ValueError(f"{where} is a .npy file of version {version}; expected 1.0 or 2.0")
        header = member.tell()
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (dtype {dtype}), which would be unpickled; refused")
    declared = math.prod(shape) * dtype.itemsize
    if header + declared != info.file_size:
        raise ValueError(
            f"{where} declares shape {tuple(shape)} of {dtype} ({declared:,} bytes) but holds "
            f"{info.file_size - header:,} bytes of data"
        )
    return declared


# HDF5 ------------------------------------------------------------------------------------------
def read_hdf5(handle: BinaryIO, name: str, used: Callable[[str], bool]) -> tuple[dict[str, Any], list[str]]:
    """The datasets under the top-level keys of an HDF5 file (an open file) that ``used`` accepts,
    as nested dicts (a group per dict key), and every top-level key. Everything read is checked
    first (see the module docstring); ``name`` names the file in errors."""
    import h5py

    with h5py.File(handle, "r") as f:
        keys = list(f.keys())
        datasets = list(walk_hdf5(f, name, used))
        check_budget(f"reading {name}", sum(nbytes for _, _, nbytes in datasets))
        out: dict[str, Any] = {}
        for path, dataset, _ in datasets:
            *parents, leaf = path.split("/")
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = dataset[()]
    return out, keys


def walk_hdf5(group: Any, name: str, used: Callable[[str], bool] = lambda key: True) -> Iterator[tuple[str, Any, int]]:
    """``(path, dataset, bytes)`` for every dataset under the top-level keys of ``group`` (an open
    h5py File or Group) that ``used`` accepts, each checked (see the module docstring); nothing is
    read. A ValueError names ``name`` and the path of whatever is refused."""
    seen: set[Any] = {group.id}
    yield from _walk(group, "", name, used, seen, 0, _file_size(group))


def _walk(
    group: Any, prefix: str, name: str, used: Callable[[str], bool], seen: set[Any], depth: int, file_size: int
) -> Iterator[tuple[str, Any, int]]:
    import h5py

    for key in group:
        path = f"{prefix}{key}"
        if not prefix and not used(key):
            continue  # a member the reader never uses is never looked into
        link = group.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise ValueError(f"{name}: {path} is an external link to {link.filename}:{link.path}; refused")
        item = group.get(key)
        if item is None:
            raise ValueError(f"{name}: {path} is a link to nothing ({link.path if hasattr(link, 'path') else link})")
        if isinstance(item, h5py.Group):
            if item.id in seen:
                raise ValueError(f"{name}: {path} links back to a group already read (a cycle); refused")
            if depth + 1 > MAX_GROUP_DEPTH:
                raise ValueError(f"{name}: {path} nests groups deeper than {MAX_GROUP_DEPTH} levels; refused")
            seen.add(item.id)
            yield from _walk(item, f"{path}/", name, used, seen, depth + 1, file_size)
        elif isinstance(item, h5py.Dataset):
            yield path, item, _dataset_bytes(item, f"{name}: {path}", file_size)
        # named datatypes hold no data


def _file_size(group: Any) -> int:
    return int(group.file.id.get_filesize())


def _dataset_bytes(dataset: Any, where: str, file_size: int) -> int:
    """What reading ``dataset`` allocates, once it is known to be stored, whole, in this file."""
    import h5py

    if dataset.is_virtual:
        raise ValueError(f"{where} is a virtual dataset (it maps data from other files); refused")
    if dataset.external:
        files = ", ".join(str(entry[0]) for entry in dataset.external)
        raise ValueError(f"{where} stores its data in another file ({files}), not in this one; refused")
    element = h5py.check_vlen_dtype(dataset.dtype)
    numeric_rows = isinstance(element, np.dtype) and element.kind in "biuf"  # str, bytes: vlen strings
    if dataset.dtype.hasobject and not numeric_rows:
        raise ValueError(f"{where} holds strings, references or nested data (dtype {dataset.dtype}); refused")
    if dataset.shape is None:  # an empty dataspace holds nothing
        return 0
    declared = math.prod(dataset.shape) * dataset.dtype.itemsize
    layout = dataset.id.get_create_plist().get_layout()
    described = f"declares shape {dataset.shape} of {dataset.dtype} ({declared:,} bytes)"
    if layout == h5py.h5d.CONTIGUOUS and declared:
        stored, offset = dataset.id.get_storage_size(), dataset.id.get_offset()
        if stored < declared or offset is None or offset + stored > file_size:
            held = 0 if offset is None else max(0, min(stored, file_size - offset))
            raise ValueError(f"{where} {described} but the file holds {held:,} bytes of it")
    elif layout == h5py.h5d.CHUNKED and declared:
        needed = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks, strict=True))
        written = dataset.id.get_num_chunks()
        if written < needed:
            raise ValueError(
                f"{where} {described} but the file holds only {written:,} of its {needed:,} chunks (the rest "
                "would be made up of fill values)"
            )
    return _vlen_bytes(dataset, where, file_size) if numeric_rows else int(declared)


def _vlen_bytes(dataset: Any, where: str, file_size: int) -> int:
    """What reading a dataset of variable-length numeric rows allocates (Minari stores camera frames
    so: one flat uint8 row per step). The rows' lengths live only in the file's heap, so the rows
    are read and counted, a block at a time, stopping once the total passes the memory budget. One
    row is at most the file's size, even when a crafted file points many rows at one heap object,
    so a block of ``budget // file size`` rows never allocates past the budget either."""
    budget = memory_budget_bytes()
    if dataset.ndim == 0:
        return int(np.asarray(dataset[()]).nbytes)
    per_row = max(1, math.prod(dataset.shape[1:])) * max(1, file_size)
    block = max(1, min(4096, budget // per_row))
    total = 0
    for start in range(0, dataset.shape[0], block):
        total += sum(np.asarray(row).nbytes for row in dataset[start : start + block].reshape(-1))
        check_budget(f"reading {where} (variable-length rows)", total, budget)
    return total
