"""What a run checkpoint costs to write, verify and load, and what the seed log costs instead.

On the embedded SmolLM2-135M-Instruct (fp32, CPU), batch 2 x 32 tokens, loss at the
last position. A checkpoint is written the way the trainer writes one:
``RunCheckpoints(root, keep=2, mesh).save(step, engine, states)``, which calls
``engine.save(folder)`` and writes the named states (here a small fixed trainer and data
state) to ``run_state.json``. Each save follows an
``engine.step``, so it has a pending update to apply first, as in a run. The save
time is split into three parts:

* ``flush``: applying the pending update to the weights (``engine.flush``);
* ``engine.save``: the state dict export, the safetensors file and the engine state;
* the rest of the save: the manifest (fsync and SHA-256 of every
  file), the rename and pruning to ``keep``. ``write_manifest`` is also timed alone
  on the published folder, to show what the hashing costs.

Loading is ``zo2.checkpoints.verify`` (re-hashes every file) and ``engine.load`` into
a fresh engine on a freshly loaded model; the files are in the page cache (just
written), so this is not a cold-disk read. The offloaded engine
(``OffloadConfig(enabled=True, ring=2)``) saves once, exporting from its block store,
and loads into a fresh offloaded engine.

The seed log (:mod:`zo2.seedlog`) stores 8*(q+2) bytes a step. Its file sizes for
1,000 steps at q=1 and q=4 come from ``SeedLog.from_records``: step_seed-derived
seeds and coefficients drawn from a normal with the spread of the coefficients of the
real SmolLM2 steps above (a real 1,000-step run takes too long here; the size does not
depend on the values). Replay time is measured for ``--replay-steps`` records on a
fresh SmolLM2 and extrapolated (linearly: one pass over every weight per record) to
1,000 steps. Medians of ``--rounds``; the machine is shared, so timings are noisy.

    python -m bench.checkpoint [--rounds 3] [--replay-steps 50] [--root DIR]

Last line: ``ckpt_write_s=... ckpt_bytes=... ckpt_load_s=... verify_s=...
offload_write_s=... offload_load_s=... seedlog_1000_bytes=... seedlog_q4_1000_bytes=...
replay_s_per_step=... replay_1000_s_extrapolated=...`` (then the other figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bench.common import RESULTS, classification_batch, median, report, timed
from zo2 import Objective, OptimConfig, ZOEngine
from zo2.checkpoints import RunCheckpoints, verify, write_manifest
from zo2.config import OffloadConfig
from zo2.engine import step_seed
from zo2.models import load_model, model_identity
from zo2.seedlog import SeedLog, replay

MODEL = "smollm2-135m"
LABELS = (5, 9)
SEED = 0


class Fixed:
    """A :class:`~zo2.checkpoints.Stateful` with a fixed state (the trainer's, the data's)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class TimedSave:
    """The engine as the checkpoint sees it, its ``save`` timed into ``parts``."""

    def __init__(self, engine: ZOEngine, parts: dict) -> None:
        self.engine, self.parts = engine, parts

    def save(self, folder: Path) -> None:
        self.parts["engine_save_s"] = timed(lambda: self.engine.save(folder))


def make_engine(offload: bool = False) -> ZOEngine:
    model, _ = load_model(MODEL)
    return ZOEngine(model, OptimConfig(lr=1e-6, eps=1e-3),
                    Objective("label_words", candidates=torch.tensor(LABELS)), seed=SEED,
                    offload=OffloadConfig(enabled=True, ring=2) if offload else None,
                    device="cpu")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_checkpoint(engine: ZOEngine, checkpoints: RunCheckpoints) -> dict:
    """One ``checkpoints.save`` as the trainer makes it, its parts timed; the engine has a
    pending update (it just stepped)."""
    parts: dict[str, float] = {"flush_s": timed(engine.flush)}  # the save's first act
    step = engine.step_index
    states = {"trainer": Fixed({"step": step, "best": {"step": 0}, "zero_shot": {},
                                "config": {}}),
              "data": Fixed({"epoch": 0, "position": 0})}
    total = parts["flush_s"] + timed(lambda: checkpoints.save(step, TimedSave(engine, parts),
                                                              states))
    folder = checkpoints.steps.path(step)
    # Rewriting the published folder's manifest gives the same manifest (same files).
    manifest = timed(lambda: write_manifest(folder, step=step))
    return {"total_s": total, **parts, "publish_s": total - parts["flush_s"]
            - parts["engine_save_s"], "manifest_s": manifest, "folder": folder}


