"""LeRobot datasets (``LeRobotDataset`` v3.0 and v2.1: Parquet tables, MP4 video per camera) as
transition columns for an :class:`~dql_agent.buffer.OfflineBuffer`, read with pyarrow and PyAV,
without the ``lerobot`` package.

:func:`read_lerobot` (``OfflineBuffer.from_lerobot``) reads a local dataset folder or a Hub dataset
repo. What it makes of the dataset:

- **Observations** are a gymnasium ``Dict`` nested along the dots of LeRobot's feature names, with
  the ``observation.`` prefix dropped: ``observation.state`` becomes the key ``"state"`` (a float32
  Box), ``observation.images.top`` the key ``"top"`` of the sub-Dict ``"images"`` (a uint8
  ``Box(0, 255, (H, W, 3))`` camera, HWC). dql_agent's observation tree and ONNX export join nested
  keys with ``.``, so the model's inputs are named ``state``, ``images.top``, ...: LeRobot's names
  without ``observation.``. ``predict`` takes the nested dict ``{"state": s, "images": {"top": f}}``.
- **Frames** are decoded with PyAV at the table's timestamps (plus the episode's ``from_timestamp``
  in a v3.0 video file), each matched to the decoded frame within ``tolerance_s`` (default 1e-4 s,
  as lerobot's loader), converted to RGB24 as lerobot's PyAV path does, so the pixels equal what
  ``LeRobotDataset`` returns (times 255) when both decode with the same FFmpeg decoder.
- **Actions** live in a Box whose bounds are the dataset's ``meta/stats.json`` min/max of
  ``action`` (v2.1: the min/max over ``meta/episodes_stats.jsonl``) unless ``action_low`` /
  ``action_high`` are given; an action outside them is an error. The networks work in [-1, 1]:
  ``a_scaled = 2 (a - low) / (high - low) - 1``, and ``predict`` returns
  ``low + (a_scaled + 1) (high - low) / 2``.
- **Transitions**: within an episode, the next observation of frame t is frame t+1. The last frame
  of an episode has no successor in the data: if that step is terminal it is kept (its next
  observation is itself, never used since a terminal is not bootstrapped), otherwise it is dropped
  and the step before it ends the episode as a timeout (a truncation, bootstrapped). This is what
  ``OfflineBuffer.from_d4rl`` does with files that lack next observations.
- **Rewards and terminals**: ``next.reward`` and ``next.done`` where the dataset has them;
  otherwise ``reward`` must say how: a per-step function, :class:`SuccessAtEnd` or
  :class:`StepCost`. Episode ends without a ``done`` are truncations. The choice is recorded in
  ``buffer.metadata["reward"]`` (with ``dataset_id`` and ``dataset_revision``), which the
  checkpoint and the model card carry.

Files are opened as regular files only (FIFOs, devices and symlinks that leave the dataset are
refused), path templates from ``meta/info.json`` may name only the fields the format defines, and
what headers declare (rows, frames, frame sizes) is bounded by the real file sizes and by
``memory_budget_bytes`` before anything large is allocated. Any error leaves nothing behind: the
buffer is built only once every frame is decoded.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from gymnasium import spaces

from dql_agent.files import open_regular
from dql_agent.observations import nested
from dql_agent.report import report

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "READ_VERSIONS",
    "VIDEO_CODECS",
    "StepCost",
    "SuccessAtEnd",
    "read_lerobot",
]

READ_VERSIONS = ("v2.1", "v3.0")
# The codecs LeRobot's writers have used (AV1 by default, H.264 and HEVC as options; VP9 in some
# older datasets). Other codecs are refused rather than handed to an arbitrary FFmpeg decoder.
VIDEO_CODECS = ("av1", "h264", "hevc", "vp9")
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 2**30
DEFAULT_TOLERANCE_S = 1e-4  # lerobot's LeRobotDataset(tolerance_s=1e-4)
MAX_JSON_BYTES = 64 * 2**20  # meta/*.json(l)
SEEK_GAP_S = 1.0  # decode through gaps shorter than this; seek over longer ones
INSTALL_HINT = "pip install dql_agent[lerobot]"
OBSERVATION_PREFIX = "observation."
# Columns every LeRobot table has besides the features the dataset declares.
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")

Successes = Literal["all", "next.success"] | Sequence[int] | None
RewardFn = Callable[[Mapping[str, np.ndarray]], Any]


# reward choices ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuccessAtEnd:
    """Reward ``value`` on the last step of each successful episode, which is then terminal; 0 on
    every other step. Episodes that do not succeed end by truncation (a timeout).

    Args:
        successes: which episodes succeed: ``"next.success"`` (the dataset's ``next.success`` at the
            episode's last frame), ``"all"`` (every episode, e.g. teleoperated demonstrations), or
            a sequence of episode indices.
        value: the reward at success.
    """

    successes: Successes = "next.success"
    value: float = 1.0


@dataclass(frozen=True)
class StepCost:
    """Reward ``-cost`` on every step until the episode's end (a minimum-time objective).

    Successful episodes end terminal (the goal is reached and the cost stops); the others end by
    truncation (a timeout, bootstrapped). ``successes`` as in :class:`SuccessAtEnd`; None: no
    episode succeeds, every end is a truncation.
    """

    cost: float = 1.0
    successes: Successes = "next.success"


RewardChoice = SuccessAtEnd | StepCost | RewardFn | None


# files -------------------------------------------------------------------------------------------
class _Files:
    """The files of one dataset: opened as regular files, never outside ``allowed`` once resolved."""

    def __init__(self, root: Path, allowed: Path, label: str) -> None:
        self.root = root
        self.allowed = Path(os.path.realpath(allowed))
        self.label = label  # how errors name the dataset

    def path(self, rel: str) -> Path:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{self.label}: refusing the path {rel!r} (absolute, empty or with '..')")
        return self.root.joinpath(*parts)

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def open(self, rel: str, what: str) -> BinaryIO:
        """``rel`` opened for reading, after checking it is a regular file inside the dataset."""
        path = self.path(rel)
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{self.label}: {what} {rel} is missing")
        try:
            return open_regular(path, name=f"{self.label}: {rel}", within=self.allowed, within_label="the dataset")
        except FileNotFoundError:  # a dangling link
            raise FileNotFoundError(f"{self.label}: {what} {rel} is missing (a link to nothing)") from None

    def size(self, handle: BinaryIO) -> int:
        return os.fstat(handle.fileno()).st_size

    def read_json(self, rel: str, what: str) -> Any:
        return _parse_json(self._read_text(rel, what), f"{self.label}: {rel}")

    def read_jsonl(self, rel: str, what: str) -> list[Any]:
        text = self._read_text(rel, what)
        return [
            _parse_json(line, f"{self.label}: {rel} line {n}")
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]

    def _read_text(self, rel: str, what: str) -> str:
        with self.open(rel, what) as handle:
            if self.size(handle) > MAX_JSON_BYTES:
                raise ValueError(
                    f"{self.label}: {rel} is {self.size(handle):,} bytes; metadata files are read up to "
                    f"{MAX_JSON_BYTES:,} bytes"
                )
            data = handle.read(MAX_JSON_BYTES + 1)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.label}: {rel} is not UTF-8 text: {error}") from None

    def listdir(self, rel: str) -> list[str]:
        path = self.path(rel)
        if not path.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(path))


def _parse_json(text: str, where: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{where}: {constant} is not valid JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None


def _format_path(template: Any, where: str, **values: int | str) -> str:
    """``template`` (a path template from info.json) filled in, allowing only plain ``{name}`` and
    ``{name:0Nd}`` fields of ``values`` (no attribute or index access, no conversions)."""
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a path template string, got {template!r}")
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"{where} is not a valid path template ({template!r}): {error}") from None
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if name not in values or conversion is not None or not re.fullmatch(r"(0?\d{0,2}d)?", spec or ""):
            raise ValueError(
                f"{where} {template!r} has the field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; expected only {sorted(values)} with an optional width "
                "such as :03d"
            )
        out.append(format(values[name], spec or ""))
    return "".join(out)


# metadata ----------------------------------------------------------------------------------------
@dataclass
class _Camera:
    key: str  # LeRobot's feature name
    height: int
    width: int
    codec: str | None  # as info.json declares it


@dataclass
class _Episode:
    index: int
    length: int
    data_file: str
    from_index: int | None = None  # v3.0: the first row's global index
    videos: dict[str, tuple[str, float, float | None]] = field(default_factory=dict)  # key -> (file, from, to)


@dataclass
class _Meta:
    version: str
    fps: float
    features: dict[str, dict[str, Any]]
    total_episodes: int
    info: dict[str, Any]


def _int(value: Any, where: str, low: int = 0, high: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise ValueError(f"{where} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _read_meta(files: _Files) -> _Meta:
    info = files.read_json("meta/info.json", "the dataset's description")
    if not isinstance(info, dict):
        raise ValueError(f"{files.label}: meta/info.json must hold a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version")
    if version not in READ_VERSIONS:
        raise ValueError(
            f"{files.label}: meta/info.json has codebase_version {version!r}; this reader reads LeRobot datasets "
            f"of versions {', '.join(READ_VERSIONS)} (convert older ones with lerobot's converters)"
        )
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 10_000:
        raise ValueError(f"{files.label}: meta/info.json fps must be a number in (0, 10000], got {fps!r}")
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise ValueError(f"{files.label}: meta/info.json 'features' must be a non-empty object, got {features!r}")
    for name, feature in features.items():
        where = f"{files.label}: meta/info.json features[{name!r}]"
        if not isinstance(feature, dict) or not isinstance(feature.get("dtype"), str):
            raise ValueError(f"{where} must be an object with a 'dtype' string, got {feature!r}")
        shape = feature.get("shape")
        if not isinstance(shape, list) or not shape or len(shape) > 4:
            raise ValueError(f"{where}['shape'] must be a list of 1 to 4 ints, got {shape!r}")
        for size in shape:
            _int(size, f"{where}['shape']", 1, 1 << 20)
    if "action" not in features:
        raise ValueError(f"{files.label}: meta/info.json declares no 'action' feature; found {sorted(features)}")
    total = _int(info.get("total_episodes"), f"{files.label}: meta/info.json total_episodes", 0, 10**8)
    return _Meta(version, float(fps), features, total, info)


def _cameras_and_vectors(meta: _Meta, keys: Sequence[str] | None, label: str) -> tuple[list[_Camera], list[str]]:
    """The chosen observation features: cameras (video) and vectors, checked against info.json."""
    observed = [k for k in meta.features if k.startswith(OBSERVATION_PREFIX)]
    if keys is None:
        chosen = [k for k in observed if _readable(meta.features[k]["dtype"])]
        if not chosen:
            raise ValueError(f"{label}: no observation.* features to read; found {sorted(meta.features)}")
    else:
        if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
            raise TypeError(f"keys must be a non-empty list of observation feature names, got {keys!r}")
        chosen = []
        for key in keys:
            if key not in meta.features or not str(key).startswith(OBSERVATION_PREFIX):
                raise ValueError(
                    f"keys: {key!r} is not an observation feature of {label}; its observations are {observed}"
                )
            if key in chosen:
                raise ValueError(f"keys: {key!r} is given twice")
            chosen.append(key)
    cameras, vectors = [], []
    for key in chosen:
        feature = meta.features[key]
        dtype, shape = feature["dtype"], [int(s) for s in feature["shape"]]
        where = f"{label}: meta/info.json features[{key!r}]"
        if dtype == "video":
            names = feature.get("names") or []
            if len(shape) != 3:
                raise ValueError(f"{where}: a video feature must have shape [height, width, channels], got {shape}")
            if isinstance(names, list) and names and str(names[0]).startswith("channel"):
                channels, height, width = shape
            else:
                height, width, channels = shape
            video_info = feature.get("info") or {}
            if channels != 3 or (isinstance(video_info, dict) and video_info.get("video.is_depth_map")):
                raise ValueError(f"{where}: only RGB cameras (3 channels) are read, got shape {shape} ({video_info})")
            codec = video_info.get("video.codec") if isinstance(video_info, dict) else None
            cameras.append(_Camera(key, height, width, codec if isinstance(codec, str) else None))
        elif dtype == "image":
            raise ValueError(
                f"{where} is stored as images inside the Parquet tables (dtype 'image'); this reader reads cameras "
                "stored as video (dtype 'video'): leave it out with keys=[...]"
            )
        elif _numpy_dtype(dtype) is None:
            raise ValueError(f"{where} has dtype {dtype!r}; observations must be numeric vectors or videos")
        else:
            vectors.append(key)
    _check_nesting(chosen)
    return cameras, vectors


def _readable(dtype: str) -> bool:
    """Whether a feature of ``dtype`` can be an observation (a video camera or a numeric vector)."""
    return dtype == "video" or _numpy_dtype(dtype) is not None


def _numpy_dtype(dtype: str) -> np.dtype | None:
    try:
        out = np.dtype(dtype)
    except TypeError:
        return None
    return out if out.kind in "biuf" else None


def _nested_path(key: str) -> tuple[str, ...]:
    """``observation.images.top`` -> ("images", "top"): the key's place in the observation Dict."""
    return tuple(key[len(OBSERVATION_PREFIX) :].split("."))


def _check_nesting(keys: Sequence[str]) -> None:
    paths = {key: _nested_path(key) for key in keys}
    for key, path in paths.items():
        if any(part == "" for part in path):
            raise ValueError(f"the feature name {key!r} has an empty part between dots; it cannot be a Dict key")
        for other, other_path in paths.items():
            if other != key and other_path[: len(path)] == path:
                raise ValueError(
                    f"the features {key!r} and {other!r} cannot both be observations: {key!r} would be both a "
                    "value and a Dict of values; choose one with keys=[...]"
                )


def _episode_table_v3(files: _Files, meta: _Meta, cameras: list[_Camera]) -> dict[int, _Episode]:
    """meta/episodes/chunk-*/file-*.parquet: one row per episode (length, rows, files, video times)."""

    rels = []
    for chunk in files.listdir("meta/episodes"):
        if re.fullmatch(r"chunk-\d+", chunk):
            rels += [
                f"meta/episodes/{chunk}/{name}"
                for name in files.listdir(f"meta/episodes/{chunk}")
                if re.fullmatch(r"file-\d+\.parquet", name)
            ]
    if not rels:
        raise FileNotFoundError(f"{files.label}: meta/episodes/chunk-*/file-*.parquet is missing (the episode table)")
    columns = [
        "episode_index",
        "length",
        "dataset_from_index",
        "dataset_to_index",
        "data/chunk_index",
        "data/file_index",
    ]
    for camera in cameras:
        columns += [f"videos/{camera.key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    data_template = meta.info.get("data_path")
    video_template = meta.info.get("video_path")
    episodes: dict[int, _Episode] = {}
    for rel in rels:
        table = _read_parquet(files, rel, columns, "episode table")
        rows = {c: table.column(c).to_pylist() for c in columns}
        for i in range(table.num_rows):
            where = f"{files.label}: {rel} row {i}"
            if any(rows[c][i] is None for c in columns):
                missing = [c for c in columns if rows[c][i] is None]
                raise ValueError(f"{where} has no value for {missing}")
            index = _int(rows["episode_index"][i], f"{where} episode_index", 0, 10**8)
            if index in episodes:
                raise ValueError(f"{where}: episode {index} is listed twice in meta/episodes")
            length = _int(rows["length"][i], f"{where} length", 1, 10**9)
            start = _int(rows["dataset_from_index"][i], f"{where} dataset_from_index")
            stop = _int(rows["dataset_to_index"][i], f"{where} dataset_to_index")
            if stop - start != length:
                raise ValueError(
                    f"{where}: dataset_to_index - dataset_from_index = {stop - start}, expected the length {length}"
                )
            data_file = _format_path(
                data_template,
                f"{files.label}: meta/info.json data_path",
                chunk_index=_int(rows["data/chunk_index"][i], f"{where} data/chunk_index"),
                file_index=_int(rows["data/file_index"][i], f"{where} data/file_index"),
            )
            episode = _Episode(index, length, data_file, start)
            for camera in cameras:
                prefix = f"videos/{camera.key}/"
                video = _format_path(
                    video_template,
                    f"{files.label}: meta/info.json video_path",
                    video_key=camera.key,
                    chunk_index=_int(rows[prefix + "chunk_index"][i], f"{where} {prefix}chunk_index"),
                    file_index=_int(rows[prefix + "file_index"][i], f"{where} {prefix}file_index"),
                )
                start_s, stop_s = rows[prefix + "from_timestamp"][i], rows[prefix + "to_timestamp"][i]
                for name, value in (("from_timestamp", start_s), ("to_timestamp", stop_s)):
                    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                        raise ValueError(f"{where} {prefix}{name} must be a finite time >= 0, got {value!r}")
                episode.videos[camera.key] = (video, float(start_s), float(stop_s))
            episodes[index] = episode
    return episodes


def _episode_table_v21(files: _Files, meta: _Meta, cameras: list[_Camera]) -> dict[int, _Episode]:
    """meta/episodes.jsonl and the per-episode file templates of info.json."""
    lines = files.read_jsonl("meta/episodes.jsonl", "the episode table")
    chunks = _int(meta.info.get("chunks_size"), f"{files.label}: meta/info.json chunks_size", 1, 10**9)
    episodes: dict[int, _Episode] = {}
    for n, line in enumerate(lines, 1):
        where = f"{files.label}: meta/episodes.jsonl line {n}"
        if not isinstance(line, dict):
            raise ValueError(f"{where} must be a JSON object, got {line!r}")
        index = _int(line.get("episode_index"), f"{where} episode_index", 0, 10**8)
        if index in episodes:
            raise ValueError(f"{where}: episode {index} is listed twice")
        length = _int(line.get("length"), f"{where} length", 1, 10**9)
        values: dict[str, int | str] = {"episode_chunk": index // chunks, "episode_index": index}
        data_file = _format_path(meta.info.get("data_path"), f"{files.label}: meta/info.json data_path", **values)
        episode = _Episode(index, length, data_file)
        for camera in cameras:
            video = _format_path(
                meta.info.get("video_path"), f"{files.label}: meta/info.json video_path", video_key=camera.key, **values
            )
            episode.videos[camera.key] = (video, 0.0, None)
        episodes[index] = episode
    return episodes


def _select_episodes(
    episodes: dict[int, _Episode], chosen: Sequence[int] | None, meta: _Meta, label: str
) -> list[_Episode]:
    if sorted(episodes) != list(range(len(episodes))) or len(episodes) != meta.total_episodes:
        raise ValueError(
            f"{label}: the episode table lists episodes {_ranges(sorted(episodes))}, but meta/info.json says "
            f"total_episodes = {meta.total_episodes} (expected 0..{meta.total_episodes - 1})"
        )
    if chosen is None:
        return [episodes[i] for i in sorted(episodes)]
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, (Sequence, np.ndarray, range)) or len(chosen) == 0:
        raise TypeError(f"episodes must be a non-empty list of episode indices, got {chosen!r}")
    out, seen = [], set()
    for value in chosen:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"episodes must hold ints, got {value!r} ({type(value).__name__})")
        if not 0 <= int(value) < len(episodes):
            raise ValueError(
                f"episodes: index {int(value)} is out of range: {label} has {len(episodes)} episodes "
                f"(0..{len(episodes) - 1})"
            )
        if int(value) in seen:
            raise ValueError(f"episodes: {int(value)} is given twice")
        seen.add(int(value))
        out.append(episodes[int(value)])
    return sorted(out, key=lambda e: e.index)


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts) or "none"


