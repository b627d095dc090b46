"""The policy server and RemotePolicy (issue 29): against the real server process on loopback for
load, faults, tokens and TLS; in-process servers where a test needs to reach inside the server
(a slow or failing predict, action chunks, bit-exact batching).

Every server process is started by :class:`ServerProcess` and killed when its test or module ends,
passed or failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import logging
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dql_agent import DiffusionQL, OfflineBuffer, wire
from dql_agent.remote import ActionQueue, RemotePolicy
from dql_agent.server import PolicyServer, add_serve_arguments, run_serve
from tests.settings import TINY
from tests.settings import tiny as tiny_settings

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
MAX_PAYLOAD = 65_536  # the module server's limit: an oversized request is cheap to make
BLOCKED = ("torch", "gymnasium", "stable_baselines3")


# the real server, as a process ------------------------------------------------------------------
class ServerProcess:
    """``python -m dql_agent.server MODEL ...`` on loopback; :attr:`url` once it printed it."""

    def __init__(self, model_dir: Path, *args: str, port: int = 0, token_file: Path | None = None):
        command = [sys.executable, "-m", "dql_agent.server", str(model_dir), "--port", str(port)]
        command += ["--device", "cpu", "--threads", "1", *args]
        if token_file is not None:
            command += ["--token-file", str(token_file)]
        env = {k: v for k, v in os.environ.items() if k != "DQL_AGENT_TOKEN"}
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.url = ""

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.stop()
                pytest.fail(f"the server printed nothing in {timeout} s; stderr: {self.errors()}")
        line = self.process.stdout.readline()
        found = re.search(r" at (wss?://[^\s;]+)", line)
        if found is None:
            self.stop()
            pytest.fail(f"the server did not start: {line!r}; stderr: {self.errors()}")
        self.url = found.group(1)
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture(scope="module")
def tiny(pendulum_arrays, tmp_path_factory) -> SimpleNamespace:
    """A tiny DiffusionQL on Pendulum, trained 20 steps and saved; the token in a file."""
    env = gym.make("Pendulum-v1")
    buffer = OfflineBuffer(**pendulum_arrays, observation_space=env.observation_space, action_space=env.action_space)
    model = DiffusionQL(buffer, env="Pendulum-v1", seed=0, device="cpu", **TINY).learn(20)
    folder = tmp_path_factory.mktemp("serve")
    model.save(folder / "model")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    return SimpleNamespace(model=model, path=folder / "model", token_file=token_file, folder=folder)


@pytest.fixture(scope="module")
def server(tiny) -> Any:
    """The shared server process: token, small payload limit, 5 ms batching window."""
    with ServerProcess(
        tiny.path, "--max-payload-bytes", str(MAX_PAYLOAD), "--max-delay-ms", "5", token_file=tiny.token_file
    ) as process:
        yield process.wait_ready()


def local(model: Any, observation: Any) -> np.ndarray:
    """The in-process answer: ``model.predict(observation, deterministic=True)``'s actions."""
    return model.predict(observation, deterministic=True)[0]


def _samples(n: int, seed: int) -> np.ndarray:
    space = gym.spaces.Box(np.array([-1, -1, -8], np.float32), np.array([1, 1, 8], np.float32))
    space.seed(seed)
    return np.stack([space.sample() for _ in range(n)])


