"""Step time of the ZO engine and of a naive MeZO loop, over two plain forwards.

At the OPT-125m shape (random weights), batch 8 x 128 tokens, classification loss at
the last position. The naive loop is MeZO's published algorithm: regenerate z from a
reseeded torch generator for +eps, -2eps, +eps and the update (four regenerations and
four read-modify-writes of every weight). Rounds are interleaved so machine noise
hits every variant alike; medians are reported.

    python -m bench.step_overhead [--rounds 3]

Last line: ``ratio=... naive_ratio=... forward_s=... step_s=... naive_step_s=...``.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import classification_batch, median, opt_shape, report, timed
from zo2 import Objective, OptimConfig, ZOEngine
from zo2.loss import last_positions, positions_to_keep

LABELS = (5, 9)


def naive_mezo_step(model, batch, objective, seed: int, eps: float, lr: float) -> float:
    """MeZO as published: z regenerated from torch's generator for each pass."""
    params = [p for p in model.parameters()]
    keep = positions_to_keep(batch["labels"])

    def perturb(scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            z = torch.normal(0.0, 1.0, size=p.shape, generator=gen)
            p.data.add_(z, alpha=scale * eps)

    def loss() -> float:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=last_positions(batch["input_ids"], keep)).logits
        return float(objective.loss(logits, batch["labels"]))

    perturb(1.0)
    plus = loss()
    perturb(-2.0)
    minus = loss()
    perturb(1.0)
    g = (plus - minus) / (2 * eps)
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        z = torch.normal(0.0, 1.0, size=p.shape, generator=gen)
        p.data.add_(z, alpha=-lr * g)
    return g


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    model = opt_shape()
    batch = classification_batch(args.batch, args.seq, model.config.vocab_size, LABELS)
    objective = Objective("label_words", candidates=torch.tensor(LABELS))
    keep = positions_to_keep(batch["labels"])
    engine = ZOEngine(model, OptimConfig(lr=1e-7, eps=1e-3), objective)

    def forward() -> None:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              logits_to_keep=last_positions(batch["input_ids"], keep))

    with torch.no_grad():
        engine.step(batch)  # warm-up: compiles the noise kernels, sizes the scratch buffer
        forward()
        fwd, step, naive = [], [], []
        for r in range(args.rounds):
            fwd.append(timed(forward))
            step.append(timed(lambda: engine.step(batch)))
            naive.append(timed(lambda r=r: naive_mezo_step(model, batch, objective, r, 1e-3, 1e-7)))
            fwd.append(timed(forward))
    two_forwards = 2 * median(fwd)
    report("step_overhead", {
        "ratio": median(step) / two_forwards,
        "naive_ratio": median(naive) / two_forwards,
        "forward_s": median(fwd), "step_s": median(step), "naive_step_s": median(naive),
        "batch": args.batch, "seq": args.seq,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    })


if __name__ == "__main__":
    main()
