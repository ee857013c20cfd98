"""Find the execution units of any decoder-only causal LM, without per-architecture code.

A *unit* is a module that owns trainable parameters and runs as one piece inside
the model's own forward: each decoder layer of the model's layer list, and, outside
that list, every module that directly owns trainable parameters (input embeddings,
learned position embeddings, the final norm, the LM head, projections). The engine
wraps each unit so that the stacked ``+eps`` / ``-eps`` batch passes through it with
its parameters perturbed slice by slice (see :mod:`zo2.perturb`).

Rules, all generic:

* The decoder layers are the children of the ``nn.ModuleList`` that holds the most
  parameters among module lists whose children all share one class.
* Outside that list, a module that directly owns a trainable parameter becomes a unit
  covering its whole subtree; the walk does not descend into it.
* Parameters are identified by their canonical name, the first name under which
  ``model.named_parameters()`` yields them. Tied weights (an LM head sharing the
  input embedding) are one parameter with one name: every unit that executes with
  it perturbs it with the same ``z``, and the update is applied to it once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from zo2.errors import ModelError
from zo2.noise import param_key


@dataclass(eq=False)
class TrainableParam:
    """One unique trainable tensor and its identity in the perturbation stream."""

    name: str
    param: nn.Parameter
    key: int
    decay: bool  # weight decay applies (matrices); biases and norm weights are skipped
    floor: float | None = None  # a quantized layer's scale: clamped to >= floor (QZO)

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass(eq=False)
class Unit:
    """A module executed as one piece, with the trainable parameters it runs with."""

    name: str
    module: nn.Module
    params: list[TrainableParam] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the (name, module list) of the decoder layers."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no list of decoder layers (an nn.ModuleList of "
            "identical blocks); zo2 supports decoder-only causal LMs"
        )
    return best


def _is_trainable(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def trainable_tensors(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module, bool]]:
    """``(name, tensor, owning module, is a scale)`` of every tensor ZO may train, once
    each under its first name: the floating-point parameters (integer ones are a quantized
    layer's frozen codes), then the scales of quantized layers (:mod:`zo2.quantized`)."""
    from zo2.quantized import scales  # imports bitsandbytes only if the model uses it

    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen and param.is_floating_point():
                seen.add(id(param))
                out.append((f"{module_name}.{name}" if module_name else name, param, module,
                            False))
    for name, scale, module in scales(model):
        if id(scale) not in seen:
            seen.add(id(scale))
            out.append((name, scale, module, True))
    return out


def tensors_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and quantization scale of ``model`` by its state-dict name.

    By name, not identity: a quantized layer may save a detached copy of its parameter
    (bitsandbytes' 4-bit codes), whose identity is not the parameter's."""
    owners = {name: t for name, t, *_ in trainable_tensors(model)}
    owners.update(dict(model.named_parameters()))
    return owners


def find_units(model: nn.Module, trainable: Sequence[str] = ("*",)) -> list[Unit]:
    """Split ``model`` into units; ``trainable`` are glob patterns over the names of
    :func:`trainable_tensors`."""
    canonical: dict[int, TrainableParam] = {}
    owned: dict[int, list[TrainableParam]] = {}  # id(module) -> its own trainable tensors
    for name, param, module, scale in trainable_tensors(model):
        if _is_trainable(name, trainable):
            p = TrainableParam(name=name, param=param, key=param_key(name),
                               decay=param.ndim >= 2 and not scale,
                               floor=0.0 if scale else None)
            canonical[id(param)] = p
            owned.setdefault(id(module), []).append(p)
    if not canonical:
        raise ModelError(
            f"no parameter of {type(model).__name__} matches trainable={list(trainable)}"
        )

    layers_name, layers = find_layer_list(model)
    units: list[Unit] = []

    def collect(module: nn.Module) -> list[TrainableParam]:
        seen: dict[int, TrainableParam] = {}
        for sub in module.modules():
            for p in owned.get(id(sub), ()):
                seen[id(p.param)] = p
        for param in module.parameters():  # tied weights owned by a module outside
            if id(param) in canonical:
                seen.setdefault(id(param), canonical[id(param)])
        return list(seen.values())

    def walk(prefix: str, module: nn.Module) -> None:
        if module is layers:
            for index, layer in enumerate(layers):
                units.append(Unit(f"{layers_name}.{index}", layer, collect(layer)))
            return
        owns = id(module) in owned or any(
            id(p) in canonical for p in module.parameters(recurse=False))
        if owns:
            units.append(Unit(prefix or "<root>", module, collect(module)))
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    units = [unit for unit in units if unit.params]
    covered = {id(p.param) for unit in units for p in unit.params}
    missing = [p.name for pid, p in canonical.items() if pid not in covered]
    if missing:
        raise ModelError(f"parameters outside every unit (not supported): {missing[:5]}")
    return units


def unique_params(units: Sequence[Unit]) -> list[TrainableParam]:
    """Every trainable parameter once, in unit order (tied weights appear once)."""
    seen: dict[int, TrainableParam] = {}
    for unit in units:
        for p in unit.params:
            seen.setdefault(id(p.param), p)
    return list(seen.values())
