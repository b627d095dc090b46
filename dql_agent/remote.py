"""The robot side of a policy server: :class:`RemotePolicy`, SB3's ``predict`` over the network.

>>> from dql_agent.remote import RemotePolicy
>>> policy = RemotePolicy("ws://gpu-box:8765", token=os.environ["DQL_AGENT_TOKEN"])
>>> action, state = policy.predict(obs, deterministic=True)

Its only dependencies are numpy, ``websockets`` (the synchronous client) and ``msgpack``: importing
this module imports no torch, gymnasium or Stable-Baselines3, so it runs on a small robot computer
(``import dql_agent`` is lazy). The server is ``dql-agent serve MODEL`` (:mod:`dql_agent.server`);
the wire format is :mod:`dql_agent.wire`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import ssl
import threading
import time
import urllib.parse
from typing import Any, NamedTuple

import numpy as np

from dql_agent import wire

try:
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import ClientConnection, connect
except ImportError as error:  # pragma: no cover - the serve extra is missing
    raise ImportError("RemotePolicy needs websockets (>= 13) and msgpack: pip install 'dql_agent[serve]'") from error

__all__ = ["ActionQueue", "RemotePolicy"]

logger = logging.getLogger("dql_agent.remote")

TOKEN_ENV = "DQL_AGENT_TOKEN"  # as dql_agent.server.TOKEN_ENV (that module imports torch-side code)
MAX_REPLY_BYTES = 64 * 2**20
MESSAGE_TOO_BIG = 1009  # the websocket close code of a message over the peer's size limit
ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "FloatingPointError": FloatingPointError,
    "RuntimeError": RuntimeError,
}


class ActionQueue(NamedTuple):
    """The ``state`` :meth:`RemotePolicy.predict` returns when the model acts in chunks
    (``n_action_steps`` > 1) or from a history (``n_obs_steps`` > 1): each env's pending actions and
    last observations, SB3's recurrent-state convention."""

    actions: np.ndarray
    """(n_envs, n_action_steps, *action_shape): the chunk each env is executing."""
    next: np.ndarray
    """(n_envs,) int: the index of each env's next action; n_action_steps means a new chunk is due."""
    history: dict[tuple[str, ...], np.ndarray] | None = None
    """Each observation leaf's last n_obs_steps values per env, (n_envs, k, *shape), oldest first
    (the first observation repeated at an episode's start); None when the model sees one."""


