"""A stateful update rule's state under offload slicing: gathered whole, cut to slices.

With slicing (:mod:`zo2.parallel.slicing`) each rank keeps, uploads and updates only
its slice ``[block.lo, block.hi)`` of every offloaded block, and so the update rule
(:mod:`zo2.rules`: momentum buffers, Adam moments) keeps only those elements' state. A
checkpoint holds whole tensors: :func:`gather_rule_state` all-gathers the slices block
by block (a collective: every rank of the node calls it), and
:func:`slice_rule_state` cuts a checkpoint's whole tensors back to this rank's slice.
The rule is seen through its view of a slice (:class:`zo2.rules.StateShard`: buffers,
dtype, keys, each parameter's part), never through its storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zo2.offload.store import Block


def gather_rule_state(blocks: Sequence[Block], slicing, rule,
                      writer_only: bool) -> dict[str, torch.Tensor]:
    """``rule``'s whole state: its resident parameters' as kept, the offloaded ones'
    gathered from every rank's slice (``writer_only``: to the checkpoint writer only;
    the other ranks get the resident parameters' state alone)."""
    state = rule.state()
    for block in blocks:
        shard = rule.shard(block.lo, block.hi)
        for which in shard.buffers:
            mine = torch.zeros(block.hi - block.lo, dtype=shard.dtype)
            for e in block.trainable:
                kept = shard.portion(e.trainable.name, which, e.offset, e.numel)
                if kept is not None:
                    a, b = shard.span(e.offset, e.numel)
                    mine[e.offset + a - block.lo: e.offset + b - block.lo] = kept
            # a copy, not arithmetic: bfloat16 travels as float16 bits (gloo has no bf16)
            wire = mine.view(torch.float16) if mine.dtype == torch.bfloat16 else mine
            whole = slicing.gather_host(wire) if writer_only else slicing.all_gather_host(wire)
            if whole is None:
                continue  # not the writer
            whole = whole.view(mine.dtype)
            for e in block.trainable:
                state[shard.key(e.trainable.name, which)] = whole[
                    e.offset: e.offset + e.numel].clone()
    return state


def slice_rule_state(blocks: Sequence[Block], rule, tensors: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A checkpoint's whole state cut to this rank: the resident parameters' whole, of
    each offloaded one the part in this rank's slice (with its start), and nothing of
    those wholly in other ranks' slices; ``rule.load_state(*result)`` takes it."""
    given, tensors, starts = tensors, dict(tensors), {}
    for block in blocks:
        shard = rule.shard(block.lo, block.hi)
        for which in shard.buffers:
            for e in block.trainable:  # offloaded: only the part in this slice stays
                key = shard.key(e.trainable.name, which)
                tensors.pop(key, None)
                part = shard.cut(given[key], e.offset, e.numel) if key in given else None
                if part is not None:
                    tensors[key], starts[key] = part
    return tensors, starts
