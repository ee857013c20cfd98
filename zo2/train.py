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
  (``from_pretrained`` loads it) with the engine state.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from zo2.config import OffloadConfig, TrainConfig, to_dict, validate
from zo2.data.batching import BatchIterator, encode, label_word_ids
from zo2.data.tasks import load_task
from zo2.engine import ZOEngine
from zo2.errors import ConfigError
from zo2.loss import Objective
from zo2.models import load_model, model_identity, weights_folder
from zo2.offload.checkpoint import SafetensorsWeights
from zo2.parallel import Comm, LaunchEnv, LocalComm, Mesh
from zo2.tracking import Tracker, plot_curves

log = logging.getLogger("zo2")


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


def _batches(tokenizer, examples, spec, batch_size: int, max_length: int) -> list[dict]:
    """Evaluation batches, examples sorted by length so that little padding is computed."""
    examples = sorted(examples, key=lambda e: len(e.text))
    return [encode(tokenizer, examples[i: i + batch_size], spec, max_length=max_length)
            for i in range(0, len(examples), batch_size)]


def run(cfg: TrainConfig, output_dir: str | Path) -> dict:
    """Fine-tune as configured; returns the summary (also written to summary.json)."""
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
    out.mkdir(parents=True, exist_ok=True)
    # Offloaded: build the model empty and stream its checkpoint into the block store,
    # so a model larger than host memory never has to be loaded whole.
    folder = weights_folder(cfg.model.name) if cfg.offload.enabled else None
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, empty=folder is not None)
    weights = SafetensorsWeights(folder) if folder is not None else None
    t = cfg.task
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     path=t.path, text_field=t.text_field, label_field=t.label_field,
                     balanced=t.balanced)
    objective = Objective(t.objective, candidates=label_word_ids(tokenizer, task.spec))
    engine = ZOEngine(model, cfg.optim, objective, seed=cfg.seed, total_steps=cfg.steps,
                      trainable=cfg.model.trainable, offload=_offload(cfg, out, mesh),
                      device=device, weights=weights, comm=comm)
    dev = _batches(tokenizer, task.dev, task.spec, cfg.eval_batch_size, t.max_length)
    test = _batches(tokenizer, task.test, task.spec, cfg.eval_batch_size, t.max_length)
    train = BatchIterator(tokenizer, task.train, task.spec, batch_size=cfg.optim.batch_size,
                          seed=cfg.seed, max_length=t.max_length)
    tracker = Tracker(cfg.logging, out, to_dict(cfg), main=comm.is_main)
    metrics = MetricsFile(out / "metrics.jsonl" if comm.is_main else None, tracker)
    metrics.write(event="config", config=to_dict(cfg), model=model_identity(model),
                  parallel=mesh.describe())

    zero_dev, zero_test = engine.evaluate(dev), engine.evaluate(test)
    metrics.write(event="eval", step=0, dev=zero_dev, test=zero_test)
    log.info("zero-shot: dev acc %.4f, test acc %.4f", zero_dev["accuracy"], zero_test["accuracy"])
    best = {"step": 0, "dev": zero_dev}
    engine.save(out / "best", tokenizer)

    progress = _progress(cfg) if comm.is_main else None
    tokens, last = 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = next(train)
        result = engine.step(batch)
        tokens += int(batch["attention_mask"].sum()) * len(result.losses)
        if step % cfg.log_every == 0 or step == cfg.steps:
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
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            dev_metrics = engine.evaluate(dev)
            metrics.write(event="eval", step=step, dev=dev_metrics)
            log.info("step %d: dev acc %.4f", step, dev_metrics["accuracy"])
            if dev_metrics["accuracy"] > best["dev"]["accuracy"]:
                best = {"step": step, "dev": dev_metrics}
                engine.save(out / "best", tokenizer)
    if progress is not None:
        progress.close()

    final_step = engine.step_index
    if best["step"] != final_step:
        engine.load_weights(out / "best")
    tuned_test = engine.evaluate(test)
    summary = {
        "model": cfg.model.name, "task": t.name, "steps": cfg.steps,
        "zero_shot_dev": zero_dev["accuracy"], "zero_shot_test": zero_test["accuracy"],
        "best_step": best["step"], "best_dev": best["dev"]["accuracy"],
        "tuned_test": tuned_test["accuracy"], "skipped_steps": engine.skipped_steps,
        "minutes": (time.perf_counter() - started) / 60, "peak_rss_mb": peak_rss_mb(),
        "checkpoint": str(out / "best"),
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


def _progress(cfg: TrainConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, desc="zo2", unit="step", dynamic_ncols=True)
