"""The fake Hub is faithful enough: the REAL huggingface_hub client round-trips through it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    ModelCard,
    create_repo,
    hf_hub_download,
    list_repo_files,
    snapshot_download,
)
from huggingface_hub.utils import (  # where every supported version exports them
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import FakeHub, git_blob_sha1, hub_offline_fixture, hub_server_fixture  # noqa: F401 - fixtures

REPO = "alice/dql-test"
README = """---
library_name: dql_agent
license: mit
tags:
- reinforcement-learning
- Pendulum-v1
---

# DQL test model

A card with YAML metadata.
"""
WEIGHTS = bytes(range(256)) * 8 + b"\x00\xff"  # binary, with NUL bytes
CONFIG = {"algo": "DiffusionQL", "hidden": [256, 256]}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text(README)
    (folder / "model.bin").write_bytes(WEIGHTS)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "sub" / "notes.txt").write_text("nested file")
    return folder


def _push(hub: FakeHub, tmp_path: Path) -> str:
    """Create REPO and upload the test folder; return the commit oid."""
    create_repo(REPO)
    info = HfApi().upload_folder(repo_id=REPO, folder_path=_folder(tmp_path), commit_message="add")
    return info.oid


def test_create_repo_new_and_existing(hub_server: FakeHub) -> None:
    url = HfApi().create_repo(REPO)
    assert url == f"{hub_server.url}/{REPO}" and url.repo_id == REPO
    # exist_ok=True swallows the 409 and reads "url" from its body.
    assert HfApi().create_repo(REPO, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().create_repo(REPO)
    assert err.value.response.status_code == 409
    assert list(hub_server.repos) == [REPO]
    # The Hub seeds a new repo with .gitattributes; so does the fake.
    assert list_repo_files(REPO) == [".gitattributes"]


def test_upload_download_roundtrip(hub_server: FakeHub, tmp_path: Path) -> None:
    before = len(hub_server.requests)
    oid = _push(hub_server, tmp_path)
    upload_calls = list(dict.fromkeys(hub_server.calls()[before:]))  # 0.36 validates the card twice
    assert upload_calls == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",  # README.md with metadata is validated first
        f"POST /api/models/{REPO}/preupload/main",
        f"POST /api/models/{REPO}/commit/main",
    ]
    assert hub_server.repos[REPO].branches["main"] == oid
    assert sorted(list_repo_files(REPO)) == [".gitattributes", "README.md", "config.json", "model.bin", "sub/notes.txt"]

    before = len(hub_server.requests)
    path = hf_hub_download(REPO, "model.bin")
    assert hub_server.calls()[before:] == [
        f"HEAD /{REPO}/resolve/main/model.bin",
        f"GET /{REPO}/resolve/main/model.bin",
    ]
    assert Path(path).read_bytes() == WEIGHTS
    assert f"/snapshots/{oid}/" in path  # cached under the commit the server reported
    assert json.loads(Path(hf_hub_download(REPO, "config.json")).read_text()) == CONFIG
    assert Path(hf_hub_download(REPO, "README.md")).read_text() == README
    assert Path(hf_hub_download(REPO, "sub/notes.txt")).read_text() == "nested file"

    # A second download is a HEAD only: the ETag matches the cached blob.
    before = len(hub_server.requests)
    assert hf_hub_download(REPO, "model.bin") == path
    assert hub_server.calls()[before:] == [f"HEAD /{REPO}/resolve/main/model.bin"]

    snap = Path(snapshot_download(REPO))
    assert snap.name == oid
    assert (snap / "model.bin").read_bytes() == WEIGHTS
    assert (snap / "sub" / "notes.txt").read_text() == "nested file"
    tree = {f["path"]: f for f in hub_server.tree(hub_server.repos[REPO], oid, "", True)}
    assert tree["model.bin"]["oid"] == git_blob_sha1(WEIGHTS)
    assert tree["sub"]["type"] == "directory"


def test_history_and_revisions(hub_server: FakeHub, tmp_path: Path) -> None:
    first = _push(hub_server, tmp_path)
    api = HfApi()
    second = api.upload_file(path_or_fileobj=b'{"algo": "QVPO"}', path_in_repo="config.json", repo_id=REPO).oid
    assert second != first
    assert api.repo_info(REPO).sha == second
    assert api.repo_info(REPO, revision=first).sha == first
    new = Path(hf_hub_download(REPO, "config.json")).read_text()
    old = Path(hf_hub_download(REPO, "config.json", revision=first)).read_text()
    assert json.loads(new) == {"algo": "QVPO"} and json.loads(old) == CONFIG

    api.delete_file("sub/notes.txt", repo_id=REPO)
    assert "sub/notes.txt" not in list_repo_files(REPO)
    assert "sub/notes.txt" in list_repo_files(REPO, revision=first)
    assert [c.oid for c in hub_server.repos[REPO].commits.values()][1:3] == [first, second]


def test_errors(hub_server: FakeHub, tmp_path: Path) -> None:
    _push(hub_server, tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().repo_info("alice/missing")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        HfApi().repo_info(REPO, revision="0" * 40)


def test_private_repo_needs_token(hub_server: FakeHub) -> None:
    create_repo("alice/secret", private=True)
    HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="alice/secret")
    assert HfApi().repo_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "a.txt", token=False)
    assert Path(hf_hub_download("alice/secret", "a.txt")).read_bytes() == b"x"


def test_rejects_paths_escaping_the_repo(hub_server: FakeHub, tmp_path: Path) -> None:
    _push(hub_server, tmp_path)
    auth = {"Authorization": "Bearer t", "Content-Type": "application/x-ndjson"}
    commit = b"\n".join(
        [
            json.dumps({"key": "header", "value": {"summary": "evil"}}).encode(),
            json.dumps({"key": "file", "value": {"path": "../evil", "content": "eA==", "encoding": "base64"}}).encode(),
        ]
    )
    requests = [
        urllib.request.Request(f"{hub_server.url}/{REPO}/resolve/main/%2E%2E/x"),
        urllib.request.Request(f"{hub_server.url}/api/models/{REPO}/commit/main", data=commit, headers=auth),
    ]
    for request in requests:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400
    assert len(hub_server.repos[REPO].commits) == 2  # nothing was committed


def test_model_card_load(hub_server: FakeHub, tmp_path: Path) -> None:
    _push(hub_server, tmp_path)
    card = ModelCard.load(REPO)
    assert card.data.library_name == "dql_agent"
    assert card.data.tags == ["reinforcement-learning", "Pendulum-v1"]
    assert "# DQL test model" in card.text


def test_offline_mode_uses_cache(hub_server: FakeHub, hub_offline, tmp_path: Path) -> None:
    _push(hub_server, tmp_path)
    online = hf_hub_download(REPO, "model.bin")
    hub_offline()
    before = len(hub_server.requests)
    assert hf_hub_download(REPO, "model.bin") == online
    assert Path(snapshot_download(REPO)).name == Path(online).parent.name
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json")  # never downloaded
    assert len(hub_server.requests) == before  # offline really made no request
