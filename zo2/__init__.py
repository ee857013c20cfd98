"""zo2: distributed zeroth-order fine-tuning of large language models.

Public API::

    from zo2 import ZOEngine, OptimConfig, Objective

    engine = ZOEngine(model, OptimConfig(lr=1e-4, eps=1e-3), Objective("lm"))
    result = engine.step(batch)        # loss and projected gradient(s); no autograd
    metrics = engine.evaluate(batches)
    engine.save("out/")                # a save_pretrained folder + engine state
"""

from zo2.config import ModelConfig, OptimConfig, TaskConfig, TrainConfig
from zo2.engine import StepResult, ZOEngine
from zo2.errors import CheckpointError, ConfigError, DataError, ModelError, ZO2Error
from zo2.loss import Objective

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ModelConfig", "ModelError", "Objective",
    "OptimConfig", "StepResult", "TaskConfig", "TrainConfig", "ZO2Error", "ZOEngine",
    "__version__",
]