# tables ------------------------------------------------------------------------------------------
def _read_parquet(files: _Files, rel: str, columns: Sequence[str], what: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with files.open(rel, what) as handle:
        size = files.size(handle)
        try:
            parquet = pq.ParquetFile(handle)
            declared = parquet.metadata.num_rows
            if declared > size:  # every row of a LeRobot table takes bytes (its unique index at least)
                raise ValueError(
                    f"{files.label}: {rel} ({what}) declares {declared:,} rows in a file of {size:,} bytes; refused"
                )
            names = parquet.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise KeyError(missing)
            return parquet.read(columns=list(columns))
        except KeyError as error:
            raise ValueError(
                f"{files.label}: {rel} ({what}) has no column(s) {error.args[0]}; its columns are {names}"
            ) from None
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{files.label}: {rel} is not a readable Parquet file ({what}): {error}") from None


def _check_table_schema(files: _Files, rel: str, meta: _Meta) -> None:
    """The data table's columns must be info.json's non-video features, no more, no less."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with files.open(rel, "data table") as handle:
        try:
            schema = pq.read_schema(handle)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{files.label}: {rel} is not a readable Parquet file (data table): {error}") from None
    expected = {k for k, f in meta.features.items() if f["dtype"] != "video"}
    found = set(schema.names)
    if found != expected:
        raise ValueError(
            f"{files.label}: {rel} has columns that disagree with meta/info.json features: missing "
            f"{sorted(expected - found)}, not declared {sorted(found - expected)}"
        )


def _column(table: Any, name: str, feature: Mapping[str, Any], where: str) -> np.ndarray:
    """A feature column as (rows, *shape) numpy (scalars as (rows,)), checked against info.json."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    shape = tuple(int(s) for s in feature["shape"])
    width = math.prod(shape)
    if column.null_count:
        raise ValueError(f"{where}: column {name!r} has {column.null_count} missing value(s)")
    kind = column.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != width or lengths.max() != width):
            bad = int(np.flatnonzero(lengths != width)[0])
            raise ValueError(
                f"{where}: column {name!r} must hold {width} value(s) per row as meta/info.json's shape {list(shape)} "
                f"says, got {int(lengths[bad])} at row {bad}"
            )
        values = pc.list_flatten(column)
        if values.null_count:
            raise ValueError(f"{where}: column {name!r} has missing values inside its lists")
        array = values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
    elif width == 1 and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        array = column.to_numpy(zero_copy_only=False)
    else:
        raise ValueError(
            f"{where}: column {name!r} has type {kind}, but meta/info.json declares {feature['dtype']} {list(shape)}"
        )
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: column {name!r} must be numeric, got {array.dtype} ({kind})")
    return array


