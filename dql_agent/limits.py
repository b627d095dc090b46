"""The memory budget: how much one read of a file, or one batch, may allocate.

Files declare sizes (an ``.npy`` header's shape, an HDF5 dataset's extent, a safetensors header's
offsets, a zip entry's uncompressed size) and a batch's size is the caller's; both are checked
against this budget before anything of that size is allocated, so a 2 kB file that declares 10^10
rows is a ``ValueError`` naming the file, the size and the budget, never a raw ``MemoryError`` or
the kernel's OOM killer.

The budget is the memory available now (Linux: ``MemAvailable`` of ``/proc/meminfo``, lowered to
what a cgroup limit leaves; elsewhere the physical memory): what a read of that size needs could
not be allocated anyway, so nothing that would have loaded is refused. Set ``DQL_AGENT_MEMORY_BUDGET``
(bytes, or with a unit: ``512MiB``, ``8GiB``, ``2G``) to fix it, lower for a shared machine or higher
to let the operating system's overcommit decide.
"""

from __future__ import annotations

import os
import re

__all__ = ["MEMORY_BUDGET_ENV", "MemoryBudgetError", "check_budget", "format_bytes", "memory_budget_bytes"]

MEMORY_BUDGET_ENV = "DQL_AGENT_MEMORY_BUDGET"
FALLBACK_BUDGET_BYTES = 16 * 2**30
"""Where the system says nothing of its memory (no /proc, no sysconf)."""
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_UNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class MemoryBudgetError(ValueError):
    """A declared size or a batch larger than the memory budget; the message names what, how large,
    the budget and how to change it."""


def memory_budget_bytes() -> int:
    """The budget in bytes: ``$DQL_AGENT_MEMORY_BUDGET`` when set, else the memory available now."""
    text = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if text:
        return parse_bytes(text, MEMORY_BUDGET_ENV)
    return _available_memory()


def parse_bytes(text: str, name: str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1000000"`` -> bytes; anything else a ValueError naming ``name``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"{name} must be a size in bytes such as 8GiB, 512MiB or 1000000, got {text!r}")
    unit = match.group(2) or ""
    scale = _BINARY_UNITS.get(unit) or _UNITS[unit]
    value = int(float(match.group(1)) * scale)
    if value < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_budget(what: str, nbytes: int, budget: int | None = None, hint: str = "") -> None:
    """Refuse (:class:`MemoryBudgetError`) ``nbytes`` for ``what`` when more than ``budget`` (default
    :func:`memory_budget_bytes`); ``hint`` ends the message (what else the user can do)."""
    budget = memory_budget_bytes() if budget is None else budget
    if nbytes <= budget:
        return
    source = f"${MEMORY_BUDGET_ENV}" if os.environ.get(MEMORY_BUDGET_ENV, "").strip() else "the memory available now"
    raise MemoryBudgetError(
        f"{what} needs {format_bytes(nbytes)} ({nbytes:,} bytes), more than the memory budget of "
        f"{format_bytes(budget)} ({source}; set {MEMORY_BUDGET_ENV} to change it){': ' + hint if hint else ''}"
    )


def _available_memory() -> int:
    available = _meminfo_available()
    limit = _cgroup_room()
    candidates = [value for value in (available, limit) if value is not None]
    if candidates:
        return min(candidates)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return FALLBACK_BUDGET_BYTES


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (None without a limit); the page
    cache it holds counts as room, since the kernel reclaims it before refusing memory."""
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read(64).strip()
        if limit == b"max":
            return None
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            current = int(f.read(64).strip())
        cache = 0
        with open("/sys/fs/cgroup/memory.stat", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("file "):
                    cache = int(line.split()[1])
        return max(int(limit) - current + cache, 0)
    except (OSError, ValueError, IndexError):
        return None
