"""MeZO's generation tasks, SQuAD and DROP, as :class:`AnswerExample` s.

SQuAD: ``Title: ...\\nContext: ...\\nQuestion: ...\\nAnswer:``; DROP (no titles):
``Passage: ...\\nQuestion: ...\\nAnswer:``. The answer follows after a space.
SQuAD rows come flattened (Hugging Face's ``context`` / ``question`` /
``answers.text``; :mod:`~zo2.data.mezo.records` flattens the official nested JSON the
same way); DROP rows are Hugging Face's ``passage`` / ``question`` /
``answers_spans.spans``.
"""

from __future__ import annotations

from typing import Any

from zo2.data.examples import AnswerExample
from zo2.data.mezo.records import need
from zo2.errors import DataError


def _answers(row: dict[str, Any], field: str, where: str) -> tuple[str, ...]:
    values = need(row, field, where, list)
    answers = tuple(a.strip() for a in values if isinstance(a, str) and a.strip())
    if not answers:
        raise DataError(f"{where}: field {field!r} holds no non-empty answer text")
    return answers


def squad(where: str, row: dict[str, Any]) -> list[AnswerExample]:
    title = row.get("title") or ""
    context, question = need(row, "context", where, str), need(row, "question", where, str)
    prompt = f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:"
    return [AnswerExample(prompt, _answers(row, "answers.text", where))]


def drop(where: str, row: dict[str, Any]) -> list[AnswerExample]:
    passage, question = need(row, "passage", where, str), need(row, "question", where, str)
    prompt = f"Passage: {passage}\nQuestion: {question.strip()}\nAnswer:"
    return [AnswerExample(prompt, _answers(row, "answers_spans.spans", where))]
