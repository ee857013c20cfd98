"""Parameter-efficient ZO: LoRA and prefix tuning through the peft library.

:func:`wrap` turns a Hugging Face causal LM into a peft model (``get_peft_model``) and
returns the globs that select exactly its adapter parameters; passed to
:class:`zo2.ZOEngine` as ``trainable``, they are the only parameters perturbed and
updated. The base model stays frozen: with offloading, a decoder layer's block holds
its LoRA matrices as a trainable prefix and only that prefix is written back
(:attr:`zo2.offload.store.Block.trained_end`). Nothing about the engine changes:

* LoRA matrices live inside the decoder layers, so the layers stay the units.
* The prefix encoder is a unit of its own outside the layers; peft calls it on the
  stacked batch (``prompt_tokens`` expanded to the stacked batch size), so the unit
  wrapper splits it slice by slice like any other unit.

:func:`save_adapter` writes peft's format (``adapter_config.json`` and
``adapter_model.safetensors``) with the current, updated values, so
``PeftModel.from_pretrained(base, path)`` loads the fine-tuned adapter.

Adapters run without dropout: the ``+eps`` and ``-eps`` forwards of a step must see
the same function (the engine runs the model in eval mode anyway).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from zo2.choices import ADAPTERS as KINDS
from zo2.errors import ConfigError

V = TypeVar("V")


@dataclass
class AdapterConfig:
    """Which adapter is trained instead of the model's own weights.

    ``kind=none`` trains ``model.trainable`` directly; ``lora`` and ``prefix`` train only
    the adapter's parameters (``model.trainable`` must then stay ``["*"]``).
    """

    kind: str = "none"  # none | lora | prefix
    r: int = 8  # lora: rank of the update matrices
    alpha: float = 16.0  # lora: scaling alpha / r
    target_modules: list[str] | None = None  # lora: module names; None: peft's per-model default
    num_virtual_tokens: int = 16  # prefix: virtual tokens prepended at every layer

    def __post_init__(self) -> None:  # OmegaConf.to_object and the Python API
        validate_adapter(self)


def validate_adapter(a: AdapterConfig, trainable: list[str] | None = None) -> AdapterConfig:
    """Check an :class:`AdapterConfig`; raise ConfigError naming the field."""
    if a.kind not in KINDS:
        raise ConfigError(f"model.adapter.kind: {a.kind!r} is not one of {list(KINDS)}")
    if a.r < 1:
        raise ConfigError(f"model.adapter.r: must be >= 1, got {a.r}")
    if a.alpha <= 0:
        raise ConfigError(f"model.adapter.alpha: must be > 0, got {a.alpha}")
    if a.target_modules is not None and len(a.target_modules) == 0:
        raise ConfigError("model.adapter.target_modules: needs a module name (or null)")
    if a.num_virtual_tokens < 1:
        raise ConfigError(f"model.adapter.num_virtual_tokens: must be >= 1, "
                          f"got {a.num_virtual_tokens}")
    if a.kind != "none" and trainable is not None and list(trainable) != ["*"]:
        raise ConfigError(f"model.trainable: must be ['*'] with adapter.kind={a.kind!r} "
                          f"(the adapter's parameters are trained), got {list(trainable)}")
    return a


def peft_config(cfg: AdapterConfig):
    """The peft config for ``cfg`` (a causal-LM task, no dropout)."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if cfg.kind == "lora":
        targets: Any = cfg.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"  # peft's generic rule: every linear layer but the head
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                          lora_dropout=0.0, target_modules=targets)
    if cfg.kind == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                  num_virtual_tokens=cfg.num_virtual_tokens)
    raise ConfigError(f"model.adapter.kind: {cfg.kind!r} has no peft config")


