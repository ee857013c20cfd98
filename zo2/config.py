"""Typed configuration: dataclasses registered in Hydra's ConfigStore, with validation.

The YAML presets in ``configs/`` (groups ``model/``, ``task/``, ``optim/``) are merged
into these schemas, so an unknown key or an ill-typed value is rejected by OmegaConf
with the full key named. Each dataclass checks its own ranges and allowed values in
``__post_init__`` (``OmegaConf.to_object`` and the Python API both construct it), and
raises :class:`~zo2.errors.ConfigError` naming the field and what is allowed; the
allowed values come from :mod:`zo2.choices`. :func:`validate` checks a whole config
again (one changed after it was built).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

import zo2.configs
from zo2.adapters import AdapterConfig, validate_adapter
from zo2.choices import (
    BACKENDS,
    DATA_FORMATS,
    DIRECTIONS,
    DTYPES,
    ESTIMATORS,
    EVAL_METRICS,
    HESSIANS,
    METHODS,
    OBJECTIVES,
    QUANTIZATIONS,
    ROUNDINGS,
    SCHEDULES,
    SLICINGS,
    STATE_DTYPES,
    WANDB_MODES,
    WIRE_DTYPES,
)
from zo2.data.tasks import TASK_NAMES
from zo2.errors import ConfigError

log = logging.getLogger("zo2")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {list(allowed)}")


class _Checked:
    """A config section that checks itself when built (``__post_init__``)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        raise NotImplementedError


