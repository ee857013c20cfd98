"""Your own labelled rows (``data.format=classification|choice``) as a task scored by accuracy.

* ``classification`` -- the prompt is ``data.template`` with the row's fields filled in
  (``str.format`` placeholders: ``"{premise} Question: {hypothesis}?"``; default
  ``"{text}"``); the row's ``data.label_field`` (default ``label``) names its class.
  ``data.labels`` maps each label, as written in the data (``0``, ``"pos"``...), to the
  word or words that answer it (``{"0": "terrible", "1": "great"}``; any number of labels,
  any number of tokens per word). With no mapping, the labels are the distinct values of
  the training rows, sorted, each answered by itself.
* ``choice`` -- the prompt is ``data.template`` (default ``"{prompt}"``); the row's
  ``choices`` are its candidate answers (a list of two or more strings) and its label
  field the right one, by index or by its text.

An answer follows its prompt after one space unless one of them already has whitespace
there. Training and evaluation follow MeZO's "train as classification": when every
label word is one token and the first tokens differ, the loss is the cross-entropy over
the label words' logits after the prompt (one forward per row, objective
``label_words``); otherwise (several tokens, or ``choice``), the cross-entropy over the
candidates' scores, each its mean token log-likelihood after the prompt (one row per
candidate, objective ``choice``, as MeZO scores COPA). For one-token words the two are
the same loss: a candidate's score is then its log-softmax over the vocabulary, and a
softmax over those is the softmax over the candidates' logits. Accuracy is the share of
rows whose right answer scores highest.

A prompt too long for ``data.max_length`` loses its left end (the question at its end and
the answers survive). Problems in a row are one :class:`~zo2.errors.DataError` line naming
the source, the row and the field: a placeholder the row lacks, a label outside the set, a
choice list that is not two or more non-empty strings.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from zo2.config import DataConfig
from zo2.data.batching import text_ids
from zo2.data.examples import ChoiceExample
from zo2.data.formats import RowAt, field_of
from zo2.data.sources import Example
from zo2.data.tasks import TaskSpec
from zo2.errors import ConfigError

LABELLED = ("classification", "choice")
DEFAULT_TEMPLATES = {"classification": "{text}", "choice": "{prompt}"}


def template_fields(template: str) -> list[str]:
    """The field names of ``template``'s placeholders (ConfigError if it has none or is
    malformed)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"data.template {template!r}: {exc}") from None
    if not names or any(not name.isidentifier() for name in names):
        raise ConfigError(f"data.template {template!r} needs placeholders naming row fields, "
                          "like '{text}' (a literal brace is written '{{' or '}}')")
    return names


def _prompt(row: Mapping, template: str, fields: list[str], at: RowAt) -> str:
    values = {}
    for name in fields:
        value = field_of(row, name, at)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise at.error(name, f"expected a string or a number, got {type(value).__name__}")
        values[name] = value
    return template.format(**values)


def _joined(word: str) -> str:
    """A continuation as it follows a prompt that ends without whitespace."""
    return word if word[:1].isspace() else " " + word


def _label_key(value: Any, field: str, at: RowAt) -> str:
    """A label as written in the data, as the key of ``data.labels``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise at.error(field, f"expected a label (a string or an integer), got "
                       f"{type(value).__name__} {value!r:.40}")
    return str(value)


class _Classes:
    """The label set: label (as written) -> index, and each index's words."""

    def __init__(self, cfg: DataConfig, train_rows: Sequence[Mapping], source: str) -> None:
        if cfg.labels:
            self.keys = [str(k) for k in cfg.labels]
            self.words = tuple(_joined(str(w)) for w in cfg.labels.values())
        else:
            keys = {_label_key(field_of(row, cfg.label_field, RowAt(source, i)),
                               cfg.label_field, RowAt(source, i))
                    for i, row in enumerate(train_rows)}
            self.keys = sorted(keys)
            self.words = tuple(_joined(k) for k in self.keys)
        if len(self.keys) < 2:
            raise ConfigError(f"data.labels: a classification needs at least 2 labels, got "
                              f"{self.keys} (set data.labels or give rows of 2+ labels)")
        self.index = {key: i for i, key in enumerate(self.keys)}

    def of(self, row: Mapping, field: str, at: RowAt) -> int:
        key = _label_key(field_of(row, field, at), field, at)
        if key not in self.index:
            raise at.error(field, f"unknown label {key!r} (labels: {', '.join(self.keys)})")
        return self.index[key]


def _choices(row: Mapping, at: RowAt) -> tuple[str, ...]:
    value = field_of(row, "choices", at)
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2
            or any(not isinstance(c, str) or not c.strip() for c in value)):
        raise at.error("choices", f"expected a list of 2 or more non-empty strings, got "
                       f"{value!r:.60}")
    return tuple(_joined(c) for c in value)


def _choice_label(row: Mapping, field: str, choices: tuple[str, ...], raw: Sequence[str],
                  at: RowAt) -> int:
    value = field_of(row, field, at)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    if isinstance(value, str) and value in raw:
        return list(raw).index(value)
    raise at.error(field, f"expected the index (0..{len(choices) - 1}) or the text of the "
                   f"right choice, got {value!r:.40}")


class LabelledRows:
    """Rows of a labelled format turned into :class:`Example` / :class:`ChoiceExample`."""

    def __init__(self, cfg: DataConfig, train_rows: Sequence[Mapping], tokenizer: Any,
                 source: str) -> None:
        if cfg.format not in LABELLED:
            raise ConfigError(f"data.format {cfg.format!r} is not one of {', '.join(LABELLED)}")
        self.cfg = cfg
        self.template = cfg.template or DEFAULT_TEMPLATES[cfg.format]
        self.fields = template_fields(self.template)
        self.classes = _Classes(cfg, train_rows, source) if cfg.format == "classification" \
            else None
        self.spec = self._spec(tokenizer)

    def _spec(self, tokenizer: Any) -> TaskSpec:
        if self.classes is None:
            return TaskSpec("data", "{text}", (), (), kind="choice")
        words = self.classes.words
        firsts = [text_ids(tokenizer, w) for w in words]
        one_token = all(len(ids) == 1 for ids in firsts) and len({ids[0] for ids in firsts}) \
            == len(firsts)
        if one_token:
            return TaskSpec("data", "{text}", words, tuple(self.classes.keys))
        return TaskSpec("data", "{text}", (), (), kind="choice")

    def label(self, row: Mapping, index: int, source: str) -> int:
        """A row's label index (choice: the right choice's index)."""
        at = RowAt(source, index)
        if self.classes is not None:
            return self.classes.of(row, self.cfg.label_field, at)
        raw = field_of(row, "choices", at)
        return _choice_label(row, self.cfg.label_field, _choices(row, at), raw, at)

    def examples(self, rows: Sequence[Mapping], indices: Sequence[int], source: str
                 ) -> list[Example | ChoiceExample]:
        """The examples of ``rows[i]`` for ``i`` in ``indices``."""
        return [self.example(rows[i], i, source) for i in indices]

    def example(self, row: Mapping, index: int, source: str) -> Example | ChoiceExample:
        at = RowAt(source, index)
        if not isinstance(row, Mapping):
            raise at.error(None, f"expected a mapping of fields, got {type(row).__name__}")
        prompt = _prompt(row, self.template, self.fields, at)
        label = self.label(row, index, source)
        if self.spec.kind == "label_words":
            return Example(prompt, label)
        choices = self.classes.words if self.classes is not None else _choices(row, at)
        return ChoiceExample(prompt, choices, label)
