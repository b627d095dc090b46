"""The policy server's wire format, shared by :mod:`dql_agent.server` and :mod:`dql_agent.remote`.

Torch-free and gymnasium-free (numpy and msgpack only), so the robot side imports it alone.

**Messages.** Every message is one binary websocket frame holding one msgpack map with a ``"type"``
and, from a client, an integer ``"id"`` that the reply repeats:

====================  ==========================================================================
client -> server      fields
====================  ==========================================================================
``act``               ``observation``: a batch, an array ``(B, *obs_shape)`` or, for a Dict space,
                      a map of such arrays per key (nested Dicts nest); ``deterministic``: bool
``metadata``          (none)
``health``            (none)
====================  ==========================================================================

====================  ==========================================================================
server -> client      fields
====================  ==========================================================================
``actions``           ``actions``: ``(B, action_horizon, *action_shape)`` in the action Box;
                      ``action_horizon``: int (1 until a model predicts action chunks)
``metadata``          ``model``: algorithm, library version, weights SHA-256, spaces as JSON,
                      the action-chunk settings; ``server``: protocol, batching, limits
``health``            ``status`` ("ok"), uptime, connections, requests, batches, errors
``error``             ``kind`` (``ValueError``, ``TypeError``, ``FloatingPointError``,
                      ``RuntimeError``), ``message``
====================  ==========================================================================

**Arrays** travel as msgpack extension type :data:`ARRAY_EXT` whose payload is: 1 byte, the
length n of the dtype name; n bytes, the numpy dtype name in ASCII (one of :data:`WIRE_DTYPES`);
1 byte, the number of dimensions d; d little-endian uint64, the shape; then the elements in C
order, little-endian. Nothing else is ever decoded into an object: no pickle, no numpy object
arrays, no Python classes. A reader in another language needs a msgpack library and these lines.

The observation batch is checked against the served model's observation space
(:meth:`SpaceSpec.check_batch`: Dict keys, shapes, dtypes, finite values) before the server
hands it to torch; :meth:`SpaceSpec.batch` is the client's side of the same rules (SB3's batching
of one observation or ``(n_envs, *obs_shape)``, each entry cast to its space's dtype).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import msgpack
except ImportError as error:  # pragma: no cover - the serve extra is missing
    raise ImportError(
        "dql_agent's policy server and RemotePolicy need msgpack and websockets: pip install 'dql_agent[serve]'"
    ) from error

__all__ = [
    "ARRAY_EXT",
    "ERROR_KINDS",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "BoxSpec",
    "DictSpec",
    "SpaceSpec",
    "pack",
    "spec_from_json",
    "unpack",
]

PROTOCOL_VERSION = 1
"""Bumped on any change a reader of an older version would misread."""
ARRAY_EXT = 1
"""msgpack extension type code of an array."""
WIRE_DTYPES = frozenset(
    ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")
)
"""The only element types an array may have on the wire."""
ERROR_KINDS = ("ValueError", "TypeError", "FloatingPointError", "RuntimeError")
"""The ``kind`` of an error reply; the client raises the builtin of that name."""
MAX_DIMS = 32
MAX_SPACE_DEPTH = 16
MESSAGE_TYPES = frozenset(("act", "metadata", "health"))


# arrays -----------------------------------------------------------------------------------------
def encode_array(array: np.ndarray) -> msgpack.ExtType:
    """A numeric array as the :data:`ARRAY_EXT` extension (little-endian, C order)."""
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise TypeError(f"arrays on the wire must have one of the dtypes {sorted(WIRE_DTYPES)}, got {array.dtype}")
    if array.ndim > MAX_DIMS:
        raise ValueError(f"arrays on the wire have at most {MAX_DIMS} dimensions, got {array.ndim}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    header = struct.pack(f"<B{len(name)}sB{array.ndim}Q", len(name), name.encode(), array.ndim, *array.shape)
    return msgpack.ExtType(ARRAY_EXT, header + data)


def decode_array(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_array`; a ValueError says what is malformed. The array is a
    writable copy in native byte order."""
    try:
        (name_len,) = struct.unpack_from("<B", data, 0)
        name = data[1 : 1 + name_len].decode("ascii")
        (ndim,) = struct.unpack_from("<B", data, 1 + name_len)
        if ndim > MAX_DIMS:
            raise ValueError(f"an array has {ndim} dimensions; at most {MAX_DIMS} are accepted")
        offset = 2 + name_len
        shape = struct.unpack_from(f"<{ndim}Q", data, offset)
        offset += 8 * ndim
    except (struct.error, UnicodeDecodeError):
        raise ValueError("an array's header is truncated or not ASCII") from None
    if name not in WIRE_DTYPES:
        raise ValueError(f"an array has dtype {name!r}; the wire carries only {sorted(WIRE_DTYPES)}")
    dtype = np.dtype(name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) - offset != expected:
        raise ValueError(
            f"an array of dtype {name} and shape {tuple(shape)} needs {expected} bytes of data, "
            f"got {len(data) - offset}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(array.dtype.newbyteorder("="), copy=True)


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):  # numpy scalars as plain numbers
        return value.item()
    raise TypeError(f"cannot send a {type(value).__name__} over the wire (numbers, strings, arrays, lists, maps)")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}; only arrays ({ARRAY_EXT}) are accepted")
    return decode_array(data)