def raw(url: str, token: str | None = TOKEN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(url, additional_headers=headers, compression=None, open_timeout=10)


def ask(ws: Any, payload: bytes | str) -> dict:
    ws.send(payload)
    return wire.unpack(ws.recv(timeout=10))


def act_message(observation: Any, request_id: int = 1, **extra: Any) -> bytes:
    return wire.pack({"type": "act", "id": request_id, "observation": observation, "deterministic": True, **extra})


# SB3's surface, and the same returns as a local model ----------------------------------------------
def test_remote_evaluation_equals_the_local_one(tiny, server):
    policy = RemotePolicy(server.url, TOKEN)
    for n_envs, episodes in ((1, 2), (3, 3)):
        returns = []
        for predictor in (tiny.model, policy):
            env = DummyVecEnv([lambda: Monitor(gym.make("Pendulum-v1"))] * n_envs)
            env.seed(7)
            rewards, _ = evaluate_policy(
                predictor, env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True
            )
            returns.append(rewards)
        assert returns[0] == returns[1], f"n_envs={n_envs}: local {returns[0]} != remote {returns[1]}"
    obs = _samples(5, 0)
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], local(tiny.model, obs))
    assert policy.predict(obs[0], deterministic=True)[0].shape == (1,)  # one observation in, one action out
    assert policy.predict(obs[:0])[0].shape == (0, 1)
    policy.close()


def test_record_video_and_the_spaces_sb3_reads(tiny, server, tmp_path):
    from dql_agent.integrations.video import record_video

    policy = RemotePolicy(server.url, TOKEN)
    env = gym.make("Pendulum-v1", render_mode="rgb_array")
    path = record_video(policy, env, tmp_path / "remote.mp4", max_steps=8, seed=0)
    assert path.stat().st_size > 0
    assert policy.observation_space == env.observation_space and policy.action_space == env.action_space
    other = gym.make("MountainCarContinuous-v0", render_mode="rgb_array")
    with pytest.raises(ValueError, match="observation_space .* does not match the served model's"):
        record_video(policy, other, tmp_path / "wrong.mp4", max_steps=2)
    policy.close()


def test_metadata_and_health(tiny, server):
    with RemotePolicy(server.url, TOKEN) as policy:
        model = policy.metadata["model"]
        config = json.loads((tiny.path / "config.json").read_text())
        assert model["weights_sha256"] == config["model_sha256"] == policy.weights_sha256
        assert model["algorithm"] == "DiffusionQL" and model["library"] == "dql_agent"
        assert model["observation_space"] == config["observation_space"]
        assert model["action_space"] == config["action_space"]
        assert (model["action_horizon"], model["n_action_steps"], model["n_obs_steps"]) == (1, 1, 1)
        assert model["device"] == "cpu"
        assert policy.metadata["server"]["max_payload_bytes"] == MAX_PAYLOAD
        health = policy.health()
        assert health["status"] == "ok" and health["connections"] >= 1
        assert "RemotePolicy('ws://127.0.0.1" in repr(policy)


# load ----------------------------------------------------------------------------------------------
def test_concurrent_clients_each_get_their_own_actions(tiny, server):
    n_clients, n_requests = 8, 12
    work = {c: [_samples(1 + (c + i) % 3, 100 * c + i) for i in range(n_requests)] for c in range(n_clients)}
    expected = {c: [tiny.model.predict(obs, deterministic=True)[0] for obs in work[c]] for c in range(n_clients)}
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_clients)

    def client(c: int) -> None:
        try:
            with RemotePolicy(server.url, TOKEN) as policy:
                barrier.wait(10)
                got[c] = [policy.predict(obs, deterministic=True)[0] for obs in work[c]]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for c in range(n_clients):
        for want, have in zip(expected[c], got[c], strict=True):
            # merged batches: the same actions up to float rounding (bit-exact here; see serve.py's docstring)
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-5)
    with RemotePolicy(server.url, TOKEN) as policy:
        assert policy.health()["largest_batch_rows"] > 3  # requests of several clients were merged


