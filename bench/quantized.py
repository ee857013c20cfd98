"""QZO on the embedded default: SmolLM2-135M in nf4 against bf16 ZO and first-order AdamW.

Three runs of ``--steps`` steps (150) on the tweets (MeZO's k-shot sample, label words,
batch 16, seed 0), each in its own process so that its peak RSS is its own:

* ``q4``: ``model.quantization=nf4`` (bitsandbytes, float32 compute), the default
  estimator and rule (MeZO) on the scales and the float parameters, ``optim.clip_grad``
  100 (QZO's);
* ``q4_bf16``: the same in bfloat16 compute (the unquantized tensors, the activations
  and the logits in bf16, as the ``bf16`` run has them): the like-for-like memory
  comparison, ``q4_rss_over_bf16``;
* ``bf16``: ``model.dtype=bfloat16``, the same estimator, rule and lr;
* ``adam``: first-order AdamW (autograd, fp32), the reference (``bench.methods``).

Test accuracy of ``best/`` (picked by dev accuracy) on ``--n-test`` balanced held-out
tweets, zero-shot and tuned; peak RSS; seconds per step; ``<part>_model_mb``: the bytes
of each ZO part's model tensors (``q4_model_bytes_over_bf16``). ``q4_bytes_over_bf16``: the
offloaded bytes up per step of a short offloaded run of q4 and bf16;
``q4_bf16_bytes_over_bf16`` the same for q4_bf16, whose blocks are held widened (float32
scales beside bf16 norms, :mod:`zo2.offload.store`). A refused run is recorded as such.

Each ZO part's peak RSS is also split at the end of the model's load
(``zo2.tracking.reset_peak_rss``): ``<part>_load_peak_rss_mb`` (the load: the checkpoint's
mapped file pages are resident while it is read, a quantizer's transients) and
``<part>_train_peak_rss_mb`` (training, evaluations and saves), with
``q4_train_rss_over_bf16``. ``q4_rss_floor_over_bf16``: the best ratio that shrinking the
model's tensors alone could give, the bf16 run's peak with its model tensors swapped for
nf4's, ``(bf16_peak - bf16_model + q4_bf16_model) / bf16_peak``.

``--shape smollm2-1.7b``: the same parts on a random-weight model of SmolLM2-1.7B's
public shape (the embedded config with 2048 x 24 layers, an MLP of 8192; built once, saved
in bf16 with the embedded tokenizer), where the weights, not the runtime, are most of the
memory; its accuracies mean nothing (random weights), its memory is the point. Use it
with few ``--steps``, a small ``--batch-size`` and ``--name quantized-1.7b``.

    python -m bench.quantized [--steps 150] [--n-test 500] [--parts q4,q4_bf16,bf16,adam]
        [--merge-from bench/results/quantized-q4.json ...]
    python -m bench.quantized --shape smollm2-1.7b --parts q4_bf16,bf16 --steps 3
        --batch-size 4 --n-dev 16 --n-test 16 --eval-every 3 --no-bytes --name quantized-1.7b

Writes bench/results/quantized.json; last line: the figures as ``key=value``. The parts
can run in separate invocations: ``--merge-from`` takes the figures of earlier records
(of the same ``--steps`` and ``--n-test``) and this run's replace what they share; the
ratios are computed from the merged figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, report

PARTS = {
    "q4": ["model.quantization=nf4", "optim.clip_grad=100"],
    "q4_bf16": ["model.quantization=nf4", "model.dtype=bfloat16", "optim.clip_grad=100"],
    "bf16": ["model.dtype=bfloat16"],
}
BYTES_STEPS = 5  # steps of the offloaded runs that measure bytes up per step
SHAPES = {"smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192,
                           "num_hidden_layers": 24, "num_attention_heads": 32,
                           "num_key_value_heads": 32}}  # SmolLM2-1.7B's config.json


def _command(out: Path, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "zo2.launch.train", f"output_dir={out}", "progress=false",
            "model=smollm2-135m", f"model.name={args.model}", "model.device=cpu", "task=tweets",
            f"task.n_train={args.n_train}", f"task.n_test={args.n_test}",
            f"task.n_dev={args.n_dev}", f"steps={args.steps}", f"eval_every={args.eval_every}",
            f"optim.batch_size={args.batch_size}", "checkpoint.every=0", "logging=none",
            "seed=0", *extra]


def build_shape(shape: str, folder: Path) -> Path:
    """A random-weight model of ``shape`` (:data:`SHAPES`: the embedded model's config
    with these fields), saved in bf16 with the embedded tokenizer into ``folder``."""
    import torch
    from transformers import AutoConfig

    from zo2.models import embedded_tokenizer, random_model, weights_folder

    config = AutoConfig.from_pretrained(weights_folder("smollm2-135m"))
    config.update(SHAPES[shape])
    random_model(config, seed=0).to(torch.bfloat16).save_pretrained(folder)
    embedded_tokenizer().save_pretrained(folder)
    return folder


def _run(command: list[str]) -> subprocess.CompletedProcess:
    print("+", " ".join(command[3:]), flush=True)
    return subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True)


def run_zo(part: str, args, out: Path) -> dict:
    done = _run(_command(out, args, PARTS[part]))
    if done.returncode:
        raise SystemExit(f"{part} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {f"{part}_zero_shot": summary["zero_shot_test"],
            f"{part}_tuned": summary["tuned_test"], f"{part}_best_step": summary["best_step"],
            f"{part}_peak_rss_mb": summary["peak_rss_mb"],
            f"{part}_load_peak_rss_mb": summary.get("load_peak_rss_mb"),
            f"{part}_train_peak_rss_mb": summary.get("train_peak_rss_mb"),
            f"{part}_s_per_step": summary["minutes"] * 60 / args.steps}


def bytes_up(part: str, args, out: Path) -> float | str:
    """MiB uploaded per step, steady state, in a short offloaded run of ``part``."""
    small = argparse.Namespace(**{**vars(args), "steps": BYTES_STEPS, "eval_every": 0,
                                  "n_test": 16, "n_dev": 16})
    done = _run(_command(out, small, [*PARTS[part], "offload.enabled=true", "log_every=1"]))
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"refused: {last}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    # one record a step (log_every=1); the first also covers the zero-shot evaluation
    ups = [r["offload_up_mb"] for r in records if "offload_up_mb" in r][1:]
    return statistics.median(ups) if ups else "no offload_up_mb in metrics.jsonl"


def model_mb(part: str, model: str) -> float:
    """MiB of the model's tensors as loaded for ``part`` (its state dict, each storage
    once: the tied embedding and LM head count once): what the weights themselves take,
    beside the process's peak RSS (runtime, activations and transients included)."""
    from zo2.models import load_model

    changes = dict(item.split("=", 1) for item in PARTS[part])
    model, _ = load_model(model, dtype=changes.get("model.dtype", "float32"),
                          quantization=changes.get("model.quantization", "none"))
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                for t in model.state_dict().values()}
    return sum(n for _, n in storages) / 2**20


