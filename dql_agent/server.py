"""Serve a policy to a robot over the network: ``dql-agent serve MODEL`` and :func:`serve`.

The model runs here (on the GPU when there is one); the robot's computer sends observations and
gets actions back through :class:`dql_agent.remote.RemotePolicy`, which needs only numpy and the
transport client.

**Transport: websockets + msgpack.** Observations and actions travel as binary websocket frames
of msgpack holding typed raw arrays (dtype, shape, bytes; see :mod:`dql_agent.wire`), so a
(48, 48, 3) camera frame costs its 6,912 bytes plus a header, with no base64, no pickle and no
numpy object arrays. A websocket is one long-lived TCP connection with 2-14 bytes of framing per
message and no per-request HTTP handshake (0.9-1.2 ms added to a 2.6 ms ``predict`` on loopback on
this project's 2-core VM, most of it thread wake-ups; docs/BENCHMARKS.md), and it is full duplex,
so streamed action chunks fit the same connection later. gRPC would give the same binary framing
and streaming, but needs a .proto file with code generated for every client and the grpcio wheel,
a compiled C++ runtime; the robot side here is the pure-Python ``websockets`` client and
``msgpack`` (compiled, with a pure-Python fallback), both widely packaged and maintained, and
msgpack readers exist in every language a robot stack uses.

**Security.** The server binds to loopback by default; any other interface needs a token
(``Authorization: Bearer <token>``), checked in the opening handshake before any message is read
(a wrong or missing token gets HTTP 401 and nothing else). TLS is one option away
(``tls=(certfile, keyfile)``). Messages are bounded (``max_payload_bytes``, websockets'
``max_size``: a larger frame closes that connection with code 1009), and every observation is
checked against the model's observation space (Dict keys, shapes, dtypes, finite values) on
arrival, before it can join a batch or reach torch: a malformed request gets an error reply and
costs no other client anything.

**Batching.** Requests are batched dynamically. A batch is dispatched when it holds
``max_batch`` rows, when every connected client has a request in it (nobody else could join), or
``max_delay_ms`` after its first request arrived, whichever comes first: so a lone client is
served at once, and no request waits more than ``max_delay_ms`` for others beyond the time the
worker spends on the batch before. One worker thread runs ``predict``; the event loop never
blocks on it. With ``batching="merge"`` (default) the requests of a batch run as one ``predict``
call over all their rows. Its arithmetic then depends on the batch's size (BLAS picks kernels by
shape; measured: actions equal to the last bit or, in a few rows, a different near-tied candidate,
see docs/BENCHMARKS.md), so with several concurrent clients an answer may differ from a
standalone ``model.predict`` in the last bits; a batch of one request is that request's own
``predict`` call, bit for bit. ``batching="exact"`` runs each request as its own ``predict``
call, so every answer equals ``model.predict`` on the same observations exactly, at the cost of
the throughput merging buys.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import numpy as np

from dql_agent import wire

try:
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as websocket_serve
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request, Response
except ImportError as error:  # pragma: no cover - the serve extra is missing
    raise ImportError(
        "dql_agent's policy server needs websockets (>= 13) and msgpack: pip install 'dql_agent[serve]'"
    ) from error

__all__ = [
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "PolicyServer",
    "add_serve_arguments",
    "run_serve",
    "serve",
]

logger = logging.getLogger("dql_agent.server")

DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 64
"""Rows one merged ``predict`` call takes at most (a single larger request still runs, alone)."""
DEFAULT_MAX_DELAY_MS = 2.0
"""The longest a request waits for others to join its batch."""
DEFAULT_MAX_PAYLOAD_BYTES = 8 * 2**20
"""Largest message accepted: 8 MiB is 400 frames of 84x84x3 pixels."""
DEFAULT_MAX_CONNECTIONS = 64
MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "DQL_AGENT_TOKEN"
"""Environment variable holding the token, read by ``dql-agent serve`` and :class:`RemotePolicy`."""
BATCHING_MODES = ("merge", "exact")


# settings ---------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1); any other name or address,
    including '0.0.0.0' and '' (every interface), is reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: Any) -> str | None:
    """None, or a token of at least :data:`MIN_TOKEN_LENGTH` printable ASCII characters without spaces."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")
    if len(token) < MIN_TOKEN_LENGTH or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError(
            f"token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces, got "
            f"{len(token)} character(s); make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def check_host(host: Any, token: str | None) -> str:
    """The interface to bind: loopback needs nothing, any other interface needs a token."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str (an address or a name), got {type(host).__name__}")
    if not is_loopback(host) and token is None:
        shown = host or "'' (every interface)"
        raise ValueError(
            f"host {shown} is reachable from the network: serving there needs a token (token=... or "
            f"--token-file, or the {TOKEN_ENV} environment variable), and TLS is advised (tls=(cert, key)); "
            "without a token, bind to 127.0.0.1 and reach it through an SSH tunnel"
        )
    return host


def tls_context(tls: Any) -> ssl.SSLContext | None:
    """A server SSLContext from None, an SSLContext, a (certfile, keyfile) pair or one PEM file
    holding both; unreadable files are a ValueError naming them."""
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        cert, key = tls, None
    elif isinstance(tls, (tuple, list)) and len(tls) == 2 and all(isinstance(p, (str, os.PathLike)) for p in tls):
        cert, key = tls
    else:
        raise TypeError(
            f"tls must be None, an ssl.SSLContext, a PEM path or a (certfile, keyfile) pair, got {tls!r:.80}"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(
            f"tls: cannot load the certificate {str(cert)!r} and key {key and str(key)!r}: {error}"
        ) from None
    return context


def _positive(name: str, value: Any, kind: type = int, allow_zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be {'a number' if kind is float else 'an int'}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return kind(value)


# the model --------------------------------------------------------------------------------------
def load_model(source: str | os.PathLike[str], device: str = "auto") -> Any:
    """A saved model folder, a ``.zip`` of one or a Hub repo id, loaded by :func:`dql_agent.load_from_hub`."""
    import dql_agent

    return dql_agent.load_from_hub(source, device=device)


def weights_sha256(model: Any) -> str:
    """The SHA-256 of the model's ``model.safetensors`` bytes: config.json's ``model_sha256``."""
    from dql_agent.checkpoint import weights_bytes

    return hashlib.sha256(weights_bytes(dict(model.policy.state_dict()))).hexdigest()


class ServedModel:
    """What the server needs of a model: its spaces as the wire checks them, its action-chunk
    settings, its description for ``metadata``, and ``act`` (a batch in, ``(B, h, *action_shape)`` out)."""

    def __init__(self, model: Any):
        if not callable(getattr(model, "predict", None)) or not hasattr(model, "observation_space"):
            raise TypeError(f"model must be a dql_agent model (with predict and spaces), got {type(model).__name__}")
        from dql_agent.spaces import space_to_json

        self.model = model
        config = getattr(model, "config", None)
        # Action chunks: fields a config may add; a model without them acts one step at a time.
        self.action_horizon = int(getattr(config, "action_horizon", 1))
        self.n_action_steps = int(getattr(config, "n_action_steps", 1))
        self.n_obs_steps = int(getattr(config, "n_obs_steps", 1))
        self.chunked = self.action_horizon > 1 or self.n_obs_steps > 1
        if self.chunked and not callable(getattr(model, "predict_chunk", None)):
            raise NotImplementedError(
                f"the model acts in chunks (action_horizon={self.action_horizon}, n_obs_steps={self.n_obs_steps}) "
                "but has no predict_chunk(observation, deterministic)"
            )
        self.observation_json = space_to_json(model.observation_space)
        self.action_json = space_to_json(model.action_space)
        # What a request holds: one observation per env, or its last n_obs_steps (each leaf (B, k, *shape)).
        single = wire.spec_from_json(self.observation_json, "observation_space")
        self.observation_spec = wire.with_history(single, self.n_obs_steps)
        self.action_shape = tuple(int(n) for n in model.action_space.shape)
        device = getattr(model, "device", None)
        self.description: dict[str, Any] = {
            "algorithm": str(getattr(model, "algorithm", type(model).__name__)),
            "library": "dql_agent",
            "library_version": _library_version(),
            "weights_sha256": weights_sha256(model),
            "num_timesteps": int(getattr(model, "num_timesteps", 0)),
            "observation_space": self.observation_json,
            "action_space": self.action_json,
            "action_horizon": self.action_horizon,
            "n_action_steps": self.n_action_steps,
            "n_obs_steps": self.n_obs_steps,
            "device": str(device) if device is not None else "unknown",
        }

    def act(self, observation: Any, deterministic: bool) -> np.ndarray:
        """A checked batch (see :func:`dql_agent.wire.check_batch`) -> actions (B, h, *action_shape)."""
        rows = wire.rows(self.observation_spec, observation)
        if self.chunked:
            actions = np.asarray(self.model.predict_chunk(observation, deterministic=deterministic))
            actions = actions.reshape(rows, self.action_horizon, *self.action_shape)
        else:
            actions = np.asarray(self.model.predict(observation, deterministic=deterministic)[0])[:, None]
        expected = (rows, self.action_horizon, *self.action_shape)
        if actions.shape != expected:
            raise RuntimeError(f"the model returned actions of shape {actions.shape}; expected {expected}")
        return actions


def _library_version() -> str:
    import dql_agent

    return str(dql_agent.__version__)


# the server -------------------------------------------------------------------------------------
@dataclass
class _Request:
    observation: Any
    rows: int
    deterministic: bool
    future: asyncio.Future
    arrived: float


@dataclass
class ServerStats:
    """Counters reported by ``health`` (and kept on :attr:`PolicyServer.stats`)."""

    messages: int = 0
    act_requests: int = 0
    rows: int = 0
    batches: int = 0
    predict_calls: int = 0
    predict_seconds: float = 0.0
    largest_batch_rows: int = 0
    errors: int = 0
    refused_handshakes: int = 0


class PolicyServer:
    """A websocket server for one model; see the module docstring for the protocol and its rules.

    Args:
        model: a dql_agent model, or what :func:`dql_agent.load_from_hub` loads (a saved folder, a
            ``.zip`` of one, a Hub repo id), loaded onto ``device``.
        host: interface to bind; loopback by default. Any other needs ``token``.
        port: TCP port; 0 picks a free one (read it from :attr:`port` once started).
        token: the shared secret clients send as ``Authorization: Bearer <token>``; None serves
            without one (loopback only).
        tls: None, an ``ssl.SSLContext``, a ``(certfile, keyfile)`` pair or one PEM file with both;
            clients then use ``wss://``.
        max_batch: rows one merged ``predict`` call takes at most.
        max_delay_ms: the longest a request waits for others to join its batch (0: never waits).
        max_payload_bytes: the largest message accepted (websockets' ``max_size``).
        batching: ``"merge"`` (one ``predict`` per batch) or ``"exact"`` (one per request, so each
            answer equals ``model.predict`` bit for bit).
        max_connections: connections served at once; more get HTTP 503 at the handshake.
        device: where a model given as a path or repo id is loaded ('auto': CUDA when present).

    Use :meth:`serve_forever` to block (``dql-agent serve``), or :meth:`start`/:meth:`stop`, or
    ``with PolicyServer(...) as server:``, to run it in a background thread.
    """

    def __init__(
        self,
        model: Any,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        token: str | None = None,
        tls: Any = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        batching: str = "merge",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        device: str = "auto",
    ):
        self.token = check_token(token)
        self.host = check_host(host, self.token)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        self.ssl_context = tls_context(tls)
        self.max_batch = _positive("max_batch", max_batch)
        self.max_delay = _positive("max_delay_ms", max_delay_ms, float, allow_zero=True) / 1000.0
        self.max_payload_bytes = _positive("max_payload_bytes", max_payload_bytes)
        self.max_connections = _positive("max_connections", max_connections)
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
        self.batching = batching
        if not is_loopback(self.host) and self.ssl_context is None:
            logger.warning(
                "serving on %s without TLS: the token and the observations cross the network in clear text; "
                "pass tls=(certfile, keyfile) (--tls-cert/--tls-key)",
                self.host or "every interface",
            )
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, device)
        self.served = ServedModel(model)
        self.port = port
        self.stats = ServerStats()
        self._started = time.monotonic()
        self._queue: collections.deque[_Request] = collections.deque()
        self._computing: list[_Request] = []  # the batch in the worker
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, for stop() from other threads
        self._stop = asyncio.Event()  # both made again by each run, on its own loop
        self._wakeup = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None
        self._metadata = {
            "type": "metadata",
            "model": self.served.description,
            "server": {
                "protocol": wire.PROTOCOL_VERSION,
                "batching": self.batching,
                "max_batch": self.max_batch,
                "max_delay_ms": self.max_delay * 1000.0,
                "max_payload_bytes": self.max_payload_bytes,
            },
        }

    @property
    def url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS); every interface is shown as 127.0.0.1."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self.ssl_context else 'ws'}://{host}:{self.port}"

    # running ------------------------------------------------------------------------------------
    def serve_forever(self, on_ready: Callable[[PolicyServer], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or :meth:`stop`; ``on_ready`` is called
        once the port is bound."""
        asyncio.run(self._main(on_ready, signals=threading.current_thread() is threading.main_thread()))

    def start(self, timeout: float = 30.0) -> PolicyServer:
        """Serve in a background thread; returns once the port is bound (or raises why it is not)."""
        if self._thread is not None:
            raise RuntimeError("this server is already running")
        ready = threading.Event()

        def run() -> None:
            try:
                self.serve_forever(on_ready=lambda _: ready.set())
            except BaseException as error:  # e.g. the port is taken: reported by start()
                self._startup_error = error
                ready.set()

        self._thread = threading.Thread(target=run, name="dql-agent-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the policy server did not start within {timeout} s")
        if self._startup_error is not None:
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: close every connection and wait for the server's thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _main(self, on_ready: Callable[[PolicyServer], None] | None, signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop, self._wakeup = loop, asyncio.Event(), asyncio.Event()
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dql-agent-predict")
        try:
            # Warm-up in the worker: the first predict pays for lazy initialisation; no client should.
            await loop.run_in_executor(executor, self.served.act, _zeros(self.served.observation_spec), True)
            async with websocket_serve(
                self._handle,
                self.host,
                self.port,
                process_request=self._process_request,
                ssl=self.ssl_context,
                max_size=self.max_payload_bytes,
                max_queue=4,  # frames buffered per connection: one request at a time is the protocol
                compression=None,  # arrays barely compress; deflate would cost latency (and invite bombs)
                server_header=None,  # an unauthenticated peer learns nothing, not even the software
                open_timeout=10,
                close_timeout=2,
            ) as server:
                self.port = int(next(iter(server.sockets)).getsockname()[1])
                batcher = asyncio.create_task(self._batch_loop(executor))
                logger.info("serving %s at %s", self.served.description["algorithm"], self.url)
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                batcher.cancel()
                # Requests still queued or being computed get an answer, so their handlers end.
                for request in [*self._queue, *self._computing]:
                    if not request.future.done():
                        request.future.set_result(RuntimeError("the policy server is shutting down"))
                self._queue.clear()
        finally:
            executor.shutdown(wait=True)
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    # the handshake: the token, before anything is read ------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.token is not None:
            values = request.headers.get_all("Authorization")
            scheme, _, given = values[0].partition(" ") if len(values) == 1 else ("", "", "")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                self.stats.refused_handshakes += 1
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "a valid token is required\n")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        if self._connections >= self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    # one connection: one request at a time, in order ---------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        self._connections += 1
        try:
            async for message in connection:
                reply = await self._reply(message)
                await connection.send(reply)
        except ConnectionClosed:
            pass  # the client left (mid-request too): its answer, if any, is dropped
        except Exception:  # a bug here must cost this connection only
            logger.exception("error in a client connection; closing it")
        finally:
            self._connections -= 1
            self._wakeup.set()  # the batcher may have been waiting for this client

    async def _reply(self, message: str | bytes) -> bytes:
        self.stats.messages += 1
        request_id: Any = None
        try:
            if isinstance(message, str):
                raise ValueError("messages must be binary frames of msgpack, got a text frame")
            request = wire.unpack(message)
            request_id = request.get("id")
            if isinstance(request_id, bool) or not isinstance(request_id, int):
                raise ValueError(f"a request needs an integer 'id', got {request_id!r:.40}")
            kind = request["type"]
            if kind == "act":
                return await self._act(request, request_id)
            if kind == "metadata":
                return wire.pack({**self._metadata, "id": request_id})
            if kind == "health":
                return wire.pack({"type": "health", "id": request_id, **self.health()})
            raise ValueError(f"unknown request type {kind!r:.40}; expected one of {sorted(wire.MESSAGE_TYPES)}")
        except (ValueError, TypeError) as error:
            return self._error(request_id, error)

    def _error(self, request_id: Any, error: BaseException) -> bytes:
        self.stats.errors += 1
        kind = type(error).__name__
        kind = kind if kind in wire.ERROR_KINDS else "RuntimeError"
        return wire.pack({"type": "error", "id": request_id, "kind": kind, "message": str(error) or kind})

    async def _act(self, request: dict[str, Any], request_id: int) -> bytes:
        deterministic = request.get("deterministic", False)
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {deterministic!r:.40}")
        observation = request.get("observation")
        rows = wire.check_batch(self.served.observation_spec, observation)
        self.stats.act_requests += 1
        if rows == 0:
            actions: Any = np.zeros((0, self.served.action_horizon, *self.served.action_shape), np.float32)
        else:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._queue.append(_Request(observation, rows, deterministic, future, loop.time()))
            self._wakeup.set()
            actions = await future
            if isinstance(actions, BaseException):
                return self._error(request_id, actions)
        return wire.pack(
            {"type": "actions", "id": request_id, "actions": actions, "action_horizon": self.served.action_horizon}
        )

    def health(self) -> dict[str, Any]:
        """Status and counters (the ``health`` reply)."""
        return {
            "status": "ok",
            "uptime_s": round(time.monotonic() - self._started, 3),
            "connections": self._connections,
            "queued_requests": len(self._queue),
            **vars(self.stats),
        }

    # dynamic batching -----------------------------------------------------------------------------
    async def _batch_loop(self, executor: ThreadPoolExecutor) -> None:
        loop, wakeup = asyncio.get_running_loop(), self._wakeup
        while True:
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            if self.batching == "merge":
                deadline = self._queue[0].arrived + self.max_delay
                # Wait for more only while the batch has room and some connected client could still add to it.
                while sum(r.rows for r in self._queue) < self.max_batch and len(self._queue) < self._connections:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    wakeup.clear()
                    try:
                        await asyncio.wait_for(wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            while self._queue and rows + self._queue[0].rows <= self.max_batch:
                rows += self._queue[0].rows
                batch.append(self._queue.popleft())
            self._computing = batch
            results = await loop.run_in_executor(executor, self._compute, batch)
            self._computing = []
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    def _predict(self, observation: Any, deterministic: bool) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.served.act(observation, deterministic)
        finally:
            self.stats.predict_calls += 1
            self.stats.predict_seconds += time.perf_counter() - started

    def _compute(self, batch: list[_Request]) -> list[np.ndarray | BaseException]:
        """Runs in the worker thread: the batch's actions, or each failed request's exception."""
        results: list[np.ndarray | BaseException | None] = [None] * len(batch)
        served = self.served
        for deterministic in (True, False):
            group = [i for i, request in enumerate(batch) if request.deterministic == deterministic]
            if self.batching == "merge" and len(group) > 1:
                try:
                    merged = wire.concatenate(served.observation_spec, [batch[i].observation for i in group])
                    actions = self._predict(merged, deterministic)
                    start = 0
                    for i in group:
                        results[i] = actions[start : start + batch[i].rows]
                        start += batch[i].rows
                    continue
                except Exception:  # find the request at fault: each runs alone below
                    logger.warning("a merged batch of %d requests failed; running them one by one", len(group))
            for i in group:
                try:
                    results[i] = self._predict(batch[i].observation, deterministic)
                except Exception as error:
                    logger.warning("predict failed on a request: %r", error)
                    results[i] = error
        self.stats.batches += 1
        self.stats.rows += sum(request.rows for request in batch)
        self.stats.largest_batch_rows = max(self.stats.largest_batch_rows, sum(request.rows for request in batch))
        return cast("list[np.ndarray | BaseException]", results)  # every request has its answer by now


def _zeros(spec: wire.SpaceSpec) -> Any:
    if isinstance(spec, wire.BoxSpec):
        return np.zeros((1, *spec.shape), spec.dtype)
    return {key: _zeros(sub) for key, sub in spec.spaces.items()}


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    token: str | None = None,
    tls: Any = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    batching: str = "merge",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    device: str = "auto",
) -> None:
    """Serve ``model`` to :class:`dql_agent.remote.RemotePolicy` clients until Ctrl-C (blocking).

    The arguments are :class:`PolicyServer`'s; use that class to serve from a background thread.

    >>> serve("dql_demo/model")  # ws://127.0.0.1:8765, loopback only
    >>> serve(model, host="0.0.0.0", token=os.environ["DQL_AGENT_TOKEN"], tls=("cert.pem", "key.pem"))
    """
    PolicyServer(
        model,
        host,
        port,
        token=token,
        tls=tls,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_payload_bytes=max_payload_bytes,
        batching=batching,
        max_connections=max_connections,
        device=device,
    ).serve_forever()


# command line -----------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dql-agent serve MODEL`` (and ``--device`` unless the parser has it)."""
    parser.add_argument("model", help="a saved model folder, a .zip of one, or a Hugging Face Hub repo id")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback; others need a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one (printed)")
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"file whose first line is the token clients must send (default: the {TOKEN_ENV} environment variable)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="TLS certificate (chain); clients then use wss://")
    parser.add_argument("--tls-key", metavar="PEM", help="TLS private key (default: in --tls-cert)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="rows per merged predict call")
    parser.add_argument(
        "--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_MS, help="longest wait for a batch to fill"
    )
    parser.add_argument("--max-payload-bytes", type=int, default=DEFAULT_MAX_PAYLOAD_BYTES, help="largest message")
    parser.add_argument(
        "--batching",
        choices=BATCHING_MODES,
        default="merge",
        help="merge: one predict per batch; exact: one per request (answers equal model.predict bit for bit)",
    )
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if "--device" not in parser._option_string_actions:
        parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda'")
    parser.set_defaults(func=run_serve)


def read_token(args: argparse.Namespace) -> str | None:
    """The token from ``--token-file`` (first line), else from :data:`TOKEN_ENV`, else None."""
    if args.token_file is not None:
        try:
            lines = Path(args.token_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--token-file {args.token_file}: cannot read it ({error})") from None
        return check_token(lines[0].strip() if lines else "")
    return check_token(os.environ.get(TOKEN_ENV) or None)


def run_serve(args: argparse.Namespace) -> None:
    """``dql-agent serve MODEL``: check the settings (before loading anything), load, serve."""
    token = read_token(args)
    check_host(args.host, token)
    if args.tls_key is not None and args.tls_cert is None:
        raise ValueError("--tls-key needs --tls-cert")
    tls = None if args.tls_cert is None else (args.tls_cert, args.tls_key) if args.tls_key else args.tls_cert
    tls = tls_context(tls)
    if args.threads is not None:
        import torch

        torch.set_num_threads(_positive("--threads", args.threads))
    server = PolicyServer(
        args.model,
        args.host,
        args.port,
        token=token,
        tls=tls,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_payload_bytes=args.max_payload_bytes,
        batching=args.batching,
        max_connections=args.max_connections,
        device=args.device,
    )

    def ready(server: PolicyServer) -> None:
        model = server.served.description
        print(
            f"dql-agent serve: {model['algorithm']} (weights sha256 {model['weights_sha256'][:12]}, on "
            f"{model['device']}) at {server.url}{' (token required)' if token else ''}; Ctrl-C stops",
            flush=True,
        )

    server.serve_forever(on_ready=ready)


def main(argv: list[str] | None = None) -> None:
    """``python -m dql_agent.server MODEL ...``: as ``dql-agent serve``."""
    parser = argparse.ArgumentParser(prog="dql-agent serve", description="serve a policy to RemotePolicy clients")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        run_serve(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        if os.environ.get("DQL_AGENT_DEBUG", "") not in ("", "0"):
            raise
        print(f"dql-agent serve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