def test_exact_batching_answers_equal_predict_bit_for_bit(tiny):
    work = [_samples(1 + i % 4, i) for i in range(24)]
    expected = [tiny.model.predict(obs, deterministic=True)[0] for obs in work]
    got: dict[int, np.ndarray] = {}
    with PolicyServer(tiny.model, port=0, batching="exact", max_delay_ms=20) as server:

        def client(indices: range) -> None:
            with RemotePolicy(server.url) as policy:
                for i in indices:
                    got[i] = policy.predict(work[i], deterministic=True)[0]

        threads = [threading.Thread(target=client, args=(range(k, 24, 4),)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(got[i], want)


# faults --------------------------------------------------------------------------------------------
BAD_ARRAY_HEADER = msgpack.ExtType(wire.ARRAY_EXT, struct.pack("<B7sB2Q", 7, b"float32", 2, 1, 3) + b"\0" * 8)
OBJECT_ARRAY = msgpack.ExtType(wire.ARRAY_EXT, struct.pack("<B6sB1Q", 6, b"object", 1, 1) + b"\0" * 8)
MALFORMED = [
    ("text frame", "hello", "ValueError", "binary frames"),
    ("not msgpack", b"\xc1\xc1\xc1", "ValueError", "malformed message"),
    ("a list", msgpack.packb([1, 2]), "ValueError", "msgpack map"),
    ("no type", msgpack.packb({"id": 1}), "ValueError", "string 'type'"),
    ("int keys", msgpack.packb({1: 2}), "ValueError", "malformed message"),
    ("too deep", b"\x91" * 20_000 + b"\xc0", "ValueError", "malformed message: StackError"),
    ("no id", msgpack.packb({"type": "act"}), "ValueError", "integer 'id'"),
    ("unknown type", msgpack.packb({"type": "shutdown", "id": 1}), "ValueError", "unknown request type"),
    ("no observation", msgpack.packb({"type": "act", "id": 1}), "TypeError", "observation must be an array"),
    ("a plain list", msgpack.packb({"type": "act", "id": 1, "observation": [[0, 0, 0]]}), "TypeError", "an array"),
    ("float64", act_message(np.zeros((1, 3))), "TypeError", r"dtype float32 .*got float64"),
    ("wrong width", act_message(np.zeros((1, 4), np.float32)), "ValueError", r"\(1, 4\); expected \(batch, 3\)"),
    ("no batch axis", act_message(np.zeros(3, np.float32)), "ValueError", r"shape \(3,\); expected \(batch, 3\)"),
    ("NaN", act_message(np.full((2, 3), np.nan, np.float32)), "ValueError", "NaN/inf"),
    ("a dict", act_message({"x": np.zeros((1, 3), np.float32)}), "TypeError", "got a dict"),
    ("bad deterministic", act_message(np.zeros((1, 3), np.float32), deterministic="yes"), "TypeError", "a bool"),
    ("short array", msgpack.packb({"type": "act", "id": 1, "observation": BAD_ARRAY_HEADER}), "ValueError", "bytes"),
    ("object array", msgpack.packb({"type": "act", "id": 1, "observation": OBJECT_ARRAY}), "ValueError", "'object'"),
    ("unknown ext", msgpack.packb({"type": "act", "id": 1, "observation": msgpack.ExtType(7, b"")}), "ValueError", "7"),
]


def test_malformed_and_wrong_payloads_get_clear_errors_and_the_connection_goes_on(tiny, server):
    good = _samples(2, 3)
    with raw(server.url) as ws:
        for name, payload, kind, message in MALFORMED:
            reply = ask(ws, payload)
            assert reply["type"] == "error" and reply["kind"] == kind, (name, reply)
            assert re.search(message, reply["message"]), (name, reply["message"])
        reply = ask(ws, act_message(good, 9))
        assert reply["type"] == "actions" and reply["id"] == 9 and reply["action_horizon"] == 1
        np.testing.assert_array_equal(reply["actions"][:, 0], tiny.model.predict(good, deterministic=True)[0])


def test_bad_observations_are_refused_by_the_client_naming_the_field(server):
    with RemotePolicy(server.url, TOKEN) as policy:
        for observation, error, message in (
            (np.zeros(4), ValueError, r"shape \(4,\); expected \(3,\) for one observation or \(n_envs, 3\)"),
            (np.array(["a", "b", "c"]), TypeError, "must hold numbers"),
            (np.array([0.0, np.inf, 0.0]), ValueError, "NaN/inf"),
            (np.array([0.0, 1e39, 0.0]), ValueError, "NaN/inf"),  # finite in float64, inf as float32
            ({"a": 1}, TypeError, "got a dict"),
            ((np.zeros(3), {}), ValueError, r"\(obs, info\) tuple"),
        ):
            with pytest.raises(error, match=message):
                policy.predict(observation)
        assert policy.predict(np.zeros(3, np.float64))[0].shape == (1,)  # float64 is cast, as predict does


def test_oversized_payloads_are_refused_and_the_server_goes_on(tiny, server):
    big = np.zeros((MAX_PAYLOAD // 12 + 10, 3), np.float32)
    with RemotePolicy(server.url, TOKEN) as policy:
        with pytest.raises(ValueError, match="max_payload_bytes"):
            policy.predict(big)  # refused before sending
        with raw(server.url) as ws:
            ws.send(act_message(big))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
        obs = _samples(1, 0)[0]
        np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], local(tiny.model, obs))
    assert server.process.poll() is None


def test_a_client_that_disconnects_mid_request_harms_nobody(tiny, server):
    for abrupt in (False, True):
        with contextlib.suppress(ConnectionClosed, OSError), raw(server.url) as ws:
            ws.send(act_message(_samples(3000, 1)))  # a few ms of work for the server
            if abrupt:
                ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close handshake
                ws.socket.close()
    with RemotePolicy(server.url, TOKEN) as policy:
        obs = _samples(4, 2)
        np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], local(tiny.model, obs))
        assert policy.health()["status"] == "ok"
    assert server.process.poll() is None


