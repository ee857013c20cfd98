"""MeZO's task suite, read from local copies of the public releases.

Each task has a parser (release row -> examples), the Objective kind it trains with
and, for the classification tasks, one label word per label:

* ``label_words``: sst2, rte, cb, boolq, wsc, wic, multirc, giving
  :class:`~zo2.data.sources.Example` (the filled prompt and the label index);
* ``choice``: copa, record, giving :class:`~zo2.data.examples.ChoiceExample`;
* ``lm``: squad, drop, giving :class:`~zo2.data.examples.AnswerExample`.

:func:`read_mezo` returns a task's training pool and its official validation split;
:func:`zo2.data.tasks.load_task` samples MeZO's k-shot sets from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo2.data.mezo import answers, choice, classify
from zo2.data.mezo.records import find_splits, read_records
from zo2.errors import ConfigError, DataError

YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")


@dataclass(frozen=True)
class MezoTask:
    """One task of the suite: how rows parse, how it is trained, its label words."""

    name: str
    kind: str  # "label_words" | "choice" | "lm": the Objective kind it trains with
    parse: Callable[[str, dict[str, Any]], list]
    label_words: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()


MEZO_TASKS: dict[str, MezoTask] = {t.name: t for t in (
    MezoTask("sst2", "label_words", classify.sst2, (" terrible", " great"),
             ("negative", "positive")),
    MezoTask("rte", "label_words", classify.rte, YES_NO, classify.RTE_LABELS),
    MezoTask("cb", "label_words", classify.cb, ("Yes", "No", "Maybe"), classify.CB_LABELS),
    MezoTask("boolq", "label_words", classify.boolq, NO_YES, classify.BINARY),
    MezoTask("wsc", "label_words", classify.wsc, NO_YES, classify.BINARY),
    MezoTask("wic", "label_words", classify.wic, NO_YES, classify.BINARY),
    MezoTask("multirc", "label_words", classify.multirc, NO_YES, classify.BINARY),
    MezoTask("copa", "choice", choice.copa),
    MezoTask("record", "choice", choice.record),
    MezoTask("squad", "lm", answers.squad),
    MezoTask("drop", "lm", answers.drop),
)}


def parse_files(task: MezoTask, paths: list[Path]) -> list:
    """Every example of these files (or datasets split folders), in file order."""
    examples: list = []
    for path in paths:
        for where, row in read_records(path):
            examples.extend(task.parse(where, row))
    if not examples:
        raise DataError(f"task {task.name!r}: {', '.join(map(str, paths))} hold no examples")
    return examples


def read_mezo(name: str, path: str | None) -> tuple[MezoTask, list, list | None]:
    """(task, training pool, validation examples) of a suite task read from ``path``.

    ``path`` is a release folder (its train and validation splits) or a single data
    file / ``datasets`` split folder (then the validation part is None).
    """
    if name not in MEZO_TASKS:
        raise ConfigError(f"unknown MeZO task {name!r}; allowed: {', '.join(MEZO_TASKS)}")
    if not path:
        raise ConfigError(f"task {name!r} needs its data: set task.path to the release "
                          "folder (train and validation files) or one data file")
    task, root = MEZO_TASKS[name], Path(path).expanduser()
    if not root.exists():
        raise DataError(f"task {name!r}: data path {root} not found")
    if not root.is_dir() or (root / "state.json").is_file():
        return task, parse_files(task, [root]), None
    train_files, val_files = find_splits(root)
    if not val_files:
        raise DataError(f"task {name!r}: {root} has no validation split (val*, dev*, "
                        "validation*), which MeZO samples its test set from")
    return task, parse_files(task, train_files), parse_files(task, val_files)