@dataclass
class _Rows:
    """The table rows of the selected episodes, episode after episode."""

    columns: dict[str, np.ndarray]  # name -> (frames, ...)
    starts: list[int]  # first frame of each episode in ``columns``


def _read_tables(files: _Files, meta: _Meta, episodes: list[_Episode], names: Sequence[str]) -> _Rows:
    by_file: dict[str, list[_Episode]] = {}
    for episode in episodes:
        by_file.setdefault(episode.data_file, []).append(episode)
    wanted = list(dict.fromkeys([*names, *INDEX_COLUMNS]))
    parts: dict[int, dict[str, np.ndarray]] = {}
    for rel, members in by_file.items():
        _check_table_schema(files, rel, meta)
        table = _read_parquet(files, rel, wanted, "data table")
        where = f"{files.label}: {rel}"
        index_feature = {"shape": [1], "dtype": "int64"}
        columns = {name: _column(table, name, meta.features.get(name, index_feature), where) for name in wanted}
        owner = columns["episode_index"].reshape(-1)
        for episode in members:
            rows = np.flatnonzero(owner == episode.index)
            ewhere = f"{where} (episode {episode.index})"
            if len(rows) != episode.length:
                raise ValueError(f"{ewhere}: {len(rows)} rows, but the episode table gives length {episode.length}")
            if len(rows) and rows[-1] - rows[0] + 1 != len(rows):
                raise ValueError(f"{ewhere}: the episode's rows are not contiguous")
            frame_index = columns["frame_index"].reshape(-1)[rows]
            if not np.array_equal(frame_index, np.arange(episode.length)):
                bad = int(np.flatnonzero(frame_index != np.arange(episode.length))[0])
                raise ValueError(
                    f"{ewhere}: frame_index is {int(frame_index[bad])} at the episode's row {bad}, expected {bad}"
                )
            if episode.from_index is not None:
                index = columns["index"].reshape(-1)[rows]
                expected = np.arange(episode.from_index, episode.from_index + episode.length)
                if not np.array_equal(index, expected):
                    raise ValueError(
                        f"{ewhere}: the index column runs {int(index[0])}..{int(index[-1])}, but the episode table "
                        f"gives dataset_from_index..to_index {episode.from_index}.."
                        f"{episode.from_index + episode.length}"
                    )
            for name, value in columns.items():
                if value.dtype.kind != "f":
                    continue
                nonfinite = ~np.isfinite(value[rows].reshape(len(rows), -1)).all(axis=1)
                if nonfinite.any():
                    raise ValueError(
                        f"{ewhere}: column {name!r} has NaN/inf in {int(nonfinite.sum())} row(s), first at frame "
                        f"{int(np.flatnonzero(nonfinite)[0])}"
                    )
            timestamps = columns["timestamp"].reshape(-1)[rows].astype(np.float64)
            wrong = (timestamps < 0) | np.r_[False, np.diff(timestamps) <= 0]
            if wrong.any():
                at = int(np.flatnonzero(wrong)[0])
                raise ValueError(
                    f"{ewhere}: timestamps must be >= 0 and increasing, got {timestamps[at]!r} at frame {at} "
                    f"(after {timestamps[at - 1]!r})"
                    if at
                    else f"{ewhere}: timestamps must be >= 0 and increasing, got {timestamps[0]!r} at frame 0"
                )
            parts[episode.index] = {name: value[rows] for name, value in columns.items()}
    starts = list(np.cumsum([0] + [e.length for e in episodes[:-1]]))
    merged = {name: np.concatenate([parts[e.index][name] for e in episodes]) for name in wanted}
    return _Rows(merged, [int(s) for s in starts])


