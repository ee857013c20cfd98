"""The ZO engine: MeZO-style SPSA on any Hugging Face causal LM, forward passes only.

One training step, for q directions ``z_1..z_q`` drawn from the step's seeds:

1. Stack the batch once per slice of the plan (two-sided: ``+eps, -eps`` for each
   seed; one-sided: an unperturbed slice, then ``+eps`` for each seed), shape
   (n*B, T).
2. Run the model's own forward once under ``torch.no_grad``. Each unit (decoder
   layer, embeddings, norm, head) runs every slice with its weights perturbed for
   that slice (:mod:`zo2.perturb`); while a unit is resident the previous step's
   update is applied to it first, so the update costs no extra pass of its own.
3. Per slice, the loss over the labelled positions (:mod:`zo2.loss`); the projected
   gradient of direction j is ``g_j = (L_j+ - L_j-) / (2 eps)`` (two-sided) or
   ``(L_j+ - L_0) / eps`` (one-sided).
4. The update ``w <- w*(1 - lr*wd) - (lr/q) * sum_j g_j z_j`` is recorded as pending
   (seeds, coefficients) and applied lazily (step 2 of the next step, or
   :meth:`ZOEngine.flush` before evaluation and export).

``z`` is a pure function of (seed, parameter name, element index)
(:mod:`zo2.noise`), so the update record ``(seeds, coefs, decay)`` of each step is a
complete description of the fine-tune: :attr:`ZOEngine.log` is the seed log.
No autograd graph and no gradient tensor exist at any point; the extra memory is one
scratch buffer the size of the largest unit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from zo2 import folders
from zo2.config import OffloadConfig, OptimConfig
from zo2.errors import CheckpointError, ConfigError
from zo2.estimators import make_estimator
from zo2.folders import RULE_STATE_FILE, SEEDLOG_FILE, STATE_FILE  # noqa: F401  (re-exported)
from zo2.loss import Objective, last_positions, positions_to_keep
from zo2.offload import Device, Offloader
from zo2.offload.lazy_weights import load_into
from zo2.offload.telemetry import gpu_metrics
from zo2.parallel.mesh import Mesh
from zo2.perturb import (
    BatchShape,
    PendingUpdate,
    PerturbationContext,
    Plan,
    Slice,
    Wrapped,
    step_seed,
)
from zo2.residency import InPlaceWeights, Residency, Resident, WeightStore
from zo2.rules import directions_of, make_rule
from zo2.schedule import learning_rate
from zo2.units import find_units, tensors_by_name, unique_params


@dataclass
class StepResult:
    """What one step measured: loss (mean over slices), projected gradients, lr."""

    step: int
    loss: float
    grads: list[float]
    lr: float
    losses: list[float]
    skipped: bool = False  # a non-finite loss: no update was made
    telemetry: dict = field(default_factory=dict)  # offload transfer figures, GPU memory


class ZOEngine:
    """Wraps a causal LM for zeroth-order fine-tuning.

    Args:
        model: a Hugging Face causal LM (any decoder-only architecture).
        optim: estimator and update-rule settings (:class:`~zo2.config.OptimConfig`).
        objective: the loss over labelled positions (:class:`~zo2.loss.Objective`).
        seed: seeds the perturbation stream; same seed and data give the same weights.
        total_steps: horizon of the lr schedule (linear / cosine decay).
        trainable: glob patterns over parameter names; others stay frozen.
        offload: ZO2 offloading (:class:`~zo2.config.OffloadConfig`); off when None.
        device: the compute device (default: where the model's parameters are).
        weights: for a model built empty (parameters on ``meta``), where to read them
            (:class:`zo2.offload.lazy_weights.SafetensorsWeights`); with offloading, one
            block at a time, so the model never has to fit in host memory.
        mesh: the DistZO2 mesh and its collectives (:class:`zo2.parallel.Mesh`); a
            single-process mesh when None.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, objective: Objective, *,
                 seed: int = 0, total_steps: int = 0, trainable: Iterable[str] = ("*",),
                 offload: OffloadConfig | None = None,
                 device: torch.device | str | None = None, weights=None,
                 mesh: Mesh | None = None) -> None:
        self.mesh = mesh or Mesh.local()
        self.model = model.eval().requires_grad_(False)
        self.optim = optim
        self.objective = objective
        self.seed = seed
        self.total_steps = total_steps
        self.trainable = tuple(trainable)  # the globs: the seed log records them
        self.units = find_units(model, self.trainable)
        self.params = unique_params(self.units)
        for p in self.params:  # quantized layers' scales (zo2.quantized)
            if p.floor is not None:
                p.floor = optim.scale_floor
        if device is None:
            device = self.params[0].param.device
            device = torch.device("cpu") if device.type == "meta" else device
        self.device = torch.device(device)
        if self.device.type == "cuda":  # kernels and streams without a device of their own
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.gpu = Device(self.device)  # its streams and memory figures (no-ops on the CPU)
        self.rule = make_rule(optim)
        self.directions = directions_of(optim)  # the shape of z (zo2.directions)
        self.pending = PendingUpdate(optim.direction, optim.rounding,
                                     rule=None if self.rule.fused else self.rule,
                                     directions=self.directions)
        if optim.conservative and (optim.method != "zo-sgd" or optim.q != 1
                                   or optim.estimator not in ("two-sided", "one-sided")
                                   or self.mesh.pertp != 1):
            raise ConfigError("optim.conservative needs optim.method=zo-sgd, optim.q=1, a "
                              "two- or one-sided estimator and parallel.pertp=1")
        # the hot path (Residency) and the weights' state (WeightStore): the offloader
        # and its store; resident weights are their own parameters
        self.residency: Residency
        self.store: WeightStore
        if offload is not None and offload.enabled:
            self._check_sparse_offload(offload)
            offloader = Offloader(model, self.units, self.pending, offload, device=self.gpu,
                                  weights=weights, slicing=self.mesh.slicing(self.gpu),
                                  local_ranks=self.mesh.local_ranks)
            self.residency, self.store = offloader, offloader.store
        else:
            if weights is not None:
                load_into(model, weights, self.device)
            model.to(self.device)
            self.residency = Resident(self.pending, self.params)
            self.store = InPlaceWeights(self.params)
        self.context = PerturbationContext(self.pending, self.residency)
        self._wrapped = Wrapped(self.units, self.context)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        self._takes_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters
        self.step_index = 0
        self.skipped_steps = 0
        self.log: list[dict] = []  # seed log: one record per applied update
        self.estimator = make_estimator(optim.estimator)  # owns its state (one-point)

    def _check_sparse_offload(self, offload: OffloadConfig) -> None:
        """Sparse masks read the weights: where they are perturbed (the device copy) and
        where they are updated (the host master) must hold the same values."""
        dtype = str(self.params[0].param.dtype).removeprefix("torch.")
        other = {offload.host_dtype, offload.wire_dtype} - {None, dtype}
        if self.optim.hessian == "diagonal":
            raise ConfigError("optim.hessian=diagonal keeps a model-sized curvature on the "
                              "device, where offloaded blocks are perturbed: with offloading "
                              "use optim.hessian=factored (HiZOO-L: rows + cols per matrix)")
        if self.directions.reads_weights and other:
            raise ConfigError(f"optim.sparsity with offload.host_dtype / offload.wire_dtype "
                              f"{sorted(other)} other than the model's {dtype}: the mask would "
                              "be read from differently rounded weights when perturbing (device) "
                              "and when updating (host); offload in the model's dtype")

    # ---- training ---------------------------------------------------------------------
    def plan(self, step: int) -> Plan:
        """The slices step ``step`` measures (the estimator's plan over its seeds)."""
        seeds = [step_seed(self.seed, step, j) for j in range(self.optim.q)]
        return self.estimator.plan(seeds, self.optim.eps)

    def lr(self, step: int) -> float:
        o = self.optim
        if isinstance(o.lr, str):
            raise ConfigError(f"optim.lr={o.lr}: the lr is chosen before the first step by "
                              "zo2's Trainer (zo2.lr_probe.choose(engine, batches)); a ZOEngine "
                              "used on its own takes a float optim.lr")
        return learning_rate(step, lr=o.lr, schedule=o.schedule, warmup_steps=o.warmup_steps,
                             total_steps=self.total_steps, min_ratio=o.min_lr_ratio)

    def _on_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def step(self, batch: Mapping[str, torch.Tensor], telemetry: bool = True,
             lr: float | None = None) -> StepResult:
        """One ZO step on ``batch`` (``input_ids``, ``attention_mask``, ``labels``).

        ``telemetry``: collect the offload and GPU figures (:meth:`telemetry`) into
        ``result.telemetry``; a loop that logs every n-th step passes True on those
        steps only, and each figure then covers the steps since the last collection.
        ``lr``: this step's learning rate when a caller schedules it (the Hugging Face
        Trainer's scheduler); None: :meth:`lr` of the step, from ``optim``.
        """
        batch = self._on_device(self.mesh.shard(batch))  # this rank's rows (data parallel)
        t = self.step_index
        plan = self.plan(t)
        losses = self._losses(batch, plan)
        grads = self._projected_grads(losses, plan)
        if self.optim.clip_grad:  # QZO: one bad batch cannot blow up the scales
            c = self.optim.clip_grad
            grads = [min(max(g, -c), c) if math.isfinite(g) else g for g in grads]
        lr = self.lr(t) if lr is None else lr
        result = StepResult(step=t, loss=sum(losses) / len(losses), grads=grads, lr=lr,
                            losses=losses, telemetry=self.telemetry() if telemetry else {})
        if all(math.isfinite(g) for g in grads):
            self.estimator.observe(losses)
            seeds = tuple(sl.seed for sl in plan.slices if sl.seed is not None and sl.sign == 1)
            coefs = tuple(-lr * g / len(grads) for g in grads)
            if self.optim.conservative:
                coefs = self._conservative(batch, seeds[0], coefs[0])
                result.telemetry["conservative_coef"] = coefs[0]
            decay = 1.0 - lr * self.optim.weight_decay
            record = {"step": t, "seeds": list(seeds), "coefs": list(coefs), "decay": decay,
                      "grads": [g / len(grads) for g in grads], "lr": lr}
            curv = self.estimator.curvatures(losses, plan.eps)
            if curv:  # HiZOO: what advances the curvature the directions are scaled by
                record["curv"] = curv
            self.log.append(record)
            self.pending.set(self.rule.update(self.log, lr, decay,
                                              round_seed=step_seed(self.seed, t, -1)))
        else:
            result.skipped = True
            self.skipped_steps += 1
        self.step_index += 1
        every = self.mesh.check_every
        if every and self.step_index % every == 0:
            self.mesh.check_in_sync(self.store.replicated_tensors())
        return result

    def _losses(self, batch: Mapping[str, torch.Tensor], plan: Plan) -> list[float]:
        """Every slice's loss over the global batch; this rank runs its own slices
        (perturbation parallel) on its own rows (data parallel)."""
        mine = self.mesh.my_slices(plan.n)
        local = Plan(tuple(plan.slices[i] for i in mine), plan.eps)
        logits = self._stacked_logits(batch, local)  # (len(mine)*B, k, V)
        labels = batch["labels"]
        count = int((labels != -100).sum())
        own = {i: (float(self.objective.loss(part, labels)), count)
               for i, part in zip(mine, logits.chunk(local.n))}
        return self.mesh.combine_losses(plan.n, own)

    def _conservative(self, batch: Mapping[str, torch.Tensor], seed: int,
                      coef: float) -> tuple[float]:
        """Conservative ZO: of ``w``, ``w + |c| z`` and ``w - |c| z`` (the SGD step and its
        opposite), keep the one with the lowest loss on this batch: one more stacked
        forward of three slices; returns the coefficient taken (0: no step)."""
        if coef == 0.0 or not math.isfinite(coef):
            return (coef,)
        size = abs(coef)
        plan = Plan((Slice(None, 0), Slice(seed, 1), Slice(seed, -1)), size)
        base, plus, minus = self._losses(batch, plan)
        best = min((base, 0.0), (plus, size), (minus, -size))  # ties: the smaller coef
        return (best[1],)

    def telemetry(self) -> dict:
        """The residency's transfer figures and, on a GPU, memory and utilisation, since
        the last call: bytes moved, stalls, and ``gpu_peak_allocated_gb``, the peak
        allocated since then (the peak counter is reset)."""
        out = self.residency.report()
        if self.device.type == "cuda" and "gpu_allocated_gb" not in out:
            out.update(gpu_metrics(self.gpu))
        return out

    def _stacked_logits(self, batch: Mapping[str, torch.Tensor], plan: Plan) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        stacked_ids, stacked_mask = ids.repeat(plan.n, 1), mask.repeat(plan.n, 1)
        keep = positions_to_keep(batch["labels"])
        self.context.plan = plan
        self.context.shape = BatchShape(plan.n, stacked_ids.shape[0], ids.shape[1])
        try:
            logits = self._forward(stacked_ids, stacked_mask, keep)
        finally:
            self.context.plan = None
            self.context.shape = None
        self.residency.flush()  # any unit the forward did not reach
        return logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        self.residency.begin_pass()
        try:
            return self._model_forward(ids, mask, keep)
        finally:
            self.residency.end_pass()

    def _model_forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        if self._takes_keep:
            out = self.model(input_ids=ids, attention_mask=mask,
                             logits_to_keep=last_positions(ids, keep),
                             use_cache=False)
            return out.logits
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -keep:]

    def _projected_grads(self, losses: list[float], plan: Plan) -> list[float]:
        return self.estimator.grads(losses, plan.eps)

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Mean loss and accuracy over ``batches`` with the current (updated) weights.

        The pending update is applied by the first batch's forward, unit by unit, as in
        a training step (an offloaded unit is not streamed an extra time for it).
        """
        batches = list(batches)
        total_loss, total_n, correct, count = 0.0, 0, 0, 0
        for index in self.mesh.eval_share(len(batches)):  # round robin over the ranks
            batch = self._on_device(batches[0 if index is None else index])
            labels = batch["labels"]
            logits = self._forward(batch["input_ids"], batch["attention_mask"],
                                   positions_to_keep(labels))
            if index is None:
                continue  # padding: every rank runs as many forwards (slicing needs it)
            n = int((labels != -100).sum())
            total_loss += float(self.objective.loss(logits, labels)) * n
            total_n += n
            right, seen = self.objective.correct(logits, labels)
            correct, count = correct + right, count + seen
        total_loss, total_n, correct, count = self.mesh.sum_across(
            [total_loss, total_n, correct, count])
        self.flush()
        return {"loss": total_loss / max(total_n, 1), "accuracy": correct / max(count, 1)}

    # ---- state ------------------------------------------------------------------------
    def flush(self) -> None:
        """Apply the pending update to every parameter (before eval, export, checkpoint)."""
        self.residency.flush()
        self.pending.set(None)

    def state_dict(self) -> dict:
        """Everything besides the weights that determines the future of the run."""
        self.flush()
        return {"step": self.step_index, "seed": self.seed, "skipped_steps": self.skipped_steps,
                "optim": asdict(self.optim), "total_steps": self.total_steps, "log": self.log,
                "directions": self.directions.state_dict(), **self.estimator.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if state["seed"] != self.seed:
            raise CheckpointError(f"checkpoint was made with seed {state['seed']}, "
                                  f"this run uses seed {self.seed}")
        self.pending.set(None)
        self.step_index = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.log = list(state.get("log", []))
        self.directions.load_state_dict(state.get("directions", {}))
        self.estimator.load_state_dict(state)

    def save(self, path: str | Path, tokenizer=None) -> Path:
        """Write a ``save_pretrained`` folder plus the engine state (:mod:`zo2.folders`)."""
        return folders.save_folder(self, path, tokenizer)

    def load(self, path: str | Path) -> None:
        """Restore a folder written by :meth:`save`: weights and engine state."""
        folders.load_folder(self, path)

    def load_weights(self, path: str | Path) -> None:
        """Copy the safetensors weights of a ``save_pretrained`` folder into the model;
        CheckpointError, before any weight changes, for a checkpoint of another model."""
        folders.load_weights(self, path)

    def export_state_dict(self, writer_only: bool = False) -> dict[str, torch.Tensor]:
        """The model's state dict with current values (offloaded ones from host memory).

        ``writer_only`` (offload slicing): the offloaded values are gathered to rank 0
        only; on the other ranks they are placeholders.
        """
        self.flush()
        homes = self.store.host_tensors(writer_only)
        by_name = {n: homes[id(t)] for n, t in tensors_by_name(self.model).items()
                   if id(t) in homes}
        return {k: by_name[k] if k in by_name else homes.get(id(v), v.detach())
                for k, v in self.model.state_dict(keep_vars=True).items()}

    def close(self) -> None:
        """Flush and unwrap the model's units, leaving a plain HF model.

        Offloaded parameters get their own tensors again, in host memory.
        """
        self.flush()
        self.store.materialize()
        self._wrapped.remove()
