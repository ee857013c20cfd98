"""Loading your own model: hub ids from the local Hugging Face cache (offline), loading
straight into the target dtype, and the trust_remote_code opt-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_model

from zo2 import models
from zo2.errors import ModelError
from zo2.models import load_model, weights_folder

SHA = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def make_tokenizer():
    """A small word-level fast tokenizer with eos (pad) and a chat template, offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(60)}}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def save_folder(folder: Path, model=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = model if model is not None else make_model("llama")
    model = model.to(dtype)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def fake_hub(root: Path, repo_id: str, model=None) -> tuple[Path, torch.nn.Module]:
    """``repo_id`` in a Hugging Face hub cache layout under ``root``: the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    saved = save_folder(snapshot, model)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snapshot, saved


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub (read at call time) takes as its own."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def same_weights(model, reference) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_hub_id_loads_the_cached_snapshot(hub) -> None:
    snapshot, saved = fake_hub(hub, "owner/tiny-model")
    assert weights_folder("owner/tiny-model") == snapshot  # the offloaded path reads it too
    model, tokenizer = load_model("owner/tiny-model")
    same_weights(model, saved)
    assert model.zo2_name == "owner/tiny-model"
    assert tokenizer.chat_template == TEMPLATE  # kept
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "left"
    empty, _ = load_model("owner/tiny-model", empty=True)  # offloaded: on meta
    assert all(p.is_meta for p in empty.parameters())


def test_hub_cache_given_explicitly(tmp_path) -> None:
    snapshot, saved = fake_hub(tmp_path / "elsewhere", "owner/name")
    assert weights_folder("owner/name", hub_cache=tmp_path / "elsewhere") == snapshot
    model, _ = load_model("owner/name", hub_cache=tmp_path / "elsewhere")
    same_weights(model, saved)


def test_uncached_hub_id_is_one_clear_line(hub) -> None:
    with pytest.raises(ModelError) as info:
        load_model("owner/not-cached")
    assert str(info.value) == (
        f"model 'owner/not-cached' is not in the local Hugging Face cache ({hub}) and "
        "nothing is downloaded: download it there first (hf download owner/not-cached), "
        "set HF_HUB_CACHE or HF_HOME to the cache holding it, or give a local folder"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["./owner/name", "/nonexistent/owner-name", "~/no/such-model"])
def test_path_like_names_stay_paths(hub, name: str) -> None:
    assert not models.is_hub_id(name)
    with pytest.raises(ModelError, match="not found: not a local folder"):
        load_model(name)


def test_existing_relative_folder_wins_over_the_hub(hub, tmp_path, monkeypatch) -> None:
    fake_hub(hub, "owner/name", make_model("llama", seed=1))
    saved = save_folder(tmp_path / "owner" / "name", make_model("llama", seed=2))
    monkeypatch.chdir(tmp_path)
    assert not models.is_hub_id("owner/name")
    model, _ = load_model("owner/name")
    same_weights(model, saved)


def test_bf16_load_is_the_exact_cast_and_reads_straight_into_bf16(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    saved = save_folder(tmp_path / "m")
    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert [c["dtype"] for c in calls] == [torch.bfloat16]  # no fp32 model on the way
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    want = {k: v.to(torch.bfloat16) for k, v in saved.state_dict().items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key  # bit-exact round-to-nearest cast
    empty, _ = load_model(str(tmp_path / "m"), dtype="bfloat16", empty=True)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in empty.parameters())


PEAK = textwrap.dedent("""
    import json, sys
    import torch
    from zo2.models import load_model
    from zo2.tracking import peak_rss_mb  # VmHWM: not the pytest parent's peak
    load_model(sys.argv[1], dtype="bfloat16")  # warm-up: every import and code path
    before = peak_rss_mb()
    model, _ = load_model(sys.argv[2], dtype="bfloat16")
    peak = peak_rss_mb()
    print(json.dumps({"delta": (peak - before) * 2**20,
                      "fp32": 4 * sum(p.numel() for p in model.parameters())}))
""")


def test_bf16_checkpoint_peak_memory_stays_below_an_fp32_copy(tmp_path) -> None:
    """A bf16 checkpoint loaded as bf16 adds far less than an fp32 copy to the peak
    (measured ~0.06x the fp32 size here); loading it as fp32 and casting, as zo2 did
    before, added ~1.5x the fp32 size."""
    from zo2.models import random_model, tiny_config

    save_folder(tmp_path / "warm", dtype=torch.bfloat16)
    config = tiny_config("llama", vocab=8192, layers=4, hidden=512)
    save_folder(tmp_path / "big", random_model(config), dtype=torch.bfloat16)  # ~27 MB
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "warm"),
                           str(tmp_path / "big")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["delta"] < 0.75 * result["fp32"], result  # under 1.5x the bf16 size


def _spy_all(monkeypatch) -> list[tuple[str, dict]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    calls: list[tuple[str, dict]] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_passed_through(tmp_path, monkeypatch, trust: bool) -> None:
    save_folder(tmp_path / "m")
    calls = _spy_all(monkeypatch)
    if trust:
        load_model(str(tmp_path / "m"), trust_remote_code=True)
    else:
        load_model(str(tmp_path / "m"))  # the default: off
    names = [name for name, _ in calls]
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"} <= set(names)
    for name, kwargs in calls:
        if name in ("AutoConfig", "AutoModelForCausalLM") or kwargs:
            assert kwargs.get("trust_remote_code") is trust, (name, kwargs)


def test_model_needing_its_own_code_names_the_setting(tmp_path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "zo2-custom-lm",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    }))
    with pytest.raises(ModelError) as info:
        load_model(str(folder))
    assert str(info.value) == (
        f"{folder}: the model needs its own code (auto_map in config.json); set "
        "model.trust_remote_code=true to run it (only for a model you trust)"
    )


def test_config_key_defaults_off() -> None:
    from zo2.config import ModelConfig, compose

    assert ModelConfig().trust_remote_code is False
    assert compose(["model.trust_remote_code=true"]).model.trust_remote_code is True
    assert compose([]).model.trust_remote_code is False


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "zo2-custom-lm"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(folder: Path) -> Path:
    """A model folder whose architecture is its own code (auto_map): a small Llama
    subclass under a model type transformers does not know, with the embedded tokenizer."""
    import importlib.util
    import sys

    folder.mkdir()
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODEL)
    package = f"zo2_custom_{folder.parent.name.replace('-', '_')}"
    for name in ("configuration_custom", "modeling_custom"):  # build it with its own code
        spec = importlib.util.spec_from_file_location(f"{package}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        if name == "configuration_custom":
            sys.modules[package] = type(sys)(package)
            sys.modules[package].__path__ = [str(folder)]
        spec.loader.exec_module(module)
    config = sys.modules[f"{package}.configuration_custom"].CustomConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config.auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    torch.manual_seed(0)
    sys.modules[f"{package}.modeling_custom"].CustomForCausalLM(config).save_pretrained(folder)
    from zo2.models import embedded_tokenizer

    embedded_tokenizer().save_pretrained(folder)
    return folder


def test_a_custom_code_model_trains_and_exports_with_trust_remote_code(tmp_path) -> None:
    """trust_remote_code=true runs a model's own code: the run trains it (the engine finds
    its units by the generic rule) and final/ loads back, code included, to the same
    logits."""
    from transformers import AutoModelForCausalLM

    from zo2.config import compose
    from zo2.trainer import Trainer

    folder = custom_code_model(tmp_path / "custom")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} of the custom model"}) + "\n"
                            for i in range(8)))
    cfg = compose([f"model.name={folder}", "model.trust_remote_code=true", f"data.train={data}",
                   "data.format=text", "data.max_length=64", "steps=2", "optim.batch_size=4",
                   "progress=false",
                   "logging=none", f"output_dir={tmp_path / 'run'}"])
    with Trainer(cfg, cfg.output_dir) as trainer:
        assert type(trainer.engine.model).__name__ == "CustomForCausalLM"
        trainer.train()
        current = trainer.engine.export_state_dict()
    final = tmp_path / "run" / "final"
    assert (final / "modeling_custom.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(loaded).__name__ == "CustomForCausalLM"
    state = loaded.state_dict()
    assert all(torch.equal(state[k], current[k]) for k in state)
