"""The training run: build, evaluate, fine-tune, select by dev accuracy, report.

``run(cfg)`` is what every launcher calls. It follows MeZO's protocol: zero-shot
dev and test accuracy first, ZO steps with a dev evaluation every ``eval_every``
steps, the checkpoint with the best dev accuracy kept (``best/``), and test accuracy
reported for that checkpoint. Files written to the output directory:

* ``metrics.jsonl``: one JSON record per logged step and per evaluation;
* ``summary.json``: zero-shot and fine-tuned accuracies, steps, minutes, peak RSS;
* ``curves.png``: training loss and dev accuracy against step (``logging.plot``);
* ``wandb/``: an offline wandb run unless ``logging.wandb`` says otherwise;
* ``best/``: the best-dev checkpoint, a ``save_pretrained`` folder
  (``from_pretrained`` loads it) with the engine state;
* ``run.seedlog``: the seed log (:mod:`zo2.seedlog`), every update of the run in a
  few bytes a step; ``python -m zo2.seedlog replay`` rebuilds the final weights from
  the base model bit for bit;
* ``checkpoints/step-*``: the newest ``checkpoint.keep`` run checkpoints (every
  ``checkpoint.every`` steps and the last): weights, engine state with the seed log,
  data position, best-so-far (:mod:`zo2.checkpoints`: atomic, verified on load).
  A run started again in the same directory continues from the newest valid one
  and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from zo2.adapters import wrap
from zo2.checkpoints import CheckpointManager, replace_dir, verify
from zo2.config import OffloadConfig, TrainConfig, to_dict, validate
from zo2.data import pipeline
from zo2.data.tasks import load_task
from zo2.engine import ZOEngine
from zo2.errors import CheckpointError, ConfigError, TrainingError
from zo2.models import check_context, load_model, model_identity, weights_folder
from zo2.offload.checkpoint import SafetensorsWeights
from zo2.parallel import Comm, LaunchEnv, LocalComm, Mesh
from zo2.seedlog import SeedLog
from zo2.tracking import Tracker, plot_curves

log = logging.getLogger("zo2")

RUN_STATE = "run_state.json"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's CUDA device (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsFile:
    """Append-only JSON-lines metrics, flushed per record, mirrored to a tracker (wandb).

    ``path=None``: a no-op, for the ranks other than the main one.
    """

    def __init__(self, path: Path | None, tracker: Tracker | None = None) -> None:
        self.path = path
        self.tracker = tracker
        self._fh = path.open("a", encoding="utf-8") if path is not None else None

    def write(self, **record) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tracker is not None and record.get("event") in ("step", "eval"):
            self.tracker.log({k: v for k, v in record.items() if k != "event"},
                             step=record["step"])
        elif self.tracker is not None and record.get("event") == "summary":
            self.tracker.summary(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.tracker is not None:
            self.tracker.finish()


def run(cfg: TrainConfig, output_dir: str | Path, reporter: Reporter | None = None) -> dict:
    """Fine-tune as configured; returns the summary (also written to summary.json).

    With ``cfg.checkpoint.resume`` (default ``auto``) a run whose output directory
    holds checkpoints continues from the newest valid one, exactly where it stopped.
    ``reporter`` (e.g. Ray Train's) receives each evaluation and checkpoint.
    """
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()

    env = LaunchEnv.read()
    device = resolve_device(cfg.model.device, env.local_rank)
    mesh = Mesh(cfg.parallel, device, env)  # checks the degrees; joins the process group
    comm = Comm(mesh) if mesh.distributed else LocalComm()
    out = Path(mesh.agree(str(output_dir)))  # rank 0's directory (launch times differ)
    if not comm.is_main:
        log.setLevel(logging.WARNING)  # one rank reports progress
    checkpoints = CheckpointManager(out / "checkpoints", keep=cfg.checkpoint.keep, comm=comm)
    # Decided before anything is written: a bad resume request ends here.
    resume = mesh.on_main(lambda: _resume_point(cfg, out, checkpoints))
    resumed = _read_run_state(cfg, resume) if resume else None
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.task  # the data first: a bad file is reported before a big model loads
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     path=t.path, text_field=t.text_field, label_field=t.label_field,
                     balanced=t.balanced)
    # Offloaded: build the model empty and stream its checkpoint into the block store,
    # so a model larger than host memory never has to be loaded whole (not with an
    # adapter: peft initialises adapters on real weights).
    adapter = cfg.model.adapter
    lazy = cfg.offload.enabled and adapter.kind == "none"
    folder = weights_folder(cfg.model.name) if lazy else None
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, empty=folder is not None)
    weights = SafetensorsWeights(folder) if folder is not None else None
    # LoRA / prefix tuning (peft): only the adapter's parameters are trained.
    model, trainable = wrap(model, adapter, cfg.model.trainable, seed=cfg.seed)
    check_context(model, t.max_length)  # before any earlier output is touched
    pipe = pipeline.build(task, tokenizer, objective=t.objective,
                          batch_size=cfg.optim.batch_size, eval_batch_size=cfg.eval_batch_size,
                          seed=cfg.seed, max_length=t.max_length)
    engine = ZOEngine(model, cfg.optim, pipe.objective, seed=cfg.seed, total_steps=cfg.steps,
                      trainable=trainable, offload=_offload(cfg, out, mesh),
                      device=device, weights=weights, comm=comm)
    train = pipe.train
    if comm.is_main:
        _keep_metrics(out / "metrics.jsonl", upto=resumed["step"] if resumed else None)
    tracker = Tracker(cfg.logging, out, to_dict(cfg), main=comm.is_main,
                      run_id=resumed.get("wandb_id") if resumed else None)
    metrics = MetricsFile(out / "metrics.jsonl" if comm.is_main else None, tracker)
    reporter = reporter or Reporter()

    if resumed:
        source_best = Path(resume).parent.parent / "best"  # <run>/checkpoints/step-N
        if comm.is_main and not (out / "best").exists() and source_best.is_dir():
            shutil.copytree(source_best, out / "best")  # resumed into another directory
        engine.load(resume)
        train.load_state_dict(resumed["data"])
        zero, best = resumed["zero_shot"], resumed["best"]
        metrics.write(event="resume", step=engine.step_index, checkpoint=str(resume))
        log.info("resumed from %s at step %d", resume, engine.step_index)
    else:
        metrics.write(event="config", config=to_dict(cfg), model=model_identity(model),
                      parallel=mesh.describe())
        zero = {"dev": pipe.evaluate(engine, "dev"), "test": pipe.evaluate(engine, "test")}
        metrics.write(event="eval", step=0, **zero)
        log.info("zero-shot: dev acc %.4f, test acc %.4f", zero["dev"]["accuracy"],
                 zero["test"]["accuracy"])
        best = {"step": 0, "dev": zero["dev"]}
        _save_best(engine, out, tokenizer)

    def write_checkpoint(folder: Path) -> None:
        engine.save(folder)
        if comm.is_main:
            state = {"step": engine.step_index, "data": train.state_dict(), "best": best,
                     "zero_shot": zero, "config": to_dict(cfg), "wandb_id": tracker.run_id}
            (folder / RUN_STATE).write_text(json.dumps(state, indent=1))

    progress = _progress(cfg, initial=engine.step_index) if comm.is_main else None
    tokens, last = 0, time.perf_counter()
    nonfinite = 0  # steps in a row whose loss was NaN or inf (skipped: no update)
    for step in range(engine.step_index + 1, cfg.steps + 1):
        batch = next(train)
        logged = step % cfg.log_every == 0 or step == cfg.steps
        result = engine.step(batch, telemetry=logged)  # figures since the last logged step
        nonfinite = nonfinite + 1 if result.skipped else 0
        if nonfinite:
            log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", step,
                        result.losses, nonfinite)
        if nonfinite >= cfg.nonfinite_limit:
            metrics.write(event="stopped", step=step, reason="non-finite losses")
            metrics.close()
            last_good = checkpoints.latest() if comm.is_main else None
            raise TrainingError(
                f"{nonfinite} steps in a row (to step {step}) had a non-finite loss: stopping "
                f"(nonfinite_limit={cfg.nonfinite_limit}); the last good checkpoint is "
                f"{last_good or 'none'} (lower optim.lr or optim.eps and resume from it)")
        tokens += int(batch["attention_mask"].sum()) * len(result.losses)
        if logged:
            now = time.perf_counter()
            rate = tokens / (now - last)
            tokens, last = 0, now
            metrics.write(event="step", step=step, loss=result.loss, grads=result.grads,
                          lr=result.lr, skipped=result.skipped, tokens_per_s=rate,
                          **result.telemetry)
            if progress is not None:
                progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}",
                                     tok_s=f"{rate:.0f}")
        if progress is not None:
            progress.update(1)
        record = {"step": step, "loss": result.loss}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            dev_metrics = pipe.evaluate(engine, "dev")
            metrics.write(event="eval", step=step, dev=dev_metrics)
            log.info("step %d: dev acc %.4f", step, dev_metrics["accuracy"])
            record["dev_accuracy"] = dev_metrics["accuracy"]
            if dev_metrics["accuracy"] > best["dev"]["accuracy"]:
                best = {"step": step, "dev": dev_metrics}
                _save_best(engine, out, tokenizer)
        every = cfg.checkpoint.every
        saved = None  # none while losses are non-finite: the last good one is kept
        if every and (step % every == 0 or step == cfg.steps) and not nonfinite:
            saved = checkpoints.save(step, write_checkpoint)
        if saved is not None or "dev_accuracy" in record:
            reporter.report(record, saved if comm.is_main else None)
    if progress is not None:
        progress.close()

    final_step = engine.step_index
    seedlog = out / "run.seedlog"
    if comm.is_main:  # every update of the run: replayed onto the base, the last weights
        SeedLog.from_engine(engine, trainable).save(seedlog)
    tested = "best"
    if best["step"] != final_step:
        if (out / "best").is_dir():
            engine.load_weights(out / "best")
        else:  # resumed into another directory from a checkpoint without its run's best/
            log.warning("no best/ (step %d) in %s: testing the final weights", best["step"], out)
            tested = "final"
    tuned_test = pipe.evaluate(engine, "test")
    summary = {
        "model": cfg.model.name, "task": t.name, "steps": cfg.steps,
        "zero_shot_dev": zero["dev"]["accuracy"], "zero_shot_test": zero["test"]["accuracy"],
        "best_step": best["step"], "best_dev": best["dev"]["accuracy"],
        "tuned_test": tuned_test["accuracy"], "tested": tested,
        "skipped_steps": engine.skipped_steps,
        "minutes": (time.perf_counter() - started) / 60, "peak_rss_mb": peak_rss_mb(),
        "checkpoint": str(out / "best"), "resumed_from": str(resume) if resume else None,
        "seedlog": str(seedlog),
        "seedlog_bytes": seedlog.stat().st_size if comm.is_main else None,
        "parallel": {k: v for k, v in mesh.describe().items() if "rank" not in k},
    }
    metrics.write(event="summary", **summary)
    metrics.close()
    if comm.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.logging.plot:
            plot_curves(out / "metrics.jsonl", out / "curves.png")
    engine.close()
    mesh.close()
    return summary


class Reporter:
    """Receives each evaluation and checkpoint of a run (Ray Train reports them to Ray).

    ``report`` is called on every rank with the same record; ``checkpoint`` is the
    published checkpoint folder on the main rank and None elsewhere.
    """

    def report(self, record: dict, checkpoint: Path | None) -> None:
        pass


# Run settings that may change on resume: they do not change the trajectory.
RESUMABLE_CHANGES = ("offload", "parallel", "logging", "checkpoint", "eval_batch_size",
                     "log_every", "output_dir", "threads", "progress")


def _resume_point(cfg: TrainConfig, out: Path, checkpoints: CheckpointManager) -> str | None:
    """The checkpoint folder to resume from, or None for a fresh start (main rank)."""
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never"):
        verify(resume)  # an explicit folder must be whole
        return str(resume)
    published = checkpoints.all()
    if resume == "never":
        if published or (out / "metrics.jsonl").exists():
            raise ConfigError(f"checkpoint.resume=never, but {out} already holds a run "
                              "(use checkpoint.resume=auto to continue it, or another "
                              "output_dir)")
        return None
    latest = checkpoints.latest()
    if latest is None and published:
        raise CheckpointError(f"every checkpoint in {checkpoints.root} fails verification "
                              "(see the warnings above); move them away to start afresh")
    return str(latest) if latest is not None else None


def _read_run_state(cfg: TrainConfig, folder: str) -> dict:
    """The run state saved with a checkpoint; ConfigError if the config changed what
    the run computes (the model, task, optimizer, seed or number of steps)."""
    path = Path(folder) / RUN_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the run state {path}: {err}") from None
    saved, now = state["config"], to_dict(cfg)
    changed = [f"{key} ({saved.get(key)} -> {now[key]})" for key in now
               if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]]
    if changed:
        raise ConfigError(f"cannot resume from {folder}: the config changed "
                          f"{'; '.join(changed)[:600]} (use another output_dir, or "
                          "checkpoint.resume=never there)")
    return state


def _keep_metrics(path: Path, upto: int | None) -> None:
    """Make ``metrics.jsonl`` end at step ``upto`` before a resumed run appends to it.

    Records of steps after the checkpoint (redone by the resumed run) are dropped; for
    a fresh start (``upto=None``) an old file is kept aside as ``metrics.jsonl.old``.
    """
    if not path.exists():
        return
    if upto is None:
        path.replace(path.with_name(path.name + ".old"))
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if record.get("event") != "summary" and record.get("step", 0) <= upto:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _save_best(engine: ZOEngine, out: Path, tokenizer) -> None:
    """Write ``best/`` (a collective with several ranks): atomically replaced."""
    tmp = out / ".best.tmp"
    if engine.comm.is_main and tmp.exists():
        shutil.rmtree(tmp)
    engine.save(tmp, tokenizer)
    if engine.comm.is_main:
        replace_dir(tmp, out / "best")
    engine.comm.wait_for_writer()


def _offload(cfg: TrainConfig, out: Path, mesh: Mesh) -> OffloadConfig:
    """The offload settings; a relative ``disk_dir`` goes inside the output directory,
    one folder per rank."""
    offload = cfg.offload
    if offload.enabled and offload.disk_dir:
        disk = Path(offload.disk_dir)
        disk = disk if disk.is_absolute() else out / disk
        if mesh.distributed:
            disk = disk / f"rank{mesh.rank}"
        offload = replace(offload, disk_dir=str(disk))
    return offload


def _progress(cfg: TrainConfig, initial: int = 0):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc="zo2", unit="step", dynamic_ncols=True)
