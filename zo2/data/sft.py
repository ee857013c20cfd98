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
predicted right (greedy, teacher-forced).
"""

from __future__ import annotations

import math
import random
from typing import Any

from zo2.config import DataConfig
from zo2.data.batching import BatchIterator
from zo2.data.formats import Encoded, collate, encode_row
from zo2.data.pipeline import Pipeline
from zo2.data.rows import load_rows
from zo2.errors import ConfigError
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

    def evaluate(engine, split: str) -> dict:
        scores = engine.evaluate(batches[split])
        scores["perplexity"] = math.exp(min(scores["loss"], 700.0))  # exp overflows past 709
        return scores

    iterator = EncodedBatches(tokenizer, train, batch_size=batch_size, seed=seed)
    return Pipeline(Objective("lm"), iterator, evaluate, splits=tuple(batches))
