"""A stateful update rule's state under offload slicing: gathered whole, cut to slices.

With slicing (:mod:`zo2.parallel.slicing`) each rank keeps, uploads and updates only
its slice ``[block.lo, block.hi)`` of every offloaded block, and so the update rule
(:mod:`zo2.rules`: momentum buffers, Adam moments) keeps only those elements' state. A
checkpoint holds whole tensors: :func:`gather_rule_state` all-gathers the slices block
by block (a collective: every rank of the node calls it), and
:func:`slice_rule_state` cuts a checkpoint's whole tensors back to this rank's slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from zo2.offload.store import Block, Entry


def _entries(block: Block, rule, which: str) -> Iterator[tuple[Entry, str, int, int]]:
    """(entry, state key, a, b): each trainable entry's flat range [a, b) in this rank's
    slice of ``block``, with the key of its buffer ``which``."""
    for e, a, b in block.overlaps(block.lo, block.hi):
        if e.trainable is not None:
            yield e, rule.key(e.trainable.name, which), a, b


def gather_rule_state(blocks: Sequence[Block], slicing, rule,
                      writer_only: bool) -> dict[str, torch.Tensor]:
    """``rule``'s whole state: its resident parameters' as kept, the offloaded ones'
    gathered from every rank's slice (``writer_only``: to the checkpoint writer only;
    the other ranks get the resident parameters' state alone)."""
    state = rule.state()
    for block in blocks:
        for which in rule.buffers:
            mine = torch.zeros(block.hi - block.lo, dtype=rule.state_dtype)
            for e, key, a, b in _entries(block, rule, which):
                kept = rule.portion(key, a - e.offset, b - e.offset)
                if kept is not None:
                    mine[a - block.lo: b - block.lo] = kept
            # a copy, not arithmetic: bfloat16 travels as float16 bits (gloo has no bf16)
            wire = mine.view(torch.float16) if mine.dtype == torch.bfloat16 else mine
            whole = slicing.gather_host(wire) if writer_only else slicing.all_gather_host(wire)
            if whole is None:
                continue  # not the writer
            whole = whole.view(mine.dtype)
            for e in block.trainable:
                state[rule.key(e.trainable.name, which)] = whole[
                    e.offset: e.offset + e.numel].clone()
    return state


def slice_rule_state(blocks: Sequence[Block], rule, tensors: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A checkpoint's whole state cut to this rank: the resident parameters' whole, of
    each offloaded one the part in this rank's slice (with its start), and nothing of
    those wholly in other ranks' slices; ``rule.load_state(*result)`` takes it."""
    given, tensors, starts = tensors, dict(tensors), {}
    for block in blocks:
        for which in rule.buffers:
            for e in block.trainable:  # offloaded: only the part in this slice stays
                tensors.pop(rule.key(e.trainable.name, which), None)
            for e, key, a, b in _entries(block, rule, which):
                if key in given:
                    tensors[key] = given[key].reshape(-1)[a - e.offset: b - e.offset].clone()
                    starts[key] = a - e.offset
    return tensors, starts
