"""Accuracy on the embedded default: zero-shot, ZO fine-tuned, and first-order Adam.

Runs, each in its own process so that peak RSS is its own:

* ``zo``: the main job (``zo2-train`` with the shipped defaults, or overrides given
  after ``--``): zero-shot and best-dev-checkpoint test accuracy, MeZO's protocol;
* ``adam``: first-order Adam with autograd on the same model, data, batch size and
  number of steps, the same dev-based checkpoint choice (the reference).

    python -m bench.quality [--adam-lr 1e-5] [-- optim.lr=5e-5 steps=200]

Last line: ``zero_shot=... tuned=... adam=... zo_minutes=... adam_minutes=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, report


def run_zo(overrides: list[str], out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "zo2.launch.train", f"output_dir={out}",
                    "progress=false", *overrides], check=True, env=env)
    return json.loads((out / "summary.json").read_text())


def run_adam(overrides: list[str], lr: float) -> dict:
    """First-order Adam under the same config (compose the same Hydra config)."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from zo2.config import register
    from zo2.data.batching import BatchIterator, encode, label_word_ids
    from zo2.data.tasks import load_task
    from zo2.loss import Objective, positions_to_keep
    from zo2.models import load_model
    from zo2.tracking import peak_rss_mb

    register()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    started = time.perf_counter()
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    t = cfg.task
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     balanced=t.balanced)
    objective = Objective(t.objective, candidates=label_word_ids(tok, task.spec))
    def batches(examples) -> list[dict]:  # as the run's pipeline cuts them
        size = cfg.eval_batch_size
        return [encode(tok, examples[i: i + size], task.spec, t.max_length)
                for i in range(0, len(examples), size)]

    dev, test = batches(task.dev), batches(task.test)
    train = BatchIterator(tok, task.train, task.spec, batch_size=cfg.optim.batch_size,
                          seed=cfg.seed, max_length=t.max_length)

    def accuracy(batches) -> float:
        right = seen = 0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               logits_to_keep=positions_to_keep(b["labels"])).logits
                r, s = objective.correct(logits, b["labels"])
                right, seen = right + r, seen + s
        return right / seen

    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best_dev, best_state = accuracy(dev), {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, cfg.steps + 1):
        b = next(train)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=positions_to_keep(b["labels"])).logits
        objective.loss(logits, b["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            dev_acc = accuracy(dev)
            print(f"adam step {step}: dev acc {dev_acc:.4f}", flush=True)
            if dev_acc > best_dev:
                best_dev = dev_acc
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"best_dev": best_dev, "tuned_test": accuracy(test), "steps": cfg.steps,
            "minutes": (time.perf_counter() - started) / 60, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser()
    parser.add_argument("--adam-lr", type=float, default=1e-5)
    parser.add_argument("--adam-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.adam_only:
        print(json.dumps(run_adam(overrides, args.adam_lr)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        zo = run_zo(overrides, Path(tmp) / "zo")
    out = subprocess.run([sys.executable, "-m", "bench.quality", "--adam-only", "--adam-lr",
                          str(args.adam_lr), "--", *overrides], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    adam = json.loads(out.strip().splitlines()[-1])
    report("quality", {
        "zero_shot": zo["zero_shot_test"], "tuned": zo["tuned_test"], "adam": adam["tuned_test"],
        "zo_best_dev": zo["best_dev"], "zo_best_step": zo["best_step"], "zo_steps": zo["steps"],
        "zo_minutes": zo["minutes"], "zo_peak_rss_mb": zo["peak_rss_mb"],
        "adam_best_dev": adam["best_dev"], "adam_steps": adam["steps"],
        "adam_minutes": adam["minutes"], "adam_peak_rss_mb": adam["peak_rss_mb"],
        "overrides": " ".join(overrides) or "defaults",
    })


if __name__ == "__main__":
    main()
