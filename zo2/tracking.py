"""Run metrics: ``metrics.jsonl``, a wandb run, and a PNG of the curves.

wandb is imported only when a run is tracked (the engine never imports it). With
``logging.wandb=auto`` the run is online when ``WANDB_API_KEY`` is set and offline
otherwise (files under ``<output_dir>/wandb``, uploadable later with ``wandb sync``);
``off`` writes nothing. Only the main rank tracks.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

from zo2.config import LoggingConfig

log = logging.getLogger("zo2")


class MetricsLogger:
    """The run's one metrics sink: ``metrics.jsonl`` and, when enabled, a wandb run.

    Every record is a JSON line (flushed per record); ``step`` and ``eval`` records are
    also logged to wandb and the ``summary`` record becomes the wandb summary. Only the
    main rank writes (``main=False``: a no-op). A resumed run (``resume_step``) first
    cuts ``metrics.jsonl`` back to that step (records of the steps it redoes go) and
    continues the wandb run ``run_id``; a fresh start moves an old file aside as
    ``metrics.jsonl.old``.

    Args:
        config: the logging settings (``wandb``: auto | online | offline | off).
        out: the run's output directory.
        run_config: the run's whole configuration (a plain dict), stored with the run.
        main: whether this is the main rank (the others log nothing).
        resume_step: the step a resumed run continues from; None for a fresh start.
        run_id: the wandb run to continue (a resumed run).
    """

    def __init__(self, config: LoggingConfig, out: Path, run_config: dict, main: bool,
                 resume_step: int | None = None, run_id: str | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.run = None
        self._fh = None
        if not main:
            return
        _cut_metrics(self.path, resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self.run = _wandb_run(config, out, run_config, run_id)

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (a resumed run continues it), None when not tracking."""
        return self.run.id if self.run is not None else None

    def write(self, **record) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.run is None:
            return
        if record.get("event") in ("step", "eval"):
            fields = {k: v for k, v in record.items() if k != "event"}
            self.run.log({**_numbers(fields), **_sample_tables(record)}, step=record["step"])
        elif record.get("event") == "summary":
            self.run.summary.update(_numbers(record))

    def close(self) -> None:
        """Close the file and finish the wandb run (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def _wandb_run(config: LoggingConfig, out: Path, run_config: dict, run_id: str | None):
    """A wandb run as configured, or None (``off``, or wandb not installed)."""
    if config.wandb == "off":
        return None
    mode = config.wandb
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: no wandb run (pip install wandb)")
        return None
    # create_new: this run is the run's own, even when the process has another one open
    # (a Hugging Face Trainer's, an earlier run's in a notebook)
    return wandb.init(project=config.project, name=config.name or out.name, dir=str(out),
                      mode=mode, config=run_config, id=run_id,
                      resume="allow" if run_id else None, reinit="create_new",
                      settings=wandb.Settings(silent=True, console="off"))


def _cut_metrics(path: Path, upto: int | None) -> None:
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


SAMPLE_COLUMNS = ("step", "prompt_end", "prediction", "reference")


def _sample_tables(record: dict) -> dict:
    """An eval record's generated answers (``<split>.samples``) as wandb Tables named
    ``<split>/samples``, one row per answer."""
    splits = {split: scores["samples"] for split, scores in record.items()
              if isinstance(scores, dict) and scores.get("samples")}
    if not splits:
        return {}
    import wandb

    return {f"{split}/samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=[
        [record["step"], *(sample[c] for c in SAMPLE_COLUMNS[1:])] for sample in samples])
        for split, samples in splits.items()}


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def plot_curves(metrics: Path, target: Path) -> Path:
    """Draw training loss and dev accuracy against step from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    evals = [(r["step"], r["dev"]["accuracy"]) for r in records
             if r.get("event") == "eval" and "dev" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_loss.plot(*zip(*steps), marker=".", linewidth=1)
    ax_loss.set(xlabel="step", ylabel="training loss (mean of +eps/-eps)", title="loss")
    if evals:
        ax_acc.plot(*zip(*evals), marker="o")
    ax_acc.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def score_of(scores: dict | None, metric: str) -> float | None:
    """``scores[metric]``, or None for a split that is not there."""
    return None if scores is None else scores[metric]


def describe_scores(splits: dict, metric: str) -> str:
    """``dev loss 1.2345, test loss 1.3456`` (or "no dev or test split")."""
    return ", ".join(f"{split} {metric} {scores[metric]:.4f}" for split, scores in
                     splits.items()) or "no dev or test split"


def progress_bar(steps: int, initial: int = 0):
    """The run's step bar on the terminal (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=initial, desc="zo2", unit="step", dynamic_ncols=True)


_closed_phases_kib = 0  # the largest peak of the phases reset_peak_rss closed (KiB)


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB (Linux reports
    KiB), the phases :func:`reset_peak_rss` closed included."""
    return max(_closed_phases_kib, _phase_peak_kib()) / 1024


def phase_peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (else since the
    process started), in MiB."""
    return _phase_peak_kib() / 1024


def reset_peak_rss() -> float | None:
    """Close a phase of the run: return its peak RSS in MiB and restart the kernel's
    high-water mark at the current RSS (Linux: ``5`` written to ``/proc/self/clear_refs``),
    so that :func:`phase_peak_rss_mb` then measures the next phase alone (a model's load,
    for one, holds its checkpoint's mapped file pages, which training never does).
    :func:`peak_rss_mb` still reports the whole process. None where the kernel refuses
    (the high-water mark then keeps counting from the start)."""
    global _closed_phases_kib
    peak = _phase_peak_kib()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    _closed_phases_kib = max(_closed_phases_kib, peak)
    return peak / 1024


def _phase_peak_kib() -> int:
    """The kernel's high-water mark of this process's RSS, in KiB: Linux's ``VmHWM``, not
    ``ru_maxrss``, which also keeps the peak of the process that started this one (a
    fork copies the parent's mark and ``exec`` keeps it), so a child of a large parent
    reported the parent's peak as its own."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