# rewards -----------------------------------------------------------------------------------------
def _success_set(successes: Successes, rows: _Rows, episodes: list[_Episode], meta: _Meta, label: str) -> set[int]:
    if successes is None:
        return set()
    if isinstance(successes, str):
        if successes == "all":
            return {e.index for e in episodes}
        if successes == "next.success":
            if "next.success" not in meta.features:
                raise ValueError(
                    f"reward: {label} has no next.success column to say which episodes succeed; pass successes='all', "
                    "a list of episode indices, or None (no episode succeeds)"
                )
            flags = _flags(rows, "next.success", len(rows.columns["next.success"]), episodes)
            return {e.index for e, s in zip(episodes, rows.starts, strict=True) if bool(flags[s + e.length - 1])}
        raise ValueError(
            f"successes must be 'all', 'next.success', a list of episode indices or None, got {successes!r}"
        )
    if not isinstance(successes, (Sequence, np.ndarray, range)):
        raise TypeError(
            f"successes must be 'all', 'next.success', a list of episode indices or None, got {successes!r}"
        )
    out = set()
    for value in successes:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or not 0 <= int(value) < meta.total_episodes
        ):
            raise ValueError(f"successes: {value!r} is not an episode index of {label} (0..{meta.total_episodes - 1})")
        out.add(int(value))
    return out


def _flags(rows: _Rows, name: str, n: int, episodes: list[_Episode]) -> np.ndarray:
    """A 0/1 (or bool) column as (n,) bool; other values are an error naming the episode and frame."""
    values = rows.columns[name].reshape(n, -1)[:, 0]
    wrong = (values != 0) & (values != 1)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        at = int(np.searchsorted(rows.starts, row, side="right") - 1)
        raise ValueError(
            f"column {name!r} must hold booleans (or 0/1), got {values[row]!r} at episode {episodes[at].index} frame "
            f"{row - rows.starts[at]}"
        )
    return values.astype(bool)


