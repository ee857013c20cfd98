"""The seed log: a whole ZO fine-tune as a small file (8*(q+2) bytes a step), and its replay.

A ZO-SGD update is ``w <- w*decay + sum_j coefs[j] * z(seeds[j])``
(:class:`zo2.perturb.Update`), where ``seeds[j] = step_seed(run_seed, step, j)`` and
``z`` is a pure function of (seed, parameter name, element index) (:mod:`zo2.noise`).
The base model, the run seed and each applied step's coefficients and decay therefore
describe the fine-tuned weights completely. The other update rules (:mod:`zo2.rules`:
momentum, Adam, sign) are functions of the same seeds, each step's projected gradients
and learning rate, and the rule's settings; their logs also keep the gradients and the
learning rates (8*(2q+3) bytes a step). :func:`replay` feeds the records in order to
the run's rule and applies its updates with the engine's own kernels and rounding
(stochastic rounding keyed by ``step_seed(run_seed, step, -1)``), which reproduces the
weights bit for bit. A stateful rule's moments are rebuilt one parameter at a time, so
replaying ZO-Adam needs one parameter's moments in memory, not the model's.

File format (one safetensors file; ``.seedlog`` by convention):

* tensors ``steps`` (int64, [n]), ``coefs`` (float64, [n, q]), ``decay`` (float64, [n]);
  for rules other than ZO-SGD, and for sparse, low-rank or HiZOO directions, also
  ``grads`` (float64, [n, q]: ``g_j / q``) and ``lr`` (float64, [n]); for HiZOO also
  ``curv`` (float64, [n, q]: each direction's curvature, which advances ``D``);
* metadata key ``zo2``: a JSON header ``{"format": "zo2-seedlog", "version": 2, "base",
  "seed", "direction", "rounding", "trainable", "dtype", "q", "rule"}``, ``base`` being
  the base model's :func:`zo2.models.model_identity` and ``rule`` the settings of
  :func:`zo2.rules.settings` (version 1 files, which have no ``rule``, are ZO-SGD).

Bit-exact replay needs the base weights in the dtype the run updated them in
(``dtype``, checked), the same ``trainable`` globs, and updates applied in that dtype:
an offloaded run with ``offload.host_dtype`` other than the model's dtype keeps its
masters in the host dtype and is not reproduced exactly.

Command line::

    python -m zo2.seedlog info run.seedlog
    python -m zo2.seedlog replay --base <folder | model name> --log run.seedlog --out <folder>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zo2.choices import DIRECTION_SETTINGS, METHODS, REPLAY_SETTINGS, RULE_SETTINGS
from zo2.config import OptimConfig
from zo2.errors import CheckpointError, ZO2Error
from zo2.models import load_model, model_identity
from zo2.noise import DISTS, ROUNDINGS
from zo2.perturb import PendingUpdate, Update, step_seed
from zo2.rules import Rule, directions_of, make_rule, settings
from zo2.units import find_units, unique_params

FORMAT = "zo2-seedlog"
VERSION = 2
READS = (1, 2)  # the versions this zo2 reads
HEADER_KEY = "zo2"


def _needs_grads(rule: Mapping[str, Any]) -> bool:
    """Every rule but ZO-SGD on dense directions makes its update from the grads and lr,
    not the coefs."""
    return rule["method"] != "zo-sgd" or any(rule.get(k) for k in DIRECTION_SETTINGS)


@dataclass(kw_only=True)
class SeedLog:
    """The updates of one fine-tune, one record per applied (non-skipped) step.

    Args:
        base: the base model's :func:`~zo2.models.model_identity`.
        seed: the run seed; the seeds of step t are ``step_seed(seed, t, j)``.
        direction: distribution of ``z`` (``gaussian`` | ``rademacher``).
        rounding: rounding of the updated bf16/fp16 weights (``nearest`` | ``stochastic``).
        trainable: the glob patterns over parameter names that were trained.
        steps: the step index of each record, strictly increasing.
        coefs: each record's q coefficients.
        decay: each record's weight-decay factor (applied to matrices only).
        dtype: the trained parameters' dtype (``"float32"``...); None: not checked.
        rule: the update rule's settings (:func:`zo2.rules.settings`).
        grads: each record's ``g_j / q`` (rules other than ZO-SGD; empty for ZO-SGD).
        lr: each record's learning rate (likewise).
    """

    base: dict[str, Any]
    seed: int
    direction: str = "gaussian"
    rounding: str = "nearest"
    trainable: list[str] = field(default_factory=lambda: ["*"])
    steps: list[int] = field(default_factory=list)
    coefs: list[tuple[float, ...]] = field(default_factory=list)
    decay: list[float] = field(default_factory=list)
    dtype: str | None = None
    rule: dict[str, Any] = field(default_factory=lambda: {"method": "zo-sgd"})
    grads: list[tuple[float, ...]] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    curv: list[tuple[float, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trainable = list(self.trainable)
        self.steps = [int(s) for s in self.steps]
        self.coefs = [tuple(float(c) for c in cs) for cs in self.coefs]
        self.decay = [float(d) for d in self.decay]
        self.grads = [tuple(float(g) for g in gs) for gs in self.grads]
        self.lr = [float(x) for x in self.lr]
        self.curv = [tuple(float(k) for k in ks) for ks in self.curv]
        self.rule = dict(self.rule)
        method = self.rule.get("method")
        allowed = {"method", *RULE_SETTINGS.get(method, ()), *REPLAY_SETTINGS}
        if method not in METHODS or set(self.rule) - allowed:
            raise ValueError(f"rule: {self.rule!r} is not the settings of one of {METHODS}")
        if self.needs_grads and not (len(self.grads) == len(self.lr) == len(self.steps)):
            raise ValueError(f"a {self.rule['method']} log needs the grads and lr of every "
                             f"record: {len(self.steps)} steps, {len(self.grads)} grads, "
                             f"{len(self.lr)} lrs")
        if self.needs_grads and any(len(g) != len(c) for g, c in zip(self.grads, self.coefs)):
            raise ValueError("every record must have as many grads as coefficients (q)")
        if self.curved and [len(k) for k in self.curv] != [len(c) for c in self.coefs]:
            raise ValueError("a HiZOO log needs every record's curvatures, one per direction")
        if self.direction not in DISTS:
            raise ValueError(f"direction must be one of {DISTS}, got {self.direction!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not len(self.steps) == len(self.coefs) == len(self.decay):
            raise ValueError(f"{len(self.steps)} steps, {len(self.coefs)} coefs and "
                             f"{len(self.decay)} decays: one of each per record")
        if len({len(cs) for cs in self.coefs}) > 1:
            raise ValueError("every record must have the same number of coefficients (q)")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must be strictly increasing")

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def q(self) -> int:
        """Directions per step (0 for an empty log)."""
        return len(self.coefs[0]) if self.coefs else 0

    @property
    def curved(self) -> bool:
        """Whether the records carry HiZOO's curvatures (``curv``, :mod:`zo2.hessian`)."""
        return self.rule.get("hessian", "none") != "none"

    @property
    def needs_grads(self) -> bool:
        """Whether the rule needs more than the coefficients (grads and lr)."""
        return _needs_grads(self.rule)

    def make_rule(self) -> Rule:
        """A fresh instance of the run's update rule."""
        return make_rule(OptimConfig(**self.rule))

    def updates(self, rule: Rule | None = None) -> Iterator[Update]:
        """The updates of the records, in order, as ``rule`` (default: a fresh
        :meth:`make_rule`) makes them from the history so far, as the engine does."""
        rule = rule or self.make_rule()
        history: list[dict] = []
        for i, (step, coefs, decay) in enumerate(zip(self.steps, self.coefs, self.decay)):
            seeds = [step_seed(self.seed, step, j) for j in range(len(coefs))]
            lr = self.lr[i] if self.lr else 0.0
            history.append({"seeds": seeds, "coefs": coefs, "lr": lr,
                            "grads": self.grads[i] if self.grads else (),
                            "curv": self.curv[i] if self.curv else ()})
            yield rule.update(history, lr, decay, round_seed=step_seed(self.seed, step, -1))

    # ---- building ---------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping], *, base: dict[str, Any], seed: int,
                     **settings: Any) -> SeedLog:
        """From ``{"step", "seeds", "coefs", "decay", "grads", "lr"}`` records
        (:attr:`ZOEngine.log`; ``grads`` and ``lr`` are kept for rules other than ZO-SGD).

        Raises ValueError when a record's seeds are not ``step_seed(seed, step, j)``
        (a log of another run seed, or records edited by hand). ``settings`` are the
        remaining fields (direction, rounding, trainable, dtype, rule).
        """
        rule = settings.get("rule", {"method": "zo-sgd"})
        keep, curved = _needs_grads(rule), rule.get("hessian", "none") != "none"
        steps, coefs, decay, grads, lrs, curv = [], [], [], [], [], []
        for record in records:
            step = int(record["step"])
            expected = [step_seed(seed, step, j) for j in range(len(record["coefs"]))]
            if [int(s) for s in record["seeds"]] != expected:
                raise ValueError(f"record of step {step}: its seeds are not those of run "
                                 f"seed {seed} (step_seed(seed, step, j))")
            steps.append(step)
            coefs.append(tuple(record["coefs"]))
            decay.append(record["decay"])
            if keep:
                grads.append(tuple(record["grads"]))
                lrs.append(record["lr"])
            if curved:
                curv.append(tuple(record["curv"]))
        return cls(base=base, seed=seed, steps=steps, coefs=coefs, decay=decay, grads=grads,
                   curv=curv,
                   lr=lrs, **settings)

    @classmethod
    def from_engine(cls, engine: Any, trainable: Sequence[str] = ("*",)) -> SeedLog:
        """The seed log of a :class:`~zo2.engine.ZOEngine` run so far.

        ``trainable`` must be the globs the engine was built with (it does not keep
        them); ValueError when they select other parameters than the engine trains, or
        when the engine's log lacks updates it made (a run resumed from a checkpoint
        that did not restore :attr:`ZOEngine.log`).
        """
        missing = engine.step_index - engine.skipped_steps - len(engine.log)
        if missing:
            raise ValueError(f"the engine's log lacks {missing} of its updates (resumed from "
                             "a checkpoint without its log?): it cannot describe the run")
        chosen = [p.name for p in unique_params(find_units(engine.model, tuple(trainable)))]
        if chosen != [p.name for p in engine.params]:
            raise ValueError(f"trainable={list(trainable)} selects other parameters than "
                             "the engine trains; pass the globs the engine was built with")
        dtype = str(engine.params[0].param.dtype).removeprefix("torch.")
        return cls.from_records(engine.log, base=model_identity(engine.model), seed=engine.seed,
                                direction=engine.optim.direction,
                                rounding=engine.optim.rounding, trainable=list(trainable),
                                dtype=dtype, rule=settings(engine.optim))

    def records(self) -> list[dict]:
        """The log as :attr:`ZOEngine.log` records (the inverse of :meth:`from_records`;
        ``grads`` and ``lr`` are empty / 0 where the rule does not keep them)."""
        out = [{"step": step, "seeds": [step_seed(self.seed, step, j) for j in range(len(cs))],
                "coefs": list(cs), "decay": decay,
                "grads": list(self.grads[i]) if self.grads else [],
                "lr": self.lr[i] if self.lr else 0.0}
               for i, (step, cs, decay) in enumerate(zip(self.steps, self.coefs, self.decay))]
        if self.curved:  # HiZOO's records, as the engine keeps them
            for record, curv in zip(out, self.curv):
                record["curv"] = list(curv)
        return out

    # ---- the file ---------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """Everything but the per-record tensors, as stored in the file's metadata."""
        return {"format": FORMAT, "version": VERSION, "base": self.base, "seed": self.seed,
                "direction": self.direction, "rounding": self.rounding,
                "trainable": self.trainable, "dtype": self.dtype, "q": self.q,
                "rule": self.rule}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the log to ``path`` (one safetensors file; replaced atomically)."""
        path = Path(path)
        n = len(self)
        tensors = {
            "steps": torch.tensor(self.steps, dtype=torch.int64).reshape(n),
            "coefs": torch.tensor(self.coefs, dtype=torch.float64).reshape(n, self.q),
            "decay": torch.tensor(self.decay, dtype=torch.float64).reshape(n),
        }
        if self.needs_grads:
            tensors["grads"] = torch.tensor(self.grads, dtype=torch.float64).reshape(n, self.q)
            tensors["lr"] = torch.tensor(self.lr, dtype=torch.float64).reshape(n)
        if self.curved:
            tensors["curv"] = torch.tensor(self.curv, dtype=torch.float64).reshape(n, self.q)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(self.header())})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SeedLog:
        """Read a file written by :meth:`save`; CheckpointError naming the file otherwise."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"seed log {path} not found")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a zo2 seed log or is corrupt ({err})") from None
        try:
            header = json.loads(meta[HEADER_KEY])
            fmt = header["format"]
        except (KeyError, TypeError, json.JSONDecodeError):
            fmt = None
        if fmt != FORMAT:
            raise CheckpointError(f"{path} is not a zo2 seed log (no {FORMAT!r} header)")
        if header.get("version") not in READS:
            raise CheckpointError(f"{path}: seed log version {header.get('version')!r}; "
                                  f"this zo2 reads versions {list(READS)}")
        try:
            return cls(base=header["base"], seed=int(header["seed"]),
                       direction=header["direction"], rounding=header["rounding"],
                       trainable=header["trainable"], dtype=header.get("dtype"),
                       steps=tensors["steps"].tolist(),
                       coefs=[tuple(row) for row in tensors["coefs"].tolist()],
                       decay=tensors["decay"].tolist(),
                       rule=header.get("rule", {"method": "zo-sgd"}),
                       grads=[tuple(r) for r in tensors["grads"].tolist()]
                       if "grads" in tensors else [],
                       lr=tensors["lr"].tolist() if "lr" in tensors else [],
                       curv=[tuple(r) for r in tensors["curv"].tolist()]
                       if "curv" in tensors else [])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: corrupt zo2 seed log ({err!r})") from None


