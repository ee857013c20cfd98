"""Generation-based evaluation: the answer tasks (SQuAD, DROP) as MeZO reports them,
and the references of your own data (:mod:`zo2.data.sft`).

:func:`generate_from_ids` decodes greedily from token-id prompts (left-padded batches,
at most ``max_new_tokens``, up to a stop id); :func:`generate_answers` does it from text
prompts and cuts each answer at its first newline; :func:`evaluate_generation` scores
the answers with SQuAD's token F1 and exact match: both strings lowercased, stripped
of punctuation and of the articles a / an / the, whitespace collapsed; an example
takes the best score over its gold answers; the result is the mean over examples.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from zo2.data.batching import bos_ids, text_ids
from zo2.data.examples import AnswerExample

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(F1, exact match) of ``prediction``, each the max over the gold answers."""
    return (max(f1_score(prediction, g) for g in golds),
            max(exact_match(prediction, g) for g in golds))


def _stop_ids(tokenizer: Any) -> list[int]:
    """End of sequence, and the newline token when a newline is one token."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    newline = text_ids(tokenizer, "\n")
    return stops + newline if len(newline) == 1 else stops


@torch.no_grad()
def generate_from_ids(model: Any, tokenizer: Any, rows: Sequence[list[int]], *,
                      max_new_tokens: int = 50, batch_size: int = 8,
                      stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuations of the token-id prompts ``rows`` (left-padded batches), each
    ending before its first stop id (default: EOS)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = list(stop_ids) if stop_ids is not None else [tokenizer.eos_token_id]
    outputs: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            outputs.append(row[:cut])
    return outputs


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *,
                     max_new_tokens: int = 50, batch_size: int = 8,
                     max_length: int = 1024) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first newline and stripped.

    A prompt longer than ``max_length - max_new_tokens`` tokens loses its left end.
    """
    room = max(max_length - max_new_tokens, 1)
    bos = bos_ids(tokenizer)
    rows = [bos + text_ids(tokenizer, p)[-(room - len(bos)):] for p in prompts]
    generated = generate_from_ids(model, tokenizer, rows, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, stop_ids=_stop_ids(tokenizer))
    return [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            for row in generated]


def evaluate_generation(model: Any, tokenizer: Any, examples: Sequence[AnswerExample], *,
                        max_new_tokens: int = 50, batch_size: int = 8,
                        max_length: int = 1024) -> dict[str, Any]:
    """Mean F1 and exact match of greedy answers to ``examples``, and the predictions.

    ``accuracy`` repeats ``f1`` so that a run can select checkpoints by it.
    """
    predictions = generate_answers(model, tokenizer, [ex.prompt for ex in examples],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   max_length=max_length)
    scores = [best_over_golds(p, ex.answers) for p, ex in zip(predictions, examples)]
    n = max(len(scores), 1)
    f1 = sum(s[0] for s in scores) / n
    return {"f1": f1, "exact_match": sum(s[1] for s in scores) / n, "accuracy": f1,
            "predictions": predictions}
