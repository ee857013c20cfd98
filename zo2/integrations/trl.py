"""TRL's ``SFTTrainer`` with zeroth-order steps: its datasets, formats and losses (text,
prompt / completion, messages; completion-only and assistant-only labels), zo2's steps.

TRL folds its completion and assistant masks into the batch's ``labels`` (-100 where no
loss is taken), which is what zo2's loss reads, so the ZO step trains on exactly the
tokens TRL's own loss would.
"""

from __future__ import annotations

from trl import SFTTrainer

from zo2.integrations.trainer import ZOTrainerMixin


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with zeroth-order steps (:class:`ZOTrainerMixin`); takes the
    ``zo2`` argument besides SFTTrainer's own."""
