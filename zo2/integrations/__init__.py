"""zo2 inside the Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (their loops, zo2's steps).

``ZOTrainer`` and ``ZOArguments`` import with transformers; ``ZOSFTTrainer`` needs TRL
(``pip install trl``) and is imported on first use.
"""

from zo2.integrations.arguments import ZOArguments
from zo2.integrations.trainer import ZOOptimizer, ZOTrainer, ZOTrainerMixin

__all__ = ["ZOArguments", "ZOOptimizer", "ZOSFTTrainer", "ZOTrainer", "ZOTrainerMixin"]


def __getattr__(name: str):
    if name == "ZOSFTTrainer":
        from zo2.integrations.trl import ZOSFTTrainer

        return ZOSFTTrainer
    raise AttributeError(f"module 'zo2.integrations' has no attribute {name!r}")
