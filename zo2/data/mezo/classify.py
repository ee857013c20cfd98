"""MeZO's classification tasks: each release row becomes prompt-prefix :class:`Example` s.

``Example.text`` is the whole filled prompt, up to where the label word follows; the
label word is a task's ``label_words[label]``. The prompts are MeZO's (its paper's
appendix): after a newline the label word has no leading space, after text it has one.
Each parser takes ``(where, row)`` and returns a list (MultiRC gives one example per
candidate answer of each question).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zo2.data.mezo.records import need
from zo2.data.sources import Example
from zo2.errors import DataError

BINARY = ("false", "true")
RTE_LABELS = ("entailment", "not_entailment")
CB_LABELS = ("entailment", "contradiction", "neutral")


def label_index(value: Any, names: Sequence[str], where: str, field: str = "label") -> int:
    """The index of a label given as a name, a JSON boolean (for false/true sets) or an index."""
    if isinstance(value, bool) and tuple(names) == BINARY:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in names:
            return names.index(text)
        if text.isdigit() and int(text) < len(names):
            return int(text)
    raise DataError(f"{where}: field {field!r} has {value!r}, not one of "
                    f"{', '.join(names)} or 0..{len(names) - 1}")


def _first(row: dict[str, Any], fields: Sequence[str], where: str) -> str:
    """The first of ``fields`` present (nested SuperGLUE name, then a flattened one)."""
    for name in fields[:-1]:
        try:
            return need(row, name, where, str)
        except DataError:
            continue
    return need(row, fields[-1], where, str)


def sst2(where: str, row: dict[str, Any]) -> list[Example]:
    text = need(row, "sentence", where, str).strip()
    return [Example(f"{text} It was", label_index(need(row, "label", where), ("0", "1"), where))]


def rte(where: str, row: dict[str, Any]) -> list[Example]:
    premise, hypothesis = need(row, "premise", where, str), need(row, "hypothesis", where, str)
    prompt = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
    return [Example(prompt, label_index(need(row, "label", where), RTE_LABELS, where))]


def cb(where: str, row: dict[str, Any]) -> list[Example]:
    premise, hypothesis = need(row, "premise", where, str), need(row, "hypothesis", where, str)
    prompt = f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
    return [Example(prompt, label_index(need(row, "label", where), CB_LABELS, where))]


def boolq(where: str, row: dict[str, Any]) -> list[Example]:
    """MeZO's BoolQ prompt for OPT: the question capitalised, with one question mark,
    on the passage's line, and the answer word on the next line."""
    passage, question = need(row, "passage", where, str), need(row, "question", where, str)
    question = question if question.endswith("?") else question + "?"
    question = question[:1].upper() + question[1:]
    return [Example(f"{passage} {question}\n",
                    label_index(need(row, "label", where), BINARY, where))]


def wic(where: str, row: dict[str, Any]) -> list[Example]:
    word = need(row, "word", where, str)
    first, second = need(row, "sentence1", where, str), need(row, "sentence2", where, str)
    prompt = (f'Does the word "{word}" have the same meaning in these two sentences? '
              f"Yes, No?\n{first}\n{second}\n")
    return [Example(prompt, label_index(need(row, "label", where), BINARY, where))]


def wsc(where: str, row: dict[str, Any]) -> list[Example]:
    text = need(row, "text", where, str)
    noun = _first(row, ("target.span1_text", "span1_text"), where)
    pronoun = _first(row, ("target.span2_text", "span2_text"), where)
    prompt = (f'{text}\nIn the previous sentence, does the pronoun "{pronoun.lower()}" '
              f"refer to {noun}? Yes or No?\n")
    return [Example(prompt, label_index(need(row, "label", where), BINARY, where))]


def _multirc_prompt(paragraph: str, question: str, answer: str) -> str:
    return (f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". '
            "Is that correct? Yes or No?\n")


def multirc(where: str, row: dict[str, Any]) -> list[Example]:
    """SuperGLUE's nested passage (every question's every answer), or a flattened row."""
    if not isinstance(row.get("passage"), dict):  # Hugging Face: one row per answer
        prompt = _multirc_prompt(need(row, "paragraph", where, str),
                                 need(row, "question", where, str), need(row, "answer", where, str))
        return [Example(prompt, label_index(need(row, "label", where), BINARY, where))]
    paragraph = need(row, "passage.text", where, str)
    examples = []
    for i, qa in enumerate(need(row, "passage.questions", where, list)):
        here = f"{where}: passage.questions[{i}]"
        question = need(qa, "question", here, str)
        for j, answer in enumerate(need(qa, "answers", here, list)):
            there = f"{here}.answers[{j}]"
            prompt = _multirc_prompt(paragraph, question, need(answer, "text", there, str))
            examples.append(Example(prompt, label_index(need(answer, "label", there), BINARY,
                                                        there)))
    return examples
