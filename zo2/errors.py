"""Errors that end a run with one clear message.

Every failure caused by user input (a config value, a model path, a data file, a
checkpoint) raises a subclass of :class:`ZO2Error`. The command-line entry point
prints ``error: <message>`` for these and exits with status 2 instead of showing
a traceback; anything else is a bug and keeps its traceback.
"""


class ZO2Error(Exception):
    """Base class of user-facing errors; the message names the cause."""


class ConfigError(ZO2Error):
    """A config key is unknown, ill-typed or outside its allowed values."""


class ModelError(ZO2Error):
    """A model is missing, unreadable, or not a decoder-only causal LM."""


class DataError(ZO2Error):
    """A dataset file is missing, empty or malformed."""


class CheckpointError(ZO2Error):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class TrainingError(ZO2Error):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class DistributedError(ZO2Error):
    """Another rank died, hung longer than the timeout, or diverged."""
