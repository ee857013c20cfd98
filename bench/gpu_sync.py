"""Host syncs per training step on a GPU, resident and offloaded.

After two warm-up steps, each of ``--steps`` steps runs under
``torch.cuda.set_sync_debug_mode("warn")`` and the synchronizing CUDA calls it makes are
counted (torch warns once per call): over the whole step (the losses' read-back and
the model's own mask checks included), and inside zo2's part only (every unit's
upload, update, perturbation, forward and write-back, ``begin_pass`` / ``end_pass``
and the flush; what ``tests/test_gpu.py::test_cuda_steps_make_no_host_sync`` requires
to be zero). ``ok`` when zo2's part made none.

    python -m bench.gpu_sync [--steps 3] [--json out.json]
    python -m bench.gpu_sync --dry-run     # the same steps on the CPU (nothing counted)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch

from zo2 import Objective, OptimConfig, ZOEngine
from zo2.config import OffloadConfig


def make_model():
    """A small random Llama (4 layers of 128), as the GPU tests use (no pytest needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                         max_position_embeddings=128)
    config.use_cache = False
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_batch(seed: int, batch: int = 4, seq: int = 12) -> dict:
    """Prompts whose last token is a label word (5 or 9), every other row left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, :3] = 0
    ids[:, -1] = torch.tensor([5, 9])[torch.randint(0, 2, (batch,), generator=g)]
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SyncCounter:
    """Counts torch's sync warnings while :meth:`watch` is active (CUDA only)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.count = cuda, 0

    @contextlib.contextmanager
    def watch(self):
        if not self.cuda:
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        self.count += sum("synchroniz" in str(w.message) for w in seen)

    def wrap(self, fn):
        def watched(*args, **kwargs):
            with self.watch():
                return fn(*args, **kwargs)
        return watched


def measure(offloaded: bool, device: str, steps: int) -> dict:
    offload = OffloadConfig(enabled=True, ring=2) if offloaded else None
    engine = ZOEngine(make_model(), OptimConfig(lr=1e-3),
                      Objective("label_words", torch.tensor([5, 9])), offload=offload,
                      device=device)
    cuda = engine.device.type == "cuda"
    for i in range(2):  # warm-up: compilation, tables, scratch
        engine.step(make_batch(i))
    whole = SyncCounter(cuda)
    for i in range(steps):
        with whole.watch():
            engine.step(make_batch(2 + i), telemetry=False)
    part = SyncCounter(cuda)
    engine.context.run_unit = part.wrap(engine.context.run_unit)
    for name in ("begin_pass", "end_pass", "flush"):
        setattr(engine.residency, name, part.wrap(getattr(engine.residency, name)))
    for i in range(steps):
        engine.step(make_batch(2 + steps + i), telemetry=False)
    if not cuda:
        return {"syncs_per_step": None, "zo2_syncs_per_step": None, "ok": None}
    return {"syncs_per_step": whole.count / steps, "zo2_syncs_per_step": part.count / steps,
            "ok": part.count == 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no GPU: run with --dry-run to check the script on the CPU")
    device = "cpu" if args.dry_run else "cuda"
    out = {mode: measure(mode == "offloaded", device, args.steps)
           for mode in ("resident", "offloaded")}
    print("gpu-sync " + " ".join(f"{m}_{k}={v}" for m, r in out.items() for k, v in r.items()),
          flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    sys.exit(0 if all(r["ok"] is not False for r in out.values()) else 1)


if __name__ == "__main__":
    main()
