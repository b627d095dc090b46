"""Hugging Face Hub round trip: push a model with its card, evaluation and replay; load it back.

A pushed repo holds what :meth:`BaseAgent.save` writes (``model.safetensors`` + ``config.json``),
a ``README.md`` model card rendered from ``hub_cards/model_card.md``, and, when an evaluation env is
given, ``results.json`` and ``replay.mp4``. Every transfer goes through ``huggingface_hub``
(``HfApi.create_repo``/``upload_folder``, ``hf_hub_download``); loading reads JSON and safetensors
only, so nothing in a repo can run code.

The three entry points are plain functions so the CLI can call them directly:

- :func:`write_hub_folder`: the hub-ready folder, written locally (no network);
- :func:`push_to_hub`: ``create_repo``, :func:`write_hub_folder` into a temp dir, ``upload_folder``;
- :func:`load_from_hub`: a repo id or a local folder -> a model of the class ``config.json`` names.

``huggingface_hub``, Stable-Baselines3 and Jinja are imported inside the functions, so importing
this module (``dql_agent`` does, for ``dql_agent.load_from_hub``) stays cheap.

Every ``huggingface_hub`` from 0.23 (HTTP through ``requests``) to 2.x (``httpx``/``httpx2``) works:
only APIs common to them are used (errors from ``huggingface_hub.utils``, the offline flag
``constants.HF_HUB_OFFLINE``). Before it transfers anything, a load or push checks with one
request that the Hub can be reached (:func:`connection_error`); when it cannot, a load uses the
local cache and a push fails at once with :class:`HubUnreachableError`, instead of the client's
retries (about 23 s, or minutes where packets are dropped).
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import os
import re
import string
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np

from dql_agent.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    library_version,
    load_checkpoint,
    parse_config,
    parse_safetensors,
    verify_weights,
)
from dql_agent.evaluation import check_eval_env, evaluate
from dql_agent.hub_access import (
    HubNotFoundError,
    HubUnreachableError,
    connection_error,
    is_connection_error,
    offline_mode,
    reason,
    repo_errors,
)
from dql_agent.registry import algorithm_class

if TYPE_CHECKING:
    import torch
    from huggingface_hub import ModelCard

    from dql_agent.base import BaseAgent

__all__ = [
    "README_FILE",
    "RESULTS_FILE",
    "VIDEO_FILE",
    "HubNotFoundError",
    "HubUnreachableError",
    "check_repo_id",
    "install_command",
    "load_from_hub",
    "make_model_card",
    "push_to_hub",
    "write_hub_folder",
]

README_FILE = "README.md"
RESULTS_FILE = "results.json"
VIDEO_FILE = "replay.mp4"
CARD_TEMPLATE = "model_card.md"  # in the dql_agent.hub_cards package
REPO_PLACEHOLDER = "<user>/<repo>"
CARD_TAGS = ("reinforcement-learning", "offline-rl", "diffusion-policy")


def check_repo_id(repo_id: Any, field: str = "repo_id") -> str:
    """``repo_id`` when it is a Hub model repo id (``owner/name`` or ``name``), by huggingface_hub's
    own rule (letters, digits, ``-``, ``_``, ``.``; at most 96 characters a part; no ``..``); else a
    TypeError/ValueError naming ``field``. Every place that writes an id (the push, the Hub folder,
    the card's usage code) checks it first, so ``../../etc`` or a quote never reaches a path or code."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"{field} must be a Hub repo id 'owner/name', got {repo_id!r} ({type(repo_id).__name__})")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        rule = str(error).split(":", 1)[0].strip()  # the rule, without the id it repeats
        raise ValueError(f"{field} must be a Hub repo id 'owner/name' ({rule}), got {repo_id!r}") from None
    return repo_id


@contextlib.contextmanager
def _connection_lost(endpoint: str, repo_id: str) -> Iterator[None]:
    """Turn a connection failing during a push (after :func:`connection_error` found the Hub) into
    a :class:`HubUnreachableError`."""
    try:
        yield
    except Exception as error:
        if not is_connection_error(error):
            raise
        why = f"the connection to {endpoint} failed ({reason(error)})"
        raise _unreachable_on_push(endpoint, repo_id, why) from error


def _unreachable_on_push(endpoint: str, repo_id: str, why: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"cannot push to model repo {repo_id!r}: {why}. To work offline, write the Hub folder (model, card, "
        f"results, video) with `dql-agent push MODEL {repo_id} --local-dir DIR` (or write_hub_folder) and push it "
        "once online",
        endpoint,
        repo_id,
    )


def _video_env(env: Any) -> tuple[gym.Env, bool]:
    """A single rgb_array env to record from (and whether we made it, so must close it)."""
    if hasattr(env, "envs") and not isinstance(env, gym.Env):  # SB3 DummyVecEnv
        env = env.envs[0]
    if not isinstance(env, gym.Env):
        raise TypeError(
            f"cannot record a video from a {type(env).__name__}; pass a gymnasium.Env made with "
            "render_mode='rgb_array' as eval_env, or video=False"
        )
    if env.render_mode == "rgb_array":
        return env, False
    if env.spec is not None:  # same id and kwargs, rendering to arrays
        return gym.make(env.spec, render_mode="rgb_array"), True
    raise ValueError(
        f"eval_env renders with render_mode={env.render_mode!r} and has no spec to re-create it "
        "with render_mode='rgb_array'; make it with render_mode='rgb_array' or pass video=False"
    )


# the card's install line ------------------------------------------------------------------------
INSTALL_ENV = "DQL_AGENT_INSTALL"
"""Environment variable with the command a model card tells readers to install dql_agent with
(e.g. ``pip install "dql_agent @ git+https://github.com/OWNER/dql_agent@v0.1.0"``)."""
_SOURCE_LABELS = ("source", "repository", "source code", "code", "homepage", "home")


def install_command() -> tuple[str, str]:
    """The command a model card gives to install this dql_agent, and where it comes from.

    In order: ``$DQL_AGENT_INSTALL`` as set; the URL this copy was installed from when pip recorded
    one that others can reach (PEP 610 ``direct_url.json``: a git URL pinned to its commit, or a
    wheel/sdist URL); ``dql_agent==VERSION`` when it came from a package index; the project URL of
    the package metadata (``Project-URL: Source``/``Repository``/``Homepage``, or ``Home-page``);
    else the folder it was installed from, which only this machine can install from (a push then
    warns: set ``DQL_AGENT_INSTALL``).

    Returns:
        ``(command, origin)``; origin is one of ``"DQL_AGENT_INSTALL"``, ``"vcs"``, ``"archive"``,
        ``"index"``, ``"project-url"``, ``"local"``.
    """
    import importlib.metadata
    import shlex

    configured = os.environ.get(INSTALL_ENV, "").strip()
    if configured:
        return configured, INSTALL_ENV
    version = library_version()
    local: str | None = None
    for dist in importlib.metadata.distributions(name="dql_agent"):
        direct = _direct_url(dist)
        if direct is None:
            continue
        url = str(direct.get("url", ""))
        vcs = direct.get("vcs_info")
        if isinstance(vcs, dict) and vcs.get("vcs") and not url.startswith("file:"):
            pin = vcs.get("commit_id") or vcs.get("requested_revision")
            return f'pip install "dql_agent @ {vcs["vcs"]}+{url}{"@" + str(pin) if pin else ""}"', "vcs"
        if "archive_info" in direct and url.startswith(("https://", "http://")):
            return f'pip install "dql_agent @ {url}"', "archive"
        if url.startswith("file:"):
            local = local or _file_url_path(url)
    if local is None and _installed_from_index():
        return f"pip install dql_agent=={version}", "index"
    project = _project_url()
    if project is not None:
        return f'pip install "dql_agent @ git+{project}"', "project-url"
    if local is None:  # run from a source tree: the folder above the package
        local = str(Path(__file__).resolve().parents[1])
    return f"pip install {shlex.quote(local)}", "local"


def _direct_url(dist: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _file_url_path(url: str) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(url).path)


def _installed_from_index() -> bool:
    """Installed by a package installer from an index: metadata with an INSTALLER record and no
    direct URL (an .egg-info of a source tree has neither)."""
    import importlib.metadata

    for dist in importlib.metadata.distributions(name="dql_agent"):
        if (dist.read_text("INSTALLER") or "").strip() and _direct_url(dist) is None:
            return True
    return False


def _project_url() -> str | None:
    """The project's source repository URL from the package metadata, if it names a git host."""
    import importlib.metadata

    try:
        meta = importlib.metadata.metadata("dql_agent")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = []
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() in _SOURCE_LABELS:
            candidates.append(url.strip())
    candidates += meta.get_all("Home-page") or []
    for url in candidates:
        if url.startswith("https://") and any(host in url for host in ("github.com", "gitlab.com", "bitbucket.org")):
            return url.removesuffix("/")
    return None


# model card --------------------------------------------------------------------------------------
# env_id and dataset_id come from files (checkpoint metadata, datasets): the card shows them as data
# in every context (YAML, Markdown text, code spans, the Python usage snippet), never as markup or code.
_MD_INERT = frozenset("-/")  # punctuation with no Markdown meaning mid-line, kept readable


def _visible(text: str) -> str:
    """``text`` with line breaks and other unprintable characters as Python escapes (``\\n``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _md_text(text: str) -> str:
    """``text`` as literal inline Markdown: punctuation backslash-escaped, ``<>&`` as entities."""
    out = []
    for c in _visible(text):
        if c in "<>&":
            out.append(html.escape(c))
        elif c in string.punctuation and c not in _MD_INERT:
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _md_code(text: str, in_table: bool = False) -> str:
    """``text`` as one Markdown code span, shown verbatim (line breaks as ``\\n``)."""
    text = _visible(text)
    if in_table and "|" in text:
        # A pipe needs a backslash in a table cell, which a code span would show: use text.
        return _md_text(text)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""  # a space is stripped each side
    return f"{fence}{pad}{text}{pad}{fence}"


def _py_str(text: str) -> str:
    """A double-quoted Python string literal, on one line, that evaluates to ``text``."""
    return _visible(json.dumps(text, ensure_ascii=False))  # JSON's escapes are Python's too


def _text_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _format_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _observation_rows(model: BaseAgent) -> list[dict[str, str]] | None:
    """The card's Observations table for a space with camera keys (None for flat spaces, whose
    card has no such section): key, kind, shape, size, dtype and layout of every leaf."""
    from dql_agent.observations import describe_observation_space, has_images

    space = model.observation_space
    if not has_images(space):
        return None
    rows = []
    for leaf in describe_observation_space(space):
        shape = tuple(leaf["shape"])
        if leaf["kind"] == "image":
            height, width, channels = leaf["size"]
            size = f"{height}x{width} px, {channels} channel{'s' if channels != 1 else ''}"
        else:
            n = int(np.prod(shape))
            size = f"{n} value{'s' if n != 1 else ''}"
        rows.append(
            {
                "key": _md_code(leaf["key"], in_table=True),  # keys come from config.json: shown as data
                "kind": leaf["kind"],
                "shape": _md_code(str(shape), in_table=True),
                "size": size,
                "dtype": _md_code(leaf["dtype"], in_table=True),
                "layout": leaf.get("layout", "-"),
            }
        )
    return rows


@functools.cache
def _card_class() -> type[ModelCard]:
    """``ModelCard`` whose YAML metadata round-trips every string (made on first use, as
    ``huggingface_hub`` is imported lazily)."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    class CardData(ModelCardData):
        def to_yaml(self, line_break: str | None = None, original_order: list[str] | None = None) -> str:
            # original_order only when given: huggingface_hub 0.23 neither has nor passes it.
            order = {} if original_order is None else {"original_order": original_order}
            text = super().to_yaml(line_break=line_break, **order)
            if "\x85" not in text:
                return text
            # PyYAML writes U+0085 (NEL) raw in a quoted scalar and reads it back as a line break;
            # ASCII output escapes it (and every other non-ASCII character).
            data = self.to_dict()
            return yaml.safe_dump(data, sort_keys=False, line_break=line_break, allow_unicode=False).strip()

    class Card(ModelCard):
        card_data_class = CardData

    return Card


