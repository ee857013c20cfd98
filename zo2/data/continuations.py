"""Batches that score a continuation after a prefix: MeZO's choice and generation tasks.

Every row is ``prefix + continuation``, left-padded like :func:`zo2.data.batching.encode`,
with ``labels`` holding the continuation's token ids at their own positions (-100
elsewhere), so the loss sees exactly the continuation's log-likelihood. A prefix too
long for ``max_length`` loses its left end (the question and the answer survive).

* :func:`encode_choices` (Objective ``"choice"``): ``choices`` rows per example, the
  right candidate first, then the others, then padding rows (a single attended pad
  token, no label) up to ``choices``: the objective regroups rows by that count.
* :func:`encode_answers` (Objective ``"lm"``): one row per example, its first gold
  answer as the continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zo2.data.batching import IGNORE_INDEX, BatchIterator, bos_ids, text_ids
from zo2.data.examples import AnswerExample, ChoiceExample
from zo2.errors import ConfigError, DataError

PAD_ROW = None  # a padding row of a choice group


def _row(tokenizer: Any, prefix: str, continuation: str, max_length: int
         ) -> tuple[list[int], int]:
    """(token ids, how many of them at the end are the continuation)."""
    head, tail = bos_ids(tokenizer), text_ids(tokenizer, continuation)
    if not tail:
        raise DataError(f"the continuation {continuation!r} encodes to no token")
    tail = tail[: max(max_length - len(head) - 1, 1)]
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise ConfigError(f"max_length {max_length} leaves no room for the prompt")
    return head + text_ids(tokenizer, prefix)[-room:] + tail, len(tail)


def encode_continuations(tokenizer: Any, rows: Sequence[tuple[str, str] | None],
                         max_length: int = 256) -> dict[str, torch.Tensor]:
    """Encode ``(prefix, continuation)`` rows (None: a padding row) into a left-padded batch
    with ``input_ids``, ``attention_mask`` and ``labels`` (B, T)."""
    if not rows or all(r is None for r in rows):
        raise DataError("cannot encode a batch without any continuation")
    encoded = [None if r is None else _row(tokenizer, r[0], r[1], max_length) for r in rows]
    width = max(len(e[0]) for e in encoded if e is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask[:, -1] = 1  # a padding row attends to one token: no fully masked row
    for i, item in enumerate(encoded):
        if item is None:
            continue
        ids, n = item
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
        labels[i, width - n:] = input_ids[i, width - n:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_choices(tokenizer: Any, examples: Sequence[ChoiceExample], choices: int,
                   max_length: int = 256) -> dict[str, torch.Tensor]:
    """``choices`` rows per example: the right candidate, the others, padding rows."""
    rows: list[tuple[str, str] | None] = []
    for ex in examples:
        if not 2 <= len(ex.candidates) <= choices or not 0 <= ex.label < len(ex.candidates):
            raise DataError(f"a choice example has {len(ex.candidates)} candidates and label "
                            f"{ex.label}; expected 2..{choices} candidates and a label among them")
        order = [ex.label] + [i for i in range(len(ex.candidates)) if i != ex.label]
        rows += [(ex.context, ex.candidates[i]) for i in order]
        rows += [PAD_ROW] * (choices - len(ex.candidates))
    return encode_continuations(tokenizer, rows, max_length)


def encode_answers(tokenizer: Any, examples: Sequence[AnswerExample],
                   max_length: int = 256) -> dict[str, torch.Tensor]:
    """One row per example: its prompt and first gold answer, labels on the answer."""
    return encode_continuations(tokenizer, [(ex.prompt, ex.target) for ex in examples],
                                max_length)


class ChoiceBatchIterator(BatchIterator):
    """:class:`~zo2.data.batching.BatchIterator` over choice examples (``choices`` rows each)."""

    def __init__(self, tokenizer: Any, examples: Sequence[ChoiceExample], spec: Any, *,
                 choices: int, **kwargs: Any) -> None:
        super().__init__(tokenizer, examples, spec, **kwargs)
        self.choices = choices

    def _encode(self, examples: list) -> dict[str, torch.Tensor]:
        return encode_choices(self.tokenizer, examples, self.choices, self.max_length)


class AnswerBatchIterator(BatchIterator):
    """:class:`~zo2.data.batching.BatchIterator` over answer examples (Objective ``"lm"``)."""

    def _encode(self, examples: list) -> dict[str, torch.Tensor]:
        return encode_answers(self.tokenizer, examples, self.max_length)