def _handshake(port: int, token: str | None, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """A websocket opening handshake by hand: the socket and the server's whole HTTP response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET / HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + extra)
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            break
        response += chunk
    return sock, response


def _client_frame(payload: bytes) -> bytes:
    """One masked binary websocket frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return bytes([0x82]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first, second = exactly(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", exactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", exactly(8))
    return exactly(n)


def test_a_slow_client_does_not_hold_up_the_others(tiny, server):
    obs = _samples(1, 5)
    frame = _client_frame(act_message(obs, 42))
    sock, response = _handshake(server.port, TOKEN)
    try:
        assert response.startswith(b"HTTP/1.1 101")
        sock.sendall(frame[: len(frame) // 2])  # half a request, then nothing for a while
        with RemotePolicy(server.url, TOKEN) as policy:
            started = time.perf_counter()
            for i in range(20):
                policy.predict(_samples(1, i)[0], deterministic=True)
            assert time.perf_counter() - started < 5.0  # each waited at most the 5 ms window for the slow one
        sock.sendall(frame[len(frame) // 2 :])
        reply = wire.unpack(_read_frame(sock))
        assert reply["id"] == 42
        np.testing.assert_array_equal(reply["actions"][:, 0], tiny.model.predict(obs, deterministic=True)[0])
    finally:
        sock.close()


# the token ------------------------------------------------------------------------------------------
def test_without_the_token_a_client_gets_only_a_refusal(tiny, server):
    with RemotePolicy(server.url, TOKEN) as policy:
        before = policy.health()["messages"]
    with pytest.raises(PermissionError, match="needs a token"):
        RemotePolicy(server.url, token=None)
    with pytest.raises(PermissionError, match="token is wrong"):
        RemotePolicy(server.url, token="x" * 30)
    digest = json.loads((tiny.path / "config.json").read_text())["model_sha256"]
    pipelined = _client_frame(wire.pack({"type": "metadata", "id": 1}))  # sent right behind the handshake
    for token in (None, "wrong-token-wrong-token", TOKEN + "x", TOKEN[:-1]):
        sock, response = _handshake(server.port, token, extra=pipelined)
        try:
            sock.settimeout(5)
            while True:  # the server closes after its refusal
                chunk = sock.recv(4096)
                if not chunk:
                    break
                response += chunk
        finally:
            sock.close()
        assert response.startswith(b"HTTP/1.1 401"), response[:100]
        for secret in (b"DiffusionQL", digest.encode(), b"observation", b"websockets", b"Python/"):
            assert secret not in response
    with RemotePolicy(server.url, TOKEN) as policy:
        health = policy.health()
        assert health["messages"] == before + 2  # this health request and the one above: nothing else was read
        assert health["refused_handshakes"] >= 6


def test_every_interface_needs_a_token_and_tokens_must_be_long(tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("DQL_AGENT_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")  # as `dql-agent` adds it to every subcommand
    add_serve_arguments(parser)
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "robot-gpu.local"):
        args = parser.parse_args(["no/such/model", "--host", host])
        assert args.func is run_serve
        with pytest.raises(ValueError, match="reachable from the network: serving there needs a token"):
            run_serve(args)  # refused before the model is looked for
    with pytest.raises(ValueError, match="needs a token"):
        PolicyServer(tiny.model, host="0.0.0.0", port=0)
    import dql_agent

    with pytest.raises(ValueError, match="needs a token"):
        dql_agent.serve(tiny.model, host="0.0.0.0")  # the public name: dql_agent.serve(model, ...)
    short = tmp_path / "short"
    short.write_text("secret\n")
    with pytest.raises(ValueError, match="at least 16 printable"):
        run_serve(parser.parse_args(["m", "--host", "0.0.0.0", "--token-file", str(short)]))
    with pytest.raises(ValueError, match="--tls-key needs --tls-cert"):
        run_serve(parser.parse_args(["m", "--tls-key", "key.pem"]))
    with pytest.raises(ValueError, match="cannot load the certificate"):
        run_serve(parser.parse_args(["m", "--tls-cert", str(tmp_path / "missing.pem")]))
    fresh = argparse.ArgumentParser()
    add_serve_arguments(fresh)  # adds --device itself
    assert fresh.parse_args(["m"]).device == "auto"
    # the command itself: a one-line error and status 2, before torch is even imported
    env = {k: v for k, v in os.environ.items() if k != "DQL_AGENT_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "dql_agent.server", str(tiny.path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "dql-agent serve: error: host 0.0.0.0 is reachable" in done.stderr


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        return cert, key
    if importlib.util.find_spec("cryptography") is None:
        pytest.fail("the TLS test needs the openssl command or the cryptography package to make a certificate")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def test_tls_round_trip(tiny, tmp_path):
    cert, key = _self_signed(tmp_path)
    with ServerProcess(tiny.path, "--tls-cert", str(cert), "--tls-key", str(key), token_file=tiny.token_file) as srv:
        srv.wait_ready()
        assert srv.url.startswith("wss://127.0.0.1:")
        obs = _samples(3, 4)
        with RemotePolicy(srv.url, TOKEN, ca_file=cert) as policy:
            np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], local(tiny.model, obs))
        with pytest.raises(ConnectionError, match="TLS .* failed.*ca_file"):
            RemotePolicy(srv.url, TOKEN, reconnect_timeout=0.5)  # the system's CAs do not trust it
        with pytest.raises(ConnectionError, match="cannot reach"):
            RemotePolicy(srv.url.replace("wss://", "ws://"), TOKEN, reconnect_timeout=0.3)  # no TLS: no handshake


# restarts, dead servers, timeouts ---------------------------------------------------------------------
def test_a_restarted_server_is_reconnected_to_and_a_dead_one_named(tiny, caplog):
    obs = _samples(2, 8)
    expected = tiny.model.predict(obs, deterministic=True)[0]
    first = ServerProcess(tiny.path, token_file=tiny.token_file)
    with first:
        first.wait_ready()
        policy = RemotePolicy(first.url, TOKEN, reconnect_timeout=60)
        np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], expected)
        first.kill()  # SIGKILL: no goodbye to the client
    with ServerProcess(tiny.path, port=first.port, token_file=tiny.token_file):  # starting, not ready yet
        with caplog.at_level(logging.WARNING, logger="dql_agent.remote"):
            again = policy.predict(obs, deterministic=True)[0]  # retries until the new server is up
        np.testing.assert_array_equal(again, expected)
        assert policy.reconnects == 1
        assert f"lost the connection to the policy server at {first.url}" in caplog.text
        assert f"reconnected to the policy server at {first.url}" in caplog.text
        assert "other weights" not in caplog.text
    policy.reconnect_timeout = 0.5  # the server is gone for good now
    with pytest.raises(ConnectionError, match=f"cannot reach the policy server at {re.escape(first.url)}"):
        policy.predict(obs)
    policy.close()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"ws://127.0.0.1:{port}.*is it running"):
        RemotePolicy(f"ws://127.0.0.1:{port}", reconnect_timeout=0.3)
    assert time.perf_counter() - started < 5


def test_a_slow_answer_is_a_timeout_and_the_late_answer_is_dropped(tiny, monkeypatch):
    obs = _samples(1, 9)
    with PolicyServer(tiny.model, port=0) as server:
        act = server.served.act
        delay = {"s": 0.6}

        def slow_act(observation: Any, deterministic: bool) -> np.ndarray:
            time.sleep(delay["s"])
            return act(observation, deterministic)

        monkeypatch.setattr(server.served, "act", slow_act)
        with RemotePolicy(server.url, timeout=0.2) as policy:
            with pytest.raises(
                TimeoutError, match=f"'act' request from the policy server at {server.url} within 0.2 s"
            ):
                policy.predict(_samples(1, 10)[0], deterministic=True)
            delay["s"] = 0.0
            policy.timeout = 5.0
            action = policy.predict(obs[0], deterministic=True)[0]  # not the late answer to the first request
            np.testing.assert_array_equal(action, tiny.model.predict(obs[0], deterministic=True)[0])


def test_stopping_the_server_answers_every_waiting_client(tiny, monkeypatch):
    server = PolicyServer(tiny.model, port=0).start()
    act = server.served.act

    def slow_act(observation: Any, deterministic: bool) -> np.ndarray:
        time.sleep(0.4)
        return act(observation, deterministic)

    monkeypatch.setattr(server.served, "act", slow_act)
    outcomes: list[Any] = []

    def client(seed: int) -> None:
        with RemotePolicy(server.url, reconnect_timeout=0.3) as policy:
            try:
                outcomes.append(policy.predict(_samples(1, seed)[0], deterministic=True))
            except (ConnectionError, RuntimeError) as error:
                outcomes.append(error)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2)]  # one computing, one queued
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    server.stop()
    assert time.perf_counter() - started < 3.0
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert isinstance(outcome, (ConnectionError, RuntimeError)), outcome
        assert re.search("shutting down|cannot reach|closed the connection", str(outcome)), outcome


