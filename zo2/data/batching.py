"""Encoding examples into left-padded causal-LM batches, and a resumable batch iterator.

A batch follows the Hugging Face shifted-LM convention: ``labels`` is -100 everywhere
except the last column, which holds the gold label word's token id, so the logits
at position ``T-2`` predict it. Long texts are cut from their left so the template
suffix and the label word always survive.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from zo2.data.sources import Example
from zo2.data.tasks import TaskSpec
from zo2.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer: Any) -> list[int]:
    """The BOS id if this tokenizer prepends one by default, else nothing."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []


def label_word_ids(tokenizer: Any, spec: TaskSpec) -> torch.Tensor:
    """First token id of each label word, by label index: LongTensor (C,); they must differ."""
    if spec.kind != "label_words":
        raise ConfigError(f"task {spec.name!r} has no label words: it trains with objective "
                          f"{spec.kind!r}")
    ids = []
    for word in spec.label_words:
        tokens = text_ids(tokenizer, word)
        if not tokens:
            raise DataError(f"task {spec.name!r}: label word {word!r} encodes to no token")
        if len(tokens) > 1:
            log.warning(
                "task %s: label word %r is %d tokens; using its first token %d",
                spec.name,
                word,
                len(tokens),
                tokens[0],
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise DataError(
            f"task {spec.name!r}: label words {list(spec.label_words)} share a first token "
            f"({ids}) with this tokenizer; choose words whose first tokens differ"
        )
    return torch.tensor(ids, dtype=torch.long)


def _encode_one(
    tokenizer: Any, spec: TaskSpec, text: str, label_id: int, max_length: int
) -> list[int]:
    """Token ids of prompt + label word, cutting the text from its left to fit ``max_length``."""
    full = bos_ids(tokenizer) + text_ids(tokenizer, spec.prompt(text)) + [label_id]
    if len(full) <= max_length:
        return full
    prefix, suffix = spec.template.split("{text}")
    head = bos_ids(tokenizer) + (text_ids(tokenizer, prefix) if prefix else [])
    tail = text_ids(tokenizer, suffix) + [label_id]
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise ConfigError(
            f"max_length {max_length} is too small for the template {spec.template!r} "
            f"({len(head) + len(tail)} tokens without the text)"
        )
    return head + text_ids(tokenizer, text)[-room:] + tail


def encode(
    tokenizer: Any, examples: Sequence[Example], spec: TaskSpec, max_length: int = 256
) -> dict[str, torch.Tensor]:
    """Encode examples into ``input_ids``, ``attention_mask`` and ``labels`` (B, T), left-padded."""
    if not examples:
        raise DataError(f"task {spec.name!r}: cannot encode an empty list of examples")
    words = label_word_ids(tokenizer, spec).tolist()
    rows = []
    for ex in examples:
        if not 0 <= ex.label < len(words):
            raise DataError(f"task {spec.name!r}: label {ex.label} outside 0..{len(words) - 1}")
        rows.append(_encode_one(tokenizer, spec, ex.text, words[ex.label], max_length))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
        labels[i, -1] = row[-1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchIterator:
    """Endless encoded training batches, reshuffled each epoch with ``random.Random(seed + epoch)``.

    ``len()`` is the number of batches per epoch (the last one may be smaller).
    ``state_dict()`` / ``load_state_dict()`` save and restore (epoch, position) so a
    resumed run continues at the exact next batch.
    """

    def __init__(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        spec: TaskSpec | None,
        *,
        batch_size: int,
        seed: int = 0,
        max_length: int = 256,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            where = f"task {spec.name!r}" if spec is not None else "data.train"
            raise DataError(f"{where}: no training examples to iterate over")
        if drop_last and batch_size > len(examples):
            raise ConfigError(
                f"batch_size {batch_size} exceeds the {len(examples)} examples (drop_last)"
            )
        self.tokenizer, self.examples, self.spec = tokenizer, list(examples), spec
        self.batch_size, self.seed, self.max_length, self.drop_last = (
            batch_size,
            seed,
            max_length,
            drop_last,
        )
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def _epoch_order(self) -> list[int]:
        """The example order of the current epoch."""
        if self._order is None:
            self._order = list(range(len(self.examples)))
            random.Random(self.seed + self.epoch).shuffle(self._order)
        return self._order

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self._encode([self.examples[i] for i in indices])

    def _encode(self, examples: list) -> dict[str, torch.Tensor]:
        """One batch of ``examples`` (subclasses encode other kinds of example)."""
        return encode(self.tokenizer, examples, self.spec, self.max_length)

    def state_dict(self) -> dict[str, int]:
        """Where the iterator stands: the next batch is batch ``position`` of ``epoch``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; refuse a state of another seed, batch size or data size."""
        for key in ("seed", "batch_size", "num_examples"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"cannot resume batches: saved {key} {state[key]} differs from {mine}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ConfigError(
                f"cannot resume the batch iterator at epoch {epoch}, batch {position} "
                f"(an epoch has {len(self)} batches)"
            )
        self.epoch, self.position, self._order = epoch, position, None