# ---- replay -----------------------------------------------------------------------------
def check_base(model: nn.Module, log: SeedLog) -> None:
    """Raise CheckpointError unless ``model`` is the base model ``log`` was made from."""
    have = model_identity(model)
    want = log.base
    if (have["config_hash"], have["num_params"]) != (want["config_hash"], want["num_params"]):
        raise CheckpointError(
            f"the seed log was made from another model: it expects {want.get('name')!r} "
            f"(config {want['config_hash']}, {want['num_params']} parameters), got "
            f"{have['name']!r} (config {have['config_hash']}, {have['num_params']} parameters)")


@torch.no_grad()
def replay(model: nn.Module, log: SeedLog, *,
           device: torch.device | str | None = None) -> nn.Module:
    """Apply every update of ``log`` to ``model`` in place (its base weights); returns it.

    Each parameter gets the records in order; parameters are independent, so they are
    replayed one after another (for cache locality). The model is not wrapped or
    otherwise changed. ``device``: move the model there first (CPU or CUDA kernels give
    the same bits). Raises CheckpointError for another base model or another dtype.
    """
    check_base(model, log)
    if device is not None:
        model.to(device)
    params = unique_params(find_units(model, tuple(log.trainable)))
    for p in params:
        if p.param.device.type == "meta":
            raise CheckpointError(f"{p.name} has no weights (on meta): load the base first")
        dtype = str(p.param.dtype).removeprefix("torch.")
        if log.dtype is not None and dtype != log.dtype:
            raise CheckpointError(f"the run updated {log.dtype} weights but {p.name} is "
                                  f"{dtype}: load the base with dtype={log.dtype}")
    rule = log.make_rule()
    updates = list(log.updates(rule))
    optim = OptimConfig(**log.rule, direction=log.direction)
    directions = directions_of(optim)
    pending = PendingUpdate(log.direction, log.rounding, rule=None if rule.fused else rule,
                            directions=directions)
    for p in params:
        if p.floor is not None:  # a quantized layer's scale (zo2.quantized)
            p.floor = optim.scale_floor
        directions.prepare(p, p.param.data)  # what the run read of the base weights
        for update in updates:
            pending.set(update)
            pending.apply(p, p.param.data)
        rule.drop_state(p)  # a stateful rule's moments of p are done with
    return model


