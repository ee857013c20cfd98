"""What a Hugging Face ``Trainer`` run means for zo2: the ``zo2`` argument and the mapping
of ``TrainingArguments`` onto zo2's settings.

``TrainingArguments`` keep their meaning where ZO has one: ``learning_rate`` and its
scheduler (``lr_scheduler_type``, ``warmup_steps`` / ``warmup_ratio``, through the
Trainer's own scheduler), ``weight_decay`` (decoupled, as zo2's), ``adam_beta1`` /
``adam_beta2`` / ``adam_epsilon`` (``method="zo-adam"``), ``seed`` (the perturbation
stream; the data order stays the Trainer's), ``per_device_train_batch_size`` and
``gradient_accumulation_steps``: the micro-batches of one optimizer step form one larger
batch, each perturbation's loss is their mean over all their labelled tokens, and one
update is made (never one update per micro-batch).

What ZO has no use for is refused with one line saying what zo2 does instead (fp16
mixed precision and its gradient scaler, ``optim`` names, DeepSpeed ZeRO, FSDP, several
GPUs in one process, label smoothing, ``torch_compile``). Ignored: ``max_grad_norm`` > 0
(no gradient to clip; a warning unless it is the default), ``bf16`` autocast (a warning:
the steps run in the model's dtype) and ``gradient_checkpointing`` (no backward pass).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zo2.config import GuardConfig, OffloadConfig, OptimConfig, ParallelConfig
from zo2.errors import ConfigError

log = logging.getLogger("zo2")

#: OptimConfig fields that TrainingArguments own: field -> the argument to set instead.
FROM_TRAINING_ARGUMENTS = {
    "lr": "learning_rate", "schedule": "lr_scheduler_type", "warmup_steps": "warmup_steps",
    "min_lr_ratio": "lr_scheduler_type / lr_scheduler_kwargs", "weight_decay": "weight_decay",
    "batch_size": "per_device_train_batch_size", "beta1": "adam_beta1",
    "beta2": "adam_beta2", "adam_eps": "adam_epsilon",
}


@dataclass
class ZOArguments:
    """zo2's own settings of a ``ZOTrainer`` run (the defaults are ``zo2-train``'s).

    The estimator and update rule (:class:`~zo2.config.OptimConfig`'s fields less those
    ``TrainingArguments`` own, see :data:`FROM_TRAINING_ARGUMENTS`), ``trainable`` (glob
    patterns over parameter names; None: the parameters that require grad, as an
    optimizer would see them), ``offload``, ``parallel`` and ``guard`` (the divergence
    guard, :class:`~zo2.config.GuardConfig`: ``factor``, ``window``, ``margin``; dicts or
    configs).
    """

    method: str = "zo-sgd"
    eps: float = 1e-3
    estimator: str = "two-sided"
    q: int = 1
    direction: str = "gaussian"
    rounding: str = "nearest"
    momentum: float = 0.9
    history: int = 0
    state_dtype: str = "float32"
    conservative: bool = False
    sparsity: float = 0.0  # sparse / low-rank / HiZOO directions (zo2.directions)
    rank: int = 0
    hessian: str = "none"
    hessian_smooth: float = 1e-8
    clip_grad: float = 0.0  # quantized bases (zo2.quantized)
    scale_floor: float = 1e-8
    trainable: tuple[str, ...] | None = None
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # dp=-1: every rank of the launch is data parallel
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp=-1))
    guard: GuardConfig = field(default_factory=GuardConfig)  # factor=0: off

    def __post_init__(self) -> None:
        if isinstance(self.offload, Mapping):
            self.offload = _section(OffloadConfig, self.offload, "zo2['offload']")
        if isinstance(self.parallel, Mapping):
            self.parallel = _section(ParallelConfig, self.parallel, "zo2['parallel']")
        if isinstance(self.guard, Mapping):
            self.guard = _section(GuardConfig, self.guard, "zo2['guard']")
        if self.trainable is not None:
            self.trainable = tuple(self.trainable)

    @classmethod
    def of(cls, value: ZOArguments | Mapping[str, Any] | None) -> ZOArguments:
        """``value`` as ZOArguments: itself, a dict of its fields, or None (the defaults);
        a key that TrainingArguments own, or no key at all, is a ConfigError."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"zo2: expected ZOArguments or a dict, got {type(value).__name__}")
        for key in value:
            if key == "lr" and value[key] == "auto":
                raise ConfigError("zo2['lr']='auto': the lr probe is zo2-train's "
                                  "(optim.lr=auto, zo2.trainer.Trainer); a ZOTrainer takes "
                                  "its lr from TrainingArguments (learning_rate)")
            if key in FROM_TRAINING_ARGUMENTS:
                raise ConfigError(f"zo2[{key!r}]: set it in TrainingArguments "
                                  f"({FROM_TRAINING_ARGUMENTS[key]}), not in zo2")
        return _section(cls, value, "zo2")

    def optim(self, args: Any, global_batch: int) -> OptimConfig:
        """The OptimConfig of a run with TrainingArguments ``args``: the learning rate is
        scheduled by the Trainer (``schedule`` stays constant here)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)
               if hasattr(self, f.name)}
        return OptimConfig(**own, lr=args.learning_rate, weight_decay=args.weight_decay,
                           beta1=args.adam_beta1, beta2=args.adam_beta2,
                           adam_eps=args.adam_epsilon, batch_size=global_batch)


def _section(kind: type, values: Mapping[str, Any], where: str):
    """``kind(**values)``, or a ConfigError naming ``where`` and the unknown keys."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    return kind(**values)