def run_adam(args) -> dict:
    """First-order AdamW over the same steps (3 forward-equivalents a step)."""
    from bench.methods import FO_FORWARDS_PER_STEP, run_method

    result = run_method("adam_fo", args.steps * FO_FORWARDS_PER_STEP, args.n_train,
                        args.n_test, None)
    points = result["run"]["curve"]
    return {"adam_zero_shot": points[0]["test_accuracy"],
            "adam_tuned": points[-1]["test_accuracy"],
            "adam_peak_rss_mb": result["run"]["peak_rss_mb"],
            "adam_s_per_step": result["run"]["wall_s"] / max(args.steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-dev", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--parts", default="q4,q4_bf16,bf16,adam")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="a random-weight model of this public shape, not the embedded one")
    parser.add_argument("--bytes", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure offloaded bytes up per step")
    parser.add_argument("--model-bytes", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the bytes of each ZO part's model tensors")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # adam, in its own process
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[],
                        help="earlier records whose figures this run adds to")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quantized")
    args = parser.parse_args()
    if args.child == "adam":
        print(json.dumps(run_adam(args)))
        return
    figures: dict = {"steps": args.steps, "n_test": args.n_test}
    if args.shape:
        figures["shape"] = args.shape
    for path in args.merge_from:
        earlier = json.loads(path.read_text())["figures"]
        if (earlier.get("steps"), earlier.get("n_test")) != (args.steps, args.n_test):
            raise SystemExit(f"{path}: steps / n_test {earlier.get('steps')} / "
                             f"{earlier.get('n_test')}, this run's {args.steps} / {args.n_test}")
        figures.update(earlier)
    parts = [p for p in args.parts.split(",") if p]
    if args.shape and "adam" in parts:
        raise SystemExit("--shape: the adam part runs on the embedded model only")
    with tempfile.TemporaryDirectory(prefix="zo2-bench-quantized-") as tmp:
        args.model = (str(build_shape(args.shape, Path(tmp) / args.shape)) if args.shape
                      else "smollm2-135m")
        for part in parts:
            if part == "adam":
                child = [sys.executable, "-m", "bench.quantized", "--child", "adam",
                         f"--steps={args.steps}", f"--n-train={args.n_train}",
                         f"--n-test={args.n_test}"]
                done = _run(child)
                if done.returncode:
                    raise SystemExit(f"adam failed:\n{done.stderr[-3000:]}")
                figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                figures.update(run_zo(part, args, Path(tmp) / part))
        if args.bytes:
            for part in ("q4", "q4_bf16", "bf16"):  # q4_bf16: blocks held widened
                figures[f"{part}_bytes_up_mb_per_step"] = bytes_up(part, args,
                                                                   Path(tmp) / f"{part}-off")
        if args.model_bytes:
            for part in PARTS:
                figures[f"{part}_model_mb"] = model_mb(part, args.model)
            figures["q4_model_bytes_over_bf16"] = (figures["q4_bf16_model_mb"]
                                                   / figures["bf16_model_mb"])
    bf16 = figures.get("bf16_peak_rss_mb")
    if bf16:  # the target's ratio: q4 in bf16 compute, like the bf16 run
        if "q4_bf16_peak_rss_mb" in figures:
            figures["q4_rss_over_bf16"] = figures["q4_bf16_peak_rss_mb"] / bf16
        if "q4_peak_rss_mb" in figures:  # float32 compute: activations and logits fp32
            figures["q4_fp32_rss_over_bf16"] = figures["q4_peak_rss_mb"] / bf16
        if "bf16_model_mb" in figures:  # only the model's tensors shrunk, nothing else
            figures["q4_rss_floor_over_bf16"] = (bf16 - figures["bf16_model_mb"]
                                                 + figures["q4_bf16_model_mb"]) / bf16
    q4t, bft = figures.get("q4_bf16_train_peak_rss_mb"), figures.get("bf16_train_peak_rss_mb")
    if q4t and bft:
        figures["q4_train_rss_over_bf16"] = q4t / bft
    for part in ("q4", "q4_bf16"):  # the accuracy target: within 3 points of bf16
        if f"{part}_tuned" in figures and "bf16_tuned" in figures:
            figures[f"{part}_minus_bf16_points"] = 100 * (figures[f"{part}_tuned"]
                                                          - figures["bf16_tuned"])
    q4b, bfb = figures.get("q4_bytes_up_mb_per_step"), figures.get("bf16_bytes_up_mb_per_step")
    if isinstance(q4b, float) and isinstance(bfb, float):
        figures["q4_bytes_over_bf16"] = q4b / bfb
    q4h = figures.get("q4_bf16_bytes_up_mb_per_step")
    if isinstance(q4h, float) and isinstance(bfb, float):
        figures["q4_bf16_bytes_over_bf16"] = q4h / bfb
    report(args.name, figures, args.out)


if __name__ == "__main__":
    main()
