"""A multi-process job for the parallel tests, launched by torchrun (or by hand).

    torchrun --standalone --nproc_per_node=N tests/dist_job.py OUT SPEC_JSON [SPEC_JSON ...]

Each spec (JSON) is one scenario run in turn on the same processes: a tiny model of
``family``, a ``dp x pertp`` mesh, ``steps`` ZO steps on batches of ``batch`` rows, with
optional ``offload`` settings (an OffloadConfig dict), ``slicing`` and ``optim`` fields
(an OptimConfig dict, lr 1e-3 by default). Rank 0 writes
``OUT/<name>.safetensors`` (the final weights) and ``OUT/<name>.json`` (losses,
gradients, bytes sent). ``die_at``: rank 1 exits abruptly before that step;
``corrupt_at``: rank 1 changes a weight before that step; ``resume_at``: before that
step the engine saves a checkpoint, and a new model and engine load it and go on.
``emulate_dp``: one process (no mesh) that computes each step's losses as that many
data-parallel ranks do (:class:`EmulatedDP`), the reference the data-parallel runs must
equal bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_batch, make_model  # noqa: E402

from zo2 import Objective, OptimConfig, ZOEngine  # noqa: E402
from zo2.config import OffloadConfig, ParallelConfig  # noqa: E402
from zo2.errors import ZO2Error  # noqa: E402
from zo2.parallel import Mesh  # noqa: E402


class EmulatedDP(ZOEngine):
    """One process whose step losses are computed as ``dp`` data-parallel ranks compute
    them (``Mesh.shard`` + ``Mesh.combine_losses``): each shard's float32 mean loss, times
    its count of labelled positions, summed in float64 and divided by the total count.

    The forward is row-independent (a row's logits do not depend on the other rows of
    its batch; ``test_parallel.py`` checks it), so the shards' means here are the ranks'
    own, bit for bit. The float64 sum is exact (checked below with fractions: each term
    is a float32 times a small integer, and the terms lie within a few binades), so no
    order of gloo's all-reduce can round it differently: the data-parallel runs must
    equal this process exactly, not up to rounding.
    """

    dp = 1

    def _losses(self, batch, plan):
        logits = self._stacked_logits(batch, plan)  # one process: every slice, every row
        labels = batch["labels"]
        size = labels.shape[0] // self.dp
        out = []
        for part in logits.chunk(plan.n):
            terms, count = [], 0
            for r in range(self.dp):
                rows = slice(r * size, (r + 1) * size)
                n = int((labels[rows] != -100).sum())
                terms.append(float(self.objective.loss(part[rows], labels[rows])) * n)
                count += n
            total = sum(terms)
            assert Fraction(total) == sum(map(Fraction, terms)), terms  # exact: any order
            out.append(total / count)
        return out


def build(spec: dict, mesh: Mesh) -> tuple[ZOEngine, torch.nn.Module]:
    """The scenario's engine and model (fresh weights)."""
    offload = OffloadConfig(**spec["offload"]) if spec.get("offload") else None
    model = make_model(spec.get("family", "llama"), layers=spec.get("layers", 3))
    if spec.get("quantization"):  # loaded back quantized by bitsandbytes (zo2.quantized)
        model = quantized(model, spec["quantization"],
                          getattr(torch, spec.get("dtype", "float32")))
    optim = OptimConfig(**{"lr": 1e-3, "q": spec.get("q", 1), **spec.get("optim", {})})
    cls = ZOEngine
    if spec.get("emulate_dp", 1) > 1:
        cls = type("EmulatedDP", (EmulatedDP,), {"dp": spec["emulate_dp"]})
    engine = cls(model, optim, Objective("label_words", candidates=torch.tensor([5, 9])),
                 seed=3, total_steps=spec.get("steps", 10), offload=offload, mesh=mesh)
    return engine, model


def quantized(model: torch.nn.Module, fmt: str, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` saved and loaded back quantized (the same codes on every rank), its
    float parameters (and the 4-bit layers' compute) in ``dtype``."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from zo2.quantized import bnb_config, portable

    with tempfile.TemporaryDirectory() as tmp:  # written by every rank (save_pretrained
        # writes on rank 0 only once torch.distributed is up)
        model.config.to_json_file(f"{tmp}/config.json")
        save_file({k: v.clone() for k, v in model.state_dict().items()},
                  f"{tmp}/model.safetensors", metadata={"format": "pt"})
        q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config(
            fmt, dtype), device_map="cpu", dtype=dtype)
    q.config.use_cache = False
    return portable(q).eval().requires_grad_(False)


def batch(spec: dict, t: int) -> dict:
    return make_batch(batch=spec.get("batch", 8), seed=t)


def run(out: Path, spec: dict) -> None:
    config = ParallelConfig(dp=spec.get("dp", 1), pertp=spec.get("pertp", 1),
                            slicing=spec.get("slicing", "off"),
                            timeout_s=spec.get("timeout_s", 60), check_every=2)
    mesh = Mesh(config, torch.device("cpu"))
    try:
        _run(out, spec, mesh)
    except ZO2Error:
        # as zo2.trainer.Trainer does on a failure: leave the process group at once (a
        # peer may be dead), so that no gloo thread is left to the interpreter's exit,
        # which once aborted a rank (SIGABRT) after it had reported its error
        mesh.close(wait=False)
        raise


def _run(out: Path, spec: dict, mesh: Mesh) -> None:
    engine, model = build(spec, mesh)
    record = {"losses": [], "grads": [], "bytes": []}
    for t in range(spec.get("steps", 10)):
        if spec.get("resume_at") == t:
            checkpoint = engine.save(out / f"{spec['name']}-step{t}")
            engine, model = build(spec, mesh)
            engine.load(checkpoint)
        if spec.get("die_at") == t and mesh.rank == 1:
            os._exit(17)
        if spec.get("corrupt_at") == t and mesh.rank == 1:  # a silent divergence
            next(model.parameters()).data.view(-1)[0] += 1e-3
        before = mesh.bytes_sent
        result = engine.step(batch(spec, t))
        record["losses"].append(result.losses)
        record["grads"].append(result.grads)
        record["bytes"].append(mesh.bytes_sent - before)  # a checksum step sends 16 more
        record.setdefault("telemetry", []).append(result.telemetry)
    record["state_elements"] = sum(v.numel() for v in engine.rule.state().values())
    record["offloaded_elements"] = sum(  # trainable elements in offloaded blocks
        e.numel for b in getattr(engine.residency, "blocks", []) for e in b.trainable)
    record["offloaded_slots"] = sum(  # their flat buffers' sizes (alignment, padding)
        b.numel for b in getattr(engine.residency, "blocks", []))
    record["eval"] = engine.evaluate([make_batch(batch=4, seed=100 + i) for i in range(3)])
    weights = engine.export_state_dict()
    if mesh.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in weights.items()},
                  str(out / f"{spec['name']}.safetensors"))
        (out / f"{spec['name']}.json").write_text(json.dumps(record))
    mesh.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    try:
        for arg in sys.argv[2:]:
            run(out, json.loads(arg))
    except ZO2Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
