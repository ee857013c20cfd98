"""Example records of the tasks that are not plain label-word classification.

* :class:`ChoiceExample`: a context and candidate continuations, one of them right
  (COPA, ReCoRD), scored by each candidate's log-likelihood;
* :class:`AnswerExample`: a prompt and its gold answers (SQuAD, DROP), trained on
  the first answer's tokens and evaluated by generation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceExample:
    """``context`` followed by each of ``candidates``; ``candidates[label]`` is right."""

    context: str
    candidates: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class AnswerExample:
    """A prompt ending where the answer starts; any of ``answers`` counts as right."""

    prompt: str
    answers: tuple[str, ...]

    @property
    def target(self) -> str:
        """The continuation trained on: a space and the first gold answer."""
        return " " + self.answers[0]
