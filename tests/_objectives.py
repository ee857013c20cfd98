"""Objectives for tests."""

from __future__ import annotations

from zo2.loss import Objective


class Ascent(Objective):
    """The negated loss: an engine that descends it ascends the real one.

    "A rule lowers the loss" is checked against the same rule run on this: the descent
    must end below the start and the ascent above it. The evaluation is deterministic
    (a rule that does nothing, or lr=0, leaves the weights and so the loss bit-identical),
    so no margin is needed; steps uncorrelated with the gradient would pass each
    comparison only by chance (about 1/2 each).
    """

    def loss(self, logits, labels):
        return -super().loss(logits, labels)
