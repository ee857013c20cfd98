"""The offload plan, settled once when the offloader is built: the blocks and the dtypes.

* :func:`plan_blocks`: which units are offloaded (``offload.layers_only``,
  ``offload.resident``), grouped into blocks (:func:`zo2.offload.store.group_units`).
* :func:`check_same_blocks`: with slicing, before the blocks are cut into slices,
  that every rank of the slice group planned the same blocks.
* :func:`plan_dtypes`: the dtype of the blocks' host copies and of the wire, and
  whether the update is applied to the host master (uploads only, no write-back).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from zo2.config import OffloadConfig
from zo2.errors import ConfigError
from zo2.offload.store import Block, group_units
from zo2.units import Unit, find_layer_list

if TYPE_CHECKING:  # a type only: zo2.parallel.slicing imports zo2.offload
    from zo2.parallel.slicing import SliceGroup


def plan_blocks(model: nn.Module, units: Sequence[Unit], config: OffloadConfig
                ) -> tuple[list[Block], list[Unit]]:
    """The blocks of the offloaded units and the units that stay resident:
    ``config.layers_only`` offloads the decoder layers only, and the ``config.resident``
    globs over unit names keep the units they match resident."""
    layers_name, _ = find_layer_list(model)
    chosen = [(not config.layers_only or u.name.startswith(layers_name + "."))
              and not any(fnmatch.fnmatchcase(u.name, g) for g in config.resident)
              for u in units]
    return group_units(model, units, chosen)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def plan_dtypes(blocks: Sequence[Block], config: OffloadConfig, stateful: bool
                ) -> tuple[torch.dtype | None, torch.dtype | None, bool]:
    """(host, wire, master_on_host): the host copy's dtype (``offload.host_dtype``, else
    the units' compute dtype), the wire's (``offload.wire_dtype``, else the host's),
    and whether the update is applied to the host copy, which is then the master: for
    a wire narrower than the host copy, and for a rule with per-parameter state
    (``stateful``), which lives on the host next to the master (:mod:`zo2.rules`)."""
    compute = {b.compute_dtype for b in blocks}
    if len(compute) > 1:
        raise ConfigError("offload: offloaded units must share one dtype")
    host = _dtype(config.host_dtype) or (compute.pop() if compute else None)
    wire = _dtype(config.wire_dtype) or host  # a narrower wire: host_dtype=float32 (config)
    return host, wire, wire != host or stateful


def check_same_blocks(blocks: Sequence[Block], slicing: SliceGroup) -> None:
    """Once, before any slice moves: every rank of the slice group cut the model into
    the same blocks (names and sizes, in order), or a ConfigError on every rank; ranks
    that disagreed would exchange slices of different tensors without noticing."""
    layout = ";".join(f"{b.name}:{b.numel}:{b.compute_dtype}" for b in blocks)
    digest = hashlib.blake2b(layout.encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    every = slicing.all_gather_host(mine)
    if not bool((every == mine).all()):
        raise ConfigError(f"offload slicing: the {slicing.size} ranks of this node cut the "
                          "model into different blocks (another model, trainable set or "
                          "offload setting on some rank); every rank must run the same config")


def check_widened(blocks: Sequence[Block], host: torch.dtype | None,
                  wire: torch.dtype | None, rounding: str) -> None:
    """ConfigError for what a widened block (:mod:`zo2.offload.store`: 16-bit parameters
    held in float32 beside float32 ones) cannot do exactly: a host copy or wire narrower
    than float32 (it would round the float32 parameters, a 4-bit layer's scales), and
    stochastic rounding of the 16-bit parameters' updates (resident, it draws its own
    random bits per parameter; here each update is rounded to nearest)."""
    widened = [b.name for b in blocks if b.narrowed]
    if not widened:
        return
    for key, dtype in (("host_dtype", host), ("wire_dtype", wire)):
        if dtype is not None and dtype != torch.float32:
            raise ConfigError(f"offload.{key}: {widened[0]} holds float32 parameters beside "
                              f"16-bit ones (a quantized layer's scales?), which {dtype} "
                              f"would round: leave offload.{key} unset")
    if rounding != "nearest":
        raise ConfigError(f"optim.rounding={rounding}: {widened[0]} holds 16-bit parameters "
                          "widened to float32 beside float32 ones, whose updates are rounded "
                          "to nearest; use optim.rounding=nearest with offloading, or keep "
                          "the model resident")
