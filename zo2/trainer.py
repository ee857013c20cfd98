"""The training run as one object: build, train, evaluate, checkpoint, close.

:class:`Trainer` owns a run the way torchtitan's ``Trainer`` does. ``__init__`` builds
the mesh, the data, the model, the engine, the metrics logger and the checkpoints (and
decides, before anything is written, whether the run resumes); :meth:`train` runs
MeZO's protocol: zero-shot dev and test evaluations first, ZO steps with a dev
evaluation every ``eval_every`` steps, the checkpoint with the best dev score kept
(``best/``; ``eval_metric``: a task's accuracy, your own data's loss), and the test
split evaluated for that checkpoint. Your own data (``data.train``,
:mod:`zo2.data.sft`) may have no dev or test split: without dev, ``best/`` is the final
weights. :meth:`state_dict` is the
run's progress (step, best so far, zero-shot results, tracker run id); the data
position is the data's own state; both are saved with every checkpoint
(:class:`~zo2.checkpoints.RunCheckpoints`). :meth:`close` releases the metrics file,
the wandb run, the engine and the process group on every exit path (use the trainer
as a context manager).

``optim.lr=auto``: ``__init__`` (a fresh run) chooses the lr from a probe of the first
training batches (:mod:`zo2.lr_probe`; the weights and the data position are left as
they were); the lr is logged, kept in :meth:`state_dict` and reused on resume.

Files written to the output directory:

* ``metrics.jsonl``: one JSON record per logged step and per evaluation;
* ``summary.json``: zero-shot and fine-tuned accuracies, steps, minutes, peak RSS;
* ``curves.png``: training loss and dev accuracy against step (``logging.plot``);
* ``wandb/``: an offline wandb run unless ``logging.wandb`` says otherwise;
* ``best/``: the best-dev weights, and ``final/``: the weights at the end, each a clean
  ``save_pretrained`` folder (a peft adapter folder with an adapter) with the tokenizer,
  a model card and a manifest, without the engine state (:mod:`zo2.export`);
* ``run.seedlog``: the seed log (:mod:`zo2.seedlog`), every update of the run in a
  few bytes a step; ``python -m zo2.seedlog replay`` rebuilds the final weights;
* ``checkpoints/step-*``: the newest ``checkpoint.keep`` run checkpoints (every
  ``checkpoint.every`` steps and the last). A run started again in the same directory
  continues from the newest valid one and ends with exactly the weights of an
  uninterrupted run.

Tests and tools inject parts through the constructor: ``engine_factory`` builds the
engine (a subclass with a fault, an emulated data-parallel engine), ``callbacks``
observe steps, evaluations and saves (Ray Train's reporter is one).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from zo2.adapters import wrap
from zo2.checkpoints import RunCheckpoints
from zo2.config import OffloadConfig, TrainConfig, to_dict, validate
from zo2.data import pipeline, sft
from zo2.data.labelled import LABELLED
from zo2.data.tasks import load_task
from zo2.engine import StepResult, ZOEngine
from zo2.errors import CheckpointError, ConfigError, TrainingError
from zo2.export import export_folder, refresh_card, run_card
from zo2.guard import DivergenceGuard
from zo2.lr_probe import Probe
from zo2.lr_probe import check as check_lr
from zo2.lr_probe import choose as choose_lr
from zo2.lr_probe import is_auto as lr_is_auto
from zo2.lr_probe import use as use_lr
from zo2.models import check_context, load_model, model_identity, weights_folder
from zo2.offload.lazy_weights import SafetensorsWeights
from zo2.parallel import LaunchEnv, Mesh
from zo2.seedlog import SeedLog
from zo2.tracking import (
    MetricsLogger,
    describe_scores,
    peak_rss_mb,
    phase_peak_rss_mb,
    plot_curves,
    progress_bar,
    reset_peak_rss,
    score_of,
)

log = logging.getLogger("zo2")


class Callback:
    """Observes a run; every hook is called on every rank (``trainer.mesh`` tells which)."""

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """After step ``result.step + 1`` of the run is computed and logged."""

    def on_evaluate(self, trainer: Trainer, step: int, metrics: dict) -> None:
        """After the dev evaluation of ``step``."""

    def on_save(self, trainer: Trainer, step: int, folder: Path) -> None:
        """After checkpoint ``step`` is published (``folder``)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def diverged_message(guard: DivergenceGuard, step: int, mean: float, *, lr: float, eps: float,
                     last: Any, best: str, lr_key: str = "optim.lr",
                     eps_key: str = "optim.eps", lr_note: str = "") -> str:
    """The one line a diverged run stops with (zo2's Trainer and the Hugging Face
    ZOTrainer): the bound it crossed, the lr and eps in force (under the keys that set
    them), the lr to try (a tenth), the last sane checkpoint and the best one."""
    return (f"training diverged at step {step}: the mean loss of the last {guard.window} "
            f"steps is {mean:.4g}, above {guard.bound(guard.first):.4g} (guard.factor="
            f"{guard.factor:g} x the first step's {guard.first:.4g}) with {lr_key}={lr:g}"
            f"{lr_note} and {eps_key}={eps:g}; try {lr_key}={lr / 10:g} (the default lr suits "
            f"the embedded model, not every model); the last sane checkpoint is "
            f"{last or 'none'} (the loss left its bound at step {guard.left_at}), {best}")


