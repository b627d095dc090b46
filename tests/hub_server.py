"""An in-process fake of the Hugging Face Hub HTTP API, for tests, and the fixtures aiming the client at it.

Model repos (and dataset repos, under ``/api/datasets/...`` and ``/datasets/{ns}/{name}/resolve/...``,
kept in ``repos`` as ``"datasets/{ns}/{name}"``), only what ``huggingface_hub`` (0.23 to 2.4) calls
for create/upload/download:

======  ==================================================  =====================================
POST    /api/repos/create                                   200 {"url"}; 409 WITH "url" if it exists
POST    /api/validate-yaml                                  200 {}
POST    /api/models/{ns}/{name}/preupload/{rev}             every file "regular", oid null
POST    /api/models/{ns}/{name}/branch/{branch}              {startingPoint?}: new branch
POST    /api/models/{ns}/{name}/commit/{rev}                ndjson: header, file, deletedFile/Folder
GET     /api/models/{ns}/{name}[/revision/{rev}]            repo_info: id, sha, siblings
GET     /api/models/{ns}/{name}/tree/{rev}[/{dir}]          recursive listing, one page
HEAD    /{ns}/{name}/resolve/{rev}/{path}                   X-Repo-Commit, ETag, Content-Length
GET     /{ns}/{name}/resolve/{rev}/{path}                   same headers + the bytes
GET     /api/whoami-v2, /api/agent-harnesses                minimal answers
======  ==================================================  =====================================

Repos keep real history: each commit is a full snapshot ``{path: bytes}`` with a sha1 oid, branch
``main`` points at the newest, and any commit oid is a valid revision. Errors carry the
``X-Error-Code`` header the client maps to exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Writes need an ``Authorization: Bearer`` header (any token); a private repo
answers 401 to reads without one. Every request is appended to ``server.requests``.

The fixtures :func:`hub_server` and :func:`hub_offline` point the real client at a fresh server
and switch its offline mode, on every ``huggingface_hub`` version ``pyproject.toml`` allows.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.mp4 filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git blob id of ``content``: what the Hub sends as ETag/oid for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit: a full snapshot of the repo's files."""

    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None = None


@dataclass
class Repo:
    """A model repo: commits in order, branch name -> commit oid."""

    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        """Record a new commit on ``branch`` with the given full snapshot."""
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{self.repo_id}\0{parent}\0{message}\0{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\0".encode())
        new = Commit(digest.hexdigest(), message, dict(files), parent)
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid -> its commit, or None."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class LoggedRequest(NamedTuple):
    """What the fake saw: for assertions on the client's call sequence."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


class HubError(Exception):
    """Turned into an HTTP error response with an ``X-Error-Code`` header."""

    def __init__(self, status: int, message: str, code: str | None = None, body: Any = None):
        super().__init__(message)
        self.status, self.code, self.body = status, code, body


def _safe_path(path: str) -> str:
    """Reject repo paths that are empty, absolute or escape the repo (``..``)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}", "InvalidPath")
    return path


