"""``zo2-train``: the Hydra app that every launcher runs.

Parse the config, build, train, clean up. Examples::

    zo2-train                                   # embedded default: SmolLM2-135M on tweets
    zo2-train optim.lr=5e-5 steps=200 task=drugs
    zo2-train -m optim.lr=1e-5,3e-5,1e-4         # a Hydra multirun sweep

User errors (a bad value, a missing model or data file) end with one line
``error: ...`` and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from zo2.config import register  # noqa: E402
from zo2.env import main as print_versions  # noqa: E402
from zo2.errors import ZO2Error  # noqa: E402
from zo2.train import run  # noqa: E402

register()


def default_run_dir() -> str:
    """Hydra's run directory: ``runs/<date>/<time>``; under torchrun one directory per
    job, ``runs/torchrun-<run id>``, shared by every rank and by every elastic restart
    (``--max-restarts``), so a restarted job finds its checkpoints and resumes."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's --rdzv-id
    if run_id != "none":
        return f"runs/torchrun-{run_id}"
    return datetime.now().strftime("runs/%Y-%m-%d/%H-%M-%S")


OmegaConf.register_new_resolver("zo2_run_dir", default_run_dir, replace=True)


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def _app(cfg: DictConfig) -> None:
    try:
        conf = OmegaConf.to_object(cfg)
        output_dir = conf.output_dir or HydraConfig.get().runtime.output_dir
        summary = run(conf, output_dir)
    except ZO2Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") != "0":
        return  # the main rank reports
    print(report_line(summary, output_dir))


def report_line(summary: dict, output_dir: str) -> str:
    """``zero-shot test acc 0.5120 | tuned test acc 0.6980 (best dev 0.7000 at step 100) |
    ...``; a metric other than accuracy by its name, a missing split as ``n/a``."""
    name = "acc" if summary["eval_metric"] == "accuracy" else summary["eval_metric"]

    def score(key: str) -> str:
        return "n/a" if summary[key] is None else f"{summary[key]:.4f}"

    return (f"zero-shot test {name} {score('zero_shot_test')} | tuned test {name} "
            f"{score('tuned_test')} (best dev {score('best_dev')} at step "
            f"{summary['best_step']}) | {summary['minutes']:.1f} min | "
            f"peak RSS {summary['peak_rss_mb']:.0f} MiB | {output_dir}")


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # before Hydra, which owns every other argument
        print_versions()
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading / shard writing bars; ours is enough
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _app()


if __name__ == "__main__":
    main()
