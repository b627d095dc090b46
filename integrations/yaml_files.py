"""YAML files read with bounds: a regular file of bounded size, bounded nesting and alias expansion.

``yaml.safe_load`` builds whatever a document describes: nine lines of anchors and aliases (a
"billion laughs") expand to 10^9 nodes, ``[[[[...`` nests past Python's recursion limit, and a
FIFO named ``spec.yaml`` blocks the reader forever. :func:`load_yaml_file` refuses each of these
before anything is built, from the file's type and size and then from the parser's event stream
(which PyYAML produces iteratively, without building the document), and reports every problem,
a syntax error included, in one line that names the file.

Used by ``dql-agent sweep`` (:meth:`dql_agent.integrations.ray.SweepSpec.from_yaml`); needs PyYAML,
which Ray installs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dql_agent.files import open_regular, regular_size

__all__ = [
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "SpecFileError",
    "check_yaml_bounds",
    "load_yaml_file",
    "read_regular_file",
]

MAX_YAML_BYTES = 1 << 20
"""Largest file read (1 MiB): a sweep spec is a few hundred bytes."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of sequences and mappings."""
MAX_YAML_NODES = 100_000
"""Most nodes the document may hold once every alias is expanded (what ``safe_load`` would build)."""


class SpecFileError(ValueError):
    """A spec file that cannot be read or that exceeds a bound; the message is one line naming it."""


def read_regular_file(path: str | os.PathLike[str], limit: int = MAX_YAML_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened as the library opens every file (:func:`dql_agent.files.open_regular`: without
    blocking, its type checked before and after opening), so a FIFO, a device such as
    ``/dev/zero`` or a folder is refused by its type; a file that grows while it is read is cut at
    ``limit + 1`` bytes and refused."""
    try:
        with open_regular(path, error=SpecFileError) as handle:
            size = regular_size(handle)
            if size > limit:
                raise SpecFileError(f"{path}: expected at most {limit:,} bytes, the file has {size:,}")
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if len(data) > limit:
        raise SpecFileError(f"{path}: expected at most {limit:,} bytes, it grew past that while read")
    return data


def _one_line(error: Any, where: str) -> SpecFileError:
    """A PyYAML error as one line: its problem and where it is (line, column)."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(error, "context", None)
    text = f"{context}: {problem}" if context else problem
    return SpecFileError(f"{where}: not valid YAML: {' '.join(str(text).split())}{at}")


class _Frame:
    """An open sequence or mapping while the events stream by."""

    __slots__ = ("anchor", "is_mapping", "keys", "nodes", "next_is_key")

    def __init__(self, anchor: str | None, is_mapping: bool) -> None:
        self.anchor, self.is_mapping = anchor, is_mapping
        self.nodes, self.next_is_key, self.keys = 1, True, set[tuple[str, str]]()


class _Bounds:
    """Follows the parser's events: the open collections, each anchor's size, the nodes so far."""

    def __init__(self, where: str, max_depth: int, max_nodes: int) -> None:
        import yaml

        self.yaml, self.resolver = yaml, yaml.resolver.Resolver()
        self.where, self.max_depth, self.max_nodes = where, max_depth, max_nodes
        self.sizes: dict[str, int] = {}  # anchor -> nodes of its finished node
        self.stack: list[_Frame] = []
        self.total = 0

    def refuse(self, what: str, event: Any) -> SpecFileError:
        return SpecFileError(f"{self.where}: {what} (line {event.start_mark.line + 1})")

    def event(self, event: Any) -> None:
        yaml = self.yaml
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(self.stack) >= self.max_depth:
                raise self.refuse(f"nested deeper than {self.max_depth} levels", event)
            self.grow(1, event)
            self.stack.append(_Frame(event.anchor, isinstance(event, yaml.MappingStartEvent)))
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            done = self.stack.pop()
            if done.anchor is not None:
                self.sizes[done.anchor] = done.nodes
            self.placed(event, done.nodes)
        elif isinstance(event, yaml.ScalarEvent):
            self.grow(1, event)
            if event.anchor is not None:
                self.sizes[event.anchor] = 1
            self.placed(event, 1)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.sizes:  # an alias inside its own anchor: an endless document
                raise self.refuse(f"the alias *{event.anchor} refers to itself", event)
            self.grow(self.sizes[event.anchor], event)
            self.placed(event, self.sizes[event.anchor])

    def grow(self, nodes: int, event: Any) -> None:
        self.total += nodes
        if self.total > self.max_nodes:
            raise self.refuse(
                f"expands to more than {self.max_nodes:,} nodes; a YAML anchor (&name) repeated by aliases (*name) "
                "multiplies the document",
                event,
            )

    def placed(self, event: Any, nodes: int) -> None:
        """A finished node (scalar, alias or collection) of ``nodes`` nodes joins the open collection."""
        frame = self.stack[-1] if self.stack else None
        if frame is None:
            return
        frame.nodes += nodes
        if not frame.is_mapping:
            return
        if frame.next_is_key and isinstance(event, self.yaml.ScalarEvent):
            # the key as safe_load sees it: 1 and "1" differ, foo and "foo" do not
            tag = event.tag or self.resolver.resolve(self.yaml.ScalarNode, event.value, event.implicit)
            if (tag, event.value) in frame.keys:
                raise self.refuse(f"the key {event.value!r} appears twice in one mapping", event)
            frame.keys.add((tag, event.value))
        frame.next_is_key = not frame.next_is_key


def check_yaml_bounds(text: str, where: str, max_depth: int = MAX_YAML_DEPTH, max_nodes: int = MAX_YAML_NODES) -> None:
    """Refuse a document nested deeper than ``max_depth``, expanding to more than ``max_nodes``
    nodes, holding an alias inside its own anchor or a key twice in one mapping; from the parser's
    events alone (nothing is built). An alias counts as many nodes as its anchor's node holds."""
    import yaml

    bounds = _Bounds(where, max_depth, max_nodes)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            bounds.event(event)
    except yaml.YAMLError as error:
        raise _one_line(error, where) from None


def load_yaml_file(path: str | os.PathLike[str]) -> Any:
    """The document in the YAML file ``path``, read as ``yaml.safe_load`` reads it, after the checks
    of :func:`read_regular_file` and :func:`check_yaml_bounds`; any problem is a
    :class:`SpecFileError` (a ValueError) in one line naming the file."""
    import yaml

    where = str(Path(path))
    data = read_regular_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecFileError(f"{where}: expected UTF-8 text, byte {error.start} is not") from None
    check_yaml_bounds(text, where)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _one_line(error, where) from None
