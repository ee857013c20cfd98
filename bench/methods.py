"""ZO methods on the embedded default at a fixed budget of forward passes.

Real SmolLM2-135M (fp32, CPU), tweet sentiment (label words), batch 16. Every method
gets the same budget of ``--budget`` forward passes of batch 16 and, per seed, the same
training batches (same order); test accuracy on one fixed balanced test subset is taken
at 0 and at four points along the budget. Methods (:data:`METHODS`, one line each):

* ``zo_sgd``: MeZO (configs/optim/mezo.yaml, tuned for this default);
* ``fzoo``: FZOO (configs/optim/fzoo.yaml: one-sided, q=8 Rademacher directions, each
  step normalised by the spread of the perturbed losses; lr chosen by ``--probe``);
* ``momentum``, ``zo_adam``, ``nspsa_q4``: configs/optim/momentum.yaml, adam.yaml,
  nspsa.yaml as shipped (untuned);
* ``lora_zo``, ``prefix_zo``: ZO-SGD on a LoRA / prefix adapter (:mod:`zo2.adapters`)
  with a larger lr and eps (untuned guesses, see ``METHODS``);
* ``adam_fo``: first-order AdamW with autograd, the reference.

Forward passes counted: a ZO step spends one forward of batch 16 per slice of its
estimator's plan (``engine.plan``): two-sided ``2 q`` (MeZO 2, n-SPSA q=4: 8), one-sided
and FZOO ``q + 1`` (FZOO q=8: 9); a first-order step (one forward + one backward) is
counted as 3 forward-equivalents (backward ~ 2 forwards). A method runs the whole steps
that fit the budget (FZOO: 44 steps, 396 forwards of 400).

``--minutes M``: equal wall time. Each run gets M minutes of its own (its process's
setup and its test evaluations included) instead of a share of the invocation's limit;
``--budget`` is then the plan that fills them (its lr schedule's horizon, set from the
method's seconds per forward pass alone on this machine): a run that reaches it early
ends there, one still short at its time stops there (``cut_short``). The figures give
each method's accuracy at its time over seeds, and ``default_mean`` / ``default_sd``:
the default's (configs/train.yaml's ``optim``).

``--seeds 0,1,2``: each method once per seed: ``zo2-train``'s ``seed``, which seeds the
perturbation directions (``step_seed(seed, step, j)``), the training data order
(``BatchIterator``: reshuffled each epoch with ``Random(seed + epoch)``) and an adapter's
init; the splits (train pool, dev, test) are fixed by ``task.seed=42``. The record
(:mod:`bench.methods_report`) gives each seed's curve, and at each eval point the mean
and the sample standard deviation over seeds; the plot a mean line and a +-1 sd band.

Each (method, seed) runs in its own process, so its ``VmHWM`` is its own peak
(:func:`zo2.tracking.peak_rss_mb`). A run
whose share of the wall limit (``--max-minutes``, ``--stop-at``) runs out stops at a
whole step, is evaluated there and is marked ``cut_short`` (``forwards_reached``).
Results go to ``--name``.json, merged: a later invocation adds or replaces its own
(method, seed) runs and keeps the others, so a bench can be spread over several runs.

``--probe``: before its run, each method whose lr is not tuned for this default (not
``tuned`` in :data:`METHODS`) tries its lr times 1/3, 1 and 3 (``--probe-factors``) for
``--probe-budget`` forward passes in a separate process (first seed) and keeps the one
with the lowest dev loss (64 dev examples, drawn from the training pool as MeZO's dev
is); the test set is never seen by the probe. ``--probe-from FILE``: attach probes run
earlier (``--probe-method`` answers, one JSON a line; the lr they pick must be the
method's preset lr) instead of probing again.

The ZO methods run through :class:`zo2.trainer.Trainer`, configured as ``zo2-train``
would be (:func:`overrides`): its model, data and engine, its ``train_step`` and
``evaluate``; this script only sets the schedule (a fixed budget, test accuracy along
it, the wall limit). ``adam_fo`` has its own loop (autograd, no engine).

    python -m bench.methods [--budget 120] [--n-test 200] [--probe] [--only zo_sgd,fzoo]
        [--seeds 0,1,2] [--name methods-screening] [--stop-at 19:40]

Writes bench/results/methods.json and methods.png (``--name``: another file name;
``--out``: another folder) after every run; last line: each method's mean final test
accuracy as ``key=value``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import methods_report
from bench.common import RESULTS, ROOT
from bench.methods_fo import FO_FORWARDS_PER_STEP


@dataclass(frozen=True)
class Method:
    """A benchmarked method: ``preset`` (configs/optim/<preset>.yaml; None: first-order
    AdamW, :func:`bench.methods_fo.first_order`), ``changes`` to the preset
    (``optim.<key>``), ``peft`` (configs/peft/<peft>.yaml or None) and whether its lr is
    ``tuned`` for this default (``--probe`` skips it)."""

    preset: str | None
    changes: dict = field(default_factory=dict)
    peft: str | None = None
    tuned: bool = False


METHODS: dict[str, Method] = {  # a new method: one line here (and its preset)
    "zo_sgd": Method("mezo", tuned=True),
    "fzoo": Method("fzoo"),
    "momentum": Method("momentum"),
    "zo_adam": Method("adam"),
    "nspsa_q4": Method("nspsa"),
    "hizoo": Method("hizoo"),  # 3 forwards a step (baseline and a pair)
    "hizoo_light": Method("hizoo-light"),
    "sparse": Method("sparse"),
    "lowrank": Method("lowrank"),
    "lora_zo": Method("mezo", {"lr": 5e-3, "eps": 1e-2}, "lora"),
    "prefix_zo": Method("mezo", {"lr": 1e-2, "eps": 1e-1}, "prefix"),
    "adam_fo": Method(None, {"lr": 1e-5}, tuned=True),
}
PROBE_FACTORS = (1 / 3, 1.0, 3.0)
N_DEV = 64


def overrides(method: str, n_train: int, n_test: int, lr: float | None = None,
              seed: int = 0) -> list[str]:
    """The ``zo2-train`` overrides of ``method`` (``lr`` overrides its preset's): the
    embedded default on the CPU, tweets (seed 42, balanced), batch 16, run ``seed``,
    nothing written but ``metrics.jsonl`` (no checkpoints, no wandb, no plot)."""
    m = METHODS[method]
    preset, changes, adapter = m.preset, m.changes, m.peft
    changes = changes if lr is None else {**changes, "lr": lr}
    out = ["model=smollm2-135m", "model.device=cpu", "task=tweets", f"task.n_train={n_train}",
           f"task.n_dev={N_DEV}", f"task.n_test={n_test}", "eval_every=0", "checkpoint.every=0",
           "checkpoint.resume=never", "logging=none", "progress=false",
           f"seed={seed}", f"optim={preset or 'mezo'}"]
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


def zo_info(method: str, cfg, engine, lr: float | None) -> dict:
    """What the record says about a ZO method's settings and memory."""
    from zo2.rules import state_bytes

    m = METHODS[method]
    preset, adapter = m.preset, m.peft
    changes = m.changes if lr is None else {**m.changes, "lr": lr}
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
          lr: float | None = None, seed: int = 0) -> Iterator[Run]:
    """``method`` set up for ``budget`` forward passes (``lr`` overrides its preset's)."""
    from zo2.config import compose
    from zo2.estimators import make_estimator

    m = METHODS[method]
    if m.preset is None:
        cfg = compose(overrides(method, n_train, n_test, seed=seed))
        from bench.methods_fo import first_order

        yield Run(**first_order(cfg, m.changes["lr"] if lr is None else lr, budget))
        return
    from zo2.trainer import Trainer

    cfg = compose(overrides(method, n_train, n_test, lr, seed))
    # one forward of batch 16 per slice of the estimator's plan (two-sided 2q, one-sided q+1)
    per_step = make_estimator(cfg.optim.estimator).plan(range(cfg.optim.q), cfg.optim.eps).n
    steps = budget // per_step
    cfg.steps = max(steps, 1)  # the lr schedule's horizon
    with tempfile.TemporaryDirectory() as out, Trainer(cfg, out) as trainer:
        assert trainer.engine.plan(0).n == per_step
        yield Run(lambda: trainer.train_step(next(trainer.data)).loss, trainer.evaluate,
                  steps, per_step, zo_info(method, cfg, trainer.engine, lr))


