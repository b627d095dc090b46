"""Camera observations end to end: image Boxes and image+state Dicts through the buffer, the
encoder, training, predict (one observation and VecEnv batches), checkpoints, Minari, D4RL files,
SB3 replay buffers, evaluate_policy and video, on a real Gymnasium renderer (Pendulum-v1)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.wrappers import AddRenderObservation, TransformObservation

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.encoders import ObservationEncoder, random_shift

SMALL = {
    "hidden_dim": 32,
    "n_hidden": 2,
    "diffusion_steps": 3,
    "n_action_samples": 8,
    "batch_size": 16,
    "cnn_channels": 4,
    "image_features": 8,
}
IMAGE = spaces.Box(0, 255, (20, 20, 3), np.uint8)
IMAGE_STATE = spaces.Dict({"image": IMAGE, "state": spaces.Box(-1, 1, (2,), np.float32)})


def image_state_data(n: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {"image": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8), "state": rng.normal(size=(n, 2))}
    nxt = {"image": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8), "state": rng.normal(size=(n, 2))}
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, (n, 2)),
        "rewards": rng.normal(size=n),
        "next_observations": nxt,
        "terminals": np.zeros(n),
    }


def encoder_weights(model: DiffusionQL) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.encoder.parameters()]


# buffer ----------------------------------------------------------------------------------------
def test_uint8_frames_are_an_image_space_and_stay_uint8(caplog):
    caplog.set_level("INFO", logger="dql_agent")
    data = image_state_data()
    buffer = OfflineBuffer(
        data["observations"]["image"],
        data["actions"],
        data["rewards"],
        data["next_observations"]["image"],
        data["terminals"],
    )
    assert buffer.observation_space == IMAGE
    assert buffer.observations["observation"].dtype == torch.uint8
    printed = caplog.text  # the buffer says what it holds on the dql_agent logger
    # 2 x 1200 image bytes + 2 actions + reward + flags
    assert "64 transitions, 2,414 bytes per transition" in printed and "(20, 20, 3) uint8" in printed
    assert buffer.bytes_per_transition() == 2 * 20 * 20 * 3 + 2 * 4 + 4 + 2


@pytest.mark.bad_input("data", "clear error")
def test_image_shaped_float_data_is_refused_naming_the_key_and_the_encoder_option():
    data = image_state_data()
    floats = {k: v.astype(np.float32) if k == "image" else v for k, v in data["observations"].items()}
    space = spaces.Dict({"image": spaces.Box(0.0, 1.0, (20, 20, 3), np.float32), "state": IMAGE_STATE["state"]})
    with pytest.raises(TypeError, match=r"observation_space\['image'\] is image-shaped .*cnn_channels"):
        OfflineBuffer(floats, data["actions"], data["rewards"], floats, data["terminals"], observation_space=space)
    with pytest.raises(TypeError, match="image-shaped"):  # (N, 20, 20, 3) float frames, no space given
        OfflineBuffer(floats["image"], data["actions"], data["rewards"], floats["image"], data["terminals"])


@pytest.mark.bad_input("data", "clear error")
def test_pixels_must_be_whole_numbers_in_0_255():
    data = image_state_data()
    obs = dict(data["observations"], image=data["observations"]["image"].astype(np.float64))
    obs["image"][3, 1, 2, 0] = 255.5
    with pytest.raises(ValueError, match=r"observations\['image'\] must be uint8 images .*255.5 at .*\[3, 1, 2, 0\]"):
        OfflineBuffer(
            obs,
            data["actions"],
            data["rewards"],
            data["next_observations"],
            data["terminals"],
            observation_space=IMAGE_STATE,
        )


@pytest.mark.parametrize("channels_first", [True, False])
def test_random_shift_is_the_crop_of_the_replicate_padded_image_at_the_drawn_offset(channels_first):
    stored = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    if channels_first:
        stored = stored.permute(0, 3, 1, 2).contiguous()
    shifted = random_shift(stored, 2, torch.Generator().manual_seed(0), channels_first)
    assert shifted.shape == stored.shape and shifted.dtype == torch.uint8
    # DrQ's definition: pad by replication, crop at the offset (the same draw from the same generator)
    offsets = torch.randint(0, 5, (3, 2), generator=torch.Generator().manual_seed(0))
    chw = stored if channels_first else stored.permute(0, 3, 1, 2)
    padded = torch.nn.functional.pad(chw.float(), (2, 2, 2, 2), mode="replicate")
    out = shifted if channels_first else shifted.permute(0, 3, 1, 2)
    for b, (i, j) in enumerate(offsets.tolist()):
        assert torch.equal(out[b].float(), padded[b, :, i : i + 8, j : j + 8])
    assert not torch.equal(shifted, stored)  # some image moved


# training and acting ----------------------------------------------------------------------------
def test_image_and_state_dicts_train_act_and_round_trip(tmp_path):
    data = image_state_data()
    buffer = OfflineBuffer(**data, observation_space=IMAGE_STATE)
    model = DiffusionQL(buffer, seed=0, **SMALL)
    assert model.policy.feature_dim == 8 + 2  # image features + the state vector
    encoder_ids = {id(p) for p in model.policy.encoder.parameters()}
    in_critic = {id(p) for g in model.critic_optimizer.param_groups for p in g["params"]}
    in_actor = {id(p) for g in model.actor_optimizer.param_groups for p in g["params"]}
    assert encoder_ids <= in_critic and not encoder_ids & in_actor  # trained by the critic loss only
    before = encoder_weights(model)
    model.learn(3, log_interval=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder_weights(model), strict=True))

    one = {"image": data["observations"]["image"][0], "state": data["observations"]["state"][0]}
    action, _ = model.predict(one, deterministic=True)
    assert action.shape == (2,)
    batch = {"image": data["observations"]["image"][:5], "state": data["observations"]["state"][:5]}
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (5, 2)
    np.testing.assert_allclose(actions[0], action, atol=1e-6)
    with pytest.raises(ValueError, match=r"observation\['image'\] has shape \(20, 20\)"):
        model.predict({"image": one["image"][..., 0], "state": one["state"]})

    model.save(tmp_path / "pixels")
    loaded = DiffusionQL.load(tmp_path / "pixels")
    np.testing.assert_array_equal(loaded.predict(batch, deterministic=True)[0], actions)
    # The checkpoint holds the CNN, not the dataset: small next to the images it was trained on.
    assert (tmp_path / "pixels" / "model.safetensors").stat().st_size < 2_000_000


def test_channels_first_images_train():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (32, 3, 24, 20), dtype=np.uint8)
    buffer = OfflineBuffer(frames, rng.uniform(-1, 1, (32, 1)), rng.normal(size=32), frames, np.zeros(32))
    model = DiffusionQL(buffer, seed=0, **SMALL)
    assert model.policy.encoder.image_layout["observation"] == (True, (3, 24, 20))
    model.learn(2, log_interval=0)
    assert model.predict(frames[:3])[0].shape == (3, 1)


def test_encoder_is_identity_for_flat_observations(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, seed=0, hidden_dim=32, n_hidden=2)
    assert model.policy.feature_dim == model.policy.obs_dim == 3
    assert list(model.policy.encoder.parameters()) == []
    x = torch.randn(4, 3)
    assert model.policy.encoder(x) is x


@pytest.mark.bad_input("data", "clear error")
def test_a_flat_buffer_is_refused_by_an_image_model():
    data = image_state_data()
    model = DiffusionQL(OfflineBuffer(**data, observation_space=IMAGE_STATE), seed=0, **SMALL)
    rng = np.random.default_rng(0)
    flat = OfflineBuffer(
        rng.normal(size=(8, 1202)), rng.uniform(-1, 1, (8, 2)), np.zeros(8), rng.normal(size=(8, 1202)), np.zeros(8)
    )
    with pytest.raises(ValueError, match="camera keys must match"):
        model.set_buffer(flat)


def test_encoder_runs_once_per_batch_not_per_reverse_step():
    data = image_state_data()
    model = DiffusionQL(
        OfflineBuffer(**data, observation_space=IMAGE_STATE),
        seed=0,
        diffusion_steps=5,
        **{k: v for k, v in SMALL.items() if k != "diffusion_steps"},
    )
    calls = []
    hook = model.policy.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.learn(1, log_interval=0)
        assert len(calls) == 2  # observations and next observations, once each
        calls.clear()
        model.predict({"image": data["observations"]["image"][:4], "state": data["observations"]["state"][:4]})
        assert len(calls) == 1
    finally:
        hook.remove()


# loaders -------------------------------------------------------------------------------------------
def test_d4rl_npz_with_an_image_key(tmp_path):
    data = image_state_data(40)
    path = tmp_path / "pixels.npz"
    np.savez(
        path,
        **{f"observations/{k}": v for k, v in data["observations"].items()},
        actions=data["actions"],
        rewards=data["rewards"],
        terminals=data["terminals"],
        timeouts=np.arange(40) % 10 == 9,
    )
    buffer = OfflineBuffer.from_d4rl(path, observation_space=IMAGE_STATE)
    assert buffer.observations["image"].dtype == torch.uint8
    assert len(buffer) == 36  # the last row of each of the 4 episodes has no successor in the file
    np.testing.assert_array_equal(buffer.next_observations["image"][0].numpy(), data["observations"]["image"][1])


def test_sb3_dict_replay_buffer_with_images():
    from stable_baselines3.common.buffers import DictReplayBuffer

    sb3 = DictReplayBuffer(50, IMAGE_STATE, spaces.Box(-1, 1, (2,), np.float32), device="cpu", n_envs=1)
    rng = np.random.default_rng(0)
    for _ in range(10):
        obs = {"image": rng.integers(0, 256, (1, 20, 20, 3), dtype=np.uint8), "state": rng.normal(size=(1, 2))}
        sb3.add(obs, obs, rng.uniform(-1, 1, (1, 2)), np.ones(1), np.zeros(1), [{}])
    buffer = OfflineBuffer.from_sb3(sb3)
    assert len(buffer) == 10 and buffer.observations["image"].dtype == torch.uint8
    np.testing.assert_array_equal(buffer.observations["image"].numpy(), sb3.observations["image"][:10, 0])


# a real Gymnasium renderer ----------------------------------------------------------------------
PIXELS = spaces.Box(0, 255, (50, 50, 3), np.uint8)


def pendulum_pixels(max_steps: int = 40) -> gym.Env:
    """Pendulum-v1 observed only through its renderer, every 10th pixel (500 -> 50 px)."""
    env = gym.make("Pendulum-v1", render_mode="rgb_array", max_episode_steps=max_steps)
    return TransformObservation(AddRenderObservation(env, render_only=True), lambda frame: frame[::10, ::10], PIXELS)


def test_pendulum_from_pixels_dataset_train_evaluate_save_load_video(tmp_path, monkeypatch):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from dql_agent.integrations.minari import write_minari_dataset
    from dql_agent.integrations.video import record_video

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = pendulum_pixels()
    episodes = []
    for seed in range(2):
        obs, _ = env.reset(seed=seed)
        frames, actions, rewards, terms, truncs = [obs], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            frames.append(obs)
            actions.append(action)
            rewards.append(reward)
            terms.append(terminated)
            truncs.append(truncated)
            done = terminated or truncated
        episodes.append(
            {
                "observations": np.stack(frames),
                "actions": np.stack(actions),
                "rewards": np.array(rewards),
                "terminations": np.array(terms),
                "truncations": np.array(truncs),
            }
        )
    write_minari_dataset("test/pendulum-pixels-v0", episodes, observation_space=PIXELS, action_space=env.action_space)
    buffer = OfflineBuffer.from_minari("test/pendulum-pixels-v0")
    assert buffer.observations["observation"].dtype == torch.uint8 and len(buffer) == 80

    model = DiffusionQL(buffer, seed=0, **SMALL)
    model.learn(3, log_interval=0)
    vec_env = make_vec_env(pendulum_pixels, n_envs=2, seed=0)  # predict gets (2, 50, 50, 3) batches
    mean, _ = evaluate_policy(model, vec_env, n_eval_episodes=2, deterministic=True)
    assert -2000 < mean < 0

    model.save(tmp_path / "model")
    loaded = DiffusionQL.load(tmp_path / "model")
    frame = env.reset(seed=5)[0]
    np.testing.assert_array_equal(
        loaded.predict(frame, deterministic=True)[0], model.predict(frame, deterministic=True)[0]
    )
    video = record_video(loaded, pendulum_pixels(max_steps=10), tmp_path / "pendulum.mp4", seed=0)
    assert video.stat().st_size > 1000


def test_encoder_output_width_matches_its_features():
    encoder = ObservationEncoder(IMAGE_STATE, DiffusionQL.config_class(**SMALL))
    out = encoder({"image": torch.zeros(3, 20, 20, 3, dtype=torch.uint8), "state": torch.zeros(3, 2)})
    assert out.shape == (3, encoder.feature_dim) == (3, 10)


def test_a_dataset_that_does_not_fit_the_gpu_stays_on_the_host():
    from dql_agent.buffer import storage_device

    cuda = torch.device("cuda")
    assert storage_device(10**9, torch.device("cpu"), free_bytes=0) == torch.device("cpu")
    assert storage_device(4 * 2**30, cuda, free_bytes=10 * 2**30) == cuda  # under half of the free memory
    assert storage_device(6 * 2**30, cuda, free_bytes=10 * 2**30) == torch.device("cpu")


@pytest.mark.cuda
def test_host_kept_images_train_on_the_gpu(monkeypatch):
    import dql_agent.buffer

    monkeypatch.setattr(dql_agent.buffer, "DEVICE_MEMORY_SHARE", 0.0)  # nothing fits: the host path
    with pytest.warns(UserWarning, match="stays in host memory"):
        model = DiffusionQL(
            OfflineBuffer(**image_state_data(), observation_space=IMAGE_STATE), device="cuda", seed=0, **SMALL
        )
    assert model.replay_buffer.observations["image"].device.type == "cpu"
    batch = model.replay_buffer.sample(8, model.generator)
    assert batch.observations["image"].device.type == "cuda" and batch.actions.device.type == "cuda"
    model.learn(3, log_interval=0)
