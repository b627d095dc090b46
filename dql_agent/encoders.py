"""The networks over observations: a CNN per camera key, concatenated with the vector keys.

What a space is, and how observations are checked and batched, is :mod:`dql_agent.observations`.
For a space with camera keys the encoder runs a small CNN per camera (random-shift augmented when
training) and concatenates the features with the vector keys, so the denoiser and the critics see
one (B, features) tensor, computed once per batch, not once per reverse step. Every other space
keeps the flat float path (the encoder is then the identity).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from gymnasium import spaces
from torch import nn

from dql_agent.config import ImageConfig
from dql_agent.observations import has_images, image_shape_chw, is_channels_first, is_image_space, leaves

# (kernel, stride) of the three convolutions: Nature-CNN's from 36 px up, 3x3 ones below (the
# Nature stack shrinks a smaller image to nothing).
NATURE_CONVS = ((8, 4), (4, 2), (3, 1))
SMALL_CONVS = ((3, 2), (3, 2), (3, 1))
MIN_NATURE_SIZE = 36
MIN_IMAGE_SIZE = 11
MAX_IMAGE_PIXELS = 1024 * 1024
"""Largest camera frame (height x width) a CNN is built for. The Nature stack keeps about a 64th
of a frame's pixels per channel: at 1 Mpx its first Linear layer has ~50M weights and a batch of
256 frames takes ~3 GB as floats before the first convolution; a 4096x4096 camera is 16 times
that, past most GPUs' memory. ``$DQL_AGENT_MAX_IMAGE_PIXELS`` raises it."""
MAX_IMAGE_PIXELS_ENV = "DQL_AGENT_MAX_IMAGE_PIXELS"


