"""Export: the ONNX file runs in onnxruntime where torch and dql_agent cannot be imported, the .pt2
in torch.export, and both act as ``predict`` does (deterministic, and stochastic fed predict's draws)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.export import read_metadata
from tests.regression_cases import build, offline_data, pendulum_spaces, train

TOLERANCE = 1e-5
# Runs each job's ONNX file on its saved inputs; importing torch or dql_agent there fails.
RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # `import torch` raises ImportError from here on
    sys.modules["dql_agent"] = None
    import numpy as np
    import onnxruntime as ort
    for job in json.loads(open(sys.argv[1]).read()):
        session = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
        feeds = dict(np.load(job["inputs"]))
        np.save(job["output"], session.run(["action"], feeds)[0])
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch not importable")
    """
)
DICT_SPACE = spaces.Dict({"a": spaces.Box(-1.0, 1.0, (2,), np.float32), "b": spaces.Box(-8.0, 8.0, (1,), np.float32)})


def trained(name: str):
    model = build(name)
    train(name, model, 12)
    return model


def dict_model() -> DiffusionQL:
    """Diffusion-QL on Dict observations {"a": obs[:2], "b": obs[2:]}, flattened in key order."""
    data = offline_data()
    _, action_space = pendulum_spaces()
    buffer = OfflineBuffer(**data, observation_space=DICT_SPACE, action_space=action_space)
    return DiffusionQL(
        buffer, seed=1, device="cpu", hidden_dim=32, n_hidden=2, diffusion_steps=3, n_action_samples=6
    ).learn(5)


def observations(n: int, dict_obs: bool = False) -> dict[str, np.ndarray]:
    obs = (np.random.default_rng(n).uniform(-1, 1, (n, 3)) * np.array([1.0, 1.0, 8.0])).astype(np.float32)
    return {"a": obs[:, :2], "b": obs[:, 2:]} if dict_obs else {"observation": obs}


def predict_input(feeds: dict[str, np.ndarray], dict_obs: bool):
    return {k: feeds[k] for k in ("a", "b")} if dict_obs else feeds["observation"]


def run_onnx(jobs: list[dict], tmp_path: Path) -> list[np.ndarray]:
    """Write each job's inputs, run all in one onnxruntime subprocess, return the actions."""
    manifest = []
    for i, job in enumerate(jobs):
        np.savez(tmp_path / f"in{i}.npz", **job["feeds"])
        manifest.append(
            {"model": job["model"], "inputs": str(tmp_path / f"in{i}.npz"), "output": str(tmp_path / f"out{i}.npy")}
        )
    (tmp_path / "jobs.json").write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch not importable" in done.stdout
    return [np.load(job["output"]) for job in manifest]