class Trainer:
    """One fine-tuning run, built from a validated :class:`TrainConfig`.

    Args:
        cfg: the run's configuration.
        output_dir: where the run writes (rank 0's path is used by every rank).
        data: your own rows in place of ``cfg.data``'s sources: ``{"train": rows,
            "validation": rows, "test": rows}`` (validation and test optional), each a
            ``datasets.Dataset`` or a list of dicts in ``cfg.data.format``.
        callbacks: observers of steps, evaluations and saves.
        engine_factory: builds the engine (``ZOEngine``'s signature).
    """

    def __init__(self, cfg: TrainConfig, output_dir: str | Path, *,
                 data: Mapping[str, Any] | None = None,
                 callbacks: Sequence[Callback] = (),
                 engine_factory: Callable[..., ZOEngine] = ZOEngine) -> None:
        validate(cfg)
        check_lr(cfg.optim)  # optim.lr=auto with a rule it suits
        self.given = sft.given_rows(data, cfg.data) if data is not None else None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.callbacks = cfg, list(callbacks)
        self.started = time.perf_counter()
        self.metrics: MetricsLogger | None = None
        self.engine: ZOEngine | None = None
        self.probe: Probe | None = None  # optim.lr=auto: what the lr probe measured, chose
        env = LaunchEnv.read()
        self.device = resolve_device(cfg.model.device, env.local_rank)
        self.mesh = Mesh(cfg.parallel, self.device, env)  # joins the process group
        try:
            self._build(output_dir, engine_factory)
        except BaseException:
            self.close(failed=True)
            raise

    def _build(self, output_dir: str | Path, engine_factory: Callable[..., ZOEngine]) -> None:
        cfg, mesh = self.cfg, self.mesh
        self.out = Path(mesh.agree(str(output_dir)))  # rank 0's directory
        if not self.mesh.is_main:
            log.setLevel(logging.WARNING)  # one rank reports progress
        self.checkpoints = RunCheckpoints(self.out, cfg.checkpoint.keep, mesh)
        # Decided before anything is written: a bad resume request ends here.
        self.resumed_from = mesh.on_main(lambda: self.checkpoints.resume_point(
            cfg.checkpoint.resume))
        saved = (RunCheckpoints.read_run_state(self.resumed_from, to_dict(cfg))
                 if self.resumed_from else None)
        self.pipe, self.tokenizer, self.engine = self._build_engine(engine_factory)
        # The load's peak (a checkpoint's mapped file pages, a quantizer's transients) is
        # reported apart from the training's: the summary's load/train_peak_rss_mb.
        self.load_peak_rss_mb = reset_peak_rss()
        self.data = self.pipe.train
        self.best: dict = {}
        self.zero_shot: dict = {}
        self._window = (0, time.perf_counter())  # train_step also works without train()
        self._nonfinite = 0
        g = cfg.guard
        self.guard = DivergenceGuard(g.factor, g.window, g.margin)
        run_state = saved["trainer"] if saved else {}
        self.metrics = MetricsLogger(cfg.logging, self.out, to_dict(cfg), self.mesh.is_main,
                                     resume_step=run_state.get("step"),
                                     run_id=run_state.get("wandb_id"))
        if saved:
            self._resume(saved)
        elif lr_is_auto(cfg.optim):
            self._probe_lr()

    def _probe_lr(self) -> None:
        """``optim.lr=auto``: choose the run's lr from the first training batches
        (:mod:`zo2.lr_probe`; the weights and the data position are left as they were)."""
        self.probe = choose_lr(self.engine, self.data)
        log.info("%s", self.probe.describe())
        self.metrics.write(event="lr_probe", step=0, **self.probe.state_dict())

    def _build_engine(self, engine_factory: Callable[..., ZOEngine]):
        """The data (first: a bad file is reported before a big model loads), the model
        (offloaded: built empty and streamed from its checkpoint into the block store)
        and the engine."""
        cfg = self.cfg
        data = self._read_data()
        adapter = cfg.model.adapter  # peft initialises adapters on real weights: not lazy
        lazy = cfg.offload.enabled and adapter.kind == "none" \
            and cfg.model.quantization == "none"
        folder = weights_folder(cfg.model.name) if lazy else None
        model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype,
                                      empty=folder is not None,
                                      trust_remote_code=cfg.model.trust_remote_code,
                                      quantization=cfg.model.quantization)
        weights = SafetensorsWeights(folder) if folder is not None else None
        model, self.trainable = wrap(model, adapter, cfg.model.trainable, seed=cfg.seed)
        pipe = self._pipeline(data, model, tokenizer)  # every row encoded and checked
        self.out.mkdir(parents=True, exist_ok=True)  # nothing written before: bad input ends
        engine = engine_factory(model, cfg.optim, pipe.objective, seed=cfg.seed,
                                total_steps=cfg.steps, trainable=self.trainable,
                                offload=self._offload(), device=self.device,
                                weights=weights, mesh=self.mesh)
        return pipe, tokenizer, engine

    def _read_data(self):
        """Your own data's rows (given, or ``data.train`` set), else the task's k-shot
        splits."""
        t = self.cfg.task
        if self.given is not None:
            return self.given
        if self.cfg.data.train is not None:
            return sft.load_sources(self.cfg.data)
        return load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev,
                         n_test=t.n_test, path=t.path, text_field=t.text_field,
                         label_field=t.label_field, balanced=t.balanced)

    def _pipeline(self, data, model, tokenizer) -> pipeline.Pipeline:
        cfg, own = self.cfg, self.own_data
        key = "data.max_length" if own else "task.max_length"
        check_context(model, cfg.data.max_length if own else cfg.task.max_length, key)
        sizes = {"batch_size": cfg.optim.batch_size, "eval_batch_size": cfg.eval_batch_size,
                 "seed": cfg.seed}
        if own:
            return sft.build(cfg.data, data, tokenizer, **sizes)
        return pipeline.build(data, tokenizer, objective=cfg.task.objective,
                              max_length=cfg.task.max_length, **sizes)

    def _offload(self) -> OffloadConfig:
        """The offload settings; a relative ``disk_dir`` goes inside the output
        directory, one folder per rank."""
        offload = self.cfg.offload
        if offload.enabled and offload.disk_dir:
            disk = Path(offload.disk_dir)
            disk = disk if disk.is_absolute() else self.out / disk
            if self.mesh.distributed:
                disk = disk / f"rank{self.mesh.rank}"
            offload = replace(offload, disk_dir=str(disk))
        return offload

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's progress besides the engine and the data position."""
        state = {"step": self.engine.step_index, "best": self.best,
                 "zero_shot": self.zero_shot, "config": to_dict(self.cfg),
                 "wandb_id": self.metrics.run_id, "guard": self.guard.state_dict()}
        if self.probe is not None:  # a resumed run reuses the lr: it never probes again
            state["lr_probe"] = self.probe.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.best, self.zero_shot = state["best"], state["zero_shot"]
        self.guard.load_state_dict(state.get("guard", {}))
        if lr_is_auto(self.cfg.optim):
            if "lr_probe" not in state:
                raise CheckpointError("optim.lr=auto: the checkpoint has no probed lr "
                                      "(lr_probe in run_state.json) to resume with")
            self.probe = Probe.from_state(state["lr_probe"])
            use_lr(self.engine, self.probe.lr)
            log.info("optim.lr=auto: resuming with the probed lr %.4g", self.probe.lr)

    def _resume(self, saved: dict) -> None:
        folder = self.resumed_from
        self.checkpoints.copy_best_from(folder)
        self.engine.load(folder)
        self.data.load_state_dict(saved["data"])
        self.load_state_dict(saved["trainer"])
        self.metrics.write(event="resume", step=self.engine.step_index, checkpoint=str(folder))
        log.info("resumed from %s at step %d", folder, self.engine.step_index)

    # ---- the loop ---------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict:
        """Loss and accuracy of the current weights on ``split`` (dev | test)."""
        return self.pipe.evaluate(self.engine, split)

    def train(self) -> dict:
        """Run to ``cfg.steps`` (from where a resumed run stopped); returns the summary."""
        if not self.resumed_from:
            self._evaluate_zero_shot()
        progress = (progress_bar(self.cfg.steps, self.engine.step_index)
                    if self.mesh.is_main and self.cfg.progress else None)
        self._window = (0, time.perf_counter())  # tokens since the last logged step
        self._nonfinite = 0  # steps in a row whose loss was NaN or inf (no update)
        for step in range(self.engine.step_index + 1, self.cfg.steps + 1):
            result = self.train_step(next(self.data))
            self._after_step(step, result)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        if progress is not None:
            progress.close()
        return self._finish()

    def _evaluate_zero_shot(self) -> None:
        probed = {"lr": self.probe.lr} if self.probe is not None else {}  # lr=auto's
        self.metrics.write(event="config", config=to_dict(self.cfg),
                           model=model_identity(self.engine.model),
                           parallel=self.mesh.describe(), **probed)
        self.zero_shot = {split: self.evaluate(split) for split in self.pipe.splits}
        self.metrics.write(event="eval", step=0, **self.zero_shot)
        log.info("zero-shot: %s", describe_scores(self.zero_shot, self.metric))
        if "dev" in self.zero_shot:  # without a dev split best/ is the final weights
            self.best = {"step": 0, "dev": self.zero_shot["dev"]}
            self._publish("best")

    def train_step(self, batch: dict) -> StepResult:
        """One ZO step; logged every ``log_every`` steps with the figures since the last
        log; a streak of ``nonfinite_limit`` non-finite losses stops the run."""
        cfg, step = self.cfg, self.engine.step_index + 1
        logged = step % cfg.log_every == 0 or step == cfg.steps
        result = self.engine.step(batch, telemetry=logged)
        self._nonfinite = self._nonfinite + 1 if result.skipped else 0
        if self._nonfinite:
            log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step,
                        result.losses, self._nonfinite)
        if self._nonfinite >= cfg.nonfinite_limit:
            self.metrics.write(event="stopped", step=step, reason="non-finite losses")
            last_good = self.checkpoints.latest() if self.mesh.is_main else None
            raise TrainingError(
                f"{self._nonfinite} steps in a row (to step {step}) had a non-finite loss: "
                f"stopping (nonfinite_limit={cfg.nonfinite_limit}); the last good checkpoint "
                f"is {last_good or 'none'} (lower optim.lr or optim.eps and resume from it)")
        if not result.skipped and (mean := self.guard.observe(step, result.loss)) is not None:
            self._diverged(step, mean)
        tokens, since = self._window
        tokens += int(batch["attention_mask"].sum()) * len(result.losses)
        if logged:
            now = time.perf_counter()
            self.metrics.write(event="step", step=step, loss=result.loss, grads=result.grads,
                               lr=result.lr, skipped=result.skipped,
                               tokens_per_s=tokens / (now - since), **result.telemetry)
            tokens, since = 0, now
        self._window = (tokens, since)
        for callback in self.callbacks:
            callback.on_step(self, result)
        return result

    def _diverged(self, step: int, mean: float) -> None:
        """Stop a diverged run: one message with the lr and eps in force and what to try."""
        guard, optim, lr = self.guard, self.cfg.optim, self.engine.optim.lr
        self.metrics.write(event="stopped", step=step, reason="diverged", mean_loss=mean,
                           first_loss=guard.first)
        sane = [p for p in self.checkpoints.steps.all()
                if guard.sane_checkpoint(int(p.name.rsplit("-", 1)[1]))]
        best = f"best/ is step {self.best['step']}" if self.best else "no best/"
        auto = " (chosen by optim.lr=auto)" if self.probe is not None else ""
        raise TrainingError(diverged_message(guard, step, mean, lr=lr, eps=optim.eps,
                                             last=sane[-1] if sane else None, best=best,
                                             lr_note=auto))

    def _after_step(self, step: int, result: StepResult) -> None:
        """The dev evaluation (best/ on a new best) and the checkpoint due at ``step``."""
        cfg = self.cfg
        due = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if due and "dev" in self.pipe.splits:
            dev = self.evaluate("dev")
            self.metrics.write(event="eval", step=step, dev=dev)
            log.info("step %d: %s", step, describe_scores({"dev": dev}, self.metric))
            if self._improves(dev):
                self.best = {"step": step, "dev": dev}
                self._publish("best")
            for callback in self.callbacks:
                callback.on_evaluate(self, step, dev)
        every = cfg.checkpoint.every
        # none while losses are non-finite or out of the guard's bound: the last good one
        # is kept
        if every and (step % every == 0 or step == cfg.steps) and not self._nonfinite \
                and not self.guard.out_of_bounds:
            folder = self.checkpoints.save(step, self.engine,
                                           {"trainer": self, "data": self.data})
            for callback in self.callbacks:
                callback.on_save(self, step, folder)

    def _publish(self, name: str) -> None:
        """``best/`` or ``final/``: a clean export of the current weights with a model card
        (:func:`zo2.export.export_folder`), published like a checkpoint."""
        engine, step = self.engine, self.engine.step_index
        cfg = self.cfg
        card = run_card(cfg, step=step, best=self.best, metric=self.metric,
                        data_name=self.data_name)
        self.checkpoints.publish(name, step, lambda tmp: export_folder(
            engine, tmp, self.tokenizer, card, merge_lora=cfg.export.merge_lora,
            base=cfg.model.name, dtype=cfg.model.dtype))

    @property
    def metric(self) -> str:
        """What picks ``best/``: ``eval_metric``, or (auto) a task's accuracy and your own
        data's loss."""
        if self.cfg.eval_metric != "auto":
            return self.cfg.eval_metric
        if self.own_data and self.cfg.data.format not in LABELLED:
            return "loss"
        return "accuracy"

    @property
    def data_name(self) -> str | None:
        """What the data is called where no config key names it (rows given in Python)."""
        if self.given is None:
            return None
        return "rows given to the Trainer (" + ", ".join(
            f"{role} {len(rows)}" for role, rows in self.given.items()) + ")"

    @property
    def own_data(self) -> bool:
        """Whether the run trains on your own rows (``data=`` or ``data.train``), not a task."""
        return self.given is not None or self.cfg.data.train is not None

    def _improves(self, dev: dict) -> bool:
        """Whether ``dev`` beats the best dev score so far (strictly; loss: lower)."""
        zero = self.zero_shot.get("dev", {}).get("loss")
        if "loss" in dev and not self.guard.sane(dev["loss"], zero):
            log.warning("dev loss %.4g is far above the zero-shot %.4g: not a candidate for "
                        "best/", dev["loss"], zero)
            return False
        best = self.best.get("dev")
        if best is None:
            return True
        new, old = dev[self.metric], best[self.metric]
        return new < old if self.metric == "loss" else new > old

    def _finish(self) -> dict:
        """The seed log, ``final/``, the test accuracy of ``best/``, the summary (and the
        model cards of ``best/`` and ``final/`` with its figures)."""
        engine, out, cfg = self.engine, self.out, self.cfg
        final_step, seedlog = engine.step_index, out / "run.seedlog"
        if self.mesh.is_main:  # every update of the run: replayed onto the base
            SeedLog.from_engine(engine, self.trainable).save(seedlog)
        tested = "best"
        if "dev" not in self.pipe.splits:  # nothing picks a best step: the final weights
            self.best = {"step": final_step, "dev": None}
            self._publish("best")
        self._publish("final")  # the engine still holds the final weights: best/ loads below
        if self.best["step"] != final_step:
            if (out / "best").is_dir():
                engine.load_weights(out / "best")
            else:  # resumed into another directory from a checkpoint without best/
                log.warning("no best/ (step %d) in %s: testing the final weights",
                            self.best["step"], out)
                tested = "final"
        zero, best = self.zero_shot, self.best
        tuned = self.evaluate("test") if "test" in self.pipe.splits else None
        summary = {
            "model": cfg.model.name, "task": cfg.task.name,
            "data": self.data_name or cfg.data.train,
            "steps": cfg.steps, "eval_metric": self.metric,
            "zero_shot_dev": score_of(zero.get("dev"), self.metric),
            "zero_shot_test": score_of(zero.get("test"), self.metric),
            "best_step": best["step"], "best_dev": score_of(best["dev"], self.metric),
            "tuned_test": score_of(tuned, self.metric), "tested": tested,
            "skipped_steps": engine.skipped_steps,
            "minutes": (time.perf_counter() - self.started) / 60,
            "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": self.load_peak_rss_mb,
            "train_peak_rss_mb": phase_peak_rss_mb() if self.load_peak_rss_mb is not None else None,
            "checkpoint": str(out / "best"),
            "final": str(out / "final"),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "seedlog": str(seedlog),
            "seedlog_bytes": seedlog.stat().st_size if self.mesh.is_main else None,
            "parallel": {k: v for k, v in self.mesh.describe().items() if "rank" not in k},
        }
        self.metrics.write(event="summary", **summary)
        if self.mesh.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            for name, step in (("best", best["step"]), ("final", final_step)):
                if (out / name).is_dir():  # the cards get the test figures
                    refresh_card(out / name, run_card(cfg, step=step, best=best,
                                                      metric=self.metric, summary=summary,
                                                      data_name=self.data_name))
            if cfg.logging.plot:
                self.metrics.close()  # flushed before the plot reads it
                plot_curves(out / "metrics.jsonl", out / "curves.png")
        return summary

    def close(self, failed: bool = False) -> None:
        """Close the metrics file and the wandb run, unwrap the model, leave the process
        group; safe on a partly built trainer and more than once. ``failed`` (an error
        path): no flush and no barrier, which would wait on a rank that may be dead."""
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None and not failed:
            self.engine.close()
            self.engine = None
        self.mesh.close(wait=not failed)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
