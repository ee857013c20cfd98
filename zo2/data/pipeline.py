"""A task's training pieces by its kind: objective, training batches, evaluation.

==============  =================================  ======================================
kind            trains with                        evaluated by
==============  =================================  ======================================
label_words     cross-entropy over the label       accuracy of the label word (one forward)
                words (MeZO's train-as-classif.)
choice          cross-entropy over candidate       accuracy of the best-scoring candidate
                continuations (COPA, ReCoRD)
lm              next-token loss on the answer      greedy generation, SQuAD F1 / exact match
                (SQuAD, DROP)
==============  =================================  ======================================

Generation runs the engine's model as it is: offloaded, every generated token is one
more pass over the blocks (each is streamed once per token, as in any forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zo2.data.batching import BatchIterator, encode, label_word_ids
from zo2.data.continuations import (
    AnswerBatchIterator,
    ChoiceBatchIterator,
    encode_answers,
    encode_choices,
)
from zo2.data.tasks import Task
from zo2.errors import ConfigError
from zo2.evaluation import evaluate_generation
from zo2.loss import Objective


@dataclass
class Pipeline:
    """``evaluate(engine, split)`` gives ``{"loss"?, "accuracy", ...}`` for each of ``splits``
    (``dev``, ``test``; your own data may have neither)."""

    objective: Objective
    train: BatchIterator
    evaluate: Callable[[Any, str], dict]
    splits: tuple[str, ...] = ("dev", "test")


def build(task: Task, tokenizer: Any, *, objective: str, batch_size: int, eval_batch_size: int,
          seed: int, max_length: int) -> Pipeline:
    """The pipeline of ``task``; ``objective`` must fit its kind (ConfigError otherwise)."""
    kind = task.spec.kind
    if kind != "label_words" and objective not in (kind, "label_words"):
        raise ConfigError(f"task {task.spec.name!r} trains with objective {kind!r}, "
                          f"not task.objective={objective!r}")
    if kind == "label_words":
        iterator, chunk = BatchIterator, encode
        objective_ = Objective(objective, candidates=label_word_ids(tokenizer, task.spec))
        extra = {}
    elif kind == "choice":
        choices = task.choices
        iterator, extra = ChoiceBatchIterator, {"choices": choices}
        chunk = lambda tok, exs, spec, max_length: encode_choices(  # noqa: E731
            tok, exs, choices, max_length)
        objective_ = Objective("choice", choices=choices)
        eval_batch_size = max(1, eval_batch_size // choices)  # rows per example
    else:
        iterator, extra = AnswerBatchIterator, {}
        chunk = lambda tok, exs, spec, max_length: encode_answers(  # noqa: E731
            tok, exs, max_length)
        objective_ = Objective("lm")
    train = iterator(tokenizer, task.train, task.spec, batch_size=batch_size, seed=seed,
                     max_length=max_length, **extra)
    splits = {name: examples for name, examples in (("dev", task.dev), ("test", task.test))
              if examples}  # your own data may have neither
    if kind == "lm":
        def evaluate(engine, split: str) -> dict:
            engine.flush()
            scores = evaluate_generation(engine.model, tokenizer, splits[split],
                                         batch_size=eval_batch_size,
                                         max_length=max_length + 50)
            scores.pop("predictions")
            return scores
        return Pipeline(objective_, train, evaluate, splits=tuple(splits))

    batches = {name: _batches(chunk, tokenizer, examples, task.spec, eval_batch_size,
                              max_length) for name, examples in splits.items()}
    return Pipeline(objective_, train, lambda engine, split: engine.evaluate(batches[split]),
                    splits=tuple(splits))


def _batches(chunk, tokenizer, examples, spec, batch_size: int, max_length: int) -> list[dict]:
    """Evaluation batches, examples sorted by length so that little padding is computed."""
    def length(e) -> int:
        return len(getattr(e, "text", None) or getattr(e, "context", None) or e.prompt)

    examples = sorted(examples, key=length)
    return [chunk(tokenizer, examples[i: i + batch_size], spec, max_length)
            for i in range(0, len(examples), batch_size)]
