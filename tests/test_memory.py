"""Peak memory of a ZO step is that of inference plus one unit's scratch buffer.

The baseline is inference on the batch the ZO step's forward computes: the batch
stacked twice (+eps and -eps rows), so the doubled activations are not counted as the
step's overhead. The slack is not a guess at the allocator's noise: it is half the
smallest defect each check exists to catch (a second buffer the size of the largest
unit; a copy of every layer, which would grow with depth), so a defect exceeds it by
the other half and the noise may take up to that half.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, resource, sys
import torch
sys.path.insert(0, sys.argv[2])
from conftest import make_batch, make_model
from zo2 import Objective, OptimConfig, ZOEngine, noise
from zo2.loss import last_positions, positions_to_keep

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

layers = int(sys.argv[1])
model = make_model("llama", layers=layers, hidden=256, vocab=8192)
batch = make_batch(batch=8, seq=64, vocab=8192)
noise.fill(torch.empty(1 << 17), 1, 2)  # compile the kernels and start their threads first
keep = positions_to_keep(batch["labels"])
stacked = {k: v.repeat(2, 1) for k, v in batch.items()}  # what the MeZO forward runs
with torch.no_grad():
    for _ in range(3):
        model(input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"],
              logits_to_keep=last_positions(stacked["input_ids"], keep))
inference = peak()
engine = ZOEngine(model, OptimConfig(lr=1e-4), Objective("label_words", torch.tensor([5, 9])))
for _ in range(3):
    engine.step(batch)
engine.flush()
print(json.dumps({"inference": inference, "zo": peak(),
                  "largest_unit": max(u.numel for u in engine.units) * 4,
                  "model": sum(p.numel() for p in model.parameters()) * 4,
                  "scratch": engine.context.scratch.nbytes()}))
"""


def probe(layers: int) -> dict:
    tests = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", PROBE, str(layers), tests], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_zo_step_memory_is_inference_plus_one_unit_at_any_depth():
    shallow, deep = probe(4), probe(16)
    layer = (deep["model"] - shallow["model"]) / 12  # the bytes of one decoder layer
    # half the smallest defect: one more largest-unit buffer, or 12 more layers' copies
    slack = min(shallow["largest_unit"], 12 * layer) / 2
    extras = []
    for m in (shallow, deep):
        extra = m["zo"] - m["inference"]
        assert m["scratch"] == m["largest_unit"]
        assert extra <= m["largest_unit"] + slack, m
        extras.append(extra)
    assert extras[1] - extras[0] < slack  # does not grow with depth
    assert extras[1] < 0.5 * deep["model"], deep  # far from a second copy of the weights
