"""Opening the files the library reads: regular files only, never blocking, never leaving a folder.

Every file dql_agent reads (checkpoints, datasets, their metadata) goes through
:func:`open_regular`:

- its type is checked before it is opened (``lstat``, then ``stat`` of a link's target) and again
  on the open handle (``fstat``), which is opened with ``O_NONBLOCK``: a FIFO named
  ``model.safetensors`` is refused instead of blocking the reader forever, and a device such as
  ``/dev/zero`` is refused instead of being read until memory runs out;
- within a folder (a checkpoint, a dataset), a symlink whose target resolves outside the folder is
  refused, and the message says where it leads: the folder's files are the folder's;
- a path the user names directly may be a link (``latest -> run3/model.zip``): it is followed, and
  what it leads to must still be a regular file.

What a file declares about its contents (rows, shapes, offsets) is bounded separately, by its real
size and by :mod:`dql_agent.limits`' memory budget, where each format is parsed.
"""

from __future__ import annotations

import os
import stat
from typing import IO, BinaryIO

__all__ = ["describe_mode", "is_inside", "open_regular", "read_exactly", "regular_size"]

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once (and is then refused by its type)
    | getattr(os, "O_NOCTTY", 0)  # a terminal never becomes the controlling one
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)  # Windows
)


def describe_mode(mode: int) -> str:
    """What a file of this ``st_mode`` is, for messages: 'a FIFO (named pipe)', 'a character device', ..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return f"a special file (mode {stat.filemode(mode)})"


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether the resolved ``path`` lies in the resolved ``folder`` (or is it)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def open_regular(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    within: str | os.PathLike[str] | None = None,
    within_label: str = "its folder",
    dir_fd: int | None = None,
    error: type[Exception] = ValueError,
) -> BinaryIO:
    """``path`` opened for reading in binary mode, once it is known to be a regular file.

    Args:
        path: the file; a name relative to ``dir_fd`` when that is given.
        name: how messages name the file (default: the path).
        within: a folder the file must resolve inside; a symlink leading out of it is refused.
            None follows links anywhere (a path the user named).
        within_label: how messages name ``within`` ('the dataset', 'the checkpoint folder').
        dir_fd: an open directory ``path`` is relative to (``within`` must then be its path):
            the file is opened in that very directory, even if another took its name meanwhile.
        error: the exception class of the refusals (a ValueError subclass such as CheckpointError).

    Raises:
        FileNotFoundError: ``path`` does not exist (callers name what was expected).
        error: ``path`` is a FIFO, device, socket or directory, a link leaving ``within``, or
            cannot be opened (permissions, a link loop); the message names it and says which.
    """
    shown = name or os.fspath(path)
    full = os.path.join(os.fspath(within), os.fspath(path)) if dir_fd is not None and within is not None else path
    info = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    target: str | os.PathLike[str] = path
    if within is not None and (stat.S_ISLNK(info.st_mode) or dir_fd is None):
        # A link anywhere along the path (lerobot's videos/ folder, a checkpoint's weights) resolves here.
        real = os.path.realpath(full)
        if not is_inside(real, within):
            raise error(f"{shown} is a link that leads out of {within_label} (to {real}); refused")
    if stat.S_ISLNK(info.st_mode):
        target, dir_fd = os.path.realpath(full), None
        info = os.stat(target)  # FileNotFoundError for a dangling link
    if not stat.S_ISREG(info.st_mode):  # refused before opening: opening a device can act on it
        raise error(f"{shown} is not a regular file: it is {describe_mode(info.st_mode)}; refused")
    try:
        fd = os.open(target, _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as failure:
        raise error(f"cannot open {shown}: {failure.strerror or failure}") from None
    try:
        opened = os.fstat(fd)  # the file itself: whatever took the name after the check is seen here
        if not stat.S_ISREG(opened.st_mode):
            raise error(f"{shown} is not a regular file: it is {describe_mode(opened.st_mode)}; refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def regular_size(handle: IO[bytes]) -> int:
    """The size of an open file, from ``fstat``."""
    return os.fstat(handle.fileno()).st_size


def read_exactly(handle: IO[bytes], size: int, name: str, error: type[Exception] = ValueError) -> bytes:
    """``size`` bytes from ``handle``'s position: fewer (the file shrank) or more (it grew while
    read) is an ``error`` naming the file, so what was checked is what was read."""
    data = handle.read(size + 1)
    if len(data) != size:
        change = "shrank" if len(data) < size else "grew"
        raise error(f"{name} {change} while it was read (expected {size:,} bytes, read {len(data):,})")
    return data
