"""Every shipped config composes and validates; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zo2.config import TrainConfig, register, validate
from zo2.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
register()


def shipped() -> list[tuple[str, str]]:
    return [(group.name, path.stem) for group in sorted(CONFIGS.iterdir()) if group.is_dir()
            and not group.name.startswith("__") for path in sorted(group.glob("*.yaml"))]


def load(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_object(cfg)


def test_there_are_configs_in_every_group():
    groups = {group for group, _ in shipped()}
    assert {"model", "task", "optim"} <= groups


@pytest.mark.parametrize("group,option", shipped())
def test_shipped_config_validates(group, option):
    own_file = group == "task" and option in ("jsonl", "csv")
    extra = ["task.path=data.file"] if own_file else []
    cfg = load([f"{group}={option}", *extra])
    assert isinstance(cfg, TrainConfig)
    validate(cfg)


def test_default_is_the_embedded_model_and_task():
    cfg = validate(load([]))
    assert (cfg.model.name, cfg.task.name, cfg.optim.method) == ("smollm2-135m", "tweets", "zo-sgd")


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("steps=many", "steps"),
])
def test_unknown_or_ill_typed_key_is_named(override, needle):
    with pytest.raises(Exception) as info:
        load([override])
    assert needle in str(info.value)


@pytest.mark.parametrize("override,needle", [
    ("optim.schedule=bogus", "optim.schedule"),
    ("optim.eps=0", "optim.eps"),
    ("optim.direction=uniform", "optim.direction"),
    ("optim.q=0", "optim.q"),
    ("task.name=imdb", "task.name"),
    ("model.dtype=int8", "model.dtype"),
])
def test_out_of_range_value_is_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(load([override]))