def test_a_request_that_fails_in_a_merged_batch_fails_alone(tiny, monkeypatch):
    poison = np.float32(7.25)  # a valid observation this test's predict refuses
    with PolicyServer(tiny.model, port=0, max_delay_ms=200) as server:
        act = server.served.act
        calls: list[int] = []

        def picky_act(observation: Any, deterministic: bool) -> np.ndarray:
            calls.append(len(observation))
            if np.any(observation[:, 2] == poison):
                raise ValueError("observation holds the poison value")
            return act(observation, deterministic)

        monkeypatch.setattr(server.served, "act", picky_act)
        work = [_samples(2, 20 + c) for c in range(4)]
        work[3][1, 2] = poison
        results: dict[int, Any] = {}
        barrier = threading.Barrier(4)

        def client(c: int) -> None:
            with RemotePolicy(server.url) as policy:
                barrier.wait(10)
                try:
                    results[c] = policy.predict(work[c], deterministic=True)[0]
                except ValueError as error:
                    results[c] = error

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert isinstance(results[3], ValueError) and "poison" in str(results[3])
    for c in range(3):
        np.testing.assert_array_equal(results[c], tiny.model.predict(work[c], deterministic=True)[0])
    assert calls[0] == 8  # the 4 requests were merged, failed together, then ran one by one
    assert sorted(calls[1:]) == [2, 2, 2, 2]