# ---- command line -----------------------------------------------------------------------
def _info(path: str) -> None:
    log = SeedLog.load(path)
    print(json.dumps(log.header(), indent=2))
    span = f" (steps {log.steps[0]}..{log.steps[-1]})" if len(log) else ""
    print(f"records: {len(log)}{span}")
    print(f"file size: {Path(path).stat().st_size} bytes")


def _replay(base: str, log_path: str, out: str, dtype: str | None) -> None:

    log = SeedLog.load(log_path)
    model, tokenizer = load_model(base, dtype=dtype or log.dtype or "float32")
    replay(model, log)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"replayed {len(log)} updates onto {base}; wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zo2.seedlog {info,replay}``; user errors exit 2 with one line."""
    parser = argparse.ArgumentParser(prog="python -m zo2.seedlog", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a seed log's header, records and file size")
    info.add_argument("file", help="the .seedlog file")
    rep = sub.add_parser("replay", help="rebuild the fine-tuned model from base + seed log")
    rep.add_argument("--base", required=True, help="the base: a HF folder or a zo2 model name")
    rep.add_argument("--log", required=True, help="the .seedlog file")
    rep.add_argument("--out", required=True, help="folder for the save_pretrained output")
    rep.add_argument("--dtype", default=None,
                     help="load the base in this dtype (default: the dtype the run trained)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            _info(args.file)
        else:
            _replay(args.base, args.log, args.out, args.dtype)
    except ZO2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
