"""A ZO step's batch from what the Trainer's data loader hands out: micro-batches joined
into one batch, and (several ranks) the ranks' batches gathered into the global one.

Rows are padded to a common width on the collator's side (``side``: right for TRL's
collator, the tokenizer's ``padding_side`` for transformers' collators) with the
pad id in ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``: exactly what the
collator would have produced for all the rows at once, so gradient accumulation over two
micro-batches is one batch twice as large.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from zo2.data.batching import IGNORE_INDEX
from zo2.errors import ConfigError

KEYS = ("input_ids", "attention_mask", "labels")


def zo_batch(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of a collated batch (labels: the
    inputs, as a causal LM's loss does without them); other keys are refused."""
    extra = sorted(k for k in inputs if k not in KEYS and inputs[k] is not None)
    if extra:
        raise ConfigError(f"ZOTrainer: the batch has {', '.join(extra)}; zo2 runs the model "
                          "on input_ids, attention_mask and labels only (padding_free / "
                          "packing with position_ids is not supported)")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = inputs.get("labels")
    if labels is None:  # a causal LM's loss on its inputs, padding excluded
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pad(batch: Mapping[str, torch.Tensor], width: int, side: str,
         pad_id: int) -> dict[str, torch.Tensor]:
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key in KEYS:
        value = batch[key]
        extra = width - value.shape[1]
        if extra:
            pad = value.new_full((value.shape[0], extra), fill[key])
            value = torch.cat([value, pad] if side == "right" else [pad, value], dim=1)
        out[key] = value
    return out


def join(batches: Sequence[Mapping[str, torch.Tensor]], side: str,
         pad_id: int) -> dict[str, torch.Tensor]:
    """The rows of ``batches`` in order, as one batch padded on ``side``."""
    if len(batches) == 1:
        return dict(batches[0])
    width = max(b["input_ids"].shape[1] for b in batches)
    padded = [_pad(b, width, side, pad_id) for b in batches]
    return {key: torch.cat([b[key] for b in padded]) for key in KEYS}


def gather(batch: Mapping[str, torch.Tensor], side: str, pad_id: int,
           group=None) -> dict[str, torch.Tensor]:
    """Every rank's ``batch``, in rank order, as one batch (the global batch a single
    process would draw): the widths are agreed first, then one all-gather per tensor."""
    world = dist.get_world_size(group)
    rows = batch["input_ids"].shape[0]
    shape = torch.tensor([rows, batch["input_ids"].shape[1]], dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(int(s[0]) != rows for s in shapes):
        raise ConfigError("ZOTrainer: the ranks' batches differ in size "
                          f"({[int(s[0]) for s in shapes]} rows); use dataloader_drop_last=True")
    padded = _pad(batch, max(int(s[1]) for s in shapes), side, pad_id)
    out = {}
    for key in KEYS:
        local = padded[key].contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        out[key] = torch.cat(parts)
    return out