def load_checkpoint(folder: Path, engine: ZOEngine, rounds: int) -> tuple[float, float]:
    """Median seconds of ``verify(folder)`` and of ``engine.load(folder)``."""
    verify_s = median([timed(lambda: verify(folder)) for _ in range(rounds)])
    load_s = median([timed(lambda: engine.load(folder)) for _ in range(rounds)])
    return verify_s, load_s


def same_weights(a: ZOEngine, b: ZOEngine) -> bool:
    sa, sb = a.export_state_dict(), b.export_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def synthetic_log(base: dict, n: int, q: int, scale: float, seed: int = 0) -> SeedLog:
    """A seed log of ``n`` records with this run seed's seeds and N(0, scale) coefs."""
    g = torch.Generator().manual_seed(seed)
    coefs = (torch.randn(n, q, generator=g, dtype=torch.float64) * scale).tolist()
    records = [{"step": s, "seeds": [step_seed(SEED, s, j) for j in range(q)],
                "coefs": coefs[s - 1], "decay": 1.0} for s in range(1, n + 1)]
    return SeedLog.from_records(records, base=base, seed=SEED, dtype="float32")


def resident(root: Path, batch_seq: int, rounds: int) -> dict:
    """Steps and saves of the resident engine; verify and load into a fresh one."""
    engine = make_engine()
    batch = classification_batch(2, batch_seq, engine.model.config.vocab_size, LABELS)
    step_s = [timed(lambda: engine.step(batch))]  # the first of "a couple" of steps
    checkpoints = RunCheckpoints(root, keep=2, mesh=engine.mesh)
    saves = []
    for _ in range(rounds):
        step_s.append(timed(lambda: engine.step(batch)))  # leaves a pending update
        saves.append(save_checkpoint(engine, checkpoints))
    folder = saves[-1]["folder"]
    fresh = make_engine()
    verify_s, load_s = load_checkpoint(folder, fresh, rounds)
    assert same_weights(engine, fresh), "the loaded checkpoint differs from the saved engine"
    figures = {k: median([s[k] for s in saves]) for k in
               ("total_s", "flush_s", "engine_save_s", "publish_s", "manifest_s")}
    return {**figures, "verify_s": verify_s, "load_s": load_s, "step_s": median(step_s),
            "bytes": folder_bytes(folder), "batch": batch,
            "files": {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()},
            "coef_scale": statistics.pstdev(c for r in engine.log for c in r["coefs"])}


def offloaded(root: Path, batch: dict, rounds: int) -> dict:
    """One step and one save of the offloaded engine; load into a fresh offloaded one."""
    engine = make_engine(offload=True)
    step_s = timed(lambda: engine.step(batch))
    save = save_checkpoint(engine, RunCheckpoints(root, keep=2, mesh=engine.mesh))
    fresh = make_engine(offload=True)
    verify_s, load_s = load_checkpoint(save["folder"], fresh, rounds)
    assert same_weights(engine, fresh), "the offloaded load differs from the offloaded save"
    engine.close()
    fresh.close()
    return {**save, "verify_s": verify_s, "load_s": load_s, "step_s": step_s}


