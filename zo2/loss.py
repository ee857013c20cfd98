"""Losses over the labelled positions of a batch, computed outside the model.

Batches follow the Hugging Face causal-LM convention: ``labels`` (B, T) holds the
target token of each position and -100 where there is none; logits at position
``t`` predict ``labels[:, t+1]``. Only the columns that carry a label need logits,
so the engine asks the model for the last ``k`` positions (``logits_to_keep``, as an
index: :func:`last_positions`) and
the loss never materialises (2B, T, V) logits for a classification task.

Three objectives:

* ``"label_words"`` (MeZO's train-as-classification): cross-entropy over the logits
  of the candidate label words only, at the labelled positions.
* ``"lm"``: ordinary next-token cross-entropy over the whole vocabulary.
* ``"choice"`` (MeZO's multiple choice as classification, COPA / ReCoRD): the batch
  holds ``choices`` consecutive rows per example, one candidate continuation each,
  the right one first, padding rows (no label) after the real candidates
  (:func:`zo2.data.continuations.encode_choices`). A row's score is its candidate's
  log-likelihood (mean over its tokens with ``length_normalised``, else the sum; -inf
  for a padding row); the loss is cross-entropy over each example's scores and an
  example is right when its first candidate scores strictly highest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zo2.choices import OBJECTIVES
from zo2.errors import ConfigError


def positions_to_keep(labels: torch.Tensor) -> int:
    """Number of trailing positions whose logits the loss needs (>= 2)."""
    labelled = (labels != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        raise ValueError("batch has no labelled position (all labels are -100)")
    first = max(int(labelled[0]), 1)
    return labels.shape[1] - first + 1


def last_positions(ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The last ``keep`` positions of ``ids`` as an index, for ``logits_to_keep``.

    An int makes transformers slice the hidden states ``[:, -keep:]``, a strided view,
    and torch.matmul of such a view with a frozen LM head expands the weight into a
    batch of copies (batch x vocab x hidden: 0.9 GB in bf16 for SmolLM2 at batch 16)
    for bmm. An index gathers the rows into a contiguous tensor: one mm, with the
    logits of a full forward, bit for bit."""
    seq = ids.shape[1]
    return torch.arange(seq - keep, seq, device=ids.device)


def _aligned(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits that predict something, their targets), both over the kept positions."""
    k = logits.shape[1]
    return logits[:, :-1], labels[:, labels.shape[1] - k + 1:]


@dataclass
class Objective:
    """A loss and its accuracy over labelled positions; ``candidates`` for label words."""

    kind: str = "label_words"
    candidates: torch.Tensor | None = None  # (C,) token ids of the label words
    choices: int = 0  # "choice": rows per example (candidates, padded to a fixed count)
    length_normalised: bool = True  # "choice": mean token log-likelihood, else the sum

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"objective={self.kind!r} is not one of {list(OBJECTIVES)}")
        if self.kind == "label_words" and self.candidates is None:
            raise ConfigError("objective 'label_words' needs the label words' token ids")
        if self.kind == "choice" and self.choices < 2:
            raise ConfigError(f"objective 'choice' needs choices >= 2, got {self.choices}")

    def _choice_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each candidate row's log-likelihood, (examples, choices); -inf for padding rows."""
        logits, targets = _aligned(logits, labels)  # (R, k-1, V), (R, k-1)
        if targets.shape[0] % self.choices:
            raise ValueError(f"{targets.shape[0]} rows are not groups of {self.choices}")
        mask = targets != -100
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (R, k-1)
        total = (token * mask).sum(dim=1)
        count = mask.sum(dim=1)
        score = total / count.clamp(min=1) if self.length_normalised else total
        score = score.masked_fill(count == 0, float("-inf"))
        return score.view(-1, self.choices)

    def _restricted(self, logits: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (M, C or V) and target indices (M,) at the labelled positions."""
        logits, targets = _aligned(logits, labels)
        mask = targets != -100
        logits, targets = logits[mask].float(), targets[mask]
        if self.kind == "lm":
            return logits, targets
        cand = self.candidates.to(targets.device)
        match = targets.unsqueeze(1) == cand.unsqueeze(0)  # (M, C)
        if not bool(match.any(dim=1).all()):
            raise ValueError("a label token is not one of the label words")
        return logits[:, cand], match.float().argmax(dim=1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions (a 0-dim float32 tensor);
        for ``choice``, over the examples' candidate scores."""
        if self.kind == "choice":
            scores = self._choice_scores(logits, labels)
            return F.cross_entropy(scores, scores.new_zeros(scores.shape[0], dtype=torch.long))
        scores, targets = self._restricted(logits, labels)
        return F.cross_entropy(scores, targets)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """(number of labelled positions predicted right, number of labelled positions);
        for ``choice``, (examples whose right candidate scores highest, examples)."""
        if self.kind == "choice":
            scores = self._choice_scores(logits, labels)
            right = scores[:, 0] > scores[:, 1:].max(dim=1).values
            return int(right.sum()), int(scores.shape[0])
        scores, targets = self._restricted(logits, labels)
        return int((scores.argmax(dim=1) == targets).sum()), int(targets.numel())