# Dict / camera observations, action chunks ------------------------------------------------------------
def test_a_camera_model_with_dict_observations(tmp_path):
    image = gym.spaces.Box(0, 255, (20, 20, 3), np.uint8)
    space = gym.spaces.Dict({"image": image, "state": gym.spaces.Box(-1, 1, (2,), np.float32)})
    small = tiny_settings("DiffusionQL", batch_size=16, cnn_channels=4, image_features=8)
    model = DiffusionQL(
        observation_space=space, action_space=gym.spaces.Box(-1, 1, (2,)), seed=0, device="cpu", **small
    )
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8), "state": rng.uniform(-1, 1, (3, 2))}
    single = {"image": batch["image"][0], "state": batch["state"][0]}
    with PolicyServer(model, port=0) as server, RemotePolicy(server.url) as policy:
        np.testing.assert_array_equal(policy.predict(batch, deterministic=True)[0], local(model, batch))
        np.testing.assert_array_equal(policy.predict(single, deterministic=True)[0], local(model, single))
        whole = dict(single, image=single["image"].astype(np.float64))  # whole numbers: cast, as predict does
        np.testing.assert_array_equal(policy.predict(whole, deterministic=True)[0], local(model, single))
        for observation, error, message in (
            ({"image": single["image"]}, ValueError, r"missing key\(s\) \['state'\]"),
            (dict(single, extra=np.zeros(1)), ValueError, r"unexpected key\(s\) \['extra'\]"),
            (dict(single, image=single["image"] + 0.5), ValueError, r"observation\['image'\] must hold whole numbers"),
            (dict(single, state=np.zeros((2, 2))), ValueError, r"observation\['state'\] has shape \(2, 2\)"),
            (single["image"], TypeError, "must be a dict"),
        ):
            with pytest.raises(error, match=message):
                policy.predict(observation)
        with raw(server.url, None) as ws:  # the server checks each key as well
            bad = {"image": batch["image"][:1].astype(np.int16), "state": batch["state"][:1].astype(np.float32)}
            reply = ask(ws, act_message(bad))
            assert reply["kind"] == "TypeError" and "observation['image'] must have dtype uint8" in reply["message"]
            bad = {"image": batch["image"][:2], "state": batch["state"][:1].astype(np.float32)}
            reply = ask(ws, act_message(bad))
            assert reply["kind"] == "ValueError" and "observation['state'] has 1 row(s)" in reply["message"]


