"""The shared configuration: fields declared once, limits where they are declared, old files read."""

from __future__ import annotations

import dataclasses

import pytest

from dql_agent import DiffusionDICEConfig, DiffusionQLConfig, QVPOConfig
from dql_agent.config import AgentConfig, ImageConfig, OfflineDataConfig

CONFIGS = [DiffusionQLConfig, QVPOConfig, DiffusionDICEConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_a_shared_field_is_redeclared_only_to_change_its_default(cls):
    shared = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    own = cls.__dict__.get("__annotations__", {})
    same = [name for name in own if name in shared and getattr(cls(), name) == shared[name]]
    assert issubclass(cls, AgentConfig) and not same, same


@pytest.mark.parametrize(
    "cls, field, limit",
    [
        (QVPOConfig, "diffusion_steps", 10_000),  # redeclared by QVPO (default 20): the base's limit holds
        (DiffusionDICEConfig, "batch_size", 1_048_576),  # redeclared by DICE (default 512)
        (DiffusionQLConfig, "hidden_dim", 16_384),
        (DiffusionQLConfig, "n_max_q_samples", 10_000),  # declared by Diffusion-QL itself
        (QVPOConfig, "cnn_channels", 4_096),  # from the image mixin
    ],
)
@pytest.mark.bad_input("config", "clear error")
def test_size_limits_hold_where_a_field_is_redeclared(cls, field, limit):
    assert cls.size_limit(field) == limit
    with pytest.raises(ValueError, match=rf"^{field} must be <= {limit:,}, got {limit + 1}"):
        cls(**{field: limit + 1})


def test_a_config_saved_before_the_image_fields_reads_with_their_defaults():
    old = {k: v for k, v in DiffusionQLConfig().to_dict().items() if k not in ("cnn_channels", "random_shift")}
    old.pop("encoder_loss")  # added later too, by Diffusion-QL itself
    config = DiffusionQLConfig.from_saved(old)
    assert (config.cnn_channels, config.random_shift, config.encoder_loss) == (32, 4, "critic")


def test_offline_options_belong_to_the_offline_algorithms():
    assert issubclass(DiffusionQLConfig, OfflineDataConfig) and issubclass(DiffusionDICEConfig, OfflineDataConfig)
    assert not issubclass(QVPOConfig, OfflineDataConfig) and issubclass(QVPOConfig, ImageConfig)
    with pytest.raises(ValueError, match=r"reward_transform must be one of \('none', 'cql_antmaze', 'normalize'\)"):
        DiffusionQLConfig(reward_transform="iql_locomotion")  # DICE's, not Diffusion-QL's
    assert DiffusionDICEConfig(reward_transform="iql_antmaze").reward_transform == "iql_antmaze"
