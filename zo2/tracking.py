"""Run tracking besides ``metrics.jsonl``: a wandb run and a PNG of the curves.

wandb is imported only when a run is tracked (the engine never imports it). With
``logging.wandb=auto`` the run is online when ``WANDB_API_KEY`` is set and offline
otherwise (files under ``<output_dir>/wandb``, uploadable later with ``wandb sync``);
``off`` writes nothing. Only the main rank tracks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from zo2.config import LoggingConfig

log = logging.getLogger("zo2")


class Tracker:
    """A wandb run (or nothing) that receives the same records as ``metrics.jsonl``.

    Args:
        config: the logging settings.
        out: the run's output directory.
        run_config: the run's whole configuration (a plain dict), stored with the run.
        main: whether this is the main rank (the others track nothing).
        run_id: continue this wandb run (a resumed training run).
    """

    def __init__(self, config: LoggingConfig, out: Path, run_config: dict, main: bool,
                 run_id: str | None = None) -> None:
        self.run = None
        if not main or config.wandb == "off":
            return
        mode = config.wandb
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: no wandb run (pip install wandb)")
            return
        self.run = wandb.init(project=config.project, name=config.name or out.name,
                              dir=str(out), mode=mode, config=run_config,
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off"))

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (a resumed run continues it), None when not tracking."""
        return self.run.id if self.run is not None else None

    def log(self, record: dict, step: int) -> None:
        """Log the numeric fields of ``record`` (nested dicts flattened with ``/``)."""
        if self.run is not None:
            self.run.log(_numbers(record), step=step)

    def summary(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update(_numbers(summary))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


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