class ChunkModel:
    """A model that predicts chunks: action j of a chunk is the tiny model's action times (1 - j/4)."""

    def __init__(self, model: DiffusionQL, action_horizon: int, n_action_steps: int):
        self.model, self.policy, self.algorithm = model, model.policy, "Chunked"
        self.observation_space, self.action_space = model.observation_space, model.action_space
        self.config = SimpleNamespace(action_horizon=action_horizon, n_action_steps=n_action_steps, n_obs_steps=1)
        self.requests: list[int] = []

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False):
        return self.model.predict(observation, state, episode_start, deterministic)

    def predict_chunk(self, observation: np.ndarray, deterministic: bool = False) -> np.ndarray:
        self.requests.append(len(observation))
        first = self.model.predict(observation, deterministic=deterministic)[0]
        return np.stack([first * (1 - j / 4) for j in range(self.config.action_horizon)], axis=1)


def test_action_chunks_run_from_the_state_and_restart_with_an_episode(tiny):
    chunked = ChunkModel(tiny.model, action_horizon=4, n_action_steps=2)
    obs = [_samples(2, 30 + t) for t in range(4)]
    with PolicyServer(chunked, port=0) as server, RemotePolicy(server.url) as policy:
        assert (policy.action_horizon, policy.n_action_steps) == (4, 2)
        a0, state = policy.predict(obs[0], deterministic=True)  # both envs: a new chunk
        assert isinstance(state, ActionQueue) and state.next.tolist() == [1, 1]
        a1, state = policy.predict(obs[1], state, np.array([False, True]), deterministic=True)  # env 1 restarts
        a2, state = policy.predict(obs[2], state, np.array([False, False]), deterministic=True)  # env 0 ran out
        a3, state = policy.predict(obs[3], state, np.array([False, False]), deterministic=True)  # env 1 ran out
        single, single_state = policy.predict(obs[0][0], deterministic=True)  # one observation: a queue of one
        assert single.shape == (1,) and single_state.actions.shape == (1, 2, 1)

    def first(t: int, env: int) -> np.ndarray:  # the first action of a chunk asked for env alone at step t
        return local(tiny.model, obs[t][env : env + 1])[0]

    np.testing.assert_array_equal(a0, local(tiny.model, obs[0]))
    np.testing.assert_array_equal(a1, [a0[0] * 0.75, first(1, 1)])
    np.testing.assert_array_equal(a2, [first(2, 0), first(1, 1) * 0.75])
    np.testing.assert_array_equal(a3, [first(2, 0) * 0.75, first(3, 1)])
    assert chunked.requests == [1, 2, 1, 1, 1, 1]  # the warm-up, then one request per chunk boundary