def wrap(model: nn.Module, cfg: AdapterConfig, trainable: list[str] | tuple[str, ...] = ("*",),
         *, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """``(model, trainable globs)``: the peft model and the globs of its adapter params.

    With ``kind=none`` the model and ``trainable`` come back unchanged. The globs select
    exactly the parameters peft made trainable (checked), named as in the returned model.
    The adapter's initial values are a function of ``seed`` (the global RNG is left as
    it was), so a resumed or offloaded run starts from the same adapter.
    """
    validate_adapter(cfg)
    if cfg.kind == "none":
        return model, list(trainable)
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, peft_config(cfg))
    except ValueError as err:  # peft has no default target modules for this model
        raise ConfigError(f"model.adapter: {err} (set model.adapter.target_modules, "
                          "e.g. [q_proj, v_proj] or [all-linear])") from None
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"model.adapter: {cfg.kind} added no parameter to "
                          f"{type(model).__name__} (check target_modules)")
    wrapped.requires_grad_(False)  # ZO needs no autograd
    return wrapped, adapter_globs(wrapped, names)


def adapter_globs(model: nn.Module, names: list[str], adapter: str = "default") -> list[str]:
    """Short globs (``*.lora_A.default.weight``) selecting exactly ``names`` in ``model``.

    Falls back to the exact names if the short form would select anything else.
    """
    globs = []
    for name in names:
        parts = name.split(".")
        at = parts.index(adapter) if adapter in parts else len(parts) - 1
        tail = ".".join(parts[max(at - 1, 0):])
        globs.append(tail if at <= 1 else "*." + tail)
    globs = list(dict.fromkeys(globs))
    chosen = [n for n, _ in model.named_parameters()
              if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    return globs if sorted(chosen) == sorted(names) else list(names)


def save_adapter(source, path: str | Path) -> Path:
    """Write the adapter of ``source`` (a :class:`zo2.ZOEngine` or a peft model) in peft's
    format: ``adapter_config.json`` and ``adapter_model.safetensors``.

    From an engine, the values are the current ones: the pending update is applied and
    offloaded parameters are read from their host blocks. With several ranks every rank
    calls it (reading sliced blocks is a collective) and the main rank writes.
    """
    from peft import PeftModel

    path = Path(path)
    engine = source if hasattr(source, "export_state_dict") else None
    model = engine.model if engine is not None else source
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a peft model, got {type(model).__name__}")
    if engine is None:
        model.save_pretrained(path)
        return path
    state = engine.export_state_dict()  # flushed; offloaded values from host memory
    own = {n for n, _ in model.named_parameters()} & set(state)
    adapter = {k: state[k].clone() for k in own if _is_adapter_key(k, model)}
    if engine.mesh.is_main:
        model.save_pretrained(path, state_dict=adapter)
    engine.mesh.wait_for_writer()
    return path


def _is_adapter_key(name: str, model: nn.Module) -> bool:
    """A parameter peft saves: one whose name carries an adapter's name."""
    return any(f".{adapter}." in f".{name}." for adapter in model.peft_config)


def is_peft_folder(path: str | Path) -> bool:
    """A folder written by peft's ``save_pretrained`` (:func:`save_adapter`, engine.save)."""
    return (Path(path) / "adapter_config.json").is_file()


def from_peft_format(model: nn.Module, tensors: dict[str, V],
                     adapter: str = "default") -> dict[str, V]:
    """Rename the tensors of peft's ``adapter_model.safetensors`` to ``model``'s names
    (the values, tensors or what describes them, are passed through).

    peft saves adapter weights without the adapter's name (``...lora_A.weight``) and a
    prefix as ``prompt_embeddings``; the model's own names carry it
    (``...lora_A.default.weight``, ``prompt_encoder.default.embedding.weight``). The
    result can be loaded like a full state dict whose base weights are all missing;
    a tensor this adapter does not have keeps its name (the caller reports it).
    """
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter]
    if config.is_prompt_learning:
        if getattr(config, "prefix_projection", False):
            raise ValueError("prefix_projection saves the projected prefix: not loadable")
        names = {"prompt_embeddings": f"prompt_encoder.{adapter}.embedding.weight"}
    else:
        own = model.state_dict(keep_vars=True)
        by_id = {id(v): k for k, v in own.items()}
        saved = get_peft_model_state_dict(model, state_dict=own, adapter_name=adapter)
        names = {k: by_id[id(v)] for k, v in saved.items() if id(v) in by_id}
    return {names.get(k, k): v for k, v in tensors.items()}  # unknown ones keep their name
