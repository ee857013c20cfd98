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
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from zo2.config import DataConfig
from zo2.data import pipeline
from zo2.data.batching import IGNORE_INDEX, BatchIterator
from zo2.data.formats import Encoded, collate, encode_row
from zo2.data.labelled import LABELLED, LabelledRows
from zo2.data.pipeline import Pipeline
from zo2.data.rows import load_rows
from zo2.data.tasks import Task
from zo2.errors import ConfigError, DataError
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


ROLES = ("train", "validation", "test")


def given_rows(data: Mapping[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """Rows handed to the Python API (``Trainer(data=...)``), checked: ``train`` (required),
    ``validation`` and ``test``, each a ``datasets.Dataset`` or a sequence of dicts (a
    ``DatasetDict`` with those splits works as it is)."""
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise ConfigError(f"data: unknown split(s) {', '.join(map(repr, unknown))}; the splits "
                          f"are {', '.join(ROLES)}")
    if "train" not in data:
        raise ConfigError("data: no 'train' rows")
    also = [f"data.{role}" for role in ROLES if getattr(cfg, role) is not None]
    if also:
        raise ConfigError(f"data: rows given to the Trainer replace {', '.join(also)}; "
                          "leave the config's sources unset")
    if cfg.validation_split and "validation" in data:
        raise ConfigError("data.validation_split: give validation rows or "
                          "data.validation_split, not both")
    rows = {}
    for role in ROLES:
        if role not in data:
            continue
        given = data[role]
        if isinstance(given, Sequence) and not isinstance(given, (str, bytes)):
            given = list(given)
        elif not isinstance(given, datasets.Dataset):
            raise ConfigError(f"data[{role!r}]: expected a datasets.Dataset or a list of "
                              f"dicts, got {type(given).__name__}")
        if len(given) == 0:
            raise DataError(f"data.{role}: no rows")
        rows[role] = given
    return rows


def _sample(indices: list[int], k: int, labels: list[int] | None, rng: random.Random,
            what: str) -> list[int]:
    """``k`` of ``indices`` drawn with ``rng``, sorted; with ``labels`` (by row), as many of
    each label as the others (the remainder of an uneven ``k`` to the lowest labels)."""
    if labels is None:
        return sorted(rng.sample(indices, k))
    pools: dict[int, list[int]] = {}
    for i in indices:
        pools.setdefault(labels[i], []).append(i)
    picked = []
    for rank, label in enumerate(sorted(pools)):
        take = k // len(pools) + (1 if rank < k % len(pools) else 0)
        if take > len(pools[label]):
            raise DataError(f"{what}: a balanced sample of {k} rows needs {take} of label "
                            f"{label}, but data.train has {len(pools[label])}")
        picked += rng.sample(pools[label], take)
    return sorted(picked)


def _split_indices(cfg: DataConfig, n: int, labels: list[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """(training rows, held-out dev rows) of the ``n`` training-source rows; with
    ``labels`` (``data.balanced``) both are drawn equally from every label."""
    order = list(range(n))
    rng = random.Random(cfg.seed)
    held: list[int] = []
    if cfg.validation_split:
        cut = max(1, round(n * cfg.validation_split))
        if cut >= n:
            raise ConfigError(f"data.validation_split={cfg.validation_split} of {n} rows "
                              "leaves no training row")
        if labels is None:
            rng.shuffle(order)
            held, order = sorted(order[:cut]), sorted(order[cut:])
        else:
            held = _sample(order, cut, labels, rng, "data.validation_split")
            order = sorted(set(order) - set(held))
    if cfg.n_train:
        if cfg.n_train > len(order):
            raise ConfigError(f"data.n_train={cfg.n_train}, but data.train has {len(order)} "
                              "training rows")
        order = _sample(order, cfg.n_train, labels, rng, "data.n_train")
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


def _plan(cfg: DataConfig, rows: dict[str, Any], labels: list[int] | None
          ) -> dict[str, tuple[str, Sequence[int]]]:
    """split (``train``, ``dev``, ``test``) -> (the role whose rows it takes, their indices)."""
    train_idx, held = _split_indices(cfg, len(rows["train"]), labels)
    plan: dict[str, tuple[str, Sequence[int]]] = {"train": ("train", train_idx)}
    if held:
        plan["dev"] = ("train", held)
    if "validation" in rows:
        plan["dev"] = ("validation", range(len(rows["validation"])))
    if "test" in rows:
        plan["test"] = ("test", range(len(rows["test"])))
    return plan


def build(cfg: DataConfig, rows: dict[str, Any], tokenizer: Any, *, batch_size: int,
          eval_batch_size: int, seed: int, sources: dict[str, str] | None = None) -> Pipeline:
    """The pipeline of ``rows`` (:func:`load_sources`); batches are drawn with ``seed``.
    ``sources`` names each role's rows in errors (default: the config's paths)."""
    sources = {role: (sources or {}).get(role) or getattr(cfg, role) or f"data.{role}"
               for role in rows}
    if cfg.format in LABELLED:
        return _labelled(cfg, rows, tokenizer, sources, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, seed=seed)
    plan = _plan(cfg, rows, None)
    encoded = {split: _encode(rows[role], picked, cfg, tokenizer, sources[role])
               for split, (role, picked) in plan.items()}
    train = encoded.pop("train")
    batches = {split: _eval_batches(examples, tokenizer, eval_batch_size)
               for split, examples in encoded.items()}
    generated = {split: _generation(examples, cfg, tokenizer, eval_batch_size)
                 for split, examples in encoded.items()} if cfg.max_new_tokens else {}

    def evaluate(engine, split: str) -> dict:
        scores = engine.evaluate(batches[split])
        scores["perplexity"] = math.exp(min(scores["loss"], 700.0))  # exp overflows past 709
        if split in generated:
            scores.update(generated[split](engine))
        return scores

    iterator = EncodedBatches(tokenizer, train, batch_size=batch_size, seed=seed)
    return Pipeline(Objective("lm"), iterator, evaluate, splits=tuple(batches))


def _labelled(cfg: DataConfig, rows: dict[str, Any], tokenizer: Any, sources: dict[str, str],
              **sizes: int) -> Pipeline:
    """Classification or choice rows as a task (:mod:`zo2.data.labelled`), scored by
    accuracy like the built-in tasks."""
    labelled = LabelledRows(cfg, rows["train"], tokenizer, sources["train"])
    labels = ([labelled.label(row, i, sources["train"]) for i, row in enumerate(rows["train"])]
              if cfg.balanced else None)
    examples = {split: labelled.examples(rows[role], picked, sources[role])
                for split, (role, picked) in _plan(cfg, rows, labels).items()}
    task = Task(labelled.spec, examples["train"], examples.get("dev", []),
                examples.get("test", []))
    return pipeline.build(task, tokenizer, objective=labelled.spec.kind,
                          max_length=cfg.max_length, **sizes)
