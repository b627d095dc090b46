"""Camera observations in every algorithm: Diffusion-QL and Diffusion-DICE on an offline buffer of
uint8 images, QVPO online on a tiny image env; the encoder is trained by the critic loss only, the
replay buffer keeps images uint8, and stacked seeds refuse images.

Images are 36 x 36, the smallest the encoder's 8/4, 4/2, 3/1 convolutions take.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from dql_agent.buffer import OfflineBuffer, ReplayBuffer
from dql_agent.diffusion_dice import DiffusionDICE
from dql_agent.diffusion_ql import DiffusionQL
from dql_agent.qvpo import QVPO
from dql_agent.seeds import SeedStack, train_seeds

SIZE = 36
ENCODER = {"cnn_channels": 4, "image_features": 8, "random_shift": 2}
TINY = {
    DiffusionQL: {"hidden_dim": 32, "n_hidden": 1, "batch_size": 16, "diffusion_steps": 3, "n_action_samples": 4},
    DiffusionDICE: {
        "hidden_dim": 32,
        "n_hidden": 1,
        "guidance_n_hidden": 1,
        "behavior_n_hidden": 1,
        "batch_size": 16,
        "behavior_batch_size": 16,
        "n_noisy_copies": 2,
        "q_ensemble_size": 2,
        "diffusion_steps": 3,
        "n_action_samples": 4,
        "reward_transform": "none",
    },
    QVPO: {
        "hidden_dim": 32,
        "n_hidden": 1,
        "batch_size": 16,
        "diffusion_steps": 3,
        "n_diffusion_samples": 4,
        "n_entropy_samples": 2,
        "n_behavior_samples": 2,
        "n_target_samples": 2,
        "n_action_samples": 4,
        "learning_starts": 8,
        "buffer_size": 64,
    },
}
EPISODE = 6  # the image env's time limit


def image_space(channels_first: bool = False) -> spaces.Box:
    shape = (3, SIZE, SIZE) if channels_first else (SIZE, SIZE, 3)
    return spaces.Box(0, 255, shape, np.uint8)


def dict_space(channels_first: bool = False) -> spaces.Dict:
    return spaces.Dict({"image": image_space(channels_first), "state": spaces.Box(-1.0, 1.0, (2,), np.float32)})


class CameraEnv(gym.Env):
    """A point on a line, seen only as a picture: channel 0 holds the position, channel 1 the step
    count (10 per step), so a stored transition tells which step of its episode it came from."""

    metadata: dict = {"render_modes": []}

    def __init__(self, dict_obs: bool = True, channels_first: bool = False):
        self.dict_obs, self.channels_first = dict_obs, channels_first
        self.observation_space = dict_space(channels_first) if dict_obs else image_space(channels_first)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.position, self.t = 0.0, 0

    def observation(self):
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[..., 0] = int((self.position + 1.0) * 127)
        image[..., 1] = 10 * self.t
        if self.channels_first:
            image = image.transpose(2, 0, 1).copy()
        if not self.dict_obs:
            return image
        return {"image": image, "state": np.array([self.position, self.t / EPISODE], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position, self.t = float(self.np_random.uniform(-0.5, 0.5)), 0
        return self.observation(), {}

    def step(self, action):
        self.position = float(np.clip(self.position + 0.2 * float(action[0]), -1.0, 1.0))
        self.t += 1
        return self.observation(), -abs(self.position), False, self.t >= EPISODE, {}


def camera_buffer(n: int = 48, channels_first: bool = False, dict_obs: bool = True, seed: int = 0) -> OfflineBuffer:
    rng = np.random.default_rng(seed)
    shape = (3, SIZE, SIZE) if channels_first else (SIZE, SIZE, 3)

    def observations():
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        if not dict_obs:
            return images
        return {"image": images, "state": rng.uniform(-1, 1, (n, 2)).astype(np.float32)}

    space = dict_space(channels_first) if dict_obs else image_space(channels_first)
    return OfflineBuffer(
        observations=observations(),
        actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        next_observations=observations(),
        terminals=rng.random(n) < 0.1,
        observation_space=space,
        action_space=spaces.Box(-1.0, 1.0, (2,), np.float32),
    )


def make_model(cls, channels_first: bool = False, dict_obs: bool = True, seed: int = 0):
    hyper = {**TINY[cls], **ENCODER}
    if cls is QVPO:
        return QVPO(CameraEnv(dict_obs, channels_first), seed=seed, device="cpu", **hyper)
    return cls(camera_buffer(channels_first=channels_first, dict_obs=dict_obs), seed=seed, device="cpu", **hyper)


def one_observation(model, channels_first: bool = False, dict_obs: bool = True):
    env = CameraEnv(dict_obs, channels_first)
    return env.reset(seed=3)[0]


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.policy.encoder.state_dict().items()}


def count_encoder_gradients(model) -> list[int]:
    """Hooks counting the gradients that reach each encoder weight (one per backward through it)."""
    counts = [0]

    def hook(grad):
        counts[0] += 1

    first = next(model.policy.encoder.parameters())
    first.register_hook(hook)
    return counts


ALGORITHMS = [DiffusionQL, DiffusionDICE, QVPO]
STEPS = {DiffusionQL: 3, DiffusionDICE: 3, QVPO: 12}  # QVPO: 8 warm-up env steps, then updates


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.__name__)
def test_dict_images_train_the_encoder_by_the_critic_loss_only(cls):
    model = make_model(cls)
    encoder = model.policy.encoder
    assert encoder.uses_images and model.policy.feature_dim == ENCODER["image_features"] + 2
    # The encoder is in exactly one optimizer: the critic's (its TD loss trains it).
    params = {id(p) for p in encoder.parameters()}
    holders = [
        name
        for name, optimizer in model.optimizers().items()
        if params & {id(p) for group in optimizer.param_groups for p in group["params"]}
    ]
    assert holders == ["critic_optimizer"]
    critic_params = {id(p) for g in model.critic_optimizer.param_groups for p in g["params"]}
    assert params <= critic_params
    before = encoder_state(model)
    counts = count_encoder_gradients(model)
    model.learn(STEPS[cls])
    updates = model.n_updates if hasattr(model, "n_updates") else None
    assert updates and updates > 0
    # One backward through the encoder per update: the critic loss's; every other loss saw detached features.
    assert counts[0] == updates
    after = encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("convs" in k for k in changed), changed

    obs = one_observation(model)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == model.action_space.shape and np.all(np.isfinite(action))
    batch = {key: np.stack([value, value, value]) for key, value in obs.items()}
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (3, *model.action_space.shape)
    np.testing.assert_allclose(actions[0], action, atol=1e-5)
    stochastic, _ = model.predict(batch, deterministic=False)
    assert stochastic.shape == actions.shape


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.__name__)
def test_chw_image_box_trains_and_acts(cls):
    model = make_model(cls, channels_first=True, dict_obs=False)
    assert model.policy.feature_dim == ENCODER["image_features"]
    before = encoder_state(model)
    model.learn(STEPS[cls])
    after = model.policy.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    obs = one_observation(model, channels_first=True, dict_obs=False)
    assert obs.shape == (3, SIZE, SIZE)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == model.action_space.shape
    actions, _ = model.predict(np.stack([obs, obs]), deterministic=True)
    assert actions.shape == (2, *model.action_space.shape)


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.__name__)
def test_save_load_round_trip_gives_the_same_action(cls, tmp_path):
    model = make_model(cls).learn(STEPS[cls])
    obs = one_observation(model)
    expected, _ = model.predict(obs, deterministic=True)
    path = tmp_path / f"{cls.__name__}.zip"
    model.save(path)
    loaded = cls.load(path, device="cpu")
    assert loaded.policy.encoder.uses_images
    got, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(got, expected)
    for key, value in model.policy.encoder.state_dict().items():
        assert torch.equal(loaded.policy.encoder.state_dict()[key], value), key


@pytest.mark.bad_input("habits", "clear error")
def test_stacked_seeds_refuse_images():
    buffer = camera_buffer()
    with pytest.raises(ValueError, match=r"image keys \['image'\].*one by one"):
        train_seeds(buffer, [0, 1], 1, device="cpu", **TINY[DiffusionQL], **ENCODER)
    models = [make_model(DiffusionQL, seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match=r"image keys \['image'\]"):
        SeedStack(models)
    plain = camera_buffer(dict_obs=False)
    with pytest.raises(ValueError, match=r"image keys \['observation'\]"):
        train_seeds(plain, [0], 1, device="cpu", **TINY[DiffusionQL], **ENCODER)


def test_qvpo_replay_buffer_stores_images_as_uint8():
    model = make_model(QVPO).learn(20)
    replay = model.replay_buffer
    assert replay is not None and replay.has_images and len(replay) == 20
    for store in (replay.observations, replay.next_observations):
        assert set(store) == {"image", "state"}
        assert store["image"].dtype == torch.uint8 and store["image"].shape == (64, SIZE, SIZE, 3)
        assert store["state"].dtype == torch.float32 and store["state"].shape == (64, 2)
    # Each stored step t has next step t + 1, also at the time limit (the real final observation
    # from info["terminal_observation"], not the reset's), and the tree's keys stay aligned.
    steps = replay.observations["image"][:20, 0, 0, 1].long() // 10
    next_steps = replay.next_observations["image"][:20, 0, 0, 1].long() // 10
    assert torch.equal(next_steps, steps + 1)
    assert int(next_steps.max()) == EPISODE
    torch.testing.assert_close(replay.observations["state"][:20, 1] * EPISODE, steps.float())
    batch = replay.sample(5, torch.Generator().manual_seed(0))
    assert batch.observations["image"].dtype == torch.uint8 and batch.observations["image"].shape == (5, SIZE, SIZE, 3)
    assert replay.bytes_per_transition() == 2 * (SIZE * SIZE * 3 + 2 * 4) + 4 + 4 + 1


def test_replay_buffer_signatures():
    # Before camera observations: (capacity, obs_dim, action_dim, device); float32 rows.
    old = ReplayBuffer(8, 3, 2, torch.device("cpu"))
    old.add(np.ones((2, 3)), np.zeros((2, 2)), np.zeros(2), np.ones((2, 3)), np.zeros(2, bool))
    assert old.observations.dtype == torch.float32 and old.observations.shape == (8, 3) and len(old) == 2
    flat = ReplayBuffer(8, spaces.Box(-1, 1, (4,), np.float32), 1, "cpu")
    assert not flat.has_images and flat.observations.shape == (8, 4)
    plain = ReplayBuffer(8, image_space(channels_first=True), 1, "cpu")
    assert plain.observations["observation"].dtype == torch.uint8
    plain.add(
        {"observation": np.full((3, 3, SIZE, SIZE), 200, np.uint8)},
        np.zeros((3, 1)),
        np.zeros(3),
        {"observation": np.full((3, 3, SIZE, SIZE), 7, np.uint8)},
        np.zeros(3, bool),
    )
    assert int(plain.observations["observation"][:3].min()) == 200 and len(plain) == 3
    with pytest.raises(ValueError, match=r"observation tree with keys \['observation'\]"):
        plain.add(np.zeros((1, 3 * SIZE * SIZE)), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 3)), np.zeros(1, bool))