@dataclass
class ModelConfig(_Checked):
    """Which causal LM to fine-tune and which of its parameters."""

    name: str = "smollm2-135m"  # embedded default, a local HF folder, or tiny-<family>
    dtype: str = "float32"
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    trainable: list[str] = field(default_factory=lambda: ["*"])  # globs over param names
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # LoRA / prefix (peft)
    trust_remote_code: bool = False  # run a model's own code (auto_map); only trusted models
    # load quantized with bitsandbytes (zo2.quantized): ZO trains the scales (QZO)
    quantization: str = "none"  # none | nf4 | fp4 | int8

    def check(self) -> None:
        _require(bool(self.name), "model.name", "must not be empty")
        _one_of(self.dtype, DTYPES, "model.dtype")
        _require(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                 "model.device", f"{self.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
        _require(len(self.trainable) > 0, "model.trainable", "needs at least one pattern")
        _one_of(self.quantization, QUANTIZATIONS, "model.quantization")
        validate_adapter(self.adapter, self.trainable)


@dataclass
class TaskConfig(_Checked):
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

    def check(self) -> None:
        _one_of(self.name, TASK_NAMES, "task.name")
        if self.name in ("jsonl", "csv"):
            _require(bool(self.path), "task.path", f"task {self.name!r} needs a data file path")
        for key in ("n_train", "n_dev", "n_test"):
            _require(getattr(self, key) > 0, f"task.{key}", "must be > 0")
        _require(self.max_length >= 8, "task.max_length", "must be >= 8")
        _one_of(self.objective, OBJECTIVES, "task.objective")


@dataclass
class DataConfig(_Checked):
    """Your own data, in place of ``task``: a local file (JSON lines, JSON, CSV, Parquet), a
    ``save_to_disk`` folder or a hub dataset id in the local cache, per split; rows in
    TRL's formats (:mod:`zo2.data.formats`)."""

    train: str | None = None  # set: the run trains on this data, not on the task
    validation: str | None = None  # None: validation_split of train, or no dev evaluation
    test: str | None = None  # None: no test evaluation
    format: str = "messages"  # text | prompt_completion | messages | classification | choice
    max_length: int = 512  # tokens per row, truncated by the format's rule
    validation_split: float = 0.0  # with no validation source: this share of train, held out
    n_train: int = 0  # 0: every training row; n: a sample of n rows (seed)
    seed: int = 42  # the sample and the held-out split
    max_new_tokens: int = 0  # > 0: evaluations also generate each answer greedily (exact
    # match and token F1 against the row's last labelled span)
    samples: int = 3  # generated answers kept per evaluation in metrics.jsonl
    # classification / choice (zo2.data.labelled):
    template: str | None = None  # the prompt from row fields: "{text} It was" (default
    # "{text}"; choice: "{prompt}")
    label_field: str = "label"  # the row's label (choice: the right choice, index or text)
    labels: Any = None  # {label as written: its word(s)}
    # (empty: the training rows' distinct labels, each answered by itself)
    balanced: bool = False  # n_train / validation_split: as many rows of every label

    def check(self) -> None:
        _one_of(self.format, DATA_FORMATS, "data.format")
        _require(self.max_length >= 8, "data.max_length", "must be >= 8")
        _require(0.0 <= self.validation_split < 1.0, "data.validation_split",
                 f"must be in [0, 1), got {self.validation_split}")
        _require(self.n_train >= 0, "data.n_train", "must be >= 0")
        _require(self.max_new_tokens >= 0, "data.max_new_tokens", "must be >= 0")
        _require(self.samples >= 0, "data.samples", "must be >= 0")
        if self.train is None:
            for key in ("validation", "test"):
                _require(getattr(self, key) is None, f"data.{key}", "needs data.train")
        _require(not (self.validation and self.validation_split), "data.validation_split",
                 "give data.validation or data.validation_split, not both")
        labelled = self.format in ("classification", "choice")
        _require(labelled or self.template is None, "data.template",
                 f"is for data.format=classification|choice, not {self.format}")
        _require(self.format == "classification" or not self.labels, "data.labels",
                 f"is for data.format=classification, not {self.format}")
        if self.labels is not None:
            _require(isinstance(self.labels, Mapping) and len(self.labels) >= 2 and all(
                isinstance(k, (str, int)) and isinstance(w, str) and w.strip()
                for k, w in self.labels.items()), "data.labels",
                f"must map 2 or more labels to non-empty words, like {{neg: terrible, pos: "
                f"great}}, got {self.labels!r}")
        _require(labelled or not self.balanced, "data.balanced",
                 f"needs labelled rows (data.format=classification|choice), not {self.format}")
        _require(not labelled or not self.max_new_tokens, "data.max_new_tokens",
                 f"{self.format} rows are scored by accuracy over their answers, not generated")


@dataclass
class OptimConfig(_Checked):
    """The ZO estimator and update rule."""

    method: str = "zo-sgd"
    lr: float | int | str = 1e-5  # a float, or "auto": chosen before training by a probe
    # on training batches (zo2.lr_probe); an int or a numeric string becomes a float
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
    # the shape of z on matrices (zo2.directions): sparse (Sparse MeZO: leave this share of
    # each matrix's largest-magnitude elements unperturbed) or low-rank (U V^T of rank r)
    sparsity: float = 0.0
    rank: int = 0
    # HiZOO (optim.estimator=hizoo): z = n / sqrt(D), D a running curvature estimate
    # (zo2.hessian): diagonal (4 bytes a parameter) or factored (HiZOO-L: rows + cols)
    hessian: str = "none"
    hessian_smooth: float = 1e-8  # alpha of D's running average (HiZOO's scripts: 1e-8)
    lr_probe_batches: int = 4  # optim.lr=auto: training batches the probe measures
    lr_safety: float = 0.5  # optim.lr=auto: lr = lr_safety / median curvature (zo2.lr_probe)
    clip_grad: float = 0.0  # clip each projected gradient to +-clip_grad (QZO: 100); 0: off
    scale_floor: float = 1e-8  # a quantized layer's scales are kept >= this (QZO)

    def check(self) -> None:
        _one_of(self.method, METHODS, "optim.method")
        if isinstance(self.lr, str) and self.lr != "auto":
            try:  # a number a YAML file left as a string (1e-5)
                self.lr = float(self.lr)
            except ValueError:
                raise ConfigError(f"optim.lr: {self.lr!r} is not a float") from None
        if isinstance(self.lr, int) and not isinstance(self.lr, bool):
            self.lr = float(self.lr)
        _require(self.lr == "auto" or isinstance(self.lr, float), "optim.lr",
                 f"must be a float or 'auto', got {self.lr!r}")
        _require(self.lr == "auto" or self.lr >= 0, "optim.lr",
                 f"must be >= 0, got {self.lr}")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _one_of(self.schedule, SCHEDULES, "optim.schedule")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _one_of(self.direction, DIRECTIONS, "optim.direction")
        _one_of(self.estimator, ESTIMATORS, "optim.estimator")
        _require(self.q >= 1, "optim.q", "must be >= 1")
        if self.estimator == "one-point":
            _require(self.q == 1, "optim.q", "the one-point estimator takes q=1")
        if self.estimator == "fzoo":
            _require(self.q >= 2, "optim.q", f"fzoo normalises by the spread of its q "
                     f"perturbed losses: set q >= 2 (FZOO uses 8 and more), got {self.q}")
        _require(self.batch_size >= 1, "optim.batch_size", "must be >= 1")
        _one_of(self.rounding, ROUNDINGS, "optim.rounding")
        _require(0.0 <= self.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
        _require(self.history >= 0, "optim.history", "must be >= 0")
        _require(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "optim.beta1",
                 "beta1 and beta2 must be in [0, 1)")
        _require(self.adam_eps > 0, "optim.adam_eps", "must be > 0")
        _one_of(self.state_dtype, STATE_DTYPES, "optim.state_dtype")
        _require(0.0 <= self.sparsity < 1.0, "optim.sparsity",
                 f"is the share of each matrix left unperturbed: in [0, 1), got {self.sparsity}")
        _require(self.rank >= 0, "optim.rank", f"must be >= 0 (0: dense), got {self.rank}")
        _one_of(self.hessian, HESSIANS, "optim.hessian")
        _require(self.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0: off), got "
                 f"{self.clip_grad}")
        _require(self.scale_floor >= 0, "optim.scale_floor", f"must be >= 0, got "
                 f"{self.scale_floor}")
        _require((self.estimator == "hizoo") == (self.hessian != "none"), "optim.hessian",
                 "and optim.estimator=hizoo go together: HiZOO measures the curvature it "
                 "scales z by (optim.hessian=diagonal|factored) from an unperturbed forward; "
                 f"got estimator={self.estimator}, hessian={self.hessian}")
        _require(0.0 <= self.hessian_smooth <= 1.0, "optim.hessian_smooth",
                 f"must be in [0, 1], got {self.hessian_smooth}")
        shaped = [k for k in ("sparsity", "rank") if getattr(self, k)] + \
            (["hessian"] if self.hessian != "none" else [])
        _require(len(shaped) <= 1, f"optim.{shaped[0] if shaped else 'sparsity'}",
                 f"choose one kind of directions (sparse, low-rank or HiZOO), got {shaped}")
        _require(not (self.history and shaped), "optim.history",
                 "rebuilds the momentum with the fused kernel, which forms dense directions "
                 f"only: use optim.history=0 with optim.{shaped[0] if shaped else ''}")


@dataclass
class OffloadConfig(_Checked):
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

    def check(self) -> None:
        _require(self.ring >= 1, "offload.ring", f"must be >= 1, got {self.ring}")
        if self.host_dtype is not None:
            _one_of(self.host_dtype, DTYPES, "offload.host_dtype")
        if self.wire_dtype is not None:
            _one_of(self.wire_dtype, WIRE_DTYPES, "offload.wire_dtype")
            _require(hasattr(torch, self.wire_dtype), "offload.wire_dtype",
                     f"{self.wire_dtype} is not supported by this torch")
            if self.wire_dtype != self.host_dtype:
                _require(self.host_dtype == "float32", "offload.host_dtype",
                         f"wire_dtype={self.wire_dtype} differs from the host copy: set "
                         "host_dtype=float32 (the master the update is applied to)")
        _require(self.host_budget_gb >= 0, "offload.host_budget_gb", "must be >= 0")


@dataclass
class ParallelConfig(_Checked):
    """DistZO2 parallelism on torch.distributed; ranks come from the launcher (torchrun).

    ``dp x pertp`` must equal the world size; ``-1`` for one of them means "the rest".
    ``pp`` is the old name of ``pertp`` (it reads as *pipeline* parallel): still read,
    with a warning.
    """

    dp: int = 1  # data parallel: the batch is split; one loss pair per step is all-reduced
    pertp: int = 1  # perturbation parallel: the plan's +eps / -eps slices are split
    pp: int | None = None  # deprecated alias of pertp
    slicing: str = "auto"  # offloaded units: each node-local rank uploads 1/N (auto|on|off)
    backend: str = "auto"  # auto: nccl on GPUs, gloo on the CPU
    timeout_s: float = 300.0  # a collective that waits longer fails (dead or hung rank)
    save_timeout_s: float = 1800.0  # ranks wait this long for rank 0 to write a checkpoint
    check_every: int = 50  # steps between cross-rank weight checksums (0: never)

    def __post_init__(self) -> None:
        if self.pp is not None:
            _require(self.pertp in (1, self.pp), "parallel.pp",
                     f"is the old name of parallel.pertp; both are set ({self.pp} and "
                     f"{self.pertp}): set parallel.pertp only")
            log.warning("parallel.pp is the old name of parallel.pertp (perturbation "
                        "parallelism; pp reads as pipeline parallel): set parallel.pertp=%d",
                        self.pp)
            self.pertp, self.pp = self.pp, None
        super().__post_init__()

    def check(self) -> None:
        """The degrees alone (the world size is checked by the mesh)."""
        for key in ("dp", "pertp"):
            value = getattr(self, key)
            _require(value == -1 or value >= 1, f"parallel.{key}",
                     f"must be >= 1 or -1, got {value}")
        _require(not (self.dp == -1 and self.pertp == -1), "parallel.dp",
                 "dp and pertp cannot both be -1")
        _one_of(self.slicing, SLICINGS, "parallel.slicing")
        _one_of(self.backend, BACKENDS, "parallel.backend")
        _require(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")
        _require(self.save_timeout_s > 0, "parallel.save_timeout_s", "must be > 0")
        _require(self.check_every >= 0, "parallel.check_every", "must be >= 0")


@dataclass
class LoggingConfig(_Checked):
    """Where a run's metrics go besides ``metrics.jsonl``."""

    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | off
    project: str = "zo2"
    name: str | None = None  # the wandb run name (default: the output directory's name)
    plot: bool = True  # write curves.png (loss, dev accuracy) next to metrics.jsonl

    def check(self) -> None:
        _one_of(self.wandb, WANDB_MODES, "logging.wandb")


@dataclass
class CheckpointConfig(_Checked):
    """Periodic run checkpoints (``<output_dir>/checkpoints/step-*``) and resuming."""

    every: int = 50  # steps between checkpoints, and the last step (0: no checkpoints)
    keep: int = 2  # complete checkpoints kept (older ones are deleted after a save)
    resume: str = "auto"  # auto: from the newest valid checkpoint if any | never | a path

    def check(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        _require(bool(self.resume), "checkpoint.resume",
                 "must be 'auto', 'never' or a checkpoint folder")


@dataclass
class GuardConfig(_Checked):
    """The divergence guard (:mod:`zo2.guard`): stop a run whose loss climbs far above its
    first step's."""

    factor: float = 4.0  # diverged: the last steps' mean loss > factor x the first (0: off)
    window: int = 5  # steps in the running mean
    margin: float = 1.0  # ... and > the first + margin nats

    def check(self) -> None:
        _require(self.factor == 0 or self.factor > 1, "guard.factor",
                 f"must be 0 (off) or > 1, got {self.factor}")
        _require(self.window >= 1, "guard.window", "must be >= 1")
        _require(self.margin >= 0, "guard.margin", "must be >= 0")


@dataclass
class ExportConfig(_Checked):
    """How ``best/`` and ``final/`` are written (:mod:`zo2.export`)."""

    merge_lora: bool = False  # a LoRA run: the adapter merged into the base weights

    def check(self) -> None:
        """Nothing to check alone (``TrainConfig`` checks it against the adapter)."""


@dataclass
class TrainConfig(_Checked):
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    steps: int = 150
    eval_every: int = 50  # dev evaluation period (0: only before and after)
    eval_batch_size: int = 32
    eval_metric: str = "auto"  # picks best/: loss|accuracy|exact_match|f1 (auto: a task's
    # accuracy, your own data's loss)
    log_every: int = 10
    seed: int = 0  # seeds the perturbation stream and the batch order
    output_dir: str = ""  # empty: Hydra's run directory
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: bool = True
    nonfinite_limit: int = 20  # steps in a row with a NaN/inf loss before the run stops

    def check(self) -> None:
        """The run's own fields (each section checked itself when it was built)."""
        _require(self.steps >= 0, "steps", "must be >= 0")
        _require(self.eval_every >= 0, "eval_every", "must be >= 0")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _one_of(self.eval_metric, EVAL_METRICS, "eval_metric")
        labelled = self.data.format in ("classification", "choice")
        if self.eval_metric in ("exact_match", "f1") and labelled:
            raise ConfigError(f"eval_metric: data.format={self.data.format} is scored by "
                              f"accuracy and loss, not {self.eval_metric}")
        if self.eval_metric in ("exact_match", "f1") and self.data.train is not None:
            _require(self.data.max_new_tokens > 0, "eval_metric",
                     f"{self.eval_metric} needs generated answers: set data.max_new_tokens")
        _require(not self.export.merge_lora or self.model.adapter.kind == "lora",
                 "export.merge_lora", f"needs a LoRA adapter (peft=lora), not the adapter "
                 f"{self.model.adapter.kind!r}")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.threads >= 0, "threads", "must be >= 0")
        _require(self.nonfinite_limit >= 1, "nonfinite_limit", "must be >= 1")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check a whole config again, every section (one changed since it was built);
    raise ConfigError naming the field."""
    for section in (cfg.model, cfg.task, cfg.data, cfg.optim, cfg.offload, cfg.parallel,
                    cfg.logging, cfg.checkpoint, cfg):
        section.check()
    return cfg


def validate_offload(f: OffloadConfig) -> OffloadConfig:
    """Check an :class:`OffloadConfig` again; raise ConfigError naming the field."""
    f.check()
    return f


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
