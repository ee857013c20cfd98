"""Your own data as a run's pipeline: rows (:mod:`zo2.data.rows`) in a format
(:mod:`zo2.data.formats`), trained with next-token loss on the labelled tokens.

Splits: ``data.train`` is required; ``data.validation`` is the dev split (the one that
picks ``best/``), or, with ``data.validation_split`` > 0, that share of the training rows
is held out (drawn with ``data.seed``); with neither there is no dev evaluation and the
final weights are the run's result. ``data.test`` is evaluated before and after
training when given. ``data.n_train`` > 0 trains on a sample of that many rows.

Every row is encoded (and checked) before training starts, with its index in its own
source, so a bad row is one :class:`~zo2.errors.DataError` line naming the source, the
row and the field before anything is written. Evaluation gives the mean loss over the
labelled tokens, its perplexity, and ``accuracy``, the share of labelled tokens
predicted right (greedy, teacher-forced). With ``data.max_new_tokens`` > 0 it also
generates: each row's reference is its last labelled span (the completion, the last
assistant turn), its prompt everything before it; the greedy answer (up to EOS or the
reference's end-of-turn token) is scored by exact match and token F1 (SQuAD's
normalisation, :mod:`zo2.evaluation`), and the first ``data.samples`` answers are kept
in the scores (``samples``: prompt end, prediction, reference).
"""

from __future__ import annotations

import math
import random
from typing import Any

from zo2.config import DataConfig
from zo2.data.batching import IGNORE_INDEX, BatchIterator
from zo2.data.formats import Encoded, collate, encode_row
from zo2.data.pipeline import Pipeline
from zo2.data.rows import load_rows
from zo2.errors import ConfigError
from zo2.evaluation import best_over_golds, generate_from_ids
from zo2.loss import Objective


class EncodedBatches(BatchIterator):
    """Training batches of encoded rows (reshuffled each epoch, resumable)."""

    def __init__(self, tokenizer: Any, examples: list[Encoded], *, batch_size: int,
                 seed: int) -> None:
        super().__init__(tokenizer, examples, None, batch_size=batch_size, seed=seed)

    def _encode(self, examples: list[Encoded]) -> dict:
        return collate(examples, self.tokenizer)


def load_sources(cfg: DataConfig) -> dict[str, Any]:
    """The rows of each given source (read before the model loads: a bad file is
    reported first); keys ``train``, ``validation``, ``test``."""
    return {role: load_rows(source, role=role) for role in ("train", "validation", "test")
            if (source := getattr(cfg, role)) is not None}


def _split_indices(cfg: DataConfig, n: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out dev rows) of the ``n`` training-source rows."""
    order = list(range(n))
    rng = random.Random(cfg.seed)
    held: list[int] = []
    if cfg.validation_split:
        rng.shuffle(order)
        cut = max(1, round(n * cfg.validation_split))
        if cut >= n:
            raise ConfigError(f"data.validation_split={cfg.validation_split} of {n} rows "
                              "leaves no training row")
        held, order = sorted(order[:cut]), sorted(order[cut:])
    if cfg.n_train:
        if cfg.n_train > len(order):
            raise ConfigError(f"data.n_train={cfg.n_train}, but data.train has {len(order)} "
                              "training rows")
        order = sorted(rng.sample(order, cfg.n_train))
    return order, held


def _encode(rows, indices, cfg: DataConfig, tokenizer: Any, source: str) -> list[Encoded]:
    return [encode_row(rows[i], i, fmt=cfg.format, tokenizer=tokenizer,
                       max_length=cfg.max_length, source=source) for i in indices]


def _eval_batches(examples: list[Encoded], tokenizer: Any, batch_size: int) -> list[dict]:
    """Evaluation batches, rows sorted by length so that little padding is computed."""
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    return [collate(examples[i: i + batch_size], tokenizer)
            for i in range(0, len(examples), batch_size)]


def _reference(example: Encoded) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the row's last labelled span and what precedes it."""
    labelled = [i for i, t in enumerate(example.labels) if t != IGNORE_INDEX]
    end = labelled[-1] + 1
    start = end
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return example.input_ids[:start], example.input_ids[start:end]


def _generation(examples: list[Encoded], cfg: DataConfig, tokenizer: Any, batch_size: int):
    """``score(engine) -> dict``: exact match, token F1 and samples of greedy answers."""
    pairs = [_reference(e) for e in examples]
    special = set(tokenizer.all_special_ids)
    stops = sorted({tokenizer.eos_token_id} | {ref[-1] for _, ref in pairs if ref[-1] in special})
    references = [tokenizer.decode(ref, skip_special_tokens=True).strip() for _, ref in pairs]

    def score(engine) -> dict:
        engine.flush()  # the model's own weights are the updated ones
        answers = generate_from_ids(engine.model, tokenizer, [p for p, _ in pairs],
                                    max_new_tokens=cfg.max_new_tokens, batch_size=batch_size,
                                    stop_ids=stops)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        scores = [best_over_golds(t, [r]) for t, r in zip(texts, references)]
        n = max(len(scores), 1)
        samples = [{"prompt_end": tokenizer.decode(p[-24:]), "prediction": t, "reference": r}
                   for (p, _), t, r in zip(pairs[: cfg.samples], texts, references)]
        return {"f1": sum(s[0] for s in scores) / n,
                "exact_match": sum(s[1] for s in scores) / n, "samples": samples}

    return score


def build(cfg: DataConfig, rows: dict[str, Any], tokenizer: Any, *, batch_size: int,
          eval_batch_size: int, seed: int) -> Pipeline:
    """The pipeline of ``rows`` (:func:`load_sources`); batches are drawn with ``seed``."""
    train_idx, held = _split_indices(cfg, len(rows["train"]))
    train = _encode(rows["train"], train_idx, cfg, tokenizer, cfg.train)
    evals: dict[str, list[Encoded]] = {}
    if held:
        evals["dev"] = _encode(rows["train"], held, cfg, tokenizer, cfg.train)
    if "validation" in rows:
        evals["dev"] = _encode(rows["validation"], range(len(rows["validation"])), cfg,
                               tokenizer, cfg.validation)
    if "test" in rows:
        evals["test"] = _encode(rows["test"], range(len(rows["test"])), cfg, tokenizer,
                                cfg.test)
    batches = {split: _eval_batches(examples, tokenizer, eval_batch_size)
               for split, examples in evals.items()}
    generated = {split: _generation(examples, cfg, tokenizer, eval_batch_size)
                 for split, examples in evals.items()} if cfg.max_new_tokens else {}

    def evaluate(engine, split: str) -> dict:
        scores = engine.evaluate(batches[split])
        scores["perplexity"] = math.exp(min(scores["loss"], 700.0))  # exp overflows past 709
        if split in generated:
            scores.update(generated[split](engine))
        return scores

    iterator = EncodedBatches(tokenizer, train, batch_size=batch_size, seed=seed)
    return Pipeline(Objective("lm"), iterator, evaluate, splits=tuple(batches))