class FakeHub(ThreadingHTTPServer):
    """The fake Hub server. Use :meth:`start`, then point ``huggingface_hub`` at :attr:`url`."""

    daemon_threads = True

    def __init__(self, username: str = "test-user") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.username = username
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FakeHub:
        """Serve in a daemon thread; returns self."""
        # A short poll interval keeps shutdown() (and so each test's teardown) fast.
        thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()

    def calls(self) -> list[str]:
        """The request log as ``"METHOD /path"`` strings, without query strings."""
        return [f"{r.method} {r.path}" for r in self.requests]

    # -- endpoint logic, called under self.lock; errors are raised as HubError ----------------

    def get_repo(self, repo_id: str, authorized: bool) -> Repo:
        """The repo, or 404 RepoNotFound; a private one needs a token (401, like the Hub)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if repo.private and not authorized:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def get_commit(self, repo: Repo, revision: str) -> Commit:
        """The commit a branch name or full oid points at, or 404 RevisionNotFound."""
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, body: dict) -> tuple[int, dict]:
        """``POST /api/repos/create``: a new repo holding one initial commit."""
        kind = body.get("type") or "model"
        if kind not in ("model", "dataset"):
            raise HubError(400, "this fake only hosts model and dataset repos")
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        key = repo_id if kind == "model" else f"datasets/{repo_id}"  # dataset repos: a namespace of their own
        url = {"url": f"{self.url}/{key}"}
        if key in self.repos:  # the client reads "url" from the 409 body when exist_ok=True
            msg = f"You already created this {kind} repo"
            raise HubError(409, msg, body={"error": msg, **url})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = self.repos[key] = Repo(repo_id, private)
        repo.commit("main", "initial commit", {".gitattributes": GITATTRIBUTES})  # as the Hub does
        return 200, url

    def repo_info(self, repo: Repo, revision: str) -> dict:
        """The ``ModelInfo`` JSON for one revision."""
        commit = self.get_commit(repo, revision)
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }

    def tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> list[dict]:
        """The tree listing under ``prefix``: folders and files, as one unpaginated page."""
        files = self.get_commit(repo, revision).files
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path in sorted(p for p in files if p.startswith(base)):
            parts = path[len(base) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders above the file
                folder = base + "/".join(parts[:i])
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid})
            if recursive or len(parts) == 1:
                content = files[path]
                entries[path] = {
                    "type": "file",
                    "path": path,
                    "size": len(content),
                    "oid": git_blob_sha1(content),
                }
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        return list(entries.values())

    def apply_commit(self, repo: Repo, branch: str, ndjson: bytes) -> dict:
        """Apply an ndjson commit payload to ``branch``; returns commitOid/commitUrl."""
        if branch not in repo.branches:  # commits go to branches only
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[branch]
        if header.get("parentCommit") not in (None, head):
            msg = f"parentCommit {header['parentCommit']} is not the head of {branch}"
            raise HubError(412, msg)
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = _safe_path(value["path"].strip("/") if key == "deletedFolder" else value["path"])
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"{path} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(path + "/")}
            else:  # lfsFile/copyFile: never requested, since preupload always says "regular"
                raise HubError(400, f"this fake does not support {key!r} operations")
        message = header.get("summary", "") + ("\n\n" + header["description"] if header.get("description") else "")
        commit = repo.commit(branch, message, files)
        url = f"{self.url}/{repo.repo_id}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url}


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append(LoggedRequest(method, url.path, query, headers))
        # Split on "/" before unquoting: the client quotes revisions and tree paths with safe="".
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        authorized = self.headers.get("Authorization", "").startswith("Bearer ")
        try:
            with self.server.lock:
                status, payload, headers = self._route(method, parts, query, body, authorized)
        except HubError as err:
            status, headers = err.status, {"X-Error-Message": str(err)}
            if err.code:
                headers["X-Error-Code"] = err.code
            payload = err.body if err.body is not None else {"error": str(err)}
        self._send(method, status, payload, headers)

    def _route(  # noqa: C901 - an HTTP router: one branch per endpoint
        self, method: str, parts: list[str], query: dict, body: bytes, authorized: bool
    ) -> tuple[int, Any, dict[str, str]]:
        hub = self.server
        if method != "GET" and method != "HEAD" and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["agent-harnesses"]:  # the client reads .get() on this: a dict, not a list
                return 200, {"standardEnvVars": [], "harnesses": {}}, {}
            if rest == ["whoami-v2"]:
                return 200, {"type": "user", "name": hub.username, "orgs": []}, {}
            if rest == ["validate-yaml"] and method == "POST":
                return 200, {}, {}
            if rest == ["repos", "create"] and method == "POST":
                status, payload = hub.create_repo(json.loads(body or b"{}"))
                return status, payload, {}
            if len(rest) >= 3 and rest[0] in ("models", "datasets"):
                prefix = "datasets/" if rest[0] == "datasets" else ""
                repo = hub.get_repo(f"{prefix}{rest[1]}/{rest[2]}", authorized)
                action, args = (rest[3], rest[4:]) if len(rest) > 3 else ("revision", ["main"])
                if action == "revision" and len(args) == 1 and method == "GET":
                    return 200, hub.repo_info(repo, args[0]), {}
                if action == "tree" and args and method == "GET":
                    prefix = _safe_path("/".join(args[1:])) if args[1:] else ""
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    return 200, hub.tree(repo, args[0], prefix, recursive), {}
                if action == "preupload" and len(args) == 1 and method == "POST":
                    files = json.loads(body)["files"]
                    hub.get_commit(repo, args[0])
                    return (
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                for f in files
                            ]
                        },
                        {},
                    )
                if action == "branch" and len(args) == 1 and method == "POST":
                    start = json.loads(body or b"{}").get("startingPoint") or "main"
                    if args[0] in repo.branches:
                        raise HubError(409, f"branch {args[0]} already exists")
                    repo.branches[args[0]] = hub.get_commit(repo, start).oid
                    return 200, {}, {}
                if action == "commit" and len(args) == 1 and method == "POST":
                    if query.get("create_pr"):
                        raise HubError(400, "this fake does not support create_pr")
                    return 200, hub.apply_commit(repo, args[0], body), {}
            raise HubError(404, f"fake hub: no route for {method} /{'/'.join(parts)}")
        prefix = ""
        if parts[:1] == ["datasets"]:  # /datasets/{ns}/{name}/resolve/...: a dataset repo's file
            prefix, parts = "datasets/", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub.get_repo(f"{prefix}{parts[0]}/{parts[1]}", authorized)
            commit = hub.get_commit(repo, parts[3])
            path = _safe_path("/".join(parts[4:]))
            if path not in commit.files:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            content = commit.files[path]
            headers = {
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{git_blob_sha1(content)}"',
                "Content-Type": "application/octet-stream",
            }
            return 200, content, headers
        raise HubError(404, f"fake hub: no route for {method} /{'/'.join(parts)}")

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():  # header values must be latin-1
            self.send_header(key, value.encode("ascii", "backslashreplace").decode())
        self.send_header("Content-Length", str(len(data)))  # also on HEAD: the client reads it
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


# -- aiming the real client at the fake -------------------------------------------------------
HUB_TEST_TOKEN = "hf_fake_test_token"


def _hub_modules() -> list[ModuleType]:
    """``huggingface_hub`` and its loaded submodules (the ones an upload or download uses are loaded first)."""
    import huggingface_hub.file_download
    import huggingface_hub.hf_api
    import huggingface_hub.repocard  # noqa: F401 - loaded so that their constants get patched

    modules = list(sys.modules.items())
    return [m for n, m in modules if m is not None and (n == "huggingface_hub" or n.startswith("huggingface_hub."))]


def _set_constant(monkeypatch: pytest.MonkeyPatch, name: str, value: Any) -> None:
    """Set ``huggingface_hub.constants.<name>`` and every copy of it: 0.x modules import constants by
    name (``from .constants import ENDPOINT``), so patching ``constants`` alone misses them."""
    from huggingface_hub import constants

    if not hasattr(constants, name):  # a newer version's constant: nothing of this version reads it
        return
    for module in _hub_modules():
        if name in vars(module):
            monkeypatch.setattr(module, name, value)


def _reset_sessions() -> None:
    """Drop the client's cached HTTP sessions: 0.x mounts its offline adapter when it makes one."""
    from huggingface_hub import utils

    reset: Callable[[], None] = getattr(utils, "reset_sessions", None) or utils.close_session
    reset()