def stochastic_feeds(model, feeds: dict[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """predict(deterministic=False)'s draws for these observations, as the exported inputs, and its actions."""
    policy = model.policy
    batch = next(iter(feeds.values())).shape[0]
    noise, uniform = policy.draw_noise(batch, torch.Generator().manual_seed(seed))
    steps, n = policy.config.diffusion_steps, policy.n_candidates(False)
    feeds = dict(feeds, noise=noise.view(steps, batch, n, -1).transpose(0, 1).numpy())
    if uniform is not None:
        feeds["uniform"] = uniform.numpy()
    policy.set_seed(seed)
    actions, _ = model.predict(predict_input(feeds, "a" in feeds), deterministic=False)
    return feeds, actions


@pytest.fixture(scope="module")
def models() -> dict:
    torch.set_num_threads(1)
    return {"dql": trained("dql"), "dice": trained("dice"), "qvpo": trained("qvpo"), "dql_dict": dict_model()}


def test_onnx_runs_without_torch_and_acts_as_predict(models, tmp_path):
    jobs, expected = [], []
    for name, model in models.items():
        dict_obs = name == "dql_dict"
        deterministic = str(model.export(tmp_path / f"{name}.onnx"))
        for n in (1, 5):  # a single observation (batch of one) and a batch
            feeds = observations(n, dict_obs)
            jobs.append({"model": deterministic, "feeds": feeds, "name": f"{name} deterministic batch {n}"})
            single = n == 1 and not dict_obs
            obs = feeds["observation"][0] if single else predict_input(feeds, dict_obs)
            actions, _ = model.predict(obs, deterministic=True)
            expected.append(actions[None] if single else actions)
        if name in ("dql", "dice"):  # softmax picks: noise and uniforms are inputs
            stochastic = str(model.export(tmp_path / f"{name}_stochastic.onnx", deterministic=False))
            feeds, actions = stochastic_feeds(model, observations(5), seed=7)
            jobs.append({"model": stochastic, "feeds": feeds, "name": f"{name} stochastic"})
            expected.append(actions)
    for job, found, want in zip(jobs, run_onnx(jobs, tmp_path), expected, strict=True):
        assert found.shape == want.shape, job["name"]
        np.testing.assert_allclose(found, want, atol=TOLERANCE, rtol=0, err_msg=job["name"])
        assert np.all(np.abs(found) <= 2.0)  # Pendulum's bounds, +-2: the graph unscales and clips

    meta = read_metadata(tmp_path / "dql_dict.onnx")
    assert meta["algorithm"] == "DiffusionQL" and meta["inputs"] == ["a", "b"] and meta["outputs"] == ["action"]
    assert meta["observation_inputs"] == {"a": [2], "b": [1]} and meta["action_low"] == [-2.0]
    assert meta["deterministic"] is True and meta["n_action_samples"] == 6
    models["dql_dict"].save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["weights_sha256"] == config["model_sha256"]
    assert read_metadata(tmp_path / "dice_stochastic.onnx")["inputs"] == ["observation", "noise", "uniform"]


def test_pt2_loads_with_torch_export_and_acts_as_predict(models, tmp_path):
    for name, model in models.items():
        dict_obs = name == "dql_dict"
        feeds = observations(4, dict_obs)
        program = torch.export.load(model.export(tmp_path / f"{name}.pt2"))
        with torch.no_grad():
            found = program.module()(*(torch.as_tensor(v) for v in feeds.values())).numpy()
        expected, _ = model.predict(predict_input(feeds, dict_obs), deterministic=True)
        np.testing.assert_allclose(found, expected, atol=TOLERANCE, rtol=0, err_msg=name)
    # QVPO explores greedily over K_b fresh samples: a noise input, no uniform.
    qvpo = models["qvpo"]
    feeds, expected = stochastic_feeds(qvpo, observations(4), seed=3)
    assert set(feeds) == {"observation", "noise"}
    program = torch.export.load(qvpo.export(tmp_path / "qvpo_stochastic.pt2", deterministic=False))
    with torch.no_grad():
        found = program.module()(*(torch.as_tensor(v) for v in feeds.values())).numpy()
    np.testing.assert_allclose(found, expected, atol=TOLERANCE, rtol=0)
    meta = read_metadata(tmp_path / "qvpo_stochastic.pt2")
    assert meta["algorithm"] == "QVPO" and meta["n_action_samples"] == qvpo.config.n_behavior_samples


def test_policy_forward_is_predicts_math_for_trace_and_compile(models):
    model = models["dice"]
    obs = torch.as_tensor(observations(3)["observation"])
    expected, _ = model.predict(obs.numpy(), deterministic=True)
    with torch.no_grad():
        np.testing.assert_allclose(model.policy(obs).numpy(), expected, atol=TOLERANCE, rtol=0)
        traced = torch.jit.trace(model.policy, (obs,), check_trace=False)
        np.testing.assert_allclose(traced(obs).numpy(), expected, atol=TOLERANCE, rtol=0)


def test_a_hub_model_exports_with_its_weights_digest(models, hub_server, tmp_path):
    from huggingface_hub import hf_hub_download

    import dql_agent

    models["qvpo"].push_to_hub("alice/qvpo", video=False)
    loaded = dql_agent.load_from_hub("alice/qvpo", device="cpu")
    meta = read_metadata(loaded.export(tmp_path / "qvpo.pt2"))
    config = json.loads(Path(hf_hub_download("alice/qvpo", "config.json")).read_text())
    assert meta["weights_sha256"] == config["model_sha256"]
    assert (
        meta["weights_sha256"]
        == hashlib.sha256(Path(hf_hub_download("alice/qvpo", "model.safetensors")).read_bytes()).hexdigest()
    )


def test_bad_export_arguments_name_what_is_wrong(models, tmp_path, monkeypatch):
    model = models["dql"]
    with pytest.raises(ValueError, match=r"export path must end in one of \['.onnx', '.pt2'\], got .*'.tflite'"):
        model.export(tmp_path / "policy.tflite")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="the folder .*a_file' does not exist"):
        model.export(tmp_path / "a_file" / "policy.onnx")
    with pytest.raises(ValueError, match="batch must be 'dynamic' or an int >= 1, got 0"):
        model.export(tmp_path / "p.pt2", batch=0)
    with pytest.raises(ValueError, match="n_action_samples must be an int >= 1 or None, got 0"):
        model.export(tmp_path / "p.pt2", n_action_samples=0)
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        model.export(tmp_path / "p.onnx", opset=11)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the deploy extra not installed
    with pytest.raises(ImportError, match=r"pip install dql_agent\[deploy\]"):
        model.export(tmp_path / "p.onnx")
    assert not list(tmp_path.glob("p.*"))  # nothing written by a refused export


def test_fixed_batch_and_other_candidate_counts(models, tmp_path):
    model = models["dql"]
    program = torch.export.load(model.export(tmp_path / "fixed.pt2", batch=3, n_action_samples=4))
    obs = torch.as_tensor(observations(3)["observation"])
    with torch.no_grad():
        actions = program.module()(obs)
        assert actions.shape == (3, 1) and torch.all(actions.abs() <= 2.0)
        with pytest.raises(Exception, match="3"):  # the batch is fixed at 3
            program.module()(obs[:2])
    assert read_metadata(tmp_path / "fixed.pt2")["n_action_samples"] == 4


def test_cli_export(models, tmp_path, capsys):
    from dql_agent.cli import main

    models["dice"].save(tmp_path / "model")
    main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "policy.pt2"), "--stochastic", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "DiffusionDICE, inputs observation, noise, uniform -> action [1]" in out
    assert read_metadata(tmp_path / "policy.pt2")["deterministic"] is False


