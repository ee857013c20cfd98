"""Datasets for MeZO-style prompted classification: sources, k-shot tasks and batching."""

from zo2.data.batching import BatchIterator, encode, label_word_ids
from zo2.data.sources import Example
from zo2.data.tasks import TASK_NAMES, Task, TaskSpec, kshot_split, load_task

__all__ = [
    "BatchIterator",
    "Example",
    "TASK_NAMES",
    "Task",
    "TaskSpec",
    "encode",
    "kshot_split",
    "label_word_ids",
    "load_task",
]