class RemotePolicy:
    """A policy served by ``dql-agent serve``, with SB3's ``predict``.

    ``predict(observation, state=None, episode_start=None, deterministic=False) -> (actions, state)``
    takes one observation or a batch ``(n_envs, *obs_shape)`` (a dict of them for Dict spaces) and
    answers with the same batching, so SB3's ``evaluate_policy``, VecEnvs and
    :func:`dql_agent.integrations.video.record_video` use it as they use a local model. When the
    model acts in chunks, ``state`` carries each env's pending chunk (:class:`ActionQueue`) and
    ``episode_start`` drops it; otherwise ``state`` is returned as given (None).

    Args:
        url: ``ws://host:port`` or, with TLS, ``wss://host:port``.
        token: the server's token; None reads the ``DQL_AGENT_TOKEN`` environment variable (and
            sends none if it is unset).
        timeout: seconds to wait for each answer; longer raises :class:`TimeoutError`.
        connect_timeout: seconds for one connection attempt (TCP, TLS and websocket handshakes).
        reconnect_timeout: how long to keep trying when the connection is lost (a server
            restart) or cannot be opened, retrying with backoff from 50 ms to 1 s; then
            :class:`ConnectionError`. Each reconnection is logged as a warning
            (``logging.getLogger("dql_agent.remote")``), and a server that now serves other weights
            is logged too.
        ca_file: a PEM file of the certificate(s) to trust for ``wss://`` (e.g. the server's
            self-signed certificate); default the system's.
        ssl_context: a client ``ssl.SSLContext`` instead (overrides ``ca_file``).

    Raises (on construction and on any request): :class:`ConnectionError` (the server cannot be
    reached), :class:`PermissionError` (the token was refused), :class:`TimeoutError`; from
    ``predict``: ValueError/TypeError naming the observation entry at fault (checked here and by
    the server), and those the server's ``predict`` raised.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        reconnect_timeout: float = 10.0,
        ca_file: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if not isinstance(url, str):
            raise TypeError(f"url must be a str like 'ws://host:8765', got {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url must look like ws://host:port or wss://host:port, got {url!r}")
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("reconnect_timeout", reconnect_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        self.url = url
        self.timeout, self.connect_timeout, self.reconnect_timeout = float(timeout), connect_timeout, reconnect_timeout
        self._token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        if self._token is not None and not isinstance(self._token, str):
            raise TypeError(f"token must be a str or None, got {type(self._token).__name__}")
        if parts.scheme == "wss":
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context(
                cafile=None if ca_file is None else os.fspath(ca_file)
            )
        elif ssl_context is not None or ca_file is not None:
            raise ValueError(f"ca_file/ssl_context need a wss:// url, got {url!r}")
        else:
            self._ssl = None
        self._connection: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.reconnects = 0
        """How many times the connection was lost and opened again."""
        self.weights_sha256: str | None = None
        self.max_payload_bytes: int | None = None
        self.metadata: dict[str, Any] = self._request({"type": "metadata"})
        self._read_metadata()

    # what the server serves ---------------------------------------------------------------------
    def _read_metadata(self) -> None:
        model = self.metadata.get("model")
        server = self.metadata.get("server")
        if not isinstance(model, dict) or not isinstance(server, dict):
            raise ConnectionError(f"{self.url} did not answer like a dql_agent policy server (metadata {model!r:.80})")
        if server.get("protocol") != wire.PROTOCOL_VERSION:
            raise ConnectionError(
                f"{self.url} speaks protocol {server.get('protocol')!r}; this client speaks {wire.PROTOCOL_VERSION}: "
                "install the same dql_agent on both sides"
            )
        self.observation_spec = wire.spec_from_json(model["observation_space"], "observation_space")
        action_spec = wire.spec_from_json(model["action_space"], "action_space")
        if not isinstance(action_spec, wire.BoxSpec):
            raise ConnectionError(f"{self.url} serves a model whose action space is not a Box")
        self.action_spec = action_spec
        self.action_horizon = int(model.get("action_horizon", 1))
        self.n_action_steps = int(model.get("n_action_steps", 1))
        self.n_obs_steps = int(model.get("n_obs_steps", 1))
        self.request_spec = wire.with_history(self.observation_spec, self.n_obs_steps)
        self.weights_sha256 = str(model.get("weights_sha256"))
        self.max_payload_bytes = int(server.get("max_payload_bytes", MAX_REPLY_BYTES))
        if self.n_obs_steps < 1 or not 1 <= self.n_action_steps <= self.action_horizon:
            raise ConnectionError(
                f"{self.url} serves a model with n_obs_steps={self.n_obs_steps}, n_action_steps={self.n_action_steps}, "
                f"action_horizon={self.action_horizon}, which no dql_agent model has"
            )

    @property
    def observation_space(self) -> Any:
        """The served model's observation space as a gymnasium space (needs gymnasium; the
        torch- and gymnasium-free description is :attr:`observation_spec`)."""
        return _gymnasium_space(self.observation_spec, "observation_space")

    @property
    def action_space(self) -> Any:
        """The served model's action space as a gymnasium Box (see :attr:`action_spec`)."""
        return _gymnasium_space(self.action_spec, "action_space")

    def check_env_spaces(self, observation_space: Any, action_space: Any) -> None:
        """Raise ValueError if an env's spaces (gymnasium's, or anything with their fields) differ
        from the served model's: keys, shapes and bounds (``record_video`` calls this)."""
        for name, ours, theirs in (
            ("observation_space", self.observation_spec, observation_space),
            ("action_space", self.action_spec, action_space),
        ):
            if not _spec_matches(ours, theirs):
                raise ValueError(f"env {name} {theirs} does not match the served model's {name} {ours}")

    def health(self) -> dict[str, Any]:
        """The server's status and counters."""
        reply = self._request({"type": "health"})
        return {key: value for key, value in reply.items() if key not in ("type", "id")}

    # acting ---------------------------------------------------------------------------------------
    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """SB3's ``predict``: one observation or a batch ``(n_envs, *obs_shape)`` in, the same
        batching out, in the action space's bounds; see the class docstring for ``state``."""
        if not isinstance(deterministic, (bool, np.bool_)):
            raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
        batch, rows, vectorized = wire.batch(self.observation_spec, observation)
        if self.n_action_steps == 1 and self.n_obs_steps == 1:
            actions = self.act(batch, bool(deterministic))[:, 0]  # (B, *action_shape)
            return (actions if vectorized else actions[0]), state
        queue = self._queue_for(state, episode_start, rows, batch)
        due = queue.next >= self.n_action_steps
        if due.any():
            ask = batch if queue.history is None else wire.from_leaves(self.request_spec, queue.history)
            chunks = self.act(wire.take(self.request_spec, ask, due), bool(deterministic))
            queue.actions[due] = chunks[:, : self.n_action_steps]
            queue.next[due] = 0
        actions = queue.actions[np.arange(rows), queue.next]
        queue.next[:] += 1
        return (actions if vectorized else actions[0]), queue

    def act(self, observation: Any, deterministic: bool = True) -> np.ndarray:
        """One request: a batch as :func:`dql_agent.wire.batch` makes it -> the served actions
        ``(B, action_horizon, *action_shape)`` (whole chunks; ``predict`` runs them)."""
        reply = self._request({"type": "act", "observation": observation, "deterministic": deterministic})
        actions = reply.get("actions")
        rows = wire.rows(self.request_spec, observation)
        shape = (rows, self.action_horizon, *self.action_spec.shape)
        if not isinstance(actions, np.ndarray) or actions.shape != shape:
            raise RuntimeError(
                f"{self.url} answered with actions {getattr(actions, 'shape', actions)!r}; expected {shape}"
            )
        return actions

    def _queue_for(self, state: Any, episode_start: Any, rows: int, batch: Any) -> ActionQueue:
        """A copy of ``state``'s pending chunks and histories (a fresh queue for None) with
        ``batch``, this step's observations, appended; envs whose episode starts are emptied."""
        k, steps = self.n_action_steps, self.n_obs_steps
        latest = wire.take_leaves(self.observation_spec, batch)
        if state is None:
            actions = np.zeros((rows, k, *self.action_spec.shape), np.float32)
            starts = np.ones(rows, bool)
            queue = ActionQueue(actions, np.full(rows, k, np.int64), None)
        else:
            if (
                not isinstance(state, ActionQueue)
                or state.actions.shape[:2] != (rows, k)
                or state.next.shape != (rows,)
                or (state.history is None) != (steps == 1)
            ):
                given = type(state).__name__
                raise ValueError(f"state must be None or the ActionQueue predict returned for {rows} envs, got {given}")
            starts = np.zeros(rows, bool)
            if episode_start is not None:
                flags = np.asarray(episode_start).reshape(-1)
                if flags.shape != (rows,):
                    raise ValueError(f"episode_start must have one flag per env ({rows}), got shape {flags.shape}")
                starts = flags.astype(bool)
            queue = ActionQueue(state.actions.copy(), state.next.copy(), state.history)
        next_action = np.where(starts, k, queue.next)
        history = None
        if steps > 1:
            history = {}
            for path, value in latest.items():
                fresh = np.repeat(value[:, None], steps, axis=1)
                if queue.history is None:
                    history[path] = fresh
                    continue
                shifted = np.concatenate([queue.history[path][:, 1:], value[:, None]], axis=1)
                history[path] = np.where(starts.reshape(-1, *([1] * (shifted.ndim - 1))), fresh, shifted)
        return ActionQueue(queue.actions, next_action, history)

    # the connection -------------------------------------------------------------------------------
    def _open(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            connection = connect(
                self.url,
                additional_headers=headers,
                ssl=self._ssl,
                open_timeout=self.connect_timeout,
                close_timeout=1,
                max_size=MAX_REPLY_BYTES,
                compression=None,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            if status in (401, 403):
                raise PermissionError(
                    f"the policy server at {self.url} refused the connection (HTTP {status}): "
                    + ("the token is wrong" if self._token else f"it needs a token (token=... or {TOKEN_ENV})")
                ) from None
            raise
        except InvalidURI as error:
            raise ValueError(f"url {self.url!r} is not a websocket URL: {error}") from None
        # websockets >= 17.1 wants connect() entered as a context manager; earlier ones accept it too.
        return self._stack.enter_context(connection)

    def _connect(self) -> int:
        """Open the connection, retrying with backoff for up to ``reconnect_timeout``; returns the
        attempts it took."""
        start, delay, attempts = time.monotonic(), 0.05, 0
        while True:
            attempts += 1
            try:
                self._connection = self._open()
                return attempts
            except PermissionError:  # a refused token does not heal by retrying
                raise
            except ssl.SSLError as error:  # nor does an untrusted certificate
                raise ConnectionError(
                    f"TLS with the policy server at {self.url} failed: {error}; for a self-signed certificate pass "
                    "ca_file='cert.pem'"
                ) from None
            except (OSError, EOFError, InvalidHandshake, ConnectionClosed) as error:  # EOFError: websockets < 14
                last = error
            elapsed = time.monotonic() - start
            if elapsed + delay > self.reconnect_timeout:
                raise ConnectionError(
                    f"cannot reach the policy server at {self.url}: {_describe(last)} (after {attempts} attempt(s) in "
                    f"{elapsed:.1f} s); is it running (dql-agent serve MODEL --port ...)?"
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def _drop(self) -> None:
        self._connection = None
        with contextlib.suppress(Exception):
            self._stack.close()
        self._stack = contextlib.ExitStack()

    def _reconnect(self, reason: BaseException) -> None:
        logger.warning("lost the connection to the policy server at %s (%s); reconnecting", self.url, _describe(reason))
        self._drop()
        started = time.monotonic()
        attempts = self._connect()
        self.reconnects += 1
        digest = self.weights_sha256
        try:
            self.metadata = self._exchange({"type": "metadata"})
        except TimeoutError:
            raise
        except (ConnectionClosed, OSError) as error:
            self._drop()
            raise ConnectionError(
                f"the policy server at {self.url} closed the connection again: {_describe(error)}"
            ) from None
        self._read_metadata()
        logger.warning(
            "reconnected to the policy server at %s after %d attempt(s) in %.2f s",
            self.url,
            attempts,
            time.monotonic() - started,
        )
        if digest is not None and self.weights_sha256 != digest:
            logger.warning(
                "the policy server at %s now serves other weights: sha256 %s (was %s)",
                self.url,
                self.weights_sha256,
                digest,
            )

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request and its answer; if the connection was lost (a server restart), reconnect
        (within ``reconnect_timeout``, saying so) and send it once more. Threads sharing a
        RemotePolicy take turns."""
        with self._lock:
            return self._request_locked(message)

    def _request_locked(self, message: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(2):
            if self._connection is None:
                self._connect()
            try:
                return self._exchange(message)
            except TimeoutError:
                raise
            except (ConnectionClosed, OSError) as error:
                closed = error.rcvd if isinstance(error, ConnectionClosed) else None
                if closed is not None and closed.code == MESSAGE_TOO_BIG:
                    self._drop()
                    raise ValueError(
                        f"the policy server at {self.url} closed the connection: the request was larger than its "
                        f"max_payload_bytes ({self.max_payload_bytes})"
                    ) from None
                if attempt == 1:
                    self._drop()
                    raise ConnectionError(
                        f"the policy server at {self.url} closed the connection again right after reconnecting: "
                        f"{_describe(error)}"
                    ) from None
                self._reconnect(error)
        raise ConnectionError(f"no answer from {self.url}")  # not reached: the loop returns or raises

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` on the open connection and wait ``timeout`` for its answer."""
        connection = self._connection
        if connection is None:
            raise ConnectionError(f"not connected to {self.url}")
        request_id = next(self._ids)
        data = wire.pack({**message, "id": request_id})
        limit = self.max_payload_bytes
        if limit is not None and len(data) > limit:
            raise ValueError(
                f"the request is {len(data)} bytes; the policy server at {self.url} takes at most {limit} "
                "(max_payload_bytes): send fewer observations per call"
            )
        connection.send(data)
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                frame = connection.recv(timeout=remaining)
            except TimeoutError:
                raise TimeoutError(
                    f"no answer to the {message['type']!r} request from the policy server at {self.url} within "
                    f"{self.timeout} s (timeout=); it may be overloaded or stuck"
                ) from None
            try:
                reply = wire.unpack(frame if isinstance(frame, bytes) else frame.encode())
            except ValueError as error:
                raise RuntimeError(f"{self.url} answered with a message this client cannot read: {error}") from None
            if reply.get("id") == request_id:
                break
            if reply.get("type") == "error" and reply.get("id") is None:
                break  # the server could not read the request far enough to know its id
            # else: the late answer to a request that timed out: dropped
        if reply["type"] == "error":
            kind = ERRORS.get(str(reply.get("kind")), RuntimeError)
            raise kind(f"policy server at {self.url}: {reply.get('message')}")
        return reply

    def close(self) -> None:
        """Close the connection (a later request opens a new one)."""
        self._drop()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        model = self.metadata.get("model", {})
        return (
            f"RemotePolicy({self.url!r}: {model.get('algorithm')}, weights sha256 {str(self.weights_sha256)[:12]}, "
            f"action_horizon={self.action_horizon})"
        )


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _spec_matches(spec: wire.SpaceSpec, space: Any) -> bool:
    if isinstance(spec, wire.DictSpec):
        members = getattr(space, "spaces", None)
        return (
            isinstance(members, dict)
            and set(members) == set(spec.spaces)
            and all(_spec_matches(sub, members[key]) for key, sub in spec.spaces.items())
        )
    try:
        low = np.asarray(space.low, np.float64)
        high = np.asarray(space.high, np.float64)
        shape = tuple(space.shape)
    except (AttributeError, TypeError, ValueError):
        return False
    return (
        shape == spec.shape
        and np.allclose(np.broadcast_to(low, shape), spec.low, equal_nan=True)
        and np.allclose(np.broadcast_to(high, shape), spec.high, equal_nan=True)
    )


def _gymnasium_space(spec: wire.SpaceSpec, name: str) -> Any:
    try:
        from gymnasium import spaces
    except ImportError:
        raise ImportError(
            f"RemotePolicy.{name} is a gymnasium space and gymnasium is not installed; "
            f"use RemotePolicy.{name.replace('space', 'spec')} (shape, dtype, low, high)"
        ) from None
    if isinstance(spec, wire.DictSpec):
        return spaces.Dict({key: _gymnasium_space(sub, name) for key, sub in spec.spaces.items()})
    return spaces.Box(spec.low.astype(spec.dtype), spec.high.astype(spec.dtype), spec.shape, spec.dtype)
