"""Shared fixtures: tiny random-weight decoder models of several families and batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from _cache import zo2_cache  # noqa: E402, F401  (autouse: the suite's own ZO2_CACHE)

from zo2.models import TINY_FAMILIES, random_model, tiny_config  # noqa: E402

# GPT-2-style families (Conv1D weights, learned absolute positions whose position_ids
# have batch dimension 1, a tied head) besides the rotary ones.
FAMILIES = TINY_FAMILIES
VOCAB = 128


def make_model(family: str, *, layers: int = 2, hidden: int = 32, vocab: int = VOCAB,
               dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = True):
    """A tiny random-weight causal LM, built without touching global RNG state."""
    config = tiny_config(family, vocab=vocab, layers=layers, hidden=hidden, max_positions=128,
                         tie=tie)
    config.use_cache = False
    return random_model(config, seed).to(dtype).eval().requires_grad_(False)


def make_batch(batch: int = 4, seq: int = 12, vocab: int = VOCAB, seed: int = 0,
               label_ids: tuple[int, ...] = (5, 9), pad_left: int = 3) -> dict:
    """Left-padded prompts whose last token is one of ``label_ids`` (the label word)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch, 2):  # every other row left-padded
        ids[row, :pad_left] = 0
        mask[row, :pad_left] = 0
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    choice = torch.randint(0, len(label_ids), (batch,), generator=g)
    ids[:, -1] = torch.tensor(label_ids)[choice]
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
