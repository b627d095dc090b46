"""Reaching the Hugging Face Hub: whether it answers, and the errors when it does not or lacks a file.

Shared by everything that downloads from the Hub (models, LeRobot datasets), so that offline and
unreachable cases read the same everywhere. ``huggingface_hub`` is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

CONNECT_TIMEOUT = 3.0  # seconds to open a connection to the Hub before calling it unreachable
# The errors of failing to open a connection (refused, timed out, DNS, proxy, TLS) in each HTTP
# library huggingface_hub has used: requests (0.x), httpx (1.x), httpx2 (2.x).
_CONNECT_ERRORS = {
    "requests": ("ConnectionError",),  # ConnectTimeout, ProxyError and SSLError derive from it
    "httpx": ("ConnectError", "ConnectTimeout", "ProxyError"),
    "httpx2": ("ConnectError", "ConnectTimeout", "ProxyError"),
}


class HubNotFoundError(FileNotFoundError):
    """A model repo, revision or file that the Hub (or the local cache) does not have.

    ``repo_id``, ``path_in_repo`` (None when the whole repo is missing) and ``revision`` say
    which (``filename``, OSError's own attribute, is left alone).
    """

    def __init__(
        self, message: str, repo_id: str, path_in_repo: str | None = None, revision: str | None = None
    ) -> None:
        super().__init__(message)
        self.repo_id, self.path_in_repo, self.revision = repo_id, path_in_repo, revision


class HubUnreachableError(ConnectionError):
    """The Hub endpoint could not be reached (no network, connection refused or timed out, DNS,
    proxy or TLS failure), or offline mode forbids a push.

    ``endpoint`` and ``repo_id`` say what was tried; the message also says how to work offline.
    """

    def __init__(self, message: str, endpoint: str, repo_id: str) -> None:
        super().__init__(message)
        self.endpoint, self.repo_id = endpoint, repo_id


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it (``constants.is_offline_mode`` is 1.x+ only)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_connection_error(error: BaseException) -> bool:
    types = tuple(
        getattr(sys.modules[module], name)
        for module, names in _CONNECT_ERRORS.items()
        if module in sys.modules  # only an imported library can have raised its errors
        for name in names
    )
    return isinstance(error, types)


def connection_error(endpoint: str) -> BaseException | None:
    """Why no connection to ``endpoint`` opens within :data:`CONNECT_TIMEOUT` (None: the Hub answers).

    One HEAD request through huggingface_hub's own HTTP session (its proxies, certificates and
    headers), without retries. Any answer, even an HTTP error, means reachable; so does an error
    other than a failed connection (a slow answer, say), which is left to huggingface_hub.
    """
    from huggingface_hub import __version__, constants
    from huggingface_hub.utils import get_session

    read = float(constants.HF_HUB_ETAG_TIMEOUT)
    # requests (0.x) takes (connect, read), httpx (1.x, 2.x) (connect, read, write, pool).
    timeout: Any = (CONNECT_TIMEOUT, read) if __version__.startswith("0.") else (CONNECT_TIMEOUT, read, read, read)
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as error:
        return error if is_connection_error(error) else None
    return None


def reason(error: BaseException) -> str:
    """The innermost cause of ``error``, in one line: what the socket said."""
    cause: BaseException | None = error
    while cause is not None:
        error, cause = cause, cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(": ")


@contextlib.contextmanager
def repo_errors(kind: str, repo_id: str, revision: str | None, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's errors about a whole repo (gated, missing, no such revision) as a
    :class:`HubNotFoundError` naming the ``kind`` of repo ("model", "dataset") and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except GatedRepoError as error:  # a RepositoryNotFoundError too: caught first
        raise HubNotFoundError(
            f"{kind} repo {repo_id!r} is gated: accept its conditions on the Hub and pass a token "
            "(token=... or `hf auth login`)",
            repo_id,
            filename,
            revision,
        ) from error
    except RepositoryNotFoundError as error:
        raise HubNotFoundError(
            f"{kind} repo {repo_id!r} not found on {constants.ENDPOINT} (check the id; a private repo needs "
            "token=... or `hf auth login`)",
            repo_id,
            None,
            revision,
        ) from error
    except RevisionNotFoundError as error:
        raise HubNotFoundError(
            f"{kind} repo {repo_id!r} has no revision {revision!r}", repo_id, filename, revision
        ) from error