def pack(message: Mapping[str, Any]) -> bytes:
    """One message as msgpack bytes (numpy arrays as :data:`ARRAY_EXT`)."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A message from msgpack bytes: a map with a string ``"type"``; a ValueError names what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"a message must be a binary frame (msgpack), got {type(data).__name__}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_hook, use_list=True)
    except ValueError as error:  # msgpack's ExtraData, FormatError, StackError (too deep) and our ext errors
        raise ValueError(f"malformed message: {str(error) or type(error).__name__}") from None
    except Exception as error:  # msgpack raises a few non-ValueErrors on garbage (e.g. TypeError on bad keys)
        raise ValueError(f"malformed message: {type(error).__name__}: {error}") from None
    if not isinstance(message, dict):
        raise ValueError(f"a message must be a msgpack map, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ValueError(f"a message must have a string 'type', got {message.get('type')!r:.80}")
    return message


# spaces ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxSpec:
    """A Box space as the wire sees it: shape, dtype and bounds (gymnasium's ``Box`` fields)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class DictSpec:
    """A Dict space: named entries in the space's own order (the order the model flattens)."""

    spaces: dict[str, SpaceSpec]


SpaceSpec = BoxSpec | DictSpec


def spec_from_json(data: Any, field: str = "space", depth: int = 0) -> SpaceSpec:
    """A :class:`BoxSpec`/:class:`DictSpec` from ``dql_agent.spaces.space_to_json``'s JSON
    (``{"type": "Box", "shape", "dtype", "low", "high"}`` or ``{"type": "Dict", "spaces"}``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{field} must be a JSON object describing a space, got {data!r:.80}")
    kind = data.get("type")
    if kind == "Dict":
        members = data.get("spaces")
        if depth >= MAX_SPACE_DEPTH or not isinstance(members, dict):
            raise ValueError(f"{field} must hold a map of spaces nested at most {MAX_SPACE_DEPTH} deep")
        return DictSpec({str(k): spec_from_json(v, f"{field}.{k}", depth + 1) for k, v in members.items()})
    if kind != "Box":
        raise ValueError(f"{field}.type must be 'Box' or 'Dict', got {kind!r:.80}")
    shape, dtype = data.get("shape"), data.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{field}.shape must be a list of ints >= 0, got {shape!r:.80}")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"{field}.dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r:.80}")
    bounds = []
    for name in ("low", "high"):
        values = data.get(name)
        if not isinstance(values, list) or len(values) != math.prod(shape):
            raise ValueError(f"{field}.{name} must be a list of {math.prod(shape)} numbers, got {values!r:.80}")
        bounds.append(np.array([float(v) for v in values], dtype=np.float64).reshape(shape))
    return BoxSpec(tuple(shape), np.dtype(dtype), bounds[0], bounds[1])


def leaves(spec: SpaceSpec, name: str = "observation") -> list[tuple[str, tuple[str, ...], BoxSpec]]:
    """(name in errors, key path, Box) of every Box entry, in the space's order."""
    if isinstance(spec, BoxSpec):
        return [(name, (), spec)]
    out = []
    for key, sub in spec.spaces.items():
        out += [(n, (key, *path), box) for n, path, box in leaves(sub, f"{name}[{key!r}]")]
    return out


def with_history(spec: SpaceSpec, history: int) -> SpaceSpec:
    """The spec of observation histories: every Box gains a leading axis of ``history`` steps
    (what a model with ``n_obs_steps`` > 1 is asked with: each leaf ``(B, k, *shape)``)."""
    if history == 1:
        return spec
    if isinstance(spec, DictSpec):
        return DictSpec({key: with_history(sub, history) for key, sub in spec.spaces.items()})
    shape = (history, *spec.shape)
    return BoxSpec(shape, spec.dtype, np.broadcast_to(spec.low, shape), np.broadcast_to(spec.high, shape))


def take_leaves(spec: SpaceSpec, tree: Any) -> dict[tuple[str, ...], np.ndarray]:
    """A batch's arrays by key path (for per-leaf bookkeeping such as histories)."""
    return {path: _get(tree, path) for _, path, _ in leaves(spec)}


def from_leaves(spec: SpaceSpec, values: dict[tuple[str, ...], np.ndarray]) -> Any:
    """Inverse of :func:`take_leaves`: the batch (a dict for Dict specs) from arrays by key path."""
    return _tree(spec, values)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _tree(spec: SpaceSpec, values: dict[tuple[str, ...], np.ndarray], path: tuple[str, ...] = ()) -> Any:
    if isinstance(spec, BoxSpec):
        return values[path]
    return {key: _tree(sub, values, (*path, key)) for key, sub in spec.spaces.items()}


def _check_keys(spec: SpaceSpec, value: Any, name: str) -> None:
    """Dict observations must be maps with exactly the space's keys (recursively)."""
    if isinstance(spec, BoxSpec):
        if isinstance(value, Mapping):
            raise TypeError(f"{name} must be an array of shape {spec.shape}, got a dict with keys {list(value)[:10]}")
        return
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict for a Dict observation space, got {type(value).__name__}")
    missing = [k for k in spec.spaces if k not in value]
    if missing:
        raise ValueError(f"{name} is missing key(s) {missing}; expected keys {list(spec.spaces)}")
    unknown = [k for k in value if k not in spec.spaces]
    if unknown:
        raise ValueError(f"{name} has unexpected key(s) {unknown[:10]}; expected keys {list(spec.spaces)}")
    for key, sub in spec.spaces.items():
        _check_keys(sub, value[key], f"{name}[{key!r}]")


def _check_values(name: str, array: np.ndarray) -> None:
    """Float entries must be finite (a NaN/inf observation would give a NaN action)."""
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{name} contains NaN/inf value(s), first at index {list(index)}: {array[index]!r}")


def _cast(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The client's cast of an observation entry to its space's dtype, refusing lossy ones."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    if array.dtype == dtype:
        _check_values(name, array)
        return array
    if dtype.kind == "f":
        _check_values(name, array)
        with np.errstate(over="ignore"):
            cast = array.astype(dtype)
        _check_values(name, cast)  # 1e39 becomes inf in float32
        return cast
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.dtype.kind == "b":
            array = array.astype(np.uint8)
        bad = ~np.isfinite(array) | (array < info.min) | (array > info.max) | (array != np.round(array))
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} must hold whole numbers in [{info.min}, {info.max}] ({dtype}), got {array[index]!r} at "
                f"index {list(index)} ({int(bad.sum())} value(s) outside)"
            )
    return array.astype(dtype)


