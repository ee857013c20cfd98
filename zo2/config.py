"""Typed configuration: dataclasses registered in Hydra's ConfigStore, with validation.

The YAML presets in ``configs/`` (groups ``model/``, ``task/``, ``optim/``) are merged
into these schemas, so an unknown key or an ill-typed value is rejected by OmegaConf
with the full key named; :func:`validate` then checks ranges and allowed values and
raises :class:`~zo2.errors.ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import zo2.configs
from zo2.adapters import AdapterConfig, validate_adapter
from zo2.choices import DIRECTIONS, DTYPES, ESTIMATORS, METHODS, ROUNDINGS, WIRE_DTYPES
from zo2.data.tasks import TASK_NAMES
from zo2.errors import ConfigError
from zo2.loss import OBJECTIVES
from zo2.schedule import SCHEDULES


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and which of its parameters."""

    name: str = "smollm2-135m"  # embedded default, a local HF folder, or tiny-<family>
    dtype: str = "float32"
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    trainable: list[str] = field(default_factory=lambda: ["*"])  # globs over param names
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # LoRA / prefix (peft)


@dataclass
class TaskConfig:
    """The dataset and MeZO's k-shot protocol."""

    name: str = "tweets"  # tweets | drugs | jsonl | csv
    path: str | None = None  # data file for jsonl / csv
    text_field: str | None = None
    label_field: str | None = None
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    max_length: int = 128
    seed: int = 42  # sampling seed of the k-shot split
    balanced: bool = True  # equal label counts in every split (majority baseline = 50%)
    objective: str = "label_words"


@dataclass
class OptimConfig:
    """The ZO estimator and update rule."""

    method: str = "zo-sgd"
    lr: float = 1e-5
    eps: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # decoupled; skips biases and norm weights (ndim < 2)
    direction: str = "gaussian"
    estimator: str = "two-sided"
    q: int = 1  # perturbations per step (n-SPSA)
    batch_size: int = 16
    rounding: str = "nearest"  # update rounding into bf16/fp16 weights: nearest | stochastic
    momentum: float = 0.9  # zo-momentum
    history: int = 0  # zo-momentum: 0 keeps a momentum buffer; k > 0 rebuilds it from k steps
    beta1: float = 0.9  # zo-adam
    beta2: float = 0.999
    adam_eps: float = 1e-8
    state_dtype: str = "float32"  # zo-momentum / zo-adam buffers: float32 | bfloat16
    conservative: bool = False  # keep w, w - lr*g*z or w + lr*g*z, whichever has less loss


@dataclass
class OffloadConfig:
    """ZO2 offloading: units live in host memory (or on disk) and stream through the device.

    ``wire_dtype`` narrower than ``host_dtype`` keeps an fp32 master on the host and
    applies the update there; otherwise the update is applied on the device while the
    unit is resident (one upload and one write-back per unit per step).
    """

    enabled: bool = False
    ring: int = 2  # K device buffers the offloaded units stream through
    layers_only: bool = True  # offload decoder layers only; embeddings, norm, head stay
    resident: list[str] = field(default_factory=list)  # globs over unit names kept resident
    host_dtype: str | None = None  # None: the model's dtype
    wire_dtype: str | None = None  # None: the host dtype
    disk_dir: str | None = None  # memory-map units beyond host_budget_gb from here
    host_budget_gb: float = 0.0  # host memory for units when disk_dir is set
    timing: bool = True  # time transfers with events (telemetry)


@dataclass
class ParallelConfig:
    """DistZO2 parallelism on torch.distributed; ranks come from the launcher (torchrun).

    ``dp x pp`` must equal the world size; ``-1`` for one of them means "the rest".
    """

    dp: int = 1  # data parallel: the batch is split; one loss pair per step is all-reduced
    pp: int = 1  # perturbation parallel: the plan's +eps / -eps slices are split
    slicing: str = "auto"  # offloaded units: each node-local rank uploads 1/N (auto|on|off)
    backend: str = "auto"  # auto: nccl on GPUs, gloo on the CPU
    timeout_s: float = 300.0  # a collective that waits longer fails (dead or hung rank)
    save_timeout_s: float = 1800.0  # ranks wait this long for rank 0 to write a checkpoint
    check_every: int = 50  # steps between cross-rank weight checksums (0: never)


@dataclass
class LoggingConfig:
    """Where a run's metrics go besides ``metrics.jsonl``."""

    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | off
    project: str = "zo2"
    name: str | None = None  # the wandb run name (default: the output directory's name)
    plot: bool = True  # write curves.png (loss, dev accuracy) next to metrics.jsonl


@dataclass
class CheckpointConfig:
    """Periodic run checkpoints (``<output_dir>/checkpoints/step-*``) and resuming."""

    every: int = 50  # steps between checkpoints, and the last step (0: no checkpoints)
    keep: int = 2  # complete checkpoints kept (older ones are deleted after a save)
    resume: str = "auto"  # auto: from the newest valid checkpoint if any | never | a path