def make_model_card(
    model: BaseAgent,
    results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    has_video: bool = False,
    install: str | None = None,
) -> ModelCard:
    """The README.md card: Hub metadata (tags, datasets, model-index) plus the rendered template.

    The env and dataset ids (which may come from any checkpoint or dataset) are quoted for each
    place they appear in: YAML by ``yaml``, Markdown escaped, the usage snippet as string literals.
    ``install`` is the card's install command (default: :func:`install_command`).
    """
    from importlib import resources

    from huggingface_hub import EvalResult

    if repo_id is not None:
        check_repo_id(repo_id)
    algorithm = model.algorithm
    paper = model.paper
    if paper is None:
        raise ValueError(
            f"{type(model).__name__} names no paper for its card: declare it as "
            f"class {type(model).__name__}(BaseAgent, algorithm=..., paper=Paper(...))"
        )
    meta = model.metadata
    env_id = _text_or_none((results or {}).get("env_id") or meta.get("env_id"))
    dataset_id = _text_or_none(meta.get("dataset_id"))
    tags = [*CARD_TAGS, *(t for t in (env_id, dataset_id) if t), "dql_agent"]
    eval_results = None
    if results is not None:
        name = env_id or "custom-env"
        common: dict[str, Any] = {
            "task_type": "reinforcement-learning",
            "task_name": "reinforcement-learning",
            "dataset_type": name,
            "dataset_name": name,
        }
        value = f"{results['mean_reward']:.2f} +/- {results['std_reward']:.2f}"
        eval_results = [EvalResult(metric_type="mean_reward", metric_name="mean_reward", metric_value=value, **common)]
        for metric, digits in (("normalized_score", 2), ("success_rate", 4)):
            if results.get(metric) is not None:
                rounded = round(float(results[metric]), digits)
                eval_results.append(EvalResult(metric_type=metric, metric_name=metric, metric_value=rounded, **common))
        results = {**results, "env_id": _md_text(str(results.get("env_id")))}  # shown in a table cell
    model_name = repo_id.split("/")[-1] if repo_id else f"{algorithm}-{env_id or 'agent'}"
    card_cls = _card_class()
    card_data = card_cls.card_data_class(
        library_name="dql_agent",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    template = resources.files("dql_agent.hub_cards").joinpath(CARD_TEMPLATE).read_text("utf-8")
    n_usage = int((results or {}).get("n_eval_episodes", 10))
    repo_literal = _py_str(repo_id or REPO_PLACEHOLDER)
    return card_cls.from_template(
        card_data,
        template_str=template,
        algorithm=algorithm,
        class_name=type(model).__name__,
        paper=paper,
        repo_literal=repo_literal,
        usage_load=_md_code(f"dql_agent.load_from_hub({repo_literal})"),
        env_id=_md_text(env_id) if env_id else None,
        usage_env_literal=_py_str(env_id or "<env id>"),
        usage_n_eval_episodes=n_usage,
        dataset_id=_md_code(dataset_id) if dataset_id else None,
        dataset_revision=_md_code(str(meta["dataset_revision"])) if meta.get("dataset_revision") else None,
        reward=_md_text(str(meta["reward"])) if meta.get("reward") else None,
        results=results,
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
        has_video=has_video,
        hyperparameters=[
            (_md_code(k, in_table=True), _md_code(_format_value(v), in_table=True))
            for k, v in model.config.to_dict().items()
        ],
        observations=_observation_rows(model),
        observations_plain=not isinstance(model.observation_space, gym.spaces.Dict),
        num_timesteps=int(model.num_timesteps),
        seed=model.seed,
        library_version=library_version(),
        install_command=" ".join((install or install_command()[0]).split()),
    )


# writing and pushing -----------------------------------------------------------------------------
def write_hub_folder(
    model: BaseAgent,
    folder: str | os.PathLike[str],
    *,
    eval_env: Any = None,
    n_eval_episodes: int = 10,
    video: bool = True,
    video_length: int = 1000,
    repo_id: str | None = None,
    results: dict[str, Any] | None = None,
    deterministic: bool = True,
    seed: int | None = 0,
    install: str | None = None,
) -> Path:
    """Write the hub-ready folder locally: what :func:`push_to_hub` uploads. No network.

    Args:
        model: a trained agent.
        folder: directory to write (created; files of a previous write are replaced, and a stale
            results.json/replay.mp4 is removed when this write has none).
        eval_env: a ``gymnasium.Env`` or SB3 VecEnv with the model's spaces; when given, the
            model is evaluated (results.json) and, with ``video``, recorded (replay.mp4).
        n_eval_episodes: evaluation episodes.
        deterministic: evaluate (and record) with ``predict(deterministic=True)``, the argmax
            over candidates from fixed noise; False samples as the official Diffusion-QL
            evaluation does (softmax over fresh candidates). results.json and the card say which.
        video: record ``replay.mp4`` from ``eval_env`` (an env that does not render rgb arrays
            is re-made from its spec with ``render_mode="rgb_array"``).
        video_length: frame budget of the video (episodes are recorded back to back).
        repo_id: the repo the card's usage snippet loads from (a placeholder when None).
        results: the output of :func:`evaluate` on ``eval_env`` when already computed (it is
            not run again).
        seed: episode ``i`` of the evaluation resets with ``seed + i`` (see :func:`evaluate`), so
            the card's numbers repeat on the same machine; results.json records the seeds. None
            leaves the env's resets unseeded.
        install: the command the card gives to install dql_agent (default: :func:`install_command`:
            ``$DQL_AGENT_INSTALL``, else where this copy was installed from).

    Returns:
        The folder, holding model.safetensors, config.json, README.md and, with ``eval_env``,
        results.json (and replay.mp4 with ``video``).
    """
    folder = Path(folder)
    if repo_id is not None:
        check_repo_id(repo_id)  # before writing anything
    if eval_env is not None:
        check_eval_env(model, eval_env)  # before writing anything
    if video and eval_env is not None and (not isinstance(video_length, int) or video_length < 1):
        raise ValueError(f"video_length must be an int >= 1, got {video_length!r}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder)
    for stale in (RESULTS_FILE, VIDEO_FILE):
        (folder / stale).unlink(missing_ok=True)
    if eval_env is None:
        results = None
    else:
        if results is None:
            results = evaluate(model, eval_env, n_eval_episodes, deterministic, seed=seed)
        (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if video:
            from dql_agent.video import record_video

            env, owned = _video_env(eval_env)
            try:
                # n_episodes is only an upper bound: video_length frames stop the recording.
                record_video(
                    model,
                    env,
                    folder / VIDEO_FILE,
                    n_episodes=video_length,
                    max_steps=video_length,
                    deterministic=deterministic,
                    seed=model.seed,
                )
            finally:
                if owned:
                    env.close()
    card = make_model_card(model, results, repo_id, has_video=(folder / VIDEO_FILE).exists(), install=install)
    card.save(folder / README_FILE)
    return folder


def push_to_hub(
    model: BaseAgent,
    repo_id: str,
    *,
    eval_env: Any = None,
    n_eval_episodes: int = 10,
    video: bool = True,
    video_length: int = 1000,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    deterministic: bool = True,
    seed: int | None = 0,
    install: str | None = None,
) -> str:
    """Push ``model`` to the Hub repo ``repo_id`` in one commit; returns the commit URL.

    Creates the repo if needed (``private`` applies to a new repo only), writes the folder of
    :func:`write_hub_folder` into a temporary directory and uploads it with
    ``HfApi.upload_folder``. ``revision`` is the branch to commit to (created from main if
    missing; default main). ``token`` defaults to the logged-in token / ``HF_TOKEN``.
    ``deterministic`` is the evaluation protocol and ``seed`` seeds its episodes (see
    :func:`write_hub_folder`). ``install`` is the card's install command (default:
    :func:`install_command`); when that names a folder on this machine, which readers cannot
    install from, a warning says to set ``$DQL_AGENT_INSTALL``.

    Raises:
        ValueError: ``repo_id`` is not a Hub repo id (:func:`check_repo_id`), before any request.
        HubUnreachableError: (a ``ConnectionError``) offline mode is on or the Hub cannot be
            reached; checked before the evaluation, so it fails in seconds.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)  # before any request
    if eval_env is not None:
        check_eval_env(model, eval_env)  # fail before creating anything on the Hub
    api = HfApi(token=token)
    endpoint = api.endpoint
    if offline_mode():
        raise _unreachable_on_push(endpoint, repo_id, "HF_HUB_OFFLINE is set (unset it to push)")
    error = connection_error(endpoint)
    if error is not None:
        raise _unreachable_on_push(endpoint, repo_id, f"no connection to {endpoint} ({reason(error)})") from error
    if install is None:
        install, origin = install_command()
        if origin == "local":
            warnings.warn(
                f"the model card tells readers to install dql_agent with `{install}`, a folder on this machine; "
                f'set {INSTALL_ENV} to a command they can run (e.g. pip install "dql_agent @ '
                'git+https://github.com/OWNER/dql_agent@TAG") or pass install=...',
                stacklevel=3,
            )
    with _connection_lost(endpoint, repo_id):
        if private is None:  # the Hub's default visibility (0.x would send None as JSON null)
            api.create_repo(repo_id, exist_ok=True, repo_type="model")
        else:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="dql_agent-push-") as tmp:
            write_hub_folder(
                model,
                tmp,
                eval_env=eval_env,
                n_eval_episodes=n_eval_episodes,
                video=video,
                video_length=video_length,
                repo_id=repo_id,
                deterministic=deterministic,
                seed=seed,
                install=install,
            )
            if commit_message is None:
                commit_message = f"Upload {model.algorithm} agent"
                dataset_id = model.metadata.get("dataset_id")
                if dataset_id:
                    commit_message += f" trained on {dataset_id}"
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
            )
    return info.commit_url


# loading -----------------------------------------------------------------------------------------
def _is_local(source: str | os.PathLike[str]) -> bool:
    path = Path(source).expanduser()
    return path.is_dir() or (path.suffix == ".zip" and path.is_file())


def _download(
    repo_id: str,
    filename: str,
    revision: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
    offline: bool,
    unreachable: BaseException | None,
) -> Path:
    """The local path of ``filename`` of ``repo_id``, with errors that name the repo and the file.

    Downloaded with ``hf_hub_download``; or, when ``offline`` (the user asked for the cache only)
    or ``unreachable`` (why the Hub cannot be reached), read from the cache without a request.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError  # in every supported version

    at = f" at revision {revision!r}" if revision else ""
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if offline or unreachable is not None:
        # Not hf_hub_download(local_files_only=True): 2.x still fetches its agent registry from the Hub.
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if unreachable is None:  # offline
            raise HubNotFoundError(
                f"{filename} of model repo {repo_id!r}{at} is not in the local cache and offline mode or "
                "local_files_only is on: download it once while online",
                repo_id,
                filename,
                revision,
            )
        raise _unreachable_on_load(repo_id, filename, at, unreachable) from unreachable
    try:
        with repo_errors("model", repo_id, revision, filename):
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    token=token,
                    cache_dir=cache,
                    library_name="dql_agent",
                    library_version=library_version(),
                )
            )
    except LocalEntryNotFoundError as error:  # the connection failed after connection_error found the Hub
        raise _unreachable_on_load(repo_id, filename, at, error) from error
    except EntryNotFoundError as error:
        raise HubNotFoundError(
            f"model repo {repo_id!r}{at} has no {filename}; a dql_agent repo holds {CONFIG_FILE} "
            f"and {MODEL_FILE} (written by model.push_to_hub)",
            repo_id,
            filename,
            revision,
        ) from error


def _unreachable_on_load(repo_id: str, filename: str, at: str, error: BaseException) -> HubUnreachableError:
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    return HubUnreachableError(
        f"cannot reach the Hub at {endpoint} ({reason(error)}) to download {filename} of model repo "
        f"{repo_id!r}{at}, and it is not in the local cache. To work offline, load a model downloaded before "
        "(with HF_HUB_OFFLINE=1 or local_files_only=True nothing is asked of the Hub) or a local checkpoint "
        "directory (model.save, `dql-agent push MODEL REPO_ID --local-dir DIR`)",
        endpoint,
        repo_id,
    )


def _download_checkpoint(
    repo_id: str,
    revision: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    cls: type[BaseAgent] | None,
) -> tuple[Checkpoint, str, type[BaseAgent]]:
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # before any request
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is neither a local checkpoint directory nor a valid Hub repo id ('owner/name'): {error}"
        ) from None
    offline = local_files_only or offline_mode()
    unreachable = None if offline else connection_error(constants.ENDPOINT)
    where = repo_id if revision is None else f"{repo_id}@{revision}"
    config_path = _download(repo_id, CONFIG_FILE, revision, token, cache_dir, offline, unreachable)
    config = parse_config(config_path.read_bytes(), f"{where}/{CONFIG_FILE}")
    agent_cls = _pick_class(cls, config, where)  # before fetching weights of the wrong kind
    # The cache stores files under snapshots/<commit>/: fetch the weights of that same commit,
    # so a push between the two downloads cannot pair a config with other weights.
    snapshot = config_path.parent
    pinned = snapshot.name if snapshot.parent.name == "snapshots" else revision
    weights_path = _download(repo_id, MODEL_FILE, pinned, token, cache_dir, offline, unreachable)
    weights = weights_path.read_bytes()
    verify_weights(config, weights, f"{where}/{MODEL_FILE}")
    tensors = parse_safetensors(weights, f"{where}/{MODEL_FILE}")
    return Checkpoint(config, tensors), where, agent_cls