def batch(spec: SpaceSpec, observation: Any) -> tuple[Any, int, bool]:
    """The client side: one observation or a batch ``(n_envs, *obs_shape)`` (a dict of them for a
    Dict space) -> (the batch as the wire carries it, rows, was it batched?).

    Batching is read off the first entry, as SB3 does; every other entry must agree. Entries are
    cast to their space's dtype (floats must be finite, integer spaces take whole numbers in range).
    """
    if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
        raise ValueError(
            "observation is an (obs, info) tuple: pass only the observation, e.g. "
            "`obs, info = env.reset(); policy.predict(obs)`"
        )
    _check_keys(spec, observation, "observation")
    found = []
    for name, path, box in leaves(spec):
        value = _get(observation, path)
        try:
            array = np.asarray(value)
        except Exception as error:  # ragged lists and the like
            raise TypeError(f"{name} is not an array: {error}") from None
        found.append((name, path, box, array))
    name, _, box, probe = found[0]
    if probe.shape == box.shape:
        vectorized, rows = False, 1
    elif probe.ndim == len(box.shape) + 1 and probe.shape[1:] == box.shape:
        vectorized, rows = True, probe.shape[0]
    else:
        raise ValueError(
            f"{name} has shape {probe.shape}; expected {box.shape} for one observation or "
            f"(n_envs, {', '.join(map(str, box.shape))}) for a batch"
        )
    values = {}
    for leaf_name, path, leaf, array in found:
        expected = (rows, *leaf.shape) if vectorized else leaf.shape
        if array.shape != expected:
            given = f"a batch of {rows}" if vectorized else "one observation"
            raise ValueError(
                f"{leaf_name} has shape {array.shape}; expected {expected} ({given}, as {name} has shape {probe.shape})"
            )
        values[path] = _cast(leaf_name, array, leaf.dtype).reshape(rows, *leaf.shape)
    return _tree(spec, values), rows, vectorized