def _set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    _set_constant(monkeypatch, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")  # for subprocesses
    _reset_sessions()


def aim_client(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Point the real ``huggingface_hub`` at the Hub ``url``, with its cache under ``home``, online.

    ``huggingface_hub`` reads its environment at import time, so besides the env vars this patches
    the constants it computed (and their copies in its modules), the endpoint of the module-level
    ``HfApi`` behind ``huggingface_hub.create_repo``/``list_repo_files``/..., and drops its HTTP
    sessions. A dummy token is set so writes are authorised. Undone by ``monkeypatch.undo()``
    followed by :func:`_reset_sessions`, as :func:`hub_server_fixture` does.
    """
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    cache = home / "hub"
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN": HUB_TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        "ENDPOINT": url,
        # hf_hub_url formats this template, so it must follow ENDPOINT.
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": getattr(constants, "HF_URL_HOSTS", frozenset()) | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
    }
    for name, value in patches.items():
        _set_constant(monkeypatch, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    _set_offline(monkeypatch, False)


@pytest.fixture(name="hub_server")
def hub_server_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh fake Hub with the real ``huggingface_hub`` aimed at it (:func:`aim_client`).

    The cache lives under ``tmp_path/hf_home``. Yields the server: ``.url``, ``.repos`` (repo_id ->
    Repo with its commits), ``.requests`` / ``.calls()``.
    """
    server = FakeHub().start()
    try:
        aim_client(monkeypatch, server.url, tmp_path / "hf_home")
        yield server
    finally:
        server.stop()
        # Restore now, not after this teardown, so that the sessions made from here on are offline again.
        monkeypatch.undo()
        _reset_sessions()


@pytest.fixture(name="hub_offline")
def hub_offline_fixture(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """A switch for ``huggingface_hub`` offline mode: call ``hub_offline()`` to go offline, ``(False)`` back.

    Sets the module flag ``constants.HF_HUB_OFFLINE`` (read from the env at import; 2.x checks it per
    request, 0.x when it makes a session, so sessions are dropped too) and the env var for
    subprocesses. Undone at the end of the test. Use it after ``hub_server`` so the cache dir is the tmp one.
    """

    def switch(offline: bool = True) -> None:
        _set_offline(monkeypatch, offline)

    return switch


# -- endpoints that cannot be reached, on this machine ----------------------------------------
@contextlib.contextmanager
def unreachable_endpoint(kind: Literal["refused", "blackhole"]) -> Iterator[str]:
    """The URL of a loopback endpoint that no connection opens to.

    "refused": a bound port that does not listen (the kernel answers RST at once). "blackhole": a
    port whose accept queue is full, so the kernel drops further SYNs, as a firewall that drops
    packets does: a connect waits until its timeout.
    """
    sockets = [socket.socket()]
    try:
        sockets[0].bind(("127.0.0.1", 0))
        address = sockets[0].getsockname()
        if kind == "blackhole":
            sockets[0].listen(0)
            sockets.append(socket.create_connection(address, timeout=1))  # fills the queue of a backlog of 0
            check = socket.socket()
            sockets.append(check)
            check.settimeout(0.2)
            try:
                check.connect(address)
            except TimeoutError:
                pass
            else:
                raise RuntimeError("this kernel accepts connections past a full accept queue: no blackhole")
        yield f"http://{address[0]}:{address[1]}"
    finally:
        for sock in sockets:
            sock.close()
