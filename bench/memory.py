"""Peak memory of a ZO step against inference (and first-order Adam) at the same batch.

Each mode runs in a fresh subprocess (peak RSS only grows), at the OPT-125m shape,
batch 8 x 128, classification loss at the last position:

* ``inference``: two plain forwards;
* ``zo``: three ZO engine steps (the scratch buffer, the stacked batch, the fused update);
* ``adam``: three first-order steps with autograd and torch.optim.Adam.

``--rules``: instead, three ZO steps of each update rule (:mod:`zo2.rules`), so that what
the stateful rules cost and what their memory-light variants save is measured: peak RSS
and the bytes of state the rule holds, against ZO-SGD (``zo``) and inference.

    python -m bench.memory [--shape opt-125m|opt-350m] [--rules]

Last line: ``zo_over_inference=... adam_over_inference=... zo_extra_mb=...``; with
``--rules``, each rule's peak over ZO-SGD's and its state in MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from bench.common import ROOT, classification_batch, opt_shape, report

LABELS = (5, 9)
RULES = {  # mode: the OptimConfig fields of a ZO run
    "zo": {},
    "momentum_history8": {"method": "zo-momentum", "history": 8},
    "momentum_buffer": {"method": "zo-momentum"},
    "momentum_buffer_bf16": {"method": "zo-momentum", "state_dtype": "bfloat16"},
    "adam": {"method": "zo-adam"},
    "adam_bf16": {"method": "zo-adam", "state_dtype": "bfloat16"},
    "sign": {"method": "zo-sign"},
}


def peak_mb() -> float:
    from zo2.tracking import peak_rss_mb  # VmHWM: ru_maxrss keeps a parent's peak too

    return peak_rss_mb()


def measure(mode: str, shape: str) -> dict:
    from zo2 import Objective, OptimConfig, ZOEngine
    from zo2.loss import last_positions, positions_to_keep

    model = opt_shape(shape=shape)
    batch = classification_batch(8, 128, model.config.vocab_size, LABELS)
    objective = Objective("label_words", candidates=torch.tensor(LABELS))
    keep = positions_to_keep(batch["labels"])
    baseline = peak_mb()
    if mode == "inference":
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      logits_to_keep=last_positions(batch["input_ids"], keep))
    elif mode.startswith("zo"):
        engine = ZOEngine(model, OptimConfig(lr=1e-7, **RULES[mode.removeprefix("zo:") or "zo"]),
                          objective)
        for _ in range(3):
            engine.step(batch)
        engine.flush()
        state = sum(t.numel() * t.element_size() for t in engine.rule.state().values())
        return {"peak_mb": peak_mb(), "model_loaded_mb": baseline, "state_mb": state / 2**20}
    elif mode == "adam":
        model.requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        for _ in range(3):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=last_positions(batch["input_ids"], keep)).logits
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
    modes = ["inference", *(f"zo:{r}" for r in RULES)] if "--rules" in sys.argv else [
        "inference", "zo", "adam"]
    for mode in modes:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--mode", mode, shape],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    if "--rules" in sys.argv:
        inf, zo = runs["inference"]["peak_mb"], runs["zo:zo"]["peak_mb"]
        figures = {"inference_mb": inf, "zo_sgd_mb": zo}
        for rule in RULES:
            r = runs[f"zo:{rule}"]
            figures[f"{rule}_over_zo_sgd"] = r["peak_mb"] / zo
            figures[f"{rule}_state_mb"] = r["state_mb"]
        report(f"memory-rules-{shape}", {**figures, "shape": shape})
        return
    inf, zo, adam = (runs[m]["peak_mb"] for m in ("inference", "zo", "adam"))
    report("memory" if shape == "opt-125m" else f"memory-{shape}", {
        "zo_over_inference": zo / inf, "adam_over_inference": adam / inf,
        "inference_mb": inf, "zo_mb": zo, "adam_mb": adam, "zo_extra_mb": zo - inf,
        "model_loaded_mb": runs["inference"]["model_loaded_mb"], "shape": shape,
    })


if __name__ == "__main__":
    main()