def _rewards(  # noqa: C901 - one branch per reward choice, each with its own error message
    reward: RewardChoice, rows: _Rows, episodes: list[_Episode], meta: _Meta, vectors: Sequence[str], label: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Per frame: (rewards (F,), done flags (F,), the choice in words)."""
    n = sum(e.length for e in episodes)
    has_done = "next.done" in meta.features
    done = _flags(rows, "next.done", n, episodes) if has_done else np.zeros(n, bool)
    done_words = "terminals from next.done" if has_done else "no next.done: episode ends are truncations"
    if reward is None:
        if "next.reward" not in meta.features:
            raise ValueError(
                f"reward: {label} has no next.reward column, so say how to reward its steps: reward=<function of the "
                "episode's columns returning one reward per step>, reward=SuccessAtEnd(successes=...) (a success "
                "signal at the episode's end) or reward=StepCost(cost=...) (a constant cost per step until the end); "
                "see dql_agent.readers.lerobot"
            )
        rewards = rows.columns["next.reward"].reshape(n, -1)[:, 0].astype(np.float64)
        return rewards, done, f"next.reward from the dataset; {done_words}"
    if isinstance(reward, (SuccessAtEnd, StepCost)):
        succeeded = _success_set(reward.successes, rows, episodes, meta, label)
        what = (
            "all"
            if reward.successes == "all"
            else ("from next.success" if reward.successes == "next.success" else _ranges(sorted(succeeded)))
        )
        selected_successes = sum(e.index in succeeded for e in episodes)
        rewards, done = np.zeros(n), np.zeros(n, bool)
        for episode, start in zip(episodes, rows.starts, strict=True):
            last = start + episode.length - 1
            if isinstance(reward, StepCost):
                rewards[start : last + 1] = -float(reward.cost)
            if episode.index in succeeded:
                done[last] = True
                if isinstance(reward, SuccessAtEnd):
                    rewards[last] = float(reward.value)
        counted = f"{selected_successes} of {len(episodes)} episodes succeed ({what})"
        if isinstance(reward, SuccessAtEnd):
            if not math.isfinite(reward.value):
                raise ValueError(f"SuccessAtEnd.value must be finite, got {reward.value!r}")
            return (
                rewards,
                done,
                (
                    f"success at the episode's end: reward {reward.value:g} on the last step of a successful episode, "
                    f"which is terminal, 0 elsewhere; {counted}; other episode ends are truncations"
                ),
            )
        if not math.isfinite(reward.cost):
            raise ValueError(f"StepCost.cost must be finite, got {reward.cost!r}")
        return (
            rewards,
            done,
            (
                f"constant step cost: reward {-float(reward.cost):g} per step until the episode's end; {counted} "
                "and end terminal, the other episode ends are truncations"
            ),
        )
    if not callable(reward):
        raise TypeError(
            f"reward must be None (the dataset's next.reward), a function, SuccessAtEnd(...) or StepCost(...), "
            f"got {reward!r}"
        )
    given = [*vectors, "action", *INDEX_COLUMNS, *(k for k in meta.features if k.startswith("next."))]
    rewards = np.zeros(n)
    for episode, start in zip(episodes, rows.starts, strict=True):
        view = {
            name: rows.columns[name][start : start + episode.length].copy() for name in given if name in rows.columns
        }
        try:
            value = np.asarray(reward(view), dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"reward function failed on episode {episode.index}: {error}") from error
        value = value.reshape(-1) if value.size == episode.length else value
        if value.shape != (episode.length,):
            raise ValueError(
                f"reward function must return one reward per step: shape ({episode.length},) for episode "
                f"{episode.index}, got {value.shape}"
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"reward function returned NaN/inf for episode {episode.index}")
        rewards[start : start + episode.length] = value
    name = getattr(reward, "__qualname__", None) or type(reward).__name__
    module = getattr(reward, "__module__", None)
    return rewards, done, f"per-step function {module + '.' if module else ''}{name}; {done_words}"


# actions -----------------------------------------------------------------------------------------
def _action_space(
    files: _Files, meta: _Meta, low: Any, high: Any, actions: np.ndarray, rows: _Rows, episodes: list[_Episode]
) -> tuple[spaces.Box, str]:
    dim = math.prod(int(s) for s in meta.features["action"]["shape"])
    source = "given"
    if low is None or high is None:
        stat_low, stat_high, source = _action_stats(files, meta, dim)
        low = stat_low if low is None else low
        high = stat_high if high is None else high
    bounds = []
    for name, value in (("action_low", low), ("action_high", high)):
        try:
            array = np.broadcast_to(np.asarray(value, dtype=np.float64), (dim,)).copy()
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or {dim} numbers (the action's size), got {value!r}") from None
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be finite, got {array.tolist()}")
        bounds.append(array)
    low_a, high_a = bounds
    flat = np.flatnonzero(high_a <= low_a)
    if len(flat):
        i = int(flat[0])
        raise ValueError(
            f"action bounds ({source}) need high > low in every dimension, got low={low_a[i]} >= high={high_a[i]} in "
            f"dimension {i}; pass action_low=... and action_high=... (the actuator's range)"
        )
    outside = (actions < low_a - 1e-6) | (actions > high_a + 1e-6)
    if outside.any():
        row, dim_i = (int(v) for v in np.argwhere(outside)[0])
        episode_i = int(np.searchsorted(rows.starts, row, side="right") - 1)
        raise ValueError(
            f"action: {int(outside.any(axis=1).sum())} step(s) lie outside the action bounds ({source}) "
            f"[{low_a.tolist()}, {high_a.tolist()}]; first: episode {episodes[episode_i].index} frame "
            f"{row - rows.starts[episode_i]}, dimension {dim_i} = {float(actions[row, dim_i])!r}; pass action_low / "
            "action_high that hold every action"
        )
    box = spaces.Box(low_a.astype(np.float32), high_a.astype(np.float32), dtype=np.float32)
    return box, source


def _action_stats(files: _Files, meta: _Meta, dim: int) -> tuple[np.ndarray, np.ndarray, str]:
    hint = "; pass action_low=... and action_high=..."
    if meta.version == "v3.0":
        rel = "meta/stats.json"
        if not files.exists(rel):
            raise FileNotFoundError(f"{files.label}: {rel} is missing, which holds the action bounds{hint}")
        stats = files.read_json(rel, "the dataset's statistics")
        entry = stats.get("action") if isinstance(stats, dict) else None
        if not isinstance(entry, dict) or "min" not in entry or "max" not in entry:
            raise ValueError(f"{files.label}: {rel} has no action min/max{hint}")
        where = f"{files.label}: {rel} action"
        return _stat(entry["min"], dim, f"{where}.min"), _stat(entry["max"], dim, f"{where}.max"), rel
    rel = "meta/episodes_stats.jsonl"
    if not files.exists(rel):
        raise FileNotFoundError(f"{files.label}: {rel} is missing, which holds the action bounds{hint}")
    lows, highs = [], []
    for n, line in enumerate(files.read_jsonl(rel, "the episodes' statistics"), 1):
        stats = line.get("stats") if isinstance(line, dict) else None
        entry = stats.get("action") if isinstance(stats, dict) else None
        if not isinstance(entry, dict) or "min" not in entry or "max" not in entry:
            raise ValueError(f"{files.label}: {rel} line {n} has no action min/max{hint}")
        lows.append(_stat(entry["min"], dim, f"{files.label}: {rel} line {n} action.min"))
        highs.append(_stat(entry["max"], dim, f"{files.label}: {rel} line {n} action.max"))
    if not lows:
        raise ValueError(f"{files.label}: {rel} is empty{hint}")
    return np.min(lows, axis=0), np.max(highs, axis=0), f"{rel} (min/max over episodes)"


def _stat(value: Any, dim: int, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {dim} numbers, got {value!r}") from None
    if array.shape != (dim,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{where} must be {dim} finite numbers (the action's size), got {value!r}")
    return array


# video -------------------------------------------------------------------------------------------
@dataclass
class _Query:
    time: float  # seconds in the video file
    targets: list[tuple[np.ndarray, int]]  # (array, row) to write the frame to
    episode: int
    frame: int


def _decode_file(
    files: _Files,
    rel: str,
    camera: _Camera,
    size: tuple[int, int],
    queries: list[_Query],
    tolerance: float,
    threads: int,
) -> None:
    """Decode the frames of ``queries`` (sorted by time) from one video file into their targets."""
    import av

    where = f"{files.label}: {rel}"
    out_h, out_w = size
    with files.open(rel, f"video of {camera.key}") as handle:
        file_size = files.size(handle)
        try:
            with av.open(handle, mode="r", format="mp4") as container:  # the MP4 demuxer only
                video = [s for s in container.streams if s.type == "video"]
                if not video:
                    raise ValueError(f"{where} holds no video stream (a truncated file, or not a video?)")
                stream = video[0]
                context = stream.codec_context
                codec = context.codec.canonical_name
                if codec not in VIDEO_CODECS:
                    raise ValueError(
                        f"{where} ({camera.key}) holds {codec!r} video; the codecs read are {', '.join(VIDEO_CODECS)}"
                    )
                if camera.codec is not None and _codec_name(camera.codec) != codec:
                    raise ValueError(
                        f"{where} holds {codec!r} video, but meta/info.json declares video.codec {camera.codec!r} for "
                        f"{camera.key}"
                    )
                if (context.height, context.width) != (camera.height, camera.width):
                    raise ValueError(
                        f"{where} has {context.height}x{context.width} frames, but meta/info.json declares "
                        f"{camera.height}x{camera.width} for {camera.key}"
                    )
                if stream.frames and stream.frames > file_size:
                    raise ValueError(f"{where} declares {stream.frames:,} frames in a file of {file_size:,} bytes")
                context.thread_count = threads
                _sweep(container, stream, queries, tolerance, (out_h, out_w), camera, where)
        except av.error.FFmpegError as error:
            raise ValueError(
                f"{where} ({camera.key}) cannot be decoded ({file_size:,} bytes: truncated or corrupt?): {error}"
            ) from None


def _codec_name(name: str) -> str:
    aliases = {"libsvtav1": "av1", "libaom-av1": "av1", "libdav1d": "av1", "libx264": "h264", "libx265": "hevc"}
    return aliases.get(name, name)


def _sweep(
    container: Any,
    stream: Any,
    queries: list[_Query],
    tolerance: float,
    size: tuple[int, int],
    camera: _Camera,
    where: str,
) -> None:
    """Walk the stream in presentation order, seeking over long gaps, and match each query to the
    frame within ``tolerance`` of its time."""
    base = stream.time_base
    resize = size != (camera.height, camera.width)
    i, n = 0, len(queries)
    last_seen = -math.inf
    position = 0.0  # where the decoder stands (seconds), to decide between decoding on and seeking
    first = True
    while i < n:
        target = queries[i].time
        if first and target - tolerance <= SEEK_GAP_S:
            pass  # decode from the start
        else:
            container.seek(max(0, int(math.floor((target - tolerance) / base)) - 1), stream=stream, backward=True)
            last_seen = -math.inf
        first = False
        reseek = False
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * base)
            position = t
            if (frame.height, frame.width) != (camera.height, camera.width):  # a stream may change size
                raise ValueError(
                    f"{where}: the frame at {t:.4f} s is {frame.height}x{frame.width}, but meta/info.json declares "
                    f"{camera.height}x{camera.width} for {camera.key}"
                )
            if t < queries[i].time - tolerance:
                last_seen = t
                continue
            if queries[i].time < t - tolerance:
                _no_frame(queries[i], last_seen, t, tolerance, camera, where)
            array = None
            while i < n and abs(queries[i].time - t) <= tolerance:
                if array is None:
                    if resize:
                        array = frame.to_ndarray(format="rgb24", width=size[1], height=size[0], interpolation="AREA")
                    else:
                        array = frame.to_ndarray(format="rgb24")
                for out, row in queries[i].targets:
                    out[row] = array
                i += 1
            last_seen = t
            if i == n:
                break
            if queries[i].time - position > SEEK_GAP_S:
                reseek = True
                break
        if not reseek and i < n:
            _no_frame(queries[i], last_seen, None, tolerance, camera, where)


def _no_frame(query: _Query, before: float, after: float | None, tolerance: float, camera: _Camera, where: str) -> None:
    near = [f"{t:.4f} s" for t in (before, after) if t is not None and math.isfinite(t)]
    ends = " (the video ends there: truncated, or shorter than the table)" if after is None else ""
    raise ValueError(
        f"{where}: no frame of {camera.key} within tolerance_s={tolerance:g} of {query.time:.4f} s (episode "
        f"{query.episode}, frame_index {query.frame}); nearest decoded: {', '.join(near) or 'none'}{ends}"
    )


# the buffer --------------------------------------------------------------------------------------
def _image_sizes(image_size: Any, cameras: list[_Camera]) -> dict[str, tuple[int, int]]:
    def pair(value: Any, where: str) -> tuple[int, int]:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value, value)
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 4096 for v in value)
        ):
            raise ValueError(f"{where} must be (height, width) ints in [1, 4096] (or one int), got {value!r}")
        return int(value[0]), int(value[1])

    if image_size is None:
        return {c.key: (c.height, c.width) for c in cameras}
    if isinstance(image_size, Mapping):
        unknown = sorted(set(image_size) - {c.key for c in cameras})
        if unknown:
            raise ValueError(f"image_size names {unknown}, which are not chosen cameras {[c.key for c in cameras]}")
        return {
            c.key: pair(image_size[c.key], f"image_size[{c.key!r}]") if c.key in image_size else (c.height, c.width)
            for c in cameras
        }
    size = pair(image_size, "image_size")
    return {c.key: size for c in cameras}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """LeRobot's feature names (``observation.images.top``) as the nested observation dict."""
    return nested({".".join(_nested_path(key)): value for key, value in flat.items()})


def _space(tree: Mapping[str, Any]) -> spaces.Dict:
    return spaces.Dict({k: _space(v) if isinstance(v, Mapping) else v for k, v in tree.items()})


def read_lerobot(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    keys: Sequence[str] | None = None,
    episodes: Sequence[int] | None = None,
    image_size: int | tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
    action_low: Any = None,
    action_high: Any = None,
    reward: RewardChoice = None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | None = None,
    decode_threads: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """A LeRobot dataset (v3.0 or v2.1) as :class:`~dql_agent.buffer.OfflineBuffer`'s keyword
    arguments: the transition columns, both spaces and the metadata.

    Needs pyarrow and PyAV: ``pip install dql_agent[lerobot]``. See the module docstring for how
    observations, actions, transitions and rewards are made from the dataset.

    Args:
        source: a local dataset folder (holding ``meta/info.json``) or a Hub dataset repo id
            ``"owner/name"``; an existing folder wins. A repo id downloads, through
            ``huggingface_hub`` into its cache, only ``meta/`` and the data and video files of
            the chosen episodes and cameras.
        revision: branch, tag or commit of the Hub repo (default main; the commit read is
            recorded as ``metadata["dataset_revision"]``).
        keys: the LeRobot observation features to read, e.g. ``["observation.state",
            "observation.images.top"]``; default every ``observation.*`` feature.
        episodes: the episode indices to read; default all.
        image_size: resize frames at load time: ``(height, width)`` (or one int) for every camera,
            or ``{feature: (height, width)}`` for some (PyAV's swscale, area averaging).
        action_low, action_high: the action bounds (a number or one per dimension); default the
            dataset's min/max statistics of ``action``. Actions outside them are an error.
        reward: None for the dataset's ``next.reward`` (an error naming the choices if it has
            none); a function called once per episode with a dict of that episode's columns
            (``observation.*`` vectors, ``action``, ``timestamp``, ``frame_index``,
            ``episode_index``, ``index``, ``task_index``, ``next.*``; arrays of T rows) returning T
            rewards, reward t following action t; :class:`SuccessAtEnd` or :class:`StepCost`.
            With None or a function, ``next.done`` (when present) gives the terminals.
        tolerance_s: how far (seconds) a frame's time may be from the time the table asks for;
            default 1e-4 s as lerobot's loader, at most half a frame period.
        memory_budget_bytes: refuse a load whose buffer would take more (default 2 GiB); the
            estimate is printed before decoding.
        cache_dir: the Hub cache to use (default ``HF_HUB_CACHE``).
        local_files_only: use the Hub cache only (as ``HF_HUB_OFFLINE=1`` does).
        token: Hub token for private or gated datasets.
        decode_threads: FFmpeg decoding threads per video (0: FFmpeg chooses).
        verbose: report the plan (transitions, bytes) before decoding (:mod:`dql_agent.report`).

    Raises:
        ImportError: pyarrow or PyAV missing (the message names the extra).
        ValueError / TypeError: a bad argument, or a dataset that disagrees with itself (the
            message names the file, the field, what was expected and what was found).
        FileNotFoundError: a file the dataset needs is missing (Hub: ``HubNotFoundError``).
        ConnectionError: the Hub cannot be reached and the files are not cached
            (``HubUnreachableError``).
    """
    try:
        import av  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"reading LeRobot datasets needs pyarrow and PyAV (av), which are not installed ({error}): {INSTALL_HINT}"
        ) from error
    _check_arguments(tolerance_s, memory_budget_bytes, decode_threads)

    hub = _HubSource.resolve(source, revision, cache_dir, local_files_only, token)
    files = hub.files
    meta = _read_meta(files)
    if tolerance_s >= 0.5 / meta.fps:
        raise ValueError(
            f"tolerance_s must be under half a frame period (0.5 / fps = {0.5 / meta.fps:g} s at {meta.fps:g} fps) so "
            f"that each timestamp matches one frame, got {tolerance_s!r}"
        )
    cameras, vectors = _cameras_and_vectors(meta, keys, files.label)
    sizes = _image_sizes(image_size, cameras)
    table = _episode_table_v3 if meta.version == "v3.0" else _episode_table_v21
    chosen = _select_episodes(table(files, meta, cameras), episodes, meta, files.label)
    hub.fetch(files, chosen, cameras)

    next_columns = [k for k in ("next.reward", "next.done", "next.success") if k in meta.features]
    rows = _read_tables(files, meta, chosen, [*vectors, "action", *next_columns])
    n_frames = sum(e.length for e in chosen)
    actions = rows.columns["action"].reshape(n_frames, -1).astype(np.float64)
    frame_rewards, frame_done, reward_words = _rewards(reward, rows, chosen, meta, vectors, files.label)
    action_space, bounds_source = _action_space(files, meta, action_low, action_high, actions, rows, chosen)

    obs_index, next_index, terminals, timeouts, skipped = _transition_rows(chosen, rows.starts, frame_done, files.label)
    n_rows = len(obs_index)

    vector_dims = {key: math.prod(int(d) for d in meta.features[key]["shape"]) for key in vectors}
    per_row = _bytes_per_row(sizes, vector_dims, actions.shape[1])
    plan = (
        f"LeRobot {files.label} ({meta.version}): {len(chosen)} episode(s), {n_rows:,} transitions from {n_frames:,} "
        f"frames; cameras {', '.join(f'{c.key} {sizes[c.key][0]}x{sizes[c.key][1]}' for c in cameras) or 'none'}; "
        f"the buffer will take {n_rows * per_row:,} bytes ({n_rows * per_row / 2**20:,.1f} MiB, observation and next "
        "observation each stored)"
    )
    if n_rows * per_row > memory_budget_bytes:
        raise ValueError(
            f"{plan}, over memory_budget_bytes={int(memory_budget_bytes):,}: pass a larger memory_budget_bytes, or "
            "fewer episodes=..., keys=... or a smaller image_size=..."
        )
    if verbose:
        report("; ".join([plan, *_plan_notes(meta, keys, skipped)]))

    images_obs, images_next = _decode_cameras(
        files, chosen, cameras, sizes, rows, obs_index, next_index, n_frames, float(tolerance_s), decode_threads
    )

    observations: dict[str, Any] = {}
    next_observations: dict[str, Any] = {}
    leaves: dict[str, spaces.Box] = {}
    for key in vectors:
        values = rows.columns[key].reshape(n_frames, vector_dims[key])  # cast (and range-checked) by the buffer
        observations[key], next_observations[key] = values[obs_index], values[next_index]
        leaves[key] = spaces.Box(-np.inf, np.inf, (vector_dims[key],), np.float32)
    for camera in cameras:
        observations[camera.key], next_observations[camera.key] = images_obs[camera.key], images_next[camera.key]
        leaves[camera.key] = spaces.Box(0, 255, (*sizes[camera.key], 3), np.uint8)
    metadata: dict[str, Any] = {
        "dataset_id": hub.dataset_id,
        "dataset_revision": hub.revision,
        "dataset_format": f"LeRobotDataset {meta.version}",
        "fps": meta.fps,
        "episodes": _ranges([e.index for e in chosen]),
        "reward": reward_words,
        "action_bounds": bounds_source,
        "observation_keys": {".".join(_nested_path(k)): k for k in [*vectors, *(c.key for c in cameras)]},
    }
    resized = {c.key: list(sizes[c.key]) for c in cameras if sizes[c.key] != (c.height, c.width)}
    if resized:  # the robot's frames must be resized the same way before predict
        metadata["image_size"] = resized
    return {
        "observations": _nest(observations),
        "actions": actions[obs_index],
        "rewards": frame_rewards[obs_index].astype(np.float32),
        "next_observations": _nest(next_observations),
        "terminals": terminals,
        "timeouts": timeouts,
        "observation_space": _space(_nest(leaves)),
        "action_space": action_space,
        "metadata": metadata,
    }


def _check_arguments(tolerance_s: Any, memory_budget_bytes: Any, decode_threads: Any) -> None:
    if isinstance(tolerance_s, bool) or not isinstance(tolerance_s, (int, float)) or not tolerance_s > 0:
        raise ValueError(f"tolerance_s must be a positive number of seconds, got {tolerance_s!r}")
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer)):
        raise TypeError(f"memory_budget_bytes must be an int, got {memory_budget_bytes!r}")
    if isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 0:
        raise ValueError(f"decode_threads must be an int >= 0, got {decode_threads!r}")


