"""ZO methods on the embedded default at a fixed budget of forward passes.

Real SmolLM2-135M (fp32, CPU), tweet sentiment (label words), batch 16. Every method
gets the same budget of ``--budget`` forward passes of batch 16 and the same training
batches (same order); test accuracy on one fixed balanced test subset is taken at 0 and
at four points along the budget. Methods:

* ``zo_sgd``: MeZO (configs/optim/mezo.yaml, tuned for this default);
* ``momentum``, ``zo_adam``, ``nspsa_q4``: configs/optim/momentum.yaml, adam.yaml,
  nspsa.yaml as shipped (untuned);
* ``lora_zo``, ``prefix_zo``: ZO-SGD on a LoRA / prefix adapter (:mod:`zo2.adapters`)
  with a larger lr and eps (untuned guesses, see ``METHODS``);
* ``adam_fo``: first-order AdamW with autograd, the reference.

Forward passes counted: two-sided ZO spends ``2 q`` forwards of batch 16 per step
(q=1: 2, n-SPSA q=4: 8); a first-order step (one forward + one backward) is counted as
3 forward-equivalents (backward ~ 2 forwards).

Each method runs in its own process (``--method X``), so ``ru_maxrss`` is its own peak.

``--probe``: before its run, each method whose lr is not tuned for this default (all but
``zo_sgd`` and ``adam_fo``) tries its lr times 1/3, 1 and 3 (``--probe-factors``) for
``--probe-budget`` forward
passes in a separate process and keeps the one with the lowest dev loss (64 dev examples,
drawn from the training pool as MeZO's dev is); the test set is never seen by the probe.

The ZO methods run through :class:`zo2.trainer.Trainer`, configured as ``zo2-train``
would be (:func:`overrides`): its model, data and engine, its ``train_step`` and
``evaluate``; this script only sets the schedule (a fixed budget, test accuracy along
it, the wall limit). ``adam_fo`` has its own loop (autograd, no engine).

    python -m bench.methods [--budget 120] [--n-test 200] [--probe] [--only zo_sgd,adam_fo]

Writes bench/results/methods.json and methods.png (``--name``: another file name, for a
partial rerun; ``--out``: another folder); last line: each method's final test
accuracy as ``key=value``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, ROOT, report

# name: (optim preset, overrides of the preset, peft preset or None); adam_fo: first order
METHODS: dict[str, tuple[str | None, dict, str | None]] = {
    "zo_sgd": ("mezo", {}, None),
    "momentum": ("momentum", {}, None),
    "zo_adam": ("adam", {}, None),
    "nspsa_q4": ("nspsa", {}, None),
    "lora_zo": ("mezo", {"lr": 5e-3, "eps": 1e-2}, "lora"),
    "prefix_zo": ("mezo", {"lr": 1e-2, "eps": 1e-1}, "prefix"),
    "adam_fo": (None, {"lr": 1e-5}, None),
}
FO_FORWARDS_PER_STEP = 3  # one forward + one backward, counted as 3 forward-equivalents
TUNED = {"zo_sgd", "adam_fo"}  # lrs tuned for this default; the others are probed with --probe
PROBE_FACTORS = (1 / 3, 1.0, 3.0)
N_DEV = 64


def overrides(method: str, n_train: int, n_test: int, lr: float | None = None) -> list[str]:
    """The ``zo2-train`` overrides of ``method`` (``lr`` overrides its preset's): the
    embedded default on the CPU, tweets (seed 42, balanced), batch 16, seed 0, nothing
    written but ``metrics.jsonl`` (no checkpoints, no wandb, no plot)."""
    preset, changes, adapter = METHODS[method]
    changes = changes if lr is None else {**changes, "lr": lr}
    out = ["model=smollm2-135m", "model.device=cpu", "task=tweets", f"task.n_train={n_train}",
           f"task.n_dev={N_DEV}", f"task.n_test={n_test}", "eval_every=0", "checkpoint.every=0",
           "checkpoint.resume=never", "logging=none", "progress=false",
           f"optim={preset or 'mezo'}"]
    if preset is not None:
        out += [f"optim.{k}={v!r}" for k, v in changes.items()]
    if adapter is not None:
        out.append(f"peft={adapter}")
    return out


def eval_steps(steps: int, points: int = 4) -> list[int]:
    """Steps after which test accuracy is taken: ~evenly along the budget, the last one."""
    return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


@dataclass
class Run:
    """One method set up: ``step()`` trains one step (its loss), ``evaluate(split)``
    measures dev or test; ``steps`` of ``per_step`` forward passes fit the budget."""

    step: Callable[[], float]
    evaluate: Callable[[str], dict]
    steps: int
    per_step: int
    info: dict


class _PlainEval:
    """Duck-types ``engine.evaluate`` for the pipeline: accuracy of a plain (autograd) model."""

    def __init__(self, model, objective) -> None:
        self.model, self.objective = model, objective

    def evaluate(self, batches) -> dict:
        import torch

        from zo2.loss import positions_to_keep

        right = seen = 0
        total, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                labels = b["labels"]
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    logits_to_keep=positions_to_keep(labels),
                                    use_cache=False).logits
                k = int((labels != -100).sum())
                total += float(self.objective.loss(logits, labels)) * k
                n += k
                r, s = self.objective.correct(logits, labels)
                right, seen = right + r, seen + s
        return {"loss": total / max(n, 1), "accuracy": right / max(seen, 1)}


def first_order(cfg, lr: float, budget: int) -> Run:
    """First-order AdamW with autograd on the model and data of ``cfg``, the reference."""
    import torch

    from zo2.data.pipeline import build
    from zo2.data.tasks import load_task
    from zo2.loss import positions_to_keep
    from zo2.models import load_model

    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    t = cfg.task
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     balanced=t.balanced)
    pipe = build(task, tok, objective=t.objective, batch_size=cfg.optim.batch_size,
                 eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, max_length=t.max_length)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    numel = sum(p.numel() for p in model.parameters())
    info = {"settings": {"optimizer": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0,
                         "schedule": "constant", "batch_size": cfg.optim.batch_size},
            "trainable_params": numel,
            "state_bytes": 2 * numel * 4,  # exp_avg, exp_avg_sq (fp32)
            "grad_bytes": numel * 4}
    evaluator = _PlainEval(model, pipe.objective)

    def step() -> float:
        b = next(pipe.train)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=positions_to_keep(b["labels"]), use_cache=False).logits
        loss = pipe.objective.loss(logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return Run(step, lambda split: pipe.evaluate(evaluator, split),
               budget // FO_FORWARDS_PER_STEP, FO_FORWARDS_PER_STEP, info)


def zo_info(method: str, cfg, engine, lr: float | None) -> dict:
    """What the record says about a ZO method's settings and memory."""
    from zo2.rules import state_bytes

    preset, changes, adapter = METHODS[method]
    changes = changes if lr is None else {**changes, "lr": lr}
    optim = cfg.optim
    numel = sum(p.numel for p in engine.params)
    settings = {k: getattr(optim, k) for k in (
        "method", "lr", "eps", "schedule", "min_lr_ratio", "q", "estimator", "direction",
        "momentum", "history", "beta1", "beta2", "state_dtype", "batch_size")}
    settings["preset"] = f"configs/optim/{preset}.yaml"
    if changes:
        settings["overrides"] = changes
    a = cfg.model.adapter
    if adapter == "lora":
        settings["adapter"] = {"kind": "lora", "r": a.r, "alpha": a.alpha,
                               "target_modules": "peft default (q_proj, v_proj)"}
    elif adapter == "prefix":
        settings["adapter"] = {"kind": "prefix", "num_virtual_tokens": a.num_virtual_tokens}
    return {"settings": settings, "trainable_params": numel,
            "state_bytes": state_bytes(engine.rule, numel)}


@contextlib.contextmanager
def setup(method: str, budget: int, n_train: int, n_test: int,
          lr: float | None = None) -> Iterator[Run]:
    """``method`` set up for ``budget`` forward passes (``lr`` overrides its preset's)."""
    from zo2.config import compose

    preset, changes, _ = METHODS[method]
    if preset is None:
        cfg = compose(overrides(method, n_train, n_test))
        yield first_order(cfg, changes["lr"] if lr is None else lr, budget)
        return
    from zo2.trainer import Trainer

    cfg = compose(overrides(method, n_train, n_test, lr))
    per_step = 2 * cfg.optim.q  # two-sided
    steps = budget // per_step
    cfg.steps = max(steps, 1)  # the lr schedule's horizon
    with tempfile.TemporaryDirectory() as out, Trainer(cfg, out) as trainer:
        yield Run(lambda: trainer.train_step(next(trainer.data)).loss, trainer.evaluate,
                  steps, per_step, zo_info(method, cfg, trainer.engine, lr))


def base_lr(method: str) -> float:
    from zo2.config import compose

    preset, changes, _ = METHODS[method]
    return changes["lr"] if "lr" in changes else compose([f"optim={preset}"]).optim.lr


def probe(method: str, budget: int, n_train: int, n_test: int,
          factors: tuple[float, ...] = PROBE_FACTORS) -> dict:
    """Short runs at the base lr times ``factors``; dev loss after each picks the lr."""
    grid = []
    for factor in factors:
        lr = base_lr(method) * factor
        with setup(method, budget, n_train, n_test, lr) as run:
            losses = [run.step() for _ in range(run.steps)]
            dev = run.evaluate("dev")
        grid.append({"lr": lr, "dev_loss": dev["loss"], "dev_accuracy": dev["accuracy"],
                     "forward_passes": run.steps * run.per_step,
                     "train_loss_first_last": [losses[0], losses[-1]] if losses else []})
        print(f"{method} probe lr {lr:.3g}: dev loss {dev['loss']:.4f} "
              f"acc {dev['accuracy']:.3f}", file=sys.stderr, flush=True)
    finite = [g for g in grid if g["dev_loss"] == g["dev_loss"]]  # drop NaN
    best = min(finite, key=lambda g: g["dev_loss"]) if finite else grid[1]
    return {"lr": best["lr"], "grid": grid}


def run_method(method: str, budget: int, n_train: int, n_test: int, acc0: float | None,
               deadline: float | None = None, lr: float | None = None) -> dict:
    """One method in this process: the accuracy curve, peak RSS, wall time."""
    started = time.perf_counter()
    with setup(method, budget, n_train, n_test, lr) as run:
        out = {"method": method, **run.info, **curve(method, run, acc0, deadline)}
    from zo2.tracking import peak_rss_mb

    out.update({"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()})
    return out


def curve(method: str, run: Run, acc0: float | None, deadline: float | None) -> dict:
    """Train ``run`` for its steps (fewer when ``deadline`` comes first), test accuracy
    at 0 (unless ``acc0`` is given) and at the :func:`eval_steps`."""
    checkpoints = eval_steps(run.steps)
    points = []
    evals_s = 0.0
    out: dict = {}
    if acc0 is None:
        t0 = time.perf_counter()
        acc0 = run.evaluate("test")["accuracy"]
        evals_s += time.perf_counter() - t0
        print(f"{method} step 0: test acc {acc0:.4f}", file=sys.stderr, flush=True)
        out["acc0_measured"] = True
    else:
        out["acc0_measured"] = False  # the same initial weights as a measured method
    points.append({"step": 0, "forward_passes": 0, "test_accuracy": acc0})
    losses = []
    train_s = 0.0
    eval_s_last = evals_s
    done = 0
    for step in range(1, run.steps + 1):
        if deadline is not None and done and time.time() + 1.5 * (
                train_s / done + eval_s_last) > deadline:
            break  # this method's share of the run's wall limit is spent
        t0 = time.perf_counter()
        losses.append(run.step())
        train_s += time.perf_counter() - t0
        done = step
        if step in checkpoints:
            t0 = time.perf_counter()
            acc = run.evaluate("test")["accuracy"]
            eval_s_last = time.perf_counter() - t0
            evals_s += eval_s_last
            points.append({"step": step, "forward_passes": step * run.per_step,
                           "test_accuracy": acc})
            print(f"{method} step {step}: test acc {acc:.4f} (train {train_s:.0f} s)",
                  file=sys.stderr, flush=True)
    if points[-1]["step"] != done:  # stopped early: evaluate where it stopped
        t0 = time.perf_counter()
        acc = run.evaluate("test")["accuracy"]
        evals_s += time.perf_counter() - t0
        points.append({"step": done, "forward_passes": done * run.per_step,
                       "test_accuracy": acc})
    out["truncated_by_deadline"] = done < run.steps
    out.update({
        "steps": done, "forward_passes_per_step": run.per_step,
        "forward_passes": done * run.per_step, "curve": points,
        "final_test_accuracy": points[-1]["test_accuracy"],
        "train_loss_first_last": [losses[0], losses[-1]] if losses else [],
        "train_s": train_s, "train_s_per_step": train_s / max(done, 1), "eval_s": evals_s,
    })
    return out


def plot(results: dict, budget: int, n_test: int, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        xs = [p["forward_passes"] for p in r["curve"]]
        ys = [p["test_accuracy"] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", label=f"{name} ({r['final_test_accuracy']:.3f})")
    ax.set_xlabel("forward passes of batch 16 (first order: 3 per step)")
    ax.set_ylabel(f"test accuracy ({n_test} balanced examples)")
    ax.set_title(f"SmolLM2-135M, tweet sentiment: budget {budget} forward passes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def _child(args: list[str], env: dict) -> dict:
    """Run this module in a fresh process; its last stdout line is the JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "bench.methods", *args], check=True, env=env,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.methods")
    parser.add_argument("--budget", type=int, default=32, help="forward passes per method")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child: run one method
    parser.add_argument("--acc0", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-method", help=argparse.SUPPRESS)  # child: probe one method
    parser.add_argument("--probe", action="store_true",
                        help="pick each untuned method's lr on dev first (see the docstring)")
    parser.add_argument("--probe-factors", type=lambda v: tuple(map(float, v.split(","))),
                        default=PROBE_FACTORS, help="comma-separated factors of the base lr")
    parser.add_argument("--name", default="methods", help="results file name")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder of the results (default bench/results)")
    parser.add_argument("--probe-budget", type=int, default=16,
                        help="forward passes of each probe run")
    parser.add_argument("--max-minutes", type=float, default=42.0,
                        help="wall limit of the whole run, shared equally by the methods left")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.budget, args.n_train, args.n_test,
                                    args.acc0, args.deadline, args.lr)))
        return
    if args.probe_method:
        print(json.dumps(probe(args.probe_method, args.probe_budget, args.n_train,
                               args.n_test, args.probe_factors)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    results: dict[str, dict] = {}
    acc0 = None
    names = args.only.split(",")
    end = time.time() + 60 * args.max_minutes - 30  # 30 s for the plot and the JSON
    data = ["--n-train", str(args.n_train), "--n-test", str(args.n_test)]
    for i, name in enumerate(names):
        deadline = time.time() + (end - time.time()) / (len(names) - i)
        probed = None
        if args.probe and name not in TUNED:  # the probe's time comes out of the share
            probed = _child(["--probe-method", name, "--probe-budget",
                             str(args.probe_budget), "--probe-factors",
                             ",".join(map(repr, args.probe_factors)), *data], env)
        cmd = ["--method", name, "--budget", str(args.budget), *data,
               "--deadline", repr(deadline)]
        if probed is not None:
            cmd += ["--lr", repr(probed["lr"])]
        if acc0 is not None and METHODS[name][2] != "prefix":  # prefix changes the init
            cmd += ["--acc0", repr(acc0)]
        results[name] = r = _child(cmd, env)
        if probed is not None:
            r["probe"] = probed
        print(f"{name}: acc {r['final_test_accuracy']:.4f} peak {r['peak_rss_mb']:.0f} MiB "
              f"wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
        if acc0 is None and METHODS[name][2] != "prefix":
            acc0 = results[name]["curve"][0]["test_accuracy"]
    total_s = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.budget, args.n_test, args.out / f"{args.name}.png")
    figures = {name: round(r["final_test_accuracy"], 4) for name, r in results.items()}
    record_extra = {
        "setup": {
            "model": "smollm2-135m (embedded, fp32, CPU)", "task": "tweets, label_words",
            "n_train": args.n_train, "n_test": args.n_test, "test_balanced": True,
            "batch_size": 16, "eval_batch_size": 32, "max_length": 128, "seed": 0,
            "budget_forward_passes": args.budget,
            "forward_pass_accounting": "two-sided ZO: 2*q forwards of batch 16 per step; "
                                       "first-order AdamW: 1 forward + 1 backward counted as "
                                       f"{FO_FORWARDS_PER_STEP} forward-equivalents per step",
            "eval_points": "test accuracy at 0 and after ~1/4, 1/2, 3/4, 1 of the budget",
            "acc0": "measured once for the base weights and reused for methods that start "
                    "from them (all but prefix_zo, whose random prefix changes the model)",
            "peak_rss": "ru_maxrss of each method's own process (load + train + eval)",
            "lr_choice": "zo_sgd: mezo.yaml (tuned for this default); adam_fo: lr 1e-5 as "
                         "bench/quality.py; the others: "
                         + (f"the lowest dev loss of base lr x {list(args.probe_factors)} after "
                            f"{args.probe_budget} forward passes (see each method's probe)"
                            if args.probe else
                            "momentum, zo_adam, nspsa_q4 as their presets, lora_zo, "
                            "prefix_zo untuned guesses (no probe run)"),
            "n_dev": N_DEV,
            "total_wall_s": total_s,
            "wall_limit": f"{args.max_minutes} min for the whole run, each method given an "
                          "equal share of what is left; a method whose share runs out stops "
                          "early (truncated_by_deadline) and is evaluated where it stopped",
            "budget_note": "see truncated_by_deadline and forward_passes for what each "
                           "method actually spent",
            "machine_note": "2 shared CPU cores: wall times are noisy",
        },
        "methods": results,
    }
    report(args.name, figures, args.out)  # prints the last line
    path = args.out / f"{args.name}.json"
    record = json.loads(path.read_text())
    record.update(record_extra)
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
