"""Losses over the labelled positions of a batch, computed outside the model.

Batches follow the Hugging Face causal-LM convention: ``labels`` (B, T) holds the
target token of each position and -100 where there is none; logits at position
``t`` predict ``labels[:, t+1]``. Only the columns that carry a label need logits,
so the engine asks the model for the last ``k`` positions (``logits_to_keep``) and
the loss never materialises (2B, T, V) logits for a classification task.

Two objectives:

* ``"label_words"`` (MeZO's train-as-classification): cross-entropy over the logits
  of the candidate label words only, at the labelled positions.
* ``"lm"``: ordinary next-token cross-entropy over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zo2.errors import ConfigError

OBJECTIVES = ("label_words", "lm")


def positions_to_keep(labels: torch.Tensor) -> int:
    """Number of trailing positions whose logits the loss needs (>= 2)."""
    labelled = (labels != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        raise ValueError("batch has no labelled position (all labels are -100)")
    first = max(int(labelled[0]), 1)
    return labels.shape[1] - first + 1


def _aligned(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits that predict something, their targets), both over the kept positions."""
    k = logits.shape[1]
    return logits[:, :-1], labels[:, labels.shape[1] - k + 1:]


@dataclass
class Objective:
    """A loss and its accuracy over labelled positions; ``candidates`` for label words."""

    kind: str = "label_words"
    candidates: torch.Tensor | None = None  # (C,) token ids of the label words

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"objective={self.kind!r} is not one of {list(OBJECTIVES)}")
        if self.kind == "label_words" and self.candidates is None:
            raise ConfigError("objective 'label_words' needs the label words' token ids")

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
        """Mean cross-entropy over the labelled positions (a 0-dim float32 tensor)."""
        scores, targets = self._restricted(logits, labels)
        return F.cross_entropy(scores, targets)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """(number of labelled positions predicted right, number of labelled positions)."""
        scores, targets = self._restricted(logits, labels)
        return int((scores.argmax(dim=1) == targets).sum()), int(targets.numel())
