"""Every shipped config composes and validates; bad values are named."""

from __future__ import annotations

import ast
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
    cfg = validate(load([f"{group}={option}", *extra]))
    # the option's values are the ones the run gets (not the schema's defaults, not
    # another option's): every key of its YAML, at its package (``# @package``)
    path = CONFIGS / group / f"{option}.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("# @package")]
    package = header[0].split()[-1] if header else group
    whole = OmegaConf.to_container(OmegaConf.structured(cfg))
    section = whole if package == "_global_" else OmegaConf.select(OmegaConf.create(whole),
                                                                   package)
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults", None)
    assert values, path

    def assert_within(got, want, where):
        if isinstance(want, dict):
            for key, value in want.items():
                assert_within(got[key], value, f"{where}.{key}")
        elif want != "???":  # mandatory in the YAML: the override above fills it
            assert got == want, (where, got, want)

    assert_within(section, values, package)


def test_default_is_the_embedded_model_and_task():
    cfg = validate(load([]))
    assert (cfg.model.name, cfg.task.name, cfg.optim.method) == ("smollm2-135m", "tweets", "zo-sgd")


@pytest.mark.parametrize("override,lines", [
    # the schema knows its fields: an unknown key is refused by the dataclass it is not in
    ("optim.lrr=1", ("Key 'lrr' not in 'OptimConfig'", "full_key: optim.lrr")),
    # and their types: the value is refused as the field's type, named by its full key
    # (optim.lr also takes "auto": its "fast" is refused by OptimConfig, test_cli_errors.py)
    ("optim.eps=fast", ("Value 'fast' of type 'str' could not be converted to Float",
                        "full_key: optim.eps")),
    ("steps=many", ("Value 'many' of type 'str' could not be converted to Integer",
                    "full_key: steps")),
])
def test_unknown_or_ill_typed_key_is_named(override, lines):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        load([override])
    message = str(info.value.__cause__).splitlines()
    assert [line.strip() for line in message[:2]] == list(lines), message


@pytest.mark.parametrize("override,message", [
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ("optim.q=0", "optim.q: must be >= 1"),
])
def test_out_of_range_value_is_named(override, message):
    with pytest.raises(ConfigError) as info:
        validate(load([override]))
    assert str(info.value) == message


@pytest.mark.parametrize("override", ["optim.schedule=bogus", "optim.direction=uniform",
                                      "task.name=imdb", "model.dtype=int8"])
def test_a_value_outside_the_choices_names_the_key_and_every_allowed_value(override):
    """``<key>: '<value>' is not one of [...]``, and the list is the truth: every value
    it names validates."""
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        validate(load([override]))
    head = f"{key}: {value!r} is not one of "
    message = str(info.value)
    assert message.startswith(head), message
    allowed = ast.literal_eval(message[len(head):])
    assert isinstance(allowed, list) and len(allowed) >= 2 and value not in allowed
    extra = ["task.path=data.file"] if key == "task.name" else []  # file tasks need one
    for choice in allowed:
        validate(load([f"{key}={choice}", *extra]))


def test_each_section_checks_itself_when_built():
    """The Python API gets the same one-line message as the CLI, at construction."""
    from zo2.config import OffloadConfig, OptimConfig, ParallelConfig

    with pytest.raises(ConfigError, match=r"^optim\.eps: must be > 0, got 0$"):
        OptimConfig(eps=0)
    with pytest.raises(ConfigError, match=r"^offload\.ring: must be >= 1, got 0$"):
        OffloadConfig(ring=0)
    with pytest.raises(ConfigError, match=r"^parallel\.slicing: 'sometimes' is not one of"):
        ParallelConfig(slicing="sometimes")
    cfg = TrainConfig()
    cfg.optim.q = 0  # changed after it was built: validate() checks it again
    with pytest.raises(ConfigError, match=r"^optim\.q: must be >= 1$"):
        validate(cfg)


def test_the_old_name_of_perturbation_parallelism_still_works_and_warns(caplog):
    """``parallel.pp`` reads as pipeline parallel; it is now ``parallel.pertp``."""
    with caplog.at_level("WARNING", logger="zo2"):
        cfg = validate(load(["parallel.pp=2"]))
    assert (cfg.parallel.pertp, cfg.parallel.pp) == (2, None)
    assert any("parallel.pp is the old name of parallel.pertp" in r.message
               for r in caplog.records)
    with pytest.raises(ConfigError, match=r"^parallel\.pp: is the old name of parallel\.pertp"):
        load(["parallel.pp=2", "parallel.pertp=4"])
