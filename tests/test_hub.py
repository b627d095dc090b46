"""Hub round trip against the fake Hub: push, load back, offline cache, card, video, errors, an
unreachable Hub (a loopback port that refuses or drops connections) and the CLI's offline push."""

from __future__ import annotations

import ast
import html
import json
import re
import time
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from markdown_it import MarkdownIt

import dql_agent
from dql_agent import CheckpointError, DiffusionQL, OfflineBuffer
from dql_agent.cli import main
from dql_agent.integrations.hub import (
    HubNotFoundError,
    HubUnreachableError,
    load_from_hub,
    make_model_card,
    write_hub_folder,
)
from tests.hub_server import (  # the fixtures, for every huggingface_hub version
    aim_client,
    hub_offline_fixture,  # noqa: F401
    hub_server_fixture,  # noqa: F401
    unreachable_endpoint,
)

ENV_ID = "Pendulum-v1"
REPO = "alice/dql-pendulum"
METADATA = {"dataset_id": "test/pendulum/tiny-v0", "env_id": ENV_ID, "ref_min_score": -1200.0, "ref_max_score": -150.0}
TINY = {"hidden_dim": 16, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 4, "batch_size": 32}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks: one thread is fastest, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DiffusionQL:
    """A tiny DiffusionQL trained 20 steps on random Pendulum-shaped transitions."""
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(0)
    n = 256
    theta = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(theta), np.sin(theta), rng.uniform(-8, 8, n)], 1).astype(np.float32)
    buffer = OfflineBuffer(
        obs,
        rng.uniform(-2, 2, (n, 1)),
        rng.normal(size=n),
        np.roll(obs, -1, 0),
        np.zeros(n, bool),
        observation_space=env.observation_space,
        action_space=env.action_space,
        metadata=METADATA,
    )
    agent = DiffusionQL(buffer, device="cpu", seed=0, **TINY)
    agent.learn(20)
    return agent


@pytest.fixture(scope="module")
def observations() -> np.ndarray:
    env = gym.make(ENV_ID)
    return np.stack([env.reset(seed=s)[0] for s in range(6)])  # (6, 3)


def _actions(agent: DiffusionQL, observations: np.ndarray) -> np.ndarray:
    single = [agent.predict(o, deterministic=True)[0] for o in observations]
    return np.concatenate([np.stack(single), agent.predict(observations, deterministic=True)[0]])


def _upload(tmp_path: Path, repo_id: str, files: dict[str, bytes]) -> None:
    folder = tmp_path / "upload"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="by hand")


def _saved(model: DiffusionQL, tmp_path: Path, **config_changes: object) -> dict[str, bytes]:
    """model.save's files, with top-level or nested ("config.hidden_dim") config.json edits."""
    folder = tmp_path / "saved"
    model.save(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in config_changes.items():
        if key.startswith("config."):
            config["config"][key.split(".", 1)[1]] = value
        else:
            config[key] = value
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
    }