def check_batch(spec: SpaceSpec, observation: Any, max_rows: int | None = None) -> int:
    """The server side: ``observation`` as decoded from an ``act`` message must be a batch of the
    space exactly (keys, shapes ``(B, *shape)`` with one B, dtypes, finite floats); returns B.

    Raises a ValueError/TypeError naming the entry, what was expected and what was received."""
    _check_keys(spec, observation, "observation")
    rows: int | None = None
    first = ""
    for name, path, box in leaves(spec):
        array = _get(observation, path)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name} must be an array (msgpack extension {ARRAY_EXT}), got {type(array).__name__}")
        if array.dtype != box.dtype:
            raise TypeError(f"{name} must have dtype {box.dtype.name} (the model's space), got {array.dtype.name}")
        if array.ndim != len(box.shape) + 1 or array.shape[1:] != box.shape:
            raise ValueError(
                f"{name} has shape {array.shape}; expected (batch, {', '.join(map(str, box.shape))})"
                + ("" if rows is None else f" with batch {rows} as {first}")
            )
        if rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            raise ValueError(f"{name} has {array.shape[0]} row(s), but {first} has {rows}: one batch size for all keys")
        _check_values(name, array)
    if rows is None:
        raise ValueError("the observation space has no entries (an empty Dict)")
    if max_rows is not None and rows > max_rows:
        raise ValueError(f"observation has {rows} rows; this server takes at most {max_rows} per request")
    return rows


def rows(spec: SpaceSpec, tree: Any) -> int:
    """The batch size of a checked batch of ``spec``."""
    _, path, _ = leaves(spec)[0]
    return int(_get(tree, path).shape[0])


def concatenate(spec: SpaceSpec, trees: list[Any]) -> Any:
    """Several checked batches of ``spec`` as one (rows in order)."""
    values = {path: np.concatenate([_get(t, path) for t in trees]) for _, path, _ in leaves(spec)}
    return _tree(spec, values)


def take(spec: SpaceSpec, tree: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` (indices or a boolean mask) of a batch of ``spec``."""
    return _tree(spec, {path: _get(tree, path)[rows] for _, path, _ in leaves(spec)})