def _default(args: Any, name: str) -> Any:
    """The dataclass default of TrainingArguments field ``name``."""
    spec = {f.name: f for f in dataclasses.fields(type(args))}[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING \
        else spec.default


def _name(value: Any) -> str:
    """An enum's value (TrainingArguments turn names into enums), else ``value``."""
    return getattr(value, "value", value)


def check_training_arguments(args: Any) -> None:
    """Refuse what ZO has no use for, each with one line saying what zo2 does instead."""
    optim = _name(args.optim)
    lr = args.learning_rate
    refusals = [
        (isinstance(lr, bool) or not isinstance(lr, (int, float)), f"learning_rate="
         f"{lr!r}: a float (the lr probe, optim.lr=auto, is zo2-train's only)"),
        (args.fp16, "fp16 mixed precision: ZO has no backward pass and no gradient to "
         "scale; load the model in the dtype to train in (e.g. dtype=torch.bfloat16) and "
         "leave fp16 off"),
        (optim != _name(_default(args, "optim")), f"optim={optim!r}: zo2 replaces the "
         "optimizer; choose its update rule with zo2={'method': 'zo-sgd' | 'zo-momentum' | "
         "'zo-adam' | 'zo-sign'}"),
        (bool(args.deepspeed), "deepspeed: ZeRO shards gradients and optimizer states, which "
         "ZO does not have; to fit a large model stream its weights with "
         "zo2={'offload': {'enabled': True}}"),
        (bool(args.fsdp), "fsdp: ZO keeps no gradients or optimizer states to shard; use "
         "zo2={'offload': {'enabled': True}} for memory and zo2={'parallel': {...}} to split "
         "the work"),
        (args.n_gpu > 1, f"{args.n_gpu} GPUs in one process (DataParallel): launch one "
         "process per GPU with torchrun; zo2 splits the batch or the perturbations over them"),
        (args.label_smoothing_factor > 0, "label_smoothing_factor: zo2's loss is the plain "
         "next-token cross-entropy of the labels"),
        (bool(args.torch_compile), "torch_compile: zo2 runs the model's own forward "
         "(its units are wrapped for the perturbations)"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(f"TrainingArguments: {message}")
    if args.bf16:  # TRL's SFTConfig turns it on by default
        log.warning("TrainingArguments.bf16: zo2's steps run in the model's own dtype, not "
                    "under autocast; load the model in bfloat16 to train in bf16")
    if args.max_grad_norm and args.max_grad_norm > 0:
        say = log.info if args.max_grad_norm == _default(args, "max_grad_norm") else log.warning
        say("TrainingArguments.max_grad_norm=%s has no effect with ZO: there is no "
                    "gradient to clip (set max_grad_norm=0 to silence this)",
                    args.max_grad_norm)