class ImageEncoder(nn.Module):
    """uint8 images (B, C, H, W) -> features (B, out_dim): a Nature-CNN-class stack sized for 48-128
    px (Conv 8/4, 4/2, 3/1 with c, 2c, 2c channels, ReLU; 3x3 convolutions for images under 36
    px), then Linear, LayerNorm and tanh (the SAC-AE/DrQ trunk, which keeps the features' scale
    fixed for the MLPs downstream)."""

    def __init__(self, channels: int, height: int, width: int, width_multiplier: int = 32, out_dim: int = 50):
        super().__init__()
        if min(height, width) < MIN_IMAGE_SIZE:
            raise ValueError(f"camera images must be at least {MIN_IMAGE_SIZE} px high and wide, got {height}x{width}")
        convs = NATURE_CONVS if min(height, width) >= MIN_NATURE_SIZE else SMALL_CONVS
        c = width_multiplier
        layers: list[nn.Module] = []
        for (kernel, stride), (fan_in, fan_out) in zip(convs, ((channels, c), (c, 2 * c), (2 * c, 2 * c)), strict=True):
            layers += [nn.Conv2d(fan_in, fan_out, kernel, stride=stride), nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            conv_out = self.convs(torch.zeros(1, channels, height, width)).shape[1]
        self.trunk = nn.Sequential(nn.Linear(conv_out, out_dim), nn.LayerNorm(out_dim), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.convs(images))


class ObservationEncoder(nn.Module):
    """Observation tree -> features (B, feature_dim): each image key through its own CNN (scaled to
    [-0.5, 0.5], channels first), the vector keys raveled and passed through, concatenated in the
    space's key order. For a space without images it is the identity on flat observations.

    With ``n_obs_steps`` k > 1 the input is a history, each leaf (B, k, *shape) (flat: (B, k,
    obs_dim)): every frame goes through the same CNN, and the k steps' features are concatenated,
    oldest first, so ``feature_dim`` is k times one step's."""

    def __init__(self, space: spaces.Space, config: ImageConfig, n_obs_steps: int = 1):
        super().__init__()
        self.space = space
        self.uses_images = has_images(space)
        self.history = n_obs_steps
        self.passthrough = not self.uses_images and n_obs_steps == 1  # the identity: acting skips the call
        self.keys = [key for key, _ in leaves(space)] if self.uses_images else []
        self.image_layout = {
            key: (is_channels_first(box), image_shape_chw(box)) for key, box in leaves(space) if is_image_space(box)
        }
        self.vector_dims = {key: math.prod(box.shape) for key, box in leaves(space) if key not in self.image_layout}
        for key, (_, (_, height, width)) in self.image_layout.items():
            check_image_size(key, height, width)
        self.random_shift = config.random_shift
        # ModuleDict keys may not contain '.': nested keys are stored with '__' in the state dict.
        self.cnns = nn.ModuleDict(
            {
                _module_key(key): ImageEncoder(*shape, config.cnn_channels, config.image_features)
                for key, (_, shape) in self.image_layout.items()
            }
        )
        if self.uses_images:
            step_features = len(self.image_layout) * int(config.image_features) + sum(self.vector_dims.values())
        else:
            step_features = sum(math.prod(box.shape) for _, box in leaves(space))
        self.feature_dim = n_obs_steps * step_features

    def images_chw(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, *shape) in the space's layout -> float (B, C, H, W) in [-0.5, 0.5]."""
        channels_first, _ = self.image_layout[key]
        # Under autocast the CNN computes in its dtype: scaling the pixels there skips a float32
        # copy of every image and the cast of it (uint8 values are exact in bfloat16 and float16).
        device = images.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        x = images.to(dtype, copy=True)  # a new tensor: scaled in place (no more image-sized allocations)
        if not channels_first:
            x = x.permute(0, 3, 1, 2)
        return x.div_(255.0).sub_(0.5)

    def forward(self, observations: Any, augment: torch.Generator | None = None) -> torch.Tensor:
        """Features of a tree (or the flat tensor itself without images); ``augment`` (a generator)
        random-shifts the images by up to ``random_shift`` pixels (DrQ) before the CNNs."""
        if self.passthrough:
            return observations
        if not self.uses_images:  # a flat history (B, k, obs_dim): the steps side by side
            return observations.reshape(observations.shape[0], -1)
        if self.history > 1:  # every frame through the same networks, then the steps side by side
            batch = next(iter(observations.values())).shape[0]
            frames = {key: value.reshape(-1, *value.shape[2:]) for key, value in observations.items()}
            return self._encode(frames, augment).reshape(batch, -1)
        return self._encode(observations, augment)

    def _encode(self, observations: Any, augment: torch.Generator | None) -> torch.Tensor:
        """One step's tree (B, *shape) per leaf -> (B, step features)."""
        parts = []
        for key in self.keys:
            value = observations[key]
            if key in self.image_layout:
                if augment is not None and self.random_shift > 0:
                    value = random_shift(value, self.random_shift, augment, self.image_layout[key][0])
                parts.append(self.cnns[_module_key(key)](self.images_chw(key, value)))
            else:
                parts.append(value.reshape(value.shape[0], -1).float())
        return torch.cat(parts, dim=1)


def max_image_pixels() -> int:
    """:data:`MAX_IMAGE_PIXELS`, or ``$DQL_AGENT_MAX_IMAGE_PIXELS`` when set."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_IMAGE_PIXELS_ENV} must be a number of pixels >= 1, got {text!r}")
    return int(text)


def check_image_size(key: str, height: int, width: int) -> None:
    """A camera's frames are small enough for a CNN (see :data:`MAX_IMAGE_PIXELS`), or a
    ValueError naming the key, its size and the limit."""
    limit = max_image_pixels()
    if height * width > limit:
        raise ValueError(
            f"camera {key!r} has {height}x{width} frames ({height * width:,} pixels), more than the {limit:,} "
            f"a CNN is built for (about {math.isqrt(limit)}x{math.isqrt(limit)}): resize the frames (LeRobot: "
            f"image_size=(H, W); gymnasium: ResizeObservation), or set {MAX_IMAGE_PIXELS_ENV} to raise the limit"
        )


def _module_key(key: str) -> str:
    return key.replace(".", "__")


def random_shift(
    images: torch.Tensor, pad: int, generator: torch.Generator, channels_first: bool = True
) -> torch.Tensor:
    """DrQ's augmentation: replicate-pad by ``pad`` and crop back at an integer offset drawn per image
    in [0, 2 pad], a shift of up to ``pad`` pixels each way; (B, C, H, W), or (B, H, W, C) when not
    ``channels_first``, in the same layout and dtype out.

    Padding by replication and then cropping is indexing with coordinates clamped to the image, so
    it is done without the padded copy, on the stored uint8 pixels (a quarter of the bytes of the
    float image the CNN then sees): whole rows are selected at once, then the columns of each image
    (two passes measured 2x faster than one advanced index over (image, row, column)).
    """
    hwc = images.permute(0, 2, 3, 1) if channels_first else images
    batch, height, width, channels = hwc.shape
    device = images.device
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), device=device, generator=generator) - pad
    rows = (torch.arange(height, device=device)[None, :] + offsets[:, :1]).clamp_(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=device)[None, :] + offsets[:, 1:]).clamp_(0, width - 1)  # (B, W)
    flat_rows = (rows + torch.arange(batch, device=device)[:, None] * height).reshape(-1)
    picked = hwc.reshape(batch * height, width * channels).index_select(0, flat_rows).view(hwc.shape)
    shifted = picked.gather(2, cols[:, None, :, None].expand(hwc.shape))  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2) if channels_first else shifted
