"""The divergence guard: a run whose loss climbs far above where it started stops, loudly.

The default learning rate is tuned on the embedded model; a user's model is not the
embedded model, and ZO at too large a step does not fail, it drifts: the loss climbs, the
projected gradients grow, and without a guard the run goes on to its last step.

Rule (``guard.factor`` > 0): the reference is the first step's loss, the loss of the
initial weights on the first batch (measured before any update). From step
``guard.window`` on, the run has diverged when the mean loss of the last ``window`` steps
is above both ``factor`` times the reference and the reference plus ``guard.margin`` nats
(the margin keeps a run that starts near zero loss from stopping on noise). A dev
evaluation is *sane* when its loss is not above the same bound over the zero-shot dev
loss; ``best/`` is never an insane one, whatever metric picks it.

Checkpoints: the loss of step ``s`` is that of the weights after step ``s - 1``, so the
checkpoint of step ``s - 1`` is the last whose weights were seen within the bound when the
loss of step ``s`` leaves it (``left_at``). No checkpoint is written while the latest loss
is out of bounds, and a diverged run names the newest checkpoint before ``left_at - 1``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class DivergenceGuard:
    """Watches the training losses of a run (``factor`` 0: never stops it)."""

    factor: float = 4.0
    window: int = 5
    margin: float = 1.0
    first: float | None = None
    recent: deque = field(default_factory=deque)
    left_at: int | None = None  # the first step whose loss was above the bound
    out_of_bounds: bool = False  # the latest loss is

    def bound(self, reference: float) -> float:
        """The loss above which a run that started at ``reference`` has diverged."""
        return max(self.factor * reference, reference + self.margin)

    def observe(self, step: int, loss: float) -> float | None:
        """Record step ``step``'s finite loss; the running mean if the run has diverged,
        else None."""
        if not self.factor:
            return None
        if self.first is None:
            self.first = loss
        self.out_of_bounds = loss > self.bound(self.first)
        if self.out_of_bounds and self.left_at is None:
            self.left_at = step
        self.recent.append(loss)
        while len(self.recent) > self.window:
            self.recent.popleft()
        if len(self.recent) < self.window:
            return None
        mean = sum(self.recent) / len(self.recent)
        return mean if mean > self.bound(self.first) else None

    def sane(self, loss: float, zero_shot: float | None) -> bool:
        """Whether a dev loss is within the bound over the zero-shot dev loss."""
        return not self.factor or zero_shot is None or loss <= self.bound(zero_shot)

    def sane_checkpoint(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` holds weights seen within the bound."""
        return self.left_at is None or step < self.left_at - 1

    def state_dict(self) -> dict:
        return {"first": self.first, "recent": list(self.recent), "left_at": self.left_at,
                "out_of_bounds": self.out_of_bounds}

    def load_state_dict(self, state: dict) -> None:
        self.first = state.get("first")
        self.recent = deque(state.get("recent", []))
        self.left_at = state.get("left_at")
        self.out_of_bounds = bool(state.get("out_of_bounds", False))