def _pick_class(cls: type[BaseAgent] | None, config: dict[str, Any], where: str) -> type[BaseAgent]:
    name = config["algorithm"]
    if cls is None or getattr(cls, "algorithm", None) is None:  # any algorithm (or BaseAgent)
        try:
            return algorithm_class(name)
        except ValueError as error:
            raise CheckpointError(f"{where}/{CONFIG_FILE}: {error}") from None
    if name != cls.algorithm:
        raise CheckpointError(
            f"{where}/{CONFIG_FILE} holds a {name} model, not a {cls.algorithm} one: load it with "
            f"{name}.load_from_hub(...) or dql_agent.load_from_hub(...), which picks the class "
            "from config.json"
        )
    return cls


def load_from_hub(
    cls_or_repo_id: type | str | os.PathLike[str] | None,
    repo_id: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device = "auto",
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Any:
    """Load a model pushed with :func:`push_to_hub` (or saved with ``model.save``).

    Called as ``load_from_hub(repo_id)`` (this is ``dql_agent.load_from_hub``) or
    ``load_from_hub(cls_or_None, repo_id)``: with a class, ``config.json`` must name that
    algorithm; without one the class comes from ``config.json``'s "algorithm" (see
    :data:`dql_agent.base.ALGORITHMS`, filled by each algorithm's class statement).

    Args:
        cls_or_repo_id: the agent class, None, or (alone) the repo id.
        repo_id: a Hub model repo id ``"owner/name"``, or a local checkpoint directory (or
            ``.zip``); an existing local path wins over a repo id.
        revision: branch, tag or commit on the Hub (default main).
        device: 'auto', 'cpu', 'cuda', ...
        token: Hub token for private repos (default: the logged-in one / ``HF_TOKEN``).
        cache_dir: the Hub cache to use (default ``HF_HUB_CACHE``).
        local_files_only: use the cache only (as ``HF_HUB_OFFLINE=1`` does).

    When the Hub cannot be reached (checked in at most :data:`CONNECT_TIMEOUT` seconds), the
    cached files of the repo are loaded, as offline.

    Raises:
        HubNotFoundError: (a ``FileNotFoundError``) the repo, revision or one of config.json /
            model.safetensors is missing, or not cached while offline; the message says which.
        HubUnreachableError: (a ``ConnectionError``) the Hub cannot be reached and the files are
            not cached; the message says what was tried and how to work offline.
        CheckpointError: config.json from a newer dql_agent, of another algorithm than ``cls``,
            or weights whose shapes disagree with it.
    """
    if repo_id is None:
        if cls_or_repo_id is None or isinstance(cls_or_repo_id, type):
            raise TypeError("load_from_hub needs a repo id: load_from_hub('owner/name')")
        cls, repo_id = None, cls_or_repo_id
    else:
        if cls_or_repo_id is not None and not isinstance(cls_or_repo_id, type):
            raise TypeError(f"the first argument must be an agent class or None, got {cls_or_repo_id!r}")
        cls = cast("type[BaseAgent] | None", cls_or_repo_id)
    if not isinstance(repo_id, (str, os.PathLike)):
        raise TypeError(f"repo_id must be a str or a path, got {type(repo_id).__name__}")
    if _is_local(repo_id):
        path = Path(repo_id).expanduser()
        checkpoint = load_checkpoint(path, include_optimizer=False)
        where = str(path)
        agent_cls = _pick_class(cls, checkpoint.config, where)
    else:
        checkpoint, where, agent_cls = _download_checkpoint(
            str(repo_id), revision, token, cache_dir, local_files_only, cls
        )
    return agent_cls.from_checkpoint(checkpoint, where, device=device)