# Camera observations: one input per key, uint8 frames as the camera gives them -----------------
IMAGE_SPACE = spaces.Dict(
    {"camera": spaces.Dict({"front": spaces.Box(0, 255, (40, 40, 3), np.uint8)}), "state": spaces.Box(-1, 1, (2,))}
)
PLAIN_IMAGE_SPACE = spaces.Box(0, 255, (3, 36, 36), np.uint8)  # CHW, the single key "observation"
IMAGE_TINY = {"hidden_dim": 32, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 4, "batch_size": 16}


def image_observations(space: spaces.Space, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n observations as the exported inputs: input name -> (n, *shape), uint8 frames, float32 vectors."""
    rng = np.random.default_rng(seed)
    if isinstance(space, spaces.Box):
        return {"observation": rng.integers(0, 256, (n, *space.shape), dtype=np.uint8)}
    return {
        "camera.front": rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8),
        "state": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
    }


def image_predict_input(feeds: dict[str, np.ndarray], index: int | None = None):
    """The exported inputs as predict takes them (a nested dict, or the array); one row with ``index``."""
    rows = {k: (v[index] if index is not None else v) for k, v in feeds.items() if k not in ("noise", "uniform")}
    if set(rows) == {"observation"}:
        return rows["observation"]
    return {"camera": {"front": rows["camera.front"]}, "state": rows["state"]}


def image_model(space: spaces.Space, **config) -> DiffusionQL:
    n = 48
    feeds, after = image_observations(space, n, seed=1), image_observations(space, n, seed=2)
    rng = np.random.default_rng(3)
    buffer = OfflineBuffer(
        image_predict_input(feeds),
        rng.uniform(-1, 1, (n, 2)),
        rng.normal(size=n),
        image_predict_input(after),
        np.zeros(n),
        observation_space=space,
    )
    model = DiffusionQL(
        buffer, seed=0, device="cpu", cnn_channels=4, image_features=8, random_shift=2, **IMAGE_TINY, **config
    )
    return model.learn(3, log_interval=0)


@pytest.fixture(scope="module")
def image_models() -> dict:
    torch.set_num_threads(1)
    return {
        "dict": image_model(IMAGE_SPACE, normalize_observations=True),  # the vector key is normalised in the graph
        "plain": image_model(PLAIN_IMAGE_SPACE),
    }


def test_image_onnx_takes_uint8_frames_and_acts_as_predict(image_models, tmp_path):
    import onnxruntime as ort

    jobs, expected = [], []
    for name, model in image_models.items():
        path = str(model.export(tmp_path / f"{name}.onnx"))
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        types = {i.name: (i.type, i.shape[1:]) for i in session.get_inputs()}
        if name == "dict":
            assert types == {"camera.front": ("tensor(uint8)", [40, 40, 3]), "state": ("tensor(float)", [2])}
        else:
            assert types == {"observation": ("tensor(uint8)", [3, 36, 36])}
        floats = {k: v.astype(np.float32) for k, v in image_observations(model.observation_space, 2).items()}
        with pytest.raises(Exception, match="(?i)type"):  # typed uint8: float frames are refused
            session.run(["action"], floats)
        for n in (1, 5):
            feeds = image_observations(model.observation_space, n, seed=n)
            jobs.append({"model": path, "feeds": feeds, "name": f"{name} batch {n}"})
            if n == 1:  # one observation, unbatched, as an env gives it
                actions, _ = model.predict(image_predict_input(feeds, 0), deterministic=True)
                expected.append(actions[None])
            else:
                expected.append(model.predict(image_predict_input(feeds), deterministic=True)[0])
    model = image_models["dict"]
    stochastic = str(model.export(tmp_path / "dict_stochastic.onnx", deterministic=False))
    feeds, actions = image_stochastic_feeds(model, image_observations(IMAGE_SPACE, 5), seed=7)
    assert list(feeds) == ["camera.front", "state", "noise", "uniform"]
    jobs.append({"model": stochastic, "feeds": feeds, "name": "dict stochastic"})
    expected.append(actions)
    for job, found, want in zip(jobs, run_onnx(jobs, tmp_path), expected, strict=True):
        assert found.shape == want.shape, job["name"]
        np.testing.assert_allclose(found, want, atol=TOLERANCE, rtol=0, err_msg=job["name"])

    meta = read_metadata(tmp_path / "dict.onnx")
    assert meta["inputs"] == ["camera.front", "state"] and meta["outputs"] == ["action"]
    assert meta["observation_inputs"] == {"camera.front": [40, 40, 3], "state": [2]}
    assert meta["observation_specs"] == [
        {
            "input": "camera.front",
            "key": "camera.front",
            "kind": "image",
            "dtype": "uint8",
            "shape": [40, 40, 3],
            "layout": "HWC",
            "size": [40, 40, 3],
        },
        {"input": "state", "key": "state", "kind": "vector", "dtype": "float32", "shape": [2]},
    ]
    assert read_metadata(tmp_path / "dict_stochastic.onnx")["inputs"] == ["camera.front", "state", "noise", "uniform"]
    plain = read_metadata(tmp_path / "plain.onnx")["observation_specs"]
    assert [(s["input"], s["layout"], s["size"]) for s in plain] == [("observation", "CHW", [36, 36, 3])]


def image_stochastic_feeds(model, feeds: dict[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """predict(deterministic=False)'s draws for these observations, as the exported inputs, and its actions."""
    policy = model.policy
    batch = next(iter(feeds.values())).shape[0]
    noise, uniform = policy.draw_noise(batch, torch.Generator().manual_seed(seed))
    steps, n = policy.config.diffusion_steps, policy.n_candidates(False)
    feeds = dict(feeds, noise=noise.view(steps, batch, n, -1).transpose(0, 1).numpy())
    if uniform is not None:
        feeds["uniform"] = uniform.numpy()
    policy.set_seed(seed)
    actions, _ = model.predict(image_predict_input(feeds), deterministic=False)
    return feeds, actions


@pytest.mark.slow  # camera export runs by default through ONNX; the .pt2 twin is the slow set's
def test_image_pt2_takes_uint8_frames_and_acts_as_predict(image_models, tmp_path):
    for name, model in image_models.items():
        feeds = image_observations(model.observation_space, 4, seed=9)
        program = torch.export.load(model.export(tmp_path / f"{name}.pt2"))
        with torch.no_grad():
            found = program.module()(*(torch.as_tensor(v) for v in feeds.values())).numpy()
        expected, _ = model.predict(image_predict_input(feeds), deterministic=True)
        np.testing.assert_allclose(found, expected, atol=TOLERANCE, rtol=0, err_msg=name)
        meta = read_metadata(tmp_path / f"{name}.pt2")
        assert [s["dtype"] for s in meta["observation_specs"]] == [str(v.dtype) for v in feeds.values()]


@pytest.mark.bad_input("habits", "clear error")
def test_observation_keys_named_like_the_other_inputs_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for key, deterministic in (("action", True), ("noise", False), ("uniform", False)):
        space = spaces.Dict({key: spaces.Box(-1, 1, (2,), np.float32)})
        obs = {key: rng.uniform(-1, 1, (8, 2)).astype(np.float32)}
        buffer = OfflineBuffer(obs, rng.uniform(-1, 1, (8, 1)), np.zeros(8), obs, np.zeros(8), observation_space=space)
        model = DiffusionQL(buffer, seed=0, device="cpu", **IMAGE_TINY)
        with pytest.raises(ValueError, match=f"the observation key '{key}' would share its name"):
            model.export(tmp_path / "p.pt2", deterministic=deterministic)
        assert not (tmp_path / "p.pt2").exists()
    # A deterministic export has no noise input: the key is free there. A flat space's metadata
    # keeps its format (no observation_specs).
    meta = read_metadata(model.export(tmp_path / "p.pt2"))
    assert meta["inputs"] == ["uniform"] and "observation_specs" not in meta
