"""The same ZO job through zo2's own Trainer and through ``ZOTrainer`` (transformers.Trainer).

The embedded SmolLM2-135M on the tweets (next-token loss on the label word,
``task.objective=lm``, constant lr), ``--steps`` steps. zo2's Trainer draws the batches;
``ZOTrainer`` gets exactly those batches in that order (a dataset of their rows, a
sequential sampler, a collator that stacks them), the same seed, eps and lr. Each side runs
``--rounds`` times, interleaved (zo2, hf, zo2, hf, ...): the step time is the median over
rounds of each run's mean step time (from the first step's start to the last step's end,
model loading and setup excluded).

    python -m bench.hf_trainer [--steps 20] [--rounds 2]

Last line: ``hf_over_zo2=... weights_equal=... zo2_step_s=... hf_step_s=...``
(target: hf_over_zo2 at most 1.05, weights_equal 1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import report

OVERRIDES = ["task=tweets", "task.objective=lm", "optim.schedule=constant", "logging=none",
             "progress=false", "eval_every=0", "checkpoint.every=0"]


def zo2_run(steps: int, out: Path) -> tuple[float, dict, list[dict], float]:
    """zo2's Trainer: (seconds per step, final weights, the batches it drew, lr)."""
    from zo2.config import compose
    from zo2.trainer import Trainer

    cfg = compose([*OVERRIDES, f"steps={steps}", f"output_dir={out}"])
    with Trainer(cfg, out) as trainer:
        batches = [next(trainer.data) for _ in range(steps)]
        start = time.perf_counter()
        for batch in batches:
            trainer.train_step(batch)
        seconds = (time.perf_counter() - start) / steps
        weights = {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}
    return seconds, weights, batches, cfg.optim.lr


class StepClock(TrainerCallback):
    """Times the steps: from the first step's start to the last step's end."""

    start = end = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


def hf_run(batches: list[dict], lr: float, out: Path) -> tuple[float, dict]:
    """ZOTrainer on exactly ``batches``: (seconds per step, final weights)."""
    import datasets
    from transformers import TrainingArguments

    from zo2.integrations import ZOTrainer
    from zo2.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    rows = [{k: v[i].tolist() for k, v in batch.items()} for batch in batches
            for i in range(batch["input_ids"].shape[0])]
    size = batches[0]["input_ids"].shape[0]

    def stack(items: list[dict]) -> dict:
        return {k: torch.tensor([item[k] for item in items]) for k in items[0]}

    args = TrainingArguments(str(out), max_steps=len(batches), per_device_train_batch_size=size,
                             learning_rate=lr, lr_scheduler_type="constant", seed=0,
                             train_sampling_strategy="sequential", report_to="none",
                             save_strategy="no", use_cpu=True, max_grad_norm=0.0,
                             disable_tqdm=True, logging_steps=10_000)
    clock = StepClock()
    trainer = ZOTrainer(model=model.requires_grad_(True), args=args, data_collator=stack,
                        train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=tokenizer, callbacks=[clock], zo2={"eps": 1e-3})
    trainer.train()
    seconds = (clock.end - clock.start) / len(batches)
    return seconds, {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    zo2_times, hf_times, equal = [], [], True
    with tempfile.TemporaryDirectory(prefix="zo2-bench-hf-") as tmp:
        for r in range(args.rounds):
            seconds, ours, batches, lr = zo2_run(args.steps, Path(tmp) / f"zo2-{r}")
            zo2_times.append(seconds)
            seconds, theirs = hf_run(batches, lr, Path(tmp) / f"hf-{r}")
            hf_times.append(seconds)
            equal = equal and ours.keys() == theirs.keys() and all(
                torch.equal(ours[k], theirs[k]) for k in ours)
            print(f"round {r}: zo2 {zo2_times[-1]:.3f} s/step, hf {hf_times[-1]:.3f} s/step, "
                  f"weights equal {equal}", flush=True)
    zo2_s, hf_s = statistics.median(zo2_times), statistics.median(hf_times)
    report("hf_trainer", {"hf_over_zo2": hf_s / zo2_s, "weights_equal": int(equal),
                          "zo2_step_s": zo2_s, "hf_step_s": hf_s, "steps": args.steps,
                          "rounds": args.rounds})


if __name__ == "__main__":
    main()