def _transition_rows(
    chosen: list[_Episode], starts: Sequence[int], frame_done: np.ndarray, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The frames each transition reads (observation, next observation), its terminal and timeout
    flags, and how many one-frame episodes gave none. Rows [start, start + kept) of each episode;
    next is the following frame, or the frame itself for a terminal last step."""
    obs_frames, next_frames, terminals, timeouts, skipped = [], [], [], [], 0
    for episode, start in zip(chosen, starts, strict=True):
        length = episode.length
        kept = length if frame_done[start + length - 1] else length - 1
        if kept == 0:
            skipped += 1
            continue
        frames = np.arange(start, start + kept)
        obs_frames.append(frames)
        next_frames.append(np.minimum(frames + 1, start + length - 1))
        terminals.append(frame_done[frames])
        end = np.zeros(kept, bool)
        end[-1] = not frame_done[start + kept - 1]
        timeouts.append(end)
    if not obs_frames:
        raise ValueError(f"{label}: the chosen episodes hold no transition (each has a single frame and no done flag)")
    return (
        np.concatenate(obs_frames),
        np.concatenate(next_frames),
        np.concatenate(terminals),
        np.concatenate(timeouts),
        skipped,
    )


def _bytes_per_row(sizes: Mapping[str, tuple[int, int]], vector_dims: Mapping[str, int], action_dim: int) -> int:
    """What one transition takes in the buffer, as ``OfflineBuffer.bytes_per_transition`` counts it."""
    per_obs = sum(h * w * 3 for h, w in sizes.values()) + 4 * sum(vector_dims.values())
    return 2 * per_obs + 4 * action_dim + 4 + 2


def _plan_notes(meta: _Meta, keys: Sequence[str] | None, skipped: int) -> list[str]:
    unread = [
        f"{k} (dtype {f['dtype']!r})"
        for k, f in meta.features.items()
        if k.startswith(OBSERVATION_PREFIX) and not _readable(f["dtype"])
    ]
    notes = [f"{skipped} one-frame episode(s) skipped"] if skipped else []
    if keys is None and unread:
        notes.append(f"not read: {', '.join(unread)}")
    return notes


def _decode_cameras(
    files: _Files,
    chosen: list[_Episode],
    cameras: list[_Camera],
    sizes: Mapping[str, tuple[int, int]],
    rows: _Rows,
    obs_index: np.ndarray,
    next_index: np.ndarray,
    n_frames: int,
    tolerance_s: float,
    decode_threads: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every camera's frames, decoded straight into the observation and next-observation arrays."""
    for camera in cameras:  # every video is there, and a regular file, before any is decoded
        for rel in sorted({episode.videos[camera.key][0] for episode in chosen}):
            files.open(rel, f"video of {camera.key}").close()
    n_rows = len(obs_index)
    images_obs = {c.key: np.empty((n_rows, *sizes[c.key], 3), np.uint8) for c in cameras}
    images_next = {c.key: np.empty((n_rows, *sizes[c.key], 3), np.uint8) for c in cameras}
    obs_row_of = np.full(n_frames, -1)
    obs_row_of[obs_index] = np.arange(n_rows)
    next_rows_of: dict[int, list[int]] = {}
    for row, frame in enumerate(next_index):
        next_rows_of.setdefault(int(frame), []).append(row)
    timestamps = rows.columns["timestamp"].reshape(-1).astype(np.float64)
    for camera in cameras:
        by_file: dict[str, list[_Query]] = {}
        for episode, start in zip(chosen, rows.starts, strict=True):
            rel, offset, stop = episode.videos[camera.key]
            for frame in range(start, start + episode.length):
                targets = [(images_next[camera.key], r) for r in next_rows_of.get(frame, [])]
                if obs_row_of[frame] >= 0:
                    targets.append((images_obs[camera.key], int(obs_row_of[frame])))
                if not targets:
                    continue
                time = offset + timestamps[frame]
                if stop is not None and time > stop + tolerance_s:
                    raise ValueError(
                        f"{files.label}: episode {episode.index} frame_index {frame - start} of {camera.key} is at "
                        f"{time:.4f} s in {rel}, past the episode's to_timestamp {stop:.4f} s"
                    )
                by_file.setdefault(rel, []).append(_Query(time, targets, episode.index, frame - start))
        for rel, queries in by_file.items():
            queries.sort(key=lambda q: q.time)
            _decode_file(files, rel, camera, sizes[camera.key], queries, tolerance_s, decode_threads)
    return images_obs, images_next


# the Hub -----------------------------------------------------------------------------------------
class _HubSource:
    """Where the dataset's files are: a local folder, or a snapshot of a Hub dataset repo that
    :meth:`fetch` completes with the files the chosen episodes need."""

    def __init__(
        self,
        files: _Files,
        dataset_id: str,
        revision: str | None,
        repo: dict[str, Any] | None = None,
    ) -> None:
        self.files, self.dataset_id, self.revision, self.repo = files, dataset_id, revision, repo

    @classmethod
    def resolve(
        cls,
        source: str | os.PathLike[str],
        revision: str | None,
        cache_dir: str | os.PathLike[str] | None,
        local_files_only: bool,
        token: str | None,
    ) -> _HubSource:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a dataset folder or a Hub dataset id, got {type(source).__name__}")
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "meta" / "info.json").exists():
                raise FileNotFoundError(f"{path} is not a LeRobot dataset folder: it has no meta/info.json")
            return cls(_Files(path, path, str(path)), path.resolve().name, None)
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(source))
        except HFValidationError as error:
            raise ValueError(
                f"{str(source)!r} is neither a dataset folder nor a valid Hub dataset id ('owner/name'): {error}"
            ) from None
        from huggingface_hub import constants

        from dql_agent.hub_access import connection_error, offline_mode

        repo_id = str(source)
        offline = local_files_only or offline_mode()
        unreachable = None if offline else connection_error(constants.ENDPOINT)
        repo = {
            "repo_id": repo_id,
            "revision": revision,
            "cache_dir": None if cache_dir is None else os.fspath(cache_dir),
            "token": token,
            "offline": offline,
            "unreachable": unreachable,
        }
        folder = _snapshot(repo, ["meta/*"], "the dataset's meta/ files")
        label = repo_id if revision is None else f"{repo_id}@{revision}"
        # The cache's snapshot files link to its blobs/: links may lead there, and no further.
        allowed = folder.parent.parent if folder.parent.name == "snapshots" else folder
        commit = folder.name if folder.parent.name == "snapshots" else revision
        repo["revision"] = commit  # the rest of the files from the same commit
        if not (folder / "meta" / "info.json").exists():
            from dql_agent.hub_access import HubNotFoundError

            raise HubNotFoundError(
                f"dataset repo {repo_id!r} at {commit} has no meta/info.json: it is not a LeRobot dataset",
                repo_id,
                "meta/info.json",
                commit,
            )
        return cls(_Files(folder, allowed, label), repo_id, commit, repo)

    def fetch(self, files: _Files, episodes: list[_Episode], cameras: list[_Camera]) -> None:
        if self.repo is None:
            return
        needed = sorted({e.data_file for e in episodes} | {e.videos[c.key][0] for e in episodes for c in cameras})
        cache_only = self.repo["offline"] or self.repo["unreachable"] is not None
        if not cache_only and not all(files.exists(p) for p in needed):
            _snapshot(self.repo, needed, "the chosen episodes' data and video files")
        missing = [p for p in needed if not files.exists(p)]
        if missing:
            from dql_agent.hub_access import HubNotFoundError

            why = (
                "are not in the local cache and offline mode or local_files_only is on: download them once while online"
                if cache_only
                else "are not in the repo"
            )
            raise HubNotFoundError(
                f"dataset repo {self.repo['repo_id']!r} at {self.revision}: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} {why}",
                self.repo["repo_id"],
                missing[0],
                self.revision,
            )