@dataclass
class TrainConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = 150
    eval_every: int = 50  # dev evaluation period (0: only before and after)
    eval_batch_size: int = 32
    log_every: int = 10
    seed: int = 0  # seeds the perturbation stream and the batch order
    output_dir: str = ""  # empty: Hydra's run directory
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: bool = True
    nonfinite_limit: int = 20  # steps in a row with a NaN/inf loss before the run stops


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {list(allowed)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ranges and allowed values; raise ConfigError naming the field."""
    m, t, o = cfg.model, cfg.task, cfg.optim
    _require(bool(m.name), "model.name", "must not be empty")
    _one_of(m.dtype, DTYPES, "model.dtype")
    _require(m.device in ("auto", "cpu") or m.device.startswith("cuda"), "model.device",
             f"{m.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
    _require(len(m.trainable) > 0, "model.trainable", "needs at least one pattern")
    validate_adapter(m.adapter, m.trainable)
    _require(t.name in TASK_NAMES, "task.name", f"{t.name!r} is not one of {list(TASK_NAMES)}")
    if t.name in ("jsonl", "csv"):
        _require(bool(t.path), "task.path", f"task {t.name!r} needs a data file path")
    for key in ("n_train", "n_dev", "n_test"):
        _require(getattr(t, key) > 0, f"task.{key}", "must be > 0")
    _require(t.max_length >= 8, "task.max_length", "must be >= 8")
    _one_of(t.objective, OBJECTIVES, "task.objective")
    _one_of(o.method, METHODS, "optim.method")
    _require(o.lr >= 0, "optim.lr", f"must be >= 0, got {o.lr}")
    _require(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _one_of(o.direction, DIRECTIONS, "optim.direction")
    _one_of(o.estimator, ESTIMATORS, "optim.estimator")
    _require(o.q >= 1, "optim.q", "must be >= 1")
    _require(o.batch_size >= 1, "optim.batch_size", "must be >= 1")
    _one_of(o.rounding, ROUNDINGS, "optim.rounding")
    _require(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    _require(o.history >= 0, "optim.history", "must be >= 0")
    _require(0.0 <= o.beta1 < 1.0 and 0.0 <= o.beta2 < 1.0, "optim.beta1",
             "beta1 and beta2 must be in [0, 1)")
    _require(o.adam_eps > 0, "optim.adam_eps", "must be > 0")
    _one_of(o.state_dtype, ("float32", "bfloat16"), "optim.state_dtype")
    if o.estimator == "one-point":
        _require(o.q == 1, "optim.q", "the one-point estimator takes q=1")
    validate_offload(cfg.offload)
    validate_parallel(cfg.parallel)
    _one_of(cfg.logging.wandb, ("auto", "online", "offline", "off"), "logging.wandb")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(bool(cfg.checkpoint.resume), "checkpoint.resume",
             "must be 'auto', 'never' or a checkpoint folder")
    _require(cfg.steps >= 0, "steps", "must be >= 0")
    _require(cfg.eval_every >= 0, "eval_every", "must be >= 0")
    _require(cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
    _require(cfg.log_every >= 1, "log_every", "must be >= 1")
    _require(cfg.threads >= 0, "threads", "must be >= 0")
    _require(cfg.nonfinite_limit >= 1, "nonfinite_limit", "must be >= 1")
    return cfg


def validate_offload(f: OffloadConfig) -> OffloadConfig:
    """Check an :class:`OffloadConfig`; raise ConfigError naming the field."""
    _require(f.ring >= 1, "offload.ring", f"must be >= 1, got {f.ring}")
    if f.host_dtype is not None:
        _one_of(f.host_dtype, DTYPES, "offload.host_dtype")
    if f.wire_dtype is not None:
        _one_of(f.wire_dtype, WIRE_DTYPES, "offload.wire_dtype")
        import torch

        _require(hasattr(torch, f.wire_dtype), "offload.wire_dtype",
                 f"{f.wire_dtype} is not supported by this torch")
        if f.wire_dtype != f.host_dtype:
            _require(f.host_dtype == "float32", "offload.host_dtype",
                     f"wire_dtype={f.wire_dtype} differs from the host copy: set "
                     "host_dtype=float32 (the master the update is applied to)")
    _require(f.host_budget_gb >= 0, "offload.host_budget_gb", "must be >= 0")
    return f


def validate_parallel(p: ParallelConfig) -> ParallelConfig:
    """Check a :class:`ParallelConfig` (the world size is checked by the mesh)."""
    for key in ("dp", "pp"):
        value = getattr(p, key)
        _require(value == -1 or value >= 1, f"parallel.{key}", f"must be >= 1 or -1, got {value}")
    _require(not (p.dp == -1 and p.pp == -1), "parallel.dp", "dp and pp cannot both be -1")
    _one_of(p.slicing, ("auto", "on", "off"), "parallel.slicing")
    _one_of(p.backend, ("auto", "nccl", "gloo"), "parallel.backend")
    _require(p.timeout_s > 0, "parallel.timeout_s", "must be > 0")
    _require(p.save_timeout_s > 0, "parallel.save_timeout_s", "must be > 0")
    _require(p.check_every >= 0, "parallel.check_every", "must be >= 0")
    return p


def register() -> None:
    """Register the schema in Hydra's ConfigStore as ``zo2_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="zo2_schema", node=TrainConfig)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The :class:`TrainConfig` that ``zo2-train <overrides>`` runs (Hydra's compose API),
    for launchers that start the run themselves (Ray) and for tests."""
    from hydra import compose as hydra_compose  # hydra: only where configs are composed
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    folder = str(Path(zo2.configs.__file__).parent)
    with initialize_config_dir(config_dir=folder, version_base=None):
        return OmegaConf.to_object(hydra_compose("train", overrides=list(overrides)))


def to_dict(obj: Any) -> Any:
    """A plain (JSON-serialisable) dict of a config dataclass."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
