"""Quantized bases (QZO): zeroth-order fine-tuning of a quantized model's scales.

A bitsandbytes-quantized linear layer holds integer codes and continuous scales,
``w = scale * code``: the 4-bit formats (nf4, fp4) one ``absmax`` per block of 64
weights, int8 one ``SCB`` per output row (``w = SCB * code / 127``). QZO (arXiv
2505.13430) keeps the codes frozen and perturbs and updates the scales alone. Here a
*provider* per format (never per architecture) finds the scales of every quantized
layer and hands them to the units (:func:`zo2.units.find_units`) as trainable tensors
named ``<layer>.weight.absmax`` / ``<layer>.SCB``, the names they are saved under; the
noise is keyed by those names like any parameter's, so seed logs, resume and parallel
runs need nothing else. Integer tensors (the codes) are never trainable.

How a scale becomes trainable: the provider replaces the layer's scale tensor by an
``nn.Parameter`` holding the same values (float32) in the place bitsandbytes reads it
from (``weight.quant_state.absmax``, ``state.SCB``), so the perturbation can point it at
perturbed values and back like any parameter; bitsandbytes' own ``state_dict`` then
saves the trained scales, and ``from_pretrained`` loads the folder back as the same
quantized model. Two normalisations, once per layer:

* double-quantized 4-bit statistics (``bnb_4bit_use_double_quant``: ``absmax`` itself
  stored in 8 bits) are dequantized to float32 ``absmax``, which is what a trained
  scale needs; zo2's own loads do not double-quantize;
* bitsandbytes repacks 4-bit weights for CPUs with AVX512-BF16 on their first forward;
  the provider turns that off, so a run does the same arithmetic on every CPU.

Scales stay positive: after every update they are clamped to at least
``optim.scale_floor`` (:class:`~zo2.units.TrainableParam` ``floor``). QZO also clips
each projected gradient (``optim.clip_grad``, its code's 100).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn

from zo2.choices import QUANTIZATIONS
from zo2.errors import ConfigError

FORMATS = QUANTIZATIONS[1:]  # model.quantization, besides none


def bnb_config(fmt: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization=fmt``."""
    try:
        import bitsandbytes  # noqa: F401  (fail here, with the remedy, not mid-load)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"model.quantization={fmt} needs bitsandbytes: pip install "
                          "'zo2[quantized]' (bitsandbytes>=0.50 runs on CPUs too)") from None
    if fmt in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt,
                                  bnb_4bit_use_double_quant=False,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"model.quantization: {fmt!r} is not one of {['none', *FORMATS]}")


def portable(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` on bitsandbytes' portable CPU path (no
    repacking of the codes for AVX512-BF16 CPUs on the first forward); returns it."""
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def _four_bit(module: nn.Module) -> nn.Parameter:
    """The trainable ``absmax`` of a ``Linear4bit`` (normalised on first call)."""
    import bitsandbytes.functional as F

    module.support_avx512bf16_for_cpu = False  # keep bitsandbytes' portable CPU path
    state = module.weight.quant_state
    if isinstance(state.absmax, nn.Parameter):
        return state.absmax
    absmax = state.absmax
    if state.nested:  # double quantization: absmax stored blockwise in 8 bits
        absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
        state.nested, state.state2, state.offset = False, None, None
    state.absmax = nn.Parameter(absmax.float(), requires_grad=False)
    return state.absmax


def _eight_bit(module: nn.Module) -> nn.Parameter:
    """The trainable row scales ``SCB`` of a ``Linear8bitLt``."""
    if module.weight.CB is not None:
        module.init_8bit_state()  # moves CB / SCB into module.state, as its forward does
    state = module.state
    if not isinstance(state.SCB, nn.Parameter):
        state.SCB = nn.Parameter(state.SCB.float(), requires_grad=False)
    return state.SCB


def scales(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """``(name, scale, layer)`` of every quantized layer of ``model``, in module order.

    Nothing when bitsandbytes was never imported: then no layer can be quantized.
    """
    if "bitsandbytes" not in sys.modules:
        return
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            yield f"{name}.weight.absmax", _four_bit(module), module
        elif isinstance(module, bnb.nn.Linear8bitLt):
            if module.state.has_fp16_weights:
                raise ConfigError(f"{name}: an 8-bit layer that keeps fp16 weights "
                                  "(has_fp16_weights) has no frozen codes to train scales of")
            yield f"{name}.SCB", _eight_bit(module), module


def check_supported(model: nn.Module) -> None:
    """ConfigError for a model quantized by a method without a provider here (GPTQ,
    AWQ...): its quantized layers would stay frozen while the rest trained unnoticed."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return
    method = config.get("quant_method") if isinstance(config, dict) else \
        getattr(config, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if str(method) != "bitsandbytes":
        raise ConfigError(f"the model is quantized with {method}, which zo2 cannot train "
                          "(no provider for its scales; supported: bitsandbytes nf4, fp4 and "
                          "int8, model.quantization=nf4|fp4|int8)")


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` has bitsandbytes-quantized layers."""
    return next(scales(model), None) is not None
