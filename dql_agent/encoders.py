"""Camera observations: which spaces are images, and the encoder that turns an observation into
the features every network is conditioned on.

A space *has images* when it is, or its Dict holds, a uint8 Box of rank 3 with bounds [0, 255]
(SB3's ``is_image_space``), stored HWC or CHW. Such observations travel as an *observation tree*:
a dict from leaf key (``"image"``, ``"state"``, ``"obs.wrist"`` for nested Dicts; ``"observation"``
for a plain image Box) to a batch ``(B, *shape)``: uint8 for images, float32 for the rest. The
encoder runs a small CNN per image key (random-shift augmented when training) and concatenates
the features with the vector keys, so the denoiser and the critics see one (B, features) tensor,
computed once per batch, not once per reverse step. Every other space keeps the flat float path
(the encoder is then the identity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from dql_agent.config import check_field, is_int

PLAIN_IMAGE_KEY = "observation"  # the tree key of a Box image space's one leaf
Tree = dict[str, torch.Tensor]


def is_image_space(space: spaces.Space) -> bool:
    """A uint8 Box of rank 3 with bounds [0, 255] (HWC or CHW), as SB3's ``is_image_space``."""
    return (
        isinstance(space, spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and bool(np.all(space.low == 0))
        and bool(np.all(space.high == 255))
    )


def is_channels_first(space: spaces.Box) -> bool:
    """CHW when the first axis is the smallest (SB3's rule), else HWC."""
    return int(np.argmin(space.shape)) == 0


def image_shape_chw(space: spaces.Box) -> tuple[int, int, int]:
    """(channels, height, width) of an image space."""
    c, h, w = space.shape if is_channels_first(space) else (space.shape[2], space.shape[0], space.shape[1])
    return int(c), int(h), int(w)


def leaves(space: spaces.Space, prefix: str = "") -> Iterator[tuple[str, spaces.Box]]:
    """(key, Box) of every leaf in the flattening order; nested Dict keys join with '.'."""
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            yield from leaves(sub, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    else:
        assert isinstance(space, spaces.Box)  # checked by check_observation_space
        yield (prefix or PLAIN_IMAGE_KEY), space


def has_images(space: spaces.Space) -> bool:
    """Whether observations of ``space`` take the image path (an observation tree and a CNN)."""
    return any(is_image_space(box) for _, box in leaves(space))


def image_keys(space: spaces.Space) -> list[str]:
    return [key for key, box in leaves(space) if is_image_space(box)]


def leaf_value(observation: Any, key: str, space: spaces.Space) -> Any:
    """The array of ``key`` in an observation (a nested dict, or the array itself for a Box)."""
    if isinstance(observation, Mapping) and key in observation:  # already a tree (dotted keys)
        return observation[key]
    if not isinstance(space, spaces.Dict):
        return observation
    value = observation
    for part in key.split("."):
        value = value[part]
    return value


def image_on_mlp_error(box: spaces.Box, where: str) -> str:
    """The message for an image-shaped Box that would be flattened into an MLP."""
    return (
        f"{where} is image-shaped ({box.shape}, {box.dtype}, bounds [{np.min(box.low)}, {np.max(box.high)}]) but "
        "not a uint8 Box with bounds [0, 255], so it would be flattened into the MLP pixel by pixel; declare "
        "camera keys as gymnasium.spaces.Box(0, 255, shape, np.uint8) (HWC or CHW) to use the CNN encoder "
        "(config fields cnn_channels, image_features, random_shift)"
    )


# The encoder's config fields (in every algorithm's config) and what a config.json saved before
# them means: no camera keys then, so the values only have to be valid.
IMAGE_FIELD_DEFAULTS: dict[str, Any] = {"cnn_channels": 32, "image_features": 50, "random_shift": 4}


def check_image_fields(config: Any) -> None:
    """The encoder's config fields, shared by every algorithm's config."""
    for name in ("cnn_channels", "image_features"):
        value = getattr(config, name)
        check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
    check_field(
        is_int(config.random_shift) and config.random_shift >= 0, "random_shift", "an int >= 0", config.random_shift
    )


# (kernel, stride) of the three convolutions: Nature-CNN's from 36 px up, 3x3 ones below (the
# Nature stack shrinks a smaller image to nothing).
NATURE_CONVS = ((8, 4), (4, 2), (3, 1))
SMALL_CONVS = ((3, 2), (3, 2), (3, 1))
MIN_NATURE_SIZE = 36
MIN_IMAGE_SIZE = 11


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
    space's key order. For a space without images it is the identity on flat observations."""

    def __init__(self, space: spaces.Space, config: Any):
        super().__init__()
        self.space = space
        self.uses_images = has_images(space)
        self.keys = [key for key, _ in leaves(space)] if self.uses_images else []
        self.image_layout = {
            key: (is_channels_first(box), image_shape_chw(box)) for key, box in leaves(space) if is_image_space(box)
        }
        self.vector_dims = {key: math.prod(box.shape) for key, box in leaves(space) if key not in self.image_layout}
        self.random_shift = int(getattr(config, "random_shift", 0))
        # ModuleDict keys may not contain '.': nested keys are stored with '__' in the state dict.
        self.cnns = nn.ModuleDict(
            {
                _module_key(key): ImageEncoder(*shape, config.cnn_channels, config.image_features)
                for key, (_, shape) in self.image_layout.items()
            }
        )
        if self.uses_images:
            self.feature_dim = len(self.image_layout) * int(config.image_features) + sum(self.vector_dims.values())
        else:
            self.feature_dim = sum(math.prod(box.shape) for _, box in leaves(space))

    def images_chw(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, *shape) in the space's layout -> float (B, C, H, W) in [-0.5, 0.5]."""
        channels_first, _ = self.image_layout[key]
        x = images.float()
        if not channels_first:
            x = x.permute(0, 3, 1, 2)
        return x / 255.0 - 0.5

    def forward(self, observations: Any, augment: torch.Generator | None = None) -> torch.Tensor:
        """Features of a tree (or the flat tensor itself without images); ``augment`` (a generator)
        random-shifts the images by up to ``random_shift`` pixels (DrQ) before the CNNs."""
        if not self.uses_images:
            return observations
        parts = []
        for key in self.keys:
            value = observations[key]
            if key in self.image_layout:
                x = self.images_chw(key, value)
                if augment is not None and self.random_shift > 0:
                    x = random_shift(x, self.random_shift, augment)
                parts.append(self.cnns[_module_key(key)](x))
            else:
                parts.append(value.reshape(value.shape[0], -1).float())
        return torch.cat(parts, dim=1)


def _module_key(key: str) -> str:
    return key.replace(".", "__")


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """DrQ's augmentation: replicate-pad by ``pad`` and crop back at an integer offset drawn per image
    in [0, 2 pad]: (B, C, H, W) -> (B, C, H, W), a shift of up to ``pad`` pixels each way."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), device=images.device, generator=generator)
    rows = torch.arange(height, device=images.device)[None, :] + offsets[:, :1]  # (B, H)
    cols = torch.arange(width, device=images.device)[None, :] + offsets[:, 1:]  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # (B, H, W, C) by advanced indexing, back to channels first
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# observation trees ------------------------------------------------------------------------------
def tree_from_arrays(space: spaces.Space, observations: Any, name: str) -> dict[str, np.ndarray]:
    """A dataset's observations (a (N, *shape) array, or a nested dict of them) as a checked tree of
    numpy arrays: images uint8 (values must be whole numbers in [0, 255]), the rest float32 finite."""
    from dql_agent.buffer import as_float32

    tree: dict[str, np.ndarray] = {}
    rows = None
    for key, box in leaves(space):
        where = name if key == PLAIN_IMAGE_KEY and not isinstance(space, spaces.Dict) else f"{name}[{key!r}]"
        try:
            value = leaf_value(observations, key, space)
        except (KeyError, TypeError):
            raise ValueError(f"{where} is missing; expected keys {[k for k, _ in leaves(space)]}") from None
        array = np.asarray(value)
        if array.shape[1:] != box.shape:
            raise ValueError(f"{where} must have shape (N, {', '.join(map(str, box.shape))}), got {array.shape}")
        if rows is not None and len(array) != rows:
            raise ValueError(f"{where} has {len(array)} rows, expected {rows} (the other keys' count)")
        rows = len(array)
        tree[key] = as_uint8_images(where, array) if is_image_space(box) else as_float32(where, array)
    return tree


def as_uint8_images(name: str, array: np.ndarray) -> np.ndarray:
    """Images as uint8; other dtypes must hold whole numbers in [0, 255] (nothing is rescaled)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be uint8 images, got dtype {array.dtype}")
    bad = ~np.isfinite(array) | (array < 0) | (array > 255) | (array != np.round(array))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be uint8 images (whole numbers in [0, 255]), got {array[index].item()!r} at "
            f"{name}[{', '.join(map(str, index))}] ({int(bad.sum())} value(s) outside)"
        )
    return array.astype(np.uint8)


def tree_nbytes_per_row(tree: Mapping[str, torch.Tensor]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tree.values() if len(t))


def describe_tree_space(space: spaces.Space) -> list[dict[str, Any]]:
    """Key, kind, shape and dtype of every leaf (for model cards and export metadata)."""
    out = []
    for key, box in leaves(space):
        entry: dict[str, Any] = {"key": key, "shape": list(box.shape), "dtype": np.dtype(box.dtype).name}
        if is_image_space(box):
            c, h, w = image_shape_chw(box)
            entry |= {"kind": "image", "layout": "CHW" if is_channels_first(box) else "HWC", "size": [h, w, c]}
        else:
            entry["kind"] = "vector"
        out.append(entry)
    return out