# the robot side imports no torch --------------------------------------------------------------------
ROBOT_LOOP = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed on this robot")
        return None

sys.meta_path.insert(0, Blocker())

import json
import numpy as np
from dql_agent.remote import RemotePolicy

def angle_normalize(x):
    return ((x + np.pi) % (2 * np.pi)) - np.pi

policy = RemotePolicy({url!r}, token={token!r})
theta, speed = {state!r}
total = 0.0
for _ in range(200):  # Pendulum-v1's dynamics (g=10, m=l=1, dt=0.05), written out: no gymnasium here
    obs = np.array([np.cos(theta), np.sin(theta), speed], dtype=np.float32)
    action, _ = policy.predict(obs, deterministic=True)
    u = np.clip(action, -2.0, 2.0)[0]
    total -= angle_normalize(theta) ** 2 + 0.1 * speed**2 + 0.001 * u**2
    speed = np.clip(speed + (3 * 10.0 / 2 * np.sin(theta) + 3.0 * u) * 0.05, -8.0, 8.0)
    theta = theta + speed * 0.05
print(json.dumps({{"return": float(total), "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {blocked!r})}}))
"""


def test_the_robot_side_runs_without_torch_gymnasium_or_sb3(tiny, server):
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=3)
    state = [float(x) for x in env.unwrapped.state]
    local, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(tiny.model.predict(obs, deterministic=True)[0])
        local += float(reward)
        done = terminated or truncated
    script = ROBOT_LOOP.format(blocked=set(BLOCKED), url=server.url, token=TOKEN, state=state)
    done_run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done_run.returncode == 0, done_run.stderr[-3000:]
    result = json.loads(done_run.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["return"] == pytest.approx(local, rel=1e-9, abs=1e-9)


# the example and the benchmark ---------------------------------------------------------------------
def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"serve_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_control_loop_runs(tiny, capsys):
    example = _load(ROOT / "examples" / "remote_control_loop.py")
    example.main(["--model", str(tiny.path), "--episodes", "1", "--max-steps", "30"])
    printed = capsys.readouterr().out
    assert "serving" in printed and re.search(r"episode 0: return -?\d+\.\d", printed)


def test_the_latency_benchmark_runs(tiny, server, capsys):
    benchmark = importlib.import_module("benchmarks.serve_latency")
    benchmark.main(
        ["--model", str(tiny.path), "--url", server.url, "--token-file", str(tiny.token_file)]
        + ["--requests", "30", "--seconds", "0.3", "--clients", "1", "2", "--repeats", "1", "--invariance-rows", "8"]
    )
    printed = capsys.readouterr().out
    assert "| added latency |" in printed and "\n| 2 | " in printed and "| merged batch of |" in printed