def _snapshot(repo: dict[str, Any], patterns: list[str], what: str) -> Path:
    """``snapshot_download`` of ``patterns`` from the dataset repo, with dql_agent's Hub errors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        LocalEntryNotFoundError,
    )

    from dql_agent.checkpoint import library_version
    from dql_agent.hub_access import HubNotFoundError, HubUnreachableError, reason, repo_errors

    repo_id, revision = repo["repo_id"], repo["revision"]
    at = f" at revision {revision!r}" if revision else ""
    cache_only = repo["offline"] or repo["unreachable"] is not None
    try:
        with repo_errors("dataset", repo_id, revision):
            folder = snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                allow_patterns=patterns,
                cache_dir=repo["cache_dir"],
                token=repo["token"],
                local_files_only=cache_only,
                library_name="dql_agent",
                library_version=library_version(),
            )
    except LocalEntryNotFoundError as error:
        if repo["unreachable"] is not None or not cache_only:
            cause = repo["unreachable"] if repo["unreachable"] is not None else error
            raise HubUnreachableError(
                f"cannot reach the Hub at {constants.ENDPOINT} ({reason(cause)}) to download {what} of dataset repo "
                f"{repo_id!r}{at}, and they are not in the local cache. To work offline, load a dataset downloaded "
                "before (with HF_HUB_OFFLINE=1 or local_files_only=True nothing is asked of the Hub) or a local "
                "dataset folder",
                constants.ENDPOINT,
                repo_id,
            ) from error
        raise HubNotFoundError(
            f"{what} of dataset repo {repo_id!r}{at} are not in the local cache and offline mode or local_files_only "
            "is on: download them once while online",
            repo_id,
            None,
            revision,
        ) from error
    return Path(folder)