def default_method() -> str:
    """The :data:`METHODS` entry that is ``zo2-train``'s default: configs/train.yaml's
    ``optim`` preset as shipped (no changes, no adapter)."""
    import yaml

    defaults = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["defaults"]
    preset = next(d["optim"] for d in defaults if isinstance(d, dict) and "optim" in d)
    return next(n for n, m in METHODS.items()
                if m.preset == preset and not m.changes and m.peft is None)


def base_lr(method: str) -> float:
    from zo2.config import compose

    m = METHODS[method]
    return m.changes["lr"] if "lr" in m.changes else compose([f"optim={m.preset}"]).optim.lr


def probe(method: str, budget: int, n_train: int, n_test: int,
          factors: tuple[float, ...] = PROBE_FACTORS, seed: int = 0) -> dict:
    """Short runs at the base lr times ``factors``; dev loss after each picks the lr."""
    grid = []
    for factor in factors:
        lr = base_lr(method) * factor
        with setup(method, budget, n_train, n_test, lr, seed) as run:
            losses = [run.step() for _ in range(run.steps)]
            dev = run.evaluate("dev")
        grid.append({"lr": lr, "dev_loss": dev["loss"], "dev_accuracy": dev["accuracy"],
                     "forward_passes": run.steps * run.per_step,
                     "train_loss_first_last": [losses[0], losses[-1]] if losses else []})
        print(f"{method} probe lr {lr:.3g}: dev loss {dev['loss']:.4f} "
              f"acc {dev['accuracy']:.3f}", file=sys.stderr, flush=True)
    finite = [g for g in grid if g["dev_loss"] == g["dev_loss"]]  # drop NaN
    best = min(finite, key=lambda g: g["dev_loss"]) if finite else grid[len(grid) // 2]
    return {"lr": best["lr"], "base_lr": base_lr(method), "factors": list(factors),
            "probe_budget": budget, "seed": seed, "grid": grid}


def run_method(method: str, budget: int, n_train: int, n_test: int, acc0: float | None,
               deadline: float | None = None, lr: float | None = None,
               seed: int = 0) -> dict:
    """One method and seed in this process: ``info`` (its settings) and ``run`` (the
    accuracy curve, cut_short, peak RSS, wall time)."""
    started = time.perf_counter()
    with setup(method, budget, n_train, n_test, lr, seed) as run:
        out = {"seed": seed, **curve(method, run, acc0, deadline, started)}
    from zo2.tracking import peak_rss_mb

    wall = time.perf_counter() - started
    out.update({"wall_s": wall, "s_per_forward": wall / max(out["forwards_reached"], 1),
                "peak_rss_mb": peak_rss_mb()})
    return {"info": {"method": method, **run.info}, "run": out}


def curve(method: str, run: Run, acc0: float | None, deadline: float | None,
          started: float | None = None) -> dict:
    """Train ``run`` for its steps (fewer when ``deadline`` comes first), test accuracy
    at 0 (unless ``acc0`` is given) and at the :func:`eval_steps`; each point's
    ``wall_s``: seconds since ``started`` (``time.perf_counter()``, the process's setup
    included) when its evaluation ended, so accuracy at equal wall time can be read."""
    from zo2.errors import TrainingError

    started = time.perf_counter() if started is None else started
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
    points.append({"step": 0, "forward_passes": 0, "test_accuracy": acc0,
                   "wall_s": time.perf_counter() - started})
    losses = []
    train_s = 0.0
    eval_s_last = evals_s
    done = 0
    for step in range(1, run.steps + 1):
        if deadline is not None and done and time.time() + 1.5 * (
                train_s / done + eval_s_last) > deadline:
            break  # this method's share of the run's wall limit is spent
        t0 = time.perf_counter()
        try:
            losses.append(run.step())
        except TrainingError as exc:  # the guard stopped it after this step: a result too
            out["diverged"] = {"step": step, "message": str(exc)}
            print(f"{method} diverged at step {step}: {exc}", file=sys.stderr, flush=True)
        train_s += time.perf_counter() - t0
        done = step
        if "diverged" in out:
            break
        if step in checkpoints:
            t0 = time.perf_counter()
            acc = run.evaluate("test")["accuracy"]
            eval_s_last = time.perf_counter() - t0
            evals_s += eval_s_last
            points.append({"step": step, "forward_passes": step * run.per_step,
                           "test_accuracy": acc, "wall_s": time.perf_counter() - started})
            print(f"{method} step {step}: test acc {acc:.4f} (train {train_s:.0f} s)",
                  file=sys.stderr, flush=True)
    if points[-1]["step"] != done:  # stopped early: evaluate where it stopped (diverged:
        # the weights after the step the guard stopped it at)
        t0 = time.perf_counter()
        acc = run.evaluate("test")["accuracy"]
        evals_s += time.perf_counter() - t0
        points.append({"step": done, "forward_passes": done * run.per_step,
                       "test_accuracy": acc, "wall_s": time.perf_counter() - started})
    out.update({
        "cut_short": done < run.steps, "forwards_reached": done * run.per_step,
        "forwards_planned": run.steps * run.per_step,
        "steps": done, "steps_planned": run.steps, "forward_passes_per_step": run.per_step,
        "curve": points,
        "final_test_accuracy": points[-1]["test_accuracy"],
        "train_loss_first_last": [losses[0], losses[-1]] if losses else [],
        "train_s": train_s, "train_s_per_step": train_s / max(done, 1),
        "train_s_per_forward": train_s / max(done * run.per_step, 1), "eval_s": evals_s,
    })
    return out


def _child(args: list[str], env: dict) -> dict:
    """Run this module in a fresh process; its last stdout line is the JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "bench.methods", *args], check=True, env=env,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stop_at(hhmm: str | None) -> float:
    """``HH:MM`` (UTC, today) as a Unix time; infinity when not given."""
    if hhmm is None:
        return float("inf")
    now = time.gmtime()
    h, m = map(int, hhmm.split(":"))
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, h, m, 0, 0, 0, 0)) - time.timezone


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.methods")
    parser.add_argument("--budget", type=int, default=32, help="forward passes per method")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--expect", default="",
                        help="comma-separated methods the record should hold for --seeds "
                             "(the rest are listed as missing)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child: run one method
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
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
    parser.add_argument("--probe-from", type=Path, default=None,
                        help="JSON lines of earlier probes of the --only method (the "
                             "--probe-method child's answers): attached to its record; the "
                             "lowest dev loss of all must be its preset's lr")
    parser.add_argument("--probe-budget", type=int, default=16,
                        help="forward passes of each probe run")
    parser.add_argument("--max-minutes", type=float, default=42.0,
                        help="wall limit of the whole run, shared equally by the runs left "
                             "(not with --minutes)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="equal wall time: each run's own limit (see the docstring)")
    parser.add_argument("--stop-at", default=None,
                        help="HH:MM (UTC, today): the wall limit ends then at the latest")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.budget, args.n_train, args.n_test,
                                    args.acc0, args.deadline, args.lr, args.seed)))
        return
    if args.probe_method:
        print(json.dumps(probe(args.probe_method, args.probe_budget, args.n_train,
                               args.n_test, args.probe_factors, args.seed)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    path = args.out / f"{args.name}.json"
    old = methods_report.load(path)
    methods_report.check_same_protocol(old, args.budget, args.n_test, args.n_train,
                                       args.minutes)
    methods: dict[str, dict] = old.get("methods", {})
    invocation = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()), "runs": []}
    invocations = old.get("setup", {}).get("invocations", []) + [invocation]
    acc0 = next((m["runs"][s]["curve"][0]["test_accuracy"] for m in methods.values()
                 if METHODS.get(m["method"], Method(None)).peft != "prefix"
                 for s in m["runs"]), None)  # the base weights' test accuracy, if known
    names, seeds = args.only.split(","), [int(s) for s in args.seeds.split(",")]
    jobs = [(name, seed) for name in names for seed in seeds]
    end = min(time.time() + 60 * args.max_minutes, _stop_at(args.stop_at)) - 30
    data = ["--n-train", str(args.n_train), "--n-test", str(args.n_test)]
    probed: dict[str, dict] = {}
    if args.probe_from is not None:  # probes run earlier (wide grid, then a finer one)
        rounds = [json.loads(line) for line in args.probe_from.read_text().splitlines() if line]
        best = min((g for r in rounds for g in r["grid"] if g["dev_loss"] == g["dev_loss"]),
                   key=lambda g: g["dev_loss"])
        assert len(names) == 1 and math.isclose(best["lr"], base_lr(names[0]), rel_tol=1e-3)
        prior = {"lr": best["lr"], "rounds": rounds, "chosen": "lowest dev loss of all rounds"}
    for i, (name, seed) in enumerate(jobs):
        deadline = time.time() + (end - time.time()) / (len(jobs) - i)
        if args.minutes is not None:  # its own limit, from the moment its process starts
            deadline = min(time.time() + 60 * args.minutes, _stop_at(args.stop_at))
        if args.probe and not METHODS[name].tuned and name not in probed:
            # once per method, on the first seed; its time comes out of this run's share
            probed[name] = _child(["--probe-method", name, "--probe-budget",
                                   str(args.probe_budget), "--probe-factors",
                                   ",".join(map(repr, args.probe_factors)), "--seed",
                                   str(seed), *data], env)
        cmd = ["--method", name, "--seed", str(seed), "--budget", str(args.budget), *data,
               "--deadline", repr(deadline)]
        if name in probed:
            cmd += ["--lr", repr(probed[name]["lr"])]
        if acc0 is not None and METHODS[name].peft != "prefix":  # prefix changes the init
            cmd += ["--acc0", repr(acc0)]
        got = _child(cmd, env)
        info, r = got["info"], got["run"]
        if name in probed:
            info["probe"] = probed[name]
        elif args.probe_from is not None:
            info["probe"] = prior
        if args.minutes is not None:
            r["minutes"] = args.minutes
        methods_report.merge(methods, name, seed, r, info)
        invocation["runs"].append(f"{name}/{seed}")
        print(f"{name} seed {seed}: acc {r['final_test_accuracy']:.4f} peak "
              f"{r['peak_rss_mb']:.0f} MiB wall {r['wall_s']:.0f} s cut_short {r['cut_short']}",
              file=sys.stderr, flush=True)
        if acc0 is None and METHODS[name].peft != "prefix":
            acc0 = r["curve"][0]["test_accuracy"]
        invocation["total_wall_s"] = time.perf_counter() - started
        methods_report.write(args, methods, invocations, seeds, [n for n, m in METHODS.items()
                                                                 if m.tuned],
                             FO_FORWARDS_PER_STEP, N_DEV, default_method())
        # after every run: partial kept


if __name__ == "__main__":
    main()
