"""Peak memory of a ZO step against inference (and first-order Adam) at the same batch.

Each mode runs in a fresh subprocess (peak RSS only grows), at the OPT-125m shape,
batch 8 x 128, classification loss at the last position:

* ``inference``: two plain forwards;
* ``zo``: three ZO engine steps (the scratch buffer, the stacked batch, the fused update);
* ``adam``: three first-order steps with autograd and torch.optim.Adam.

    python bench/memory.py [--shape opt-125m|opt-350m]

Last line: ``zo_over_inference=... adam_over_inference=... zo_extra_mb=...``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import classification_batch, opt_shape, report  # noqa: E402

LABELS = (5, 9)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, shape: str) -> dict:
    from zo2 import Objective, OptimConfig, ZOEngine
    from zo2.loss import positions_to_keep

    model = opt_shape(shape=shape)
    batch = classification_batch(8, 128, model.config.vocab_size, LABELS)
    objective = Objective("label_words", candidates=torch.tensor(LABELS))
    keep = positions_to_keep(batch["labels"])
    baseline = peak_mb()
    if mode == "inference":
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      logits_to_keep=keep)
    elif mode == "zo":
        engine = ZOEngine(model, OptimConfig(lr=1e-7), objective)
        for _ in range(3):
            engine.step(batch)
        engine.flush()
    elif mode == "adam":
        model.requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        for _ in range(3):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep).logits
            objective.loss(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"peak_mb": peak_mb(), "model_loaded_mb": baseline}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--mode":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    shape = sys.argv[sys.argv.index("--shape") + 1] if "--shape" in sys.argv else "opt-125m"
    runs = {}
    for mode in ("inference", "zo", "adam"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, shape], check=True,
                             capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    inf, zo, adam = (runs[m]["peak_mb"] for m in ("inference", "zo", "adam"))
    report("memory" if shape == "opt-125m" else f"memory-{shape}", {
        "zo_over_inference": zo / inf, "adam_over_inference": adam / inf,
        "inference_mb": inf, "zo_mb": zo, "adam_mb": adam, "zo_extra_mb": zo - inf,
        "model_loaded_mb": runs["inference"]["model_loaded_mb"], "shape": shape,
    })


if __name__ == "__main__":
    main()