def test_push_load_offline_card_video(model, observations, hub_server, hub_offline, tmp_path):
    eval_env = gym.make(ENV_ID, render_mode="rgb_array")
    url = model.push_to_hub(REPO, eval_env=eval_env, n_eval_episodes=2, video_length=30)

    repo = hub_server.repos[REPO]
    head = repo.commits[repo.branches["main"]]
    assert url.endswith(head.oid)
    assert {"model.safetensors", "config.json", "README.md", "results.json", "replay.mp4"} <= set(head.files)
    assert head.message.startswith("Upload DiffusionQL agent trained on test/pendulum/tiny-v0")

    expected = _actions(model, observations)
    loaded = DiffusionQL.load_from_hub(REPO, device="cpu")
    assert isinstance(loaded, DiffusionQL)
    np.testing.assert_array_equal(_actions(loaded, observations), expected)
    assert loaded.metadata == model.metadata and loaded.num_timesteps == 20
    any_algorithm = dql_agent.load_from_hub(REPO, device="cpu")
    assert isinstance(any_algorithm, DiffusionQL)

    n_requests = len(hub_server.requests)
    hub_offline()
    cached = DiffusionQL.load_from_hub(REPO, device="cpu")
    np.testing.assert_array_equal(_actions(cached, observations), expected)
    assert len(hub_server.requests) == n_requests  # nothing asked of the Hub
    hub_offline(False)

    results = json.loads(head.files["results.json"])
    assert results["n_eval_episodes"] == 2 and results["is_deterministic"] is True
    assert results["env_id"] == ENV_ID and results["dataset_id"] == METADATA["dataset_id"]
    assert all(type(results[k]) is float for k in ("mean_reward", "std_reward", "normalized_score"))
    assert results["normalized_score"] == pytest.approx(100 * (results["mean_reward"] + 1200.0) / 1050.0)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", results["eval_datetime"])

    card_path = tmp_path / "README.md"
    card_path.write_bytes(head.files["README.md"])
    card = ModelCard.load(card_path)
    data = card.data
    assert data.library_name == "dql_agent"
    for tag in (
        "reinforcement-learning",
        "offline-rl",
        "diffusion-policy",
        ENV_ID,
        METADATA["dataset_id"],
        "dql_agent",
    ):
        assert tag in data.tags
    assert data.datasets == [METADATA["dataset_id"]]
    by_metric = {r.metric_type: r for r in data.eval_results}
    mean_result = by_metric["mean_reward"]
    assert mean_result.metric_value == (f"{results['mean_reward']:.2f} +/- {results['std_reward']:.2f}")
    assert mean_result.task_type == "reinforcement-learning"
    assert mean_result.dataset_type == mean_result.dataset_name == ENV_ID
    assert by_metric["normalized_score"].metric_value == round(results["normalized_score"], 2)
    assert "arXiv" in card.text and "2208.06193" in card.text and "Wang" in card.text
    assert "| `hidden_dim` | `16` |" in card.text

    # The card's usage snippet runs as written.
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert f'DiffusionQL.load_from_hub("{REPO}")' in snippet
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own card
    assert namespace["action"].shape == (1,)

    video = tmp_path / "replay.mp4"
    video.write_bytes(head.files["replay.mp4"])
    frames = iio.imread(video, plugin="FFMPEG")  # (T, H, W, 3)
    assert frames.shape[0] == 30 and frames.shape[-1] == 3
    assert all(frame.std() > 1.0 for frame in frames)  # not blank


def test_load_from_local_directory(model, observations, tmp_path):
    folder = write_hub_folder(model, tmp_path / "hub", repo_id=REPO)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None  # no eval env, no model-index
    expected = _actions(model, observations)
    for loaded in (DiffusionQL.load_from_hub(folder, device="cpu"), load_from_hub(str(folder), device="cpu")):
        np.testing.assert_array_equal(_actions(loaded, observations), expected)


def test_write_hub_folder_remakes_non_rendering_env_and_drops_stale_files(model, tmp_path):
    folder = write_hub_folder(model, tmp_path / "hub")  # a previous write, then a stale video in it
    (folder / "replay.mp4").write_bytes(b"stale")
    write_hub_folder(model, folder, eval_env=gym.make(ENV_ID), n_eval_episodes=1, video_length=5)
    assert iio.imread(folder / "replay.mp4", plugin="FFMPEG").shape[0] == 5
    write_hub_folder(model, folder)  # no eval env: no stale results or video left behind
    assert not (folder / "replay.mp4").exists() and not (folder / "results.json").exists()