def seedlog(root: Path, coef_scale: float, replay_steps: int) -> dict:
    """Seed log file sizes at 1,000 steps; replay time of ``replay_steps`` on SmolLM2."""
    base_load_s = timed(lambda: load_model(MODEL))  # what a replay loads first (page cache)
    model, _ = load_model(MODEL)
    base = model_identity(model)
    sizes = {}
    for q in (1, 4):
        path = synthetic_log(base, 1000, q, coef_scale / q).save(root / f"q{q}.seedlog")
        assert len(SeedLog.load(path)) == 1000
        sizes[q] = path.stat().st_size
    log = synthetic_log(base, replay_steps, 1, coef_scale)
    replay_s = timed(lambda: replay(model, log))
    return {"bytes_q1": sizes[1], "bytes_q4": sizes[4], "replay_s": replay_s,
            "base_load_s": base_load_s, "params": base["num_params"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay-steps", type=int, default=50)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--root", default=None, help="folder for the checkpoints (default: "
                        "a temporary folder under $TMPDIR)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        res = resident(root / "resident", args.seq, args.rounds)
        off = offloaded(root / "offload", res["batch"], args.rounds)
        log = seedlog(root, res["coef_scale"], args.replay_steps)
    n = args.replay_steps
    per_step = log["replay_s"] / n
    full_load_s = res["verify_s"] + res["load_s"]
    report("checkpoint", {
        "ckpt_write_s": res["total_s"], "ckpt_bytes": res["bytes"],
        "ckpt_load_s": res["load_s"], "verify_s": res["verify_s"],
        "offload_write_s": off["total_s"], "offload_load_s": off["load_s"],
        "seedlog_1000_bytes": log["bytes_q1"], "seedlog_q4_1000_bytes": log["bytes_q4"],
        "replay_s_per_step": per_step, "replay_1000_s_extrapolated": 1000 * per_step,
        # the parts of a resident save (medians): apply the pending update, engine.save,
        # then manifest + fsync + rename + prune; write_manifest alone on the folder
        "write_flush_s": res["flush_s"], "write_engine_save_s": res["engine_save_s"],
        "write_manifest_rename_s": res["publish_s"], "write_manifest_alone_s": res["manifest_s"],
        "ckpt_safetensors_bytes": res["files"]["model.safetensors"],
        "offload_write_flush_s": off["flush_s"],
        "offload_write_engine_save_s": off["engine_save_s"],
        "offload_write_manifest_rename_s": off["publish_s"],
        "offload_verify_s": off["verify_s"],
        "step_s": res["step_s"], "offload_step_s": off["step_s"],
        # the seed log instead of weights
        "seedlog_bytes_per_step_q1": 8 * 3, "seedlog_bytes_per_step_q4": 8 * 6,
        "seedlog_source": "from_records_synthetic_coefs",  # see notes in the JSON
        "replay_measured_steps": n, "replay_measured_s": log["replay_s"],
        "replay_base_load_s": log["base_load_s"],  # load_model before a replay
        "full_load_s": full_load_s,  # verify + engine.load: resuming from a checkpoint
        "replay_steps_per_full_load": full_load_s / per_step,
        "replay_1000_over_full_load_extrapolated": 1000 * per_step / full_load_s,
        "ckpt_over_seedlog_1000_bytes": res["bytes"] / log["bytes_q1"],
        "params_m": log["params"] / 1e6, "batch": 2, "seq": args.seq, "rounds": args.rounds,
        "total_bench_s": time.perf_counter() - started,
        "loadavg_start": load_before, "loadavg_end": os.getloadavg()[0],  # other processes
    })
    path = RESULTS / "checkpoint.json"  # add what key=value cannot say to report()'s file
    result = json.loads(path.read_text())
    result["notes"] = {
        "ckpt_files": res["files"],
        "seedlog_source": "SeedLog.from_records with step_seed(run seed, step, j) seeds and "
                          f"coefficients drawn from N(0, ({res['coef_scale']:.3g}/q)^2), the "
                          "spread of the real SmolLM2 steps' coefficients; no 1,000-step run "
                          "(the file size does not depend on the values)",
        "replay_1000_s_extrapolated": f"not measured: {n} replayed records, times 1000/{n}",
        "load": "files in the page cache (just written): not a cold-disk read",
        "write": "after an engine.step: includes applying the pending update (flush)",
        "offload": "OffloadConfig(enabled=True, ring=2) on the CPU; one save (after one "
                   f"step), load median of {args.rounds} into a fresh offloaded engine",
    }
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
