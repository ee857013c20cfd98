"""MeZO's multiple-choice tasks, COPA and ReCoRD, as :class:`ChoiceExample` s.

COPA: the premise without its final full stop, then " so" (effect) or " because"
(cause); each choice, first letter lowered, is a candidate continuation.
ReCoRD: the passage with its ``@highlight`` lines as "- " bullets, then a new bullet;
each candidate is the query with ``@placeholder`` replaced by one of the passage's
entities (unique, in order of appearance).
"""

from __future__ import annotations

from typing import Any

from zo2.data.examples import ChoiceExample
from zo2.data.mezo.classify import label_index
from zo2.data.mezo.records import need
from zo2.errors import DataError


def _lower_first(text: str) -> str:
    """The choice continues the sentence: its first word lower-cased, except "I"."""
    first, _, rest = text.partition(" ")
    first = first if first == "I" else first.lower()
    return f"{first} {rest}" if rest else first


def copa(where: str, row: dict[str, Any]) -> list[ChoiceExample]:
    premise = need(row, "premise", where, str).strip()
    question = need(row, "question", where, str)
    if question not in ("cause", "effect"):
        raise DataError(f"{where}: field 'question' is {question!r}, not 'cause' or 'effect'")
    connector = "so" if question == "effect" else "because"
    choices = (need(row, "choice1", where, str), need(row, "choice2", where, str))
    premise = premise[:-1] if premise.endswith(".") else premise
    return [ChoiceExample(f"{premise} {connector}",
                          tuple(" " + _lower_first(c.strip()) for c in choices),
                          label_index(need(row, "label", where), ("0", "1"), where))]


def _entities(passage: str, spans: list, where: str) -> list[str]:
    """The entity strings of SuperGLUE's inclusive ``start``/``end`` spans, unique, in order."""
    names: list[str] = []
    for i, span in enumerate(spans):
        here = f"{where}: passage.entities[{i}]"
        start, end = need(span, "start", here, int), need(span, "end", here, int)
        if not 0 <= start <= end < len(passage):
            raise DataError(f"{here}: span {start}..{end} is outside the passage")
        name = passage[start : end + 1]
        if name not in names:
            names.append(name)
    return names


def _record_example(passage: str, query: str, entities: list[str], answers: list[str],
                    where: str) -> ChoiceExample:
    if "@placeholder" not in query:
        raise DataError(f"{where}: field 'query' has no @placeholder")
    unique = list(dict.fromkeys(entities))
    gold = [i for i, name in enumerate(unique) if name in answers]
    if not gold:
        raise DataError(f"{where}: no answer ({answers!r:.80}) is one of the passage's entities")
    context = passage.replace("@highlight\n", "- ") + "\n-"
    candidates = tuple(" " + query.replace("@placeholder", name) for name in unique)
    return ChoiceExample(context, candidates, gold[0])


def record(where: str, row: dict[str, Any]) -> list[ChoiceExample]:
    """SuperGLUE's nested row (one example per query), or Hugging Face's flattened one."""
    if isinstance(row.get("passage"), str):
        entities = need(row, "entities", where, list)
        return [_record_example(row["passage"], need(row, "query", where, str), entities,
                                need(row, "answers", where, list), where)]
    passage = need(row, "passage.text", where, str)
    entities = _entities(passage, need(row, "passage.entities", where, list), where)
    examples = []
    for i, qa in enumerate(need(row, "qas", where, list)):
        here = f"{where}: qas[{i}]"
        answers = [need(a, "text", f"{here}.answers[{j}]", str)
                   for j, a in enumerate(need(qa, "answers", here, list))]
        examples.append(_record_example(passage, need(qa, "query", here, str), entities,
                                        answers, here))
    return examples