def test_eval_env_errors(model, hub_server, tmp_path):
    with pytest.raises(ValueError, match="observation_space"):
        model.push_to_hub("alice/wrong-env", eval_env=gym.make("MountainCarContinuous-v0"))
    assert "alice/wrong-env" not in hub_server.repos  # checked before creating the repo

    class NoSpecEnv(gym.Env):
        observation_space = gym.make(ENV_ID).observation_space
        action_space = gym.make(ENV_ID).action_space

        def reset(self, *, seed=None, options=None):
            return np.zeros(3, np.float32), {}

        def step(self, action):
            return np.zeros(3, np.float32), 0.0, True, False, {}

    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        write_hub_folder(model, tmp_path / "x", eval_env=NoSpecEnv(), n_eval_episodes=1)
    write_hub_folder(model, tmp_path / "y", eval_env=NoSpecEnv(), n_eval_episodes=1, video=False)
    assert json.loads((tmp_path / "y" / "results.json").read_text())["env_id"] == ENV_ID


def test_missing_repo(hub_server):
    with pytest.raises(HubNotFoundError, match="alice/nope") as info:
        DiffusionQL.load_from_hub("alice/nope")
    assert "not found" in str(info.value) and info.value.path_in_repo is None


def test_missing_file(model, hub_server, tmp_path):
    _upload(tmp_path, "alice/card-only", {"README.md": b"# just a card\n"})
    with pytest.raises(HubNotFoundError, match=r"'alice/card-only'.*config\.json"):
        DiffusionQL.load_from_hub("alice/card-only")
    _upload(tmp_path, "alice/no-weights", {"config.json": _saved(model, tmp_path)["config.json"]})
    with pytest.raises(HubNotFoundError, match=r"'alice/no-weights'.*model\.safetensors") as info:
        DiffusionQL.load_from_hub("alice/no-weights")
    assert info.value.path_in_repo == "model.safetensors"


def test_offline_without_cache(hub_server, hub_offline):
    hub_offline()
    with pytest.raises(HubNotFoundError, match="not in the local cache.*offline"):
        DiffusionQL.load_from_hub("alice/never-downloaded")


FAST = 5.0  # seconds: an unreachable Hub is reported within this (the connect timeout is 3 s)


@pytest.mark.bad_input("hub", "clear error")
@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_load_from_unreachable_hub(kind, hub_server, monkeypatch, tmp_path):
    with unreachable_endpoint(kind) as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        start = time.monotonic()
        with pytest.raises(HubUnreachableError) as info:
            DiffusionQL.load_from_hub("alice/never-downloaded")
        assert time.monotonic() - start < FAST
    error = info.value
    assert isinstance(error, ConnectionError) and (error.endpoint, error.repo_id) == (url, "alice/never-downloaded")
    message = str(error)
    assert f"cannot reach the Hub at {url}" in message and "'alice/never-downloaded'" in message
    for way_offline in ("HF_HUB_OFFLINE=1", "local_files_only=True", "local checkpoint directory", "--local-dir"):
        assert way_offline in message


@pytest.mark.bad_input("hub", "clear error")
@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_push_to_unreachable_hub(model, kind, hub_server, monkeypatch, tmp_path):
    with unreachable_endpoint(kind) as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        start = time.monotonic()
        with pytest.raises(HubUnreachableError, match=f"'alice/new'.*no connection to {url}.*--local-dir DIR"):
            model.push_to_hub("alice/new", eval_env=gym.make(ENV_ID), video=False)  # fails before evaluating
        assert time.monotonic() - start < FAST


@pytest.mark.bad_input("hub", "correct behaviour")
def test_unreachable_hub_loads_from_cache(model, observations, hub_server, monkeypatch, tmp_path):
    model.push_to_hub(REPO, video=False)
    DiffusionQL.load_from_hub(REPO, device="cpu")  # cached
    with unreachable_endpoint("blackhole") as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")  # the same cache
        start = time.monotonic()
        loaded = DiffusionQL.load_from_hub(REPO, device="cpu")
        assert time.monotonic() - start < FAST
    np.testing.assert_array_equal(_actions(loaded, observations), _actions(model, observations))


@pytest.mark.bad_input("hub", "clear error")
def test_push_in_offline_mode(model, hub_server, hub_offline):
    hub_offline()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE is set.*--local-dir DIR"):
        model.push_to_hub("alice/offline")
    assert not hub_server.requests


def test_cli_push_local_dir_needs_no_network(model, hub_server, hub_offline, tmp_path, capsys):
    model.save(tmp_path / "model")
    hub_offline()
    folder = tmp_path / "hub"
    argv = ["push", str(tmp_path / "model"), REPO, "--local-dir", str(folder), "--env", ENV_ID]
    main([*argv, "--episodes", "1", "--video-length", "5", "--device", "cpu"])
    assert not hub_server.requests
    assert "wrote the Hub folder" in capsys.readouterr().out
    files = {"model.safetensors", "config.json", "README.md", "results.json", "replay.mp4"}
    assert {p.name for p in folder.iterdir()} == files
    assert f'DiffusionQL.load_from_hub("{REPO}")' in (folder / "README.md").read_text()
    assert json.loads((folder / "results.json").read_text())["n_eval_episodes"] == 1
    assert DiffusionQL.load_from_hub(folder, device="cpu").num_timesteps == model.num_timesteps


@pytest.mark.bad_input("hub", "clear error")
@pytest.mark.parametrize("options", [[], ["--local-dir", "hub", "--private"]], ids=["unreachable", "local private"])
def test_cli_push_errors_are_one_line(options, model, hub_server, monkeypatch, tmp_path, capsys):
    model.save(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DQL_AGENT_DEBUG", raising=False)
    with unreachable_endpoint("refused") as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        with pytest.raises(SystemExit) as info:
            main(["push", "model", REPO, "--episodes", "0", "--device", "cpu", *options])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dql-agent: error: ") and err.count("\n") == 1, err
    assert ("--local-dir DIR" if not options else "--private and --revision apply to a push") in err


def test_newer_format_version(model, hub_server, tmp_path):
    _upload(tmp_path, "alice/future", _saved(model, tmp_path, format_version=99))
    with pytest.raises(CheckpointError, match=r"alice/future/config\.json has format_version 99"):
        DiffusionQL.load_from_hub("alice/future")


def test_shape_mismatch(model, hub_server, tmp_path):
    _upload(tmp_path, "alice/shapes", _saved(model, tmp_path, **{"config.hidden_dim": 32}))
    match = r"alice/shapes/model\.safetensors: .*shapes disagree"
    with pytest.raises(CheckpointError, match=match):
        DiffusionQL.load_from_hub("alice/shapes")


def test_other_algorithm(model, observations, hub_server, tmp_path, monkeypatch):
    _upload(tmp_path, "alice/other", _saved(model, tmp_path, algorithm="OtherAlgo"))
    with pytest.raises(CheckpointError, match="holds a OtherAlgo model, not a DiffusionQL"):
        DiffusionQL.load_from_hub("alice/other")
    with pytest.raises(CheckpointError, match="unknown algorithm 'OtherAlgo'"):
        dql_agent.load_from_hub("alice/other")

    # A class statement registers a new algorithm (in a copy of the registry, undone after the test).
    monkeypatch.setattr(dql_agent.registry, "ALGORITHMS", dict(dql_agent.registry.ALGORITHMS))

    class OtherAlgo(DiffusionQL, algorithm="OtherAlgo", short_name="other", paper=DiffusionQL.paper):
        pass

    assert dql_agent.registry.ALGORITHMS["OtherAlgo"] is OtherAlgo and OtherAlgo.online is False
    loaded = dql_agent.load_from_hub("alice/other", device="cpu")
    assert type(loaded) is OtherAlgo
    np.testing.assert_array_equal(_actions(loaded, observations), _actions(model, observations))


def test_push_to_branch(model, observations, hub_server):
    url = model.push_to_hub("alice/branchy", revision="dev", commit_message="to dev")
    repo = hub_server.repos["alice/branchy"]
    assert url.endswith(repo.branches["dev"]) and repo.commits[repo.branches["dev"]].message == ("to dev")
    assert "model.safetensors" not in repo.commits[repo.branches["main"]].files
    loaded = DiffusionQL.load_from_hub("alice/branchy", revision="dev", device="cpu")
    np.testing.assert_array_equal(_actions(loaded, observations), _actions(model, observations))
    with pytest.raises(HubNotFoundError, match="config.json"):
        DiffusionQL.load_from_hub("alice/branchy")  # main has only .gitattributes


def test_load_from_hub_arguments():
    with pytest.raises(TypeError, match="repo id"):
        load_from_hub(DiffusionQL)
    with pytest.raises(ValueError, match="neither a local checkpoint directory"):
        load_from_hub("not a/valid/repo id!!")


# Ids from files (checkpoint metadata, datasets) in the card: data in every context, never markup or code.
HOSTILE_IDS = {
    "double and single quotes": "Pendulum\"-v1'",
    "newline and heading": "Pendulum-v1\n# injected heading\n",
    "yaml document end": "x\n---\ntags: [evil]\n...\n",
    "backticks": "a`b``c```d`",
    "code fence": "x\n```\nimport os\n```\n",
    "script tag": "<script>alert(1)</script>",
    "python breakout": '"); import os #',
    "markdown link": "](https://evil.example)[x",
    "table pipes": "a|b\\|c |",
    "unicode line breaks": "a\u2028b\u2029c\x85d\re\r\nf",
    "html entity": "&lt;b&gt; &amp;",
    "trailing backslash": "x\\",
    "emphasis and autolink": "*a* _b_ www.evil.example https://evil.example <https://evil.example>",
    "spaces and tab": " x\t ",
    "astral and lone surrogate": "\U0001f600\ud800",
}


def _visible(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _card_text(model, tmp_path: Path, env_id: str, dataset_id: str) -> str:
    model.metadata = {**METADATA, "env_id": env_id, "dataset_id": dataset_id}
    results = {
        "env_id": env_id,
        "dataset_id": dataset_id,
        "mean_reward": -500.0,
        "std_reward": 10.0,
        "normalized_score": 50.0,
        "n_eval_episodes": 3,
        "is_deterministic": True,
        "eval_datetime": "2025-01-01T00:00:00+00:00",
    }
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.md"
    make_model_card(model, results, repo_id=REPO).save(path)
    return path.read_text(encoding="utf-8")


def _python_snippet(text: str, replace: str, by: str) -> str:
    """The usage snippet's AST, string constants equal to ``replace`` swapped for ``by``."""
    tree = ast.parse(re.search(r"^```python\n(.*?)^```$", text, re.S | re.M).group(1))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == replace:
            node.value = by
    return ast.dump(tree)


def _markdown_tokens(text: str) -> list[str]:
    """Block and inline token types of the card body (how the Markdown is structured)."""
    tokens = MarkdownIt("js-default").parse(text)
    return [t.type for token in tokens for t in (token, *(token.children or []))]


@pytest.mark.bad_input("model card", "correct behaviour")
@pytest.mark.parametrize("hostile", HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_card_shows_hostile_ids_as_data(model, hostile, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "metadata", dict(model.metadata))  # restored after the test
    dataset = f"{hostile}/data-v0"
    baseline = _card_text(model, tmp_path, ENV_ID, METADATA["dataset_id"])
    text = _card_text(model, tmp_path, hostile, dataset)

    # YAML front matter: parsed as the Hub does, every id back as it was.
    data = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.S).group(1))
    card = ModelCard(text)
    for parsed in (data, card.data.to_dict()):
        assert hostile in parsed["tags"] and dataset in parsed["tags"] and parsed["datasets"] == [dataset]
        assert {r["dataset"]["name"] for r in parsed["model-index"][0]["results"]} == {hostile}

    # Python snippet: parses, and holds the id as a string constant only.
    assert _python_snippet(text, hostile, ENV_ID) == _python_snippet(baseline, ENV_ID, ENV_ID)

    # Markdown: the same structure as a plain card (no new line, heading, link, HTML or cell).
    assert len(card.text.splitlines()) == len(ModelCard(baseline).text.splitlines())
    assert _markdown_tokens(card.text) == _markdown_tokens(ModelCard(baseline).text)
    rendered = MarkdownIt("js-default").render(card.text)
    assert "<script" not in rendered and "evil.example</a>" not in rendered
    heading = re.search(r"<h1>(.*?)</h1>", rendered).group(1)
    assert html.unescape(heading) == f"DiffusionQL on {_visible(hostile)}".rstrip()  # headings drop end spaces
    codes = {html.unescape(c) for c in re.findall(r"<code>(.*?)</code>", rendered, re.S)}
    assert _visible(dataset) in codes
    cells = re.findall(r"<td>(.*?)</td>", rendered.split("<tbody>")[1].split("</tbody>")[0])
    assert html.unescape(cells[0]) == _visible(hostile).strip()  # as cells do


def test_image_model_card_lists_the_camera_keys_and_loads_back(hub_server, tmp_path):
    from gymnasium import spaces

    space = spaces.Dict(
        {
            "camera": spaces.Dict({"front": spaces.Box(0, 255, (40, 40, 3), np.uint8)}),
            "depth": spaces.Box(0, 255, (1, 36, 36), np.uint8),
            "state": spaces.Box(-1, 1, (2,), np.float32),
        }
    )
    rng = np.random.default_rng(0)
    n = 32

    def frames(count: int) -> dict:
        return {
            "camera": {"front": rng.integers(0, 256, (count, 40, 40, 3), dtype=np.uint8)},
            "depth": rng.integers(0, 256, (count, 1, 36, 36), dtype=np.uint8),
            "state": rng.uniform(-1, 1, (count, 2)).astype(np.float32),
        }

    buffer = OfflineBuffer(
        frames(n), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), frames(n), np.zeros(n), observation_space=space
    )
    agent = DiffusionQL(buffer, device="cpu", seed=0, cnn_channels=4, image_features=8, **TINY).learn(3, log_interval=0)
    agent.push_to_hub("alice/dql-camera", video=False)

    head = hub_server.repos["alice/dql-camera"]
    card = ModelCard(head.commits[head.branches["main"]].files["README.md"].decode())
    table = card.text.split("## Observations")[1].split("\n\n")[1]
    assert table.splitlines() == [
        "| Key | Kind | Shape | Size | Dtype | Layout |",
        "|---|---|---|---|---|---|",
        "| `camera.front` | image | `(40, 40, 3)` | 40x40 px, 3 channels | `uint8` | HWC |",
        "| `depth` | image | `(1, 36, 36)` | 36x36 px, 1 channel | `uint8` | CHW |",
        "| `state` | vector | `(2,)` | 2 values | `float32` | - |",
    ]
    assert "`predict` takes a dict with these keys" in card.text

    loaded = dql_agent.load_from_hub("alice/dql-camera", device="cpu")
    assert isinstance(loaded, DiffusionQL)
    observations = frames(5)
    one = {
        "camera": {"front": observations["camera"]["front"][0]},
        "depth": observations["depth"][0],
        "state": np.zeros(2),
    }
    for obs in (observations, one):
        np.testing.assert_array_equal(
            loaded.predict(obs, deterministic=True)[0], agent.predict(obs, deterministic=True)[0]
        )


def test_flat_model_card_has_no_observations_section(model, tmp_path):
    make_model_card(model, None, repo_id=REPO).save(tmp_path / "README.md")
    assert "## Observations" not in (tmp_path / "README.md").read_text(encoding="utf-8")
