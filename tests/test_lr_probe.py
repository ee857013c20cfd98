"""``optim.lr=auto`` (:mod:`zo2.lr_probe`): the lr from the curvature along ZO directions,
measured on training batches before the first step; scale-aware, invisible to the run
(weights and data order), resumed without probing again, and refused clearly."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from _chat import chat_files
from conftest import make_batch, make_model

from zo2 import lr_probe
from zo2.config import OptimConfig, compose
from zo2.engine import ZOEngine
from zo2.errors import ConfigError, TrainingError
from zo2.loss import Objective
from zo2.trainer import Callback, Trainer

LABELS = (5, 9)
SCALES = (0.3, 1.0, 3.0)  # every trainable tensor multiplied by these: 10x apart


def engine_at(family: str, scale: float, **optim) -> ZOEngine:
    model = make_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    settings = {"lr": "auto", "eps": 1e-3, "batch_size": 16, **optim}
    return ZOEngine(model, OptimConfig(**settings),
                    Objective("label_words", candidates=torch.tensor(LABELS)), seed=0)


def snapshot(engine: ZOEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.export_state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_weight_scales_10x_apart_each_get_an_lr_under_which_the_loss_falls(family):
    """Each scale's probed lr lowers the training loss: the loss of the (fixed) training
    batch after 12 steps is below its loss before (an exact comparison). The lrs are not
    one constant: larger weights curve the loss more, the lr falls strictly with the
    scale, and the smallest scale's lr used at the largest scale makes its loss rise."""
    batch = make_batch(batch=16, seed=0)  # the run's training data: this one batch
    lrs = []
    for scale in SCALES:
        engine = engine_at(family, scale)
        probe = lr_probe.measure(engine, [batch] * lr_probe.PROBE_BATCHES)
        lr_probe.use(engine, probe.lr)
        before = engine.evaluate([batch])["loss"]
        for _ in range(12):
            engine.step(batch)
        after = engine.evaluate([batch])["loss"]
        assert after < before, (family, scale, probe.describe(), before, after)
        lrs.append(probe.lr)
    assert lrs[0] > lrs[1] > lrs[2], lrs
    # no one lr fits every scale: the smallest scale's lr at the largest scale raises the loss
    engine = engine_at(family, SCALES[-1])
    lr_probe.use(engine, lrs[0])
    before = engine.evaluate([batch])["loss"]
    for _ in range(12):
        engine.step(batch)
    assert engine.evaluate([batch])["loss"] > before


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_fzoo_needs_no_probe_one_lr_lowers_the_loss_at_every_scale(family):
    """FZOO divides its step by the spread of the step's losses, so its lr is a step
    length: the preset's one lr (configs/optim/fzoo.yaml) lowers the training loss at
    weight scales 10x apart, where ZO-SGD needs the probe (the test above: one lr that
    suits the smallest scale raises the loss at the largest)."""
    preset = compose(["optim=fzoo"]).optim
    batch = make_batch(batch=16, seed=0)
    for scale in SCALES:
        engine = engine_at(family, scale, lr=preset.lr, q=preset.q, estimator=preset.estimator,
                           direction=preset.direction)
        before = engine.evaluate([batch])["loss"]
        for _ in range(12):
            engine.step(batch)
        assert engine.evaluate([batch])["loss"] < before, (family, scale)


def test_the_rule_is_half_the_line_minimum_of_the_median_curvature():
    """The chosen lr is exactly ``0.5 * f / median(|L+ + L- - 2 L0| / eps^2)`` of the
    measured losses, ``f`` being 1 for zo-sgd and ``1 - beta`` for momentum; the probe
    does not move the weights, and its directions are no step's."""
    batches = [make_batch(batch=8, seed=s) for s in range(4)]
    engine = engine_at("llama", 1.0)
    before = snapshot(engine)
    probe = lr_probe.measure(engine, batches)
    after = snapshot(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    eps = engine.optim.eps
    cs = [abs(plus + minus - 2 * base) / eps**2 for base, plus, minus in probe.losses]
    assert probe.curvatures == cs and probe.lr == 0.5 / statistics.median(cs)
    momentum = engine_at("llama", 1.0, method="zo-momentum", momentum=0.9)
    again = lr_probe.measure(momentum, batches)
    assert again.curvatures == cs  # the same directions and losses
    assert again.lr == 0.5 * (1.0 / (1.0 / (1 - 0.9))) / statistics.median(cs)
    steps = {engine.plan(t).slices[0].seed for t in range(1000)}
    assert not steps & {lr_probe.probe_seed(0, i) for i in range(4)}
    assert "c = |L+ + L- - 2 L0| / eps^2 = [" in probe.describe()
    assert f"lr = 0.5 / median(c) = {probe.lr:.4g}" in probe.describe()


def run_overrides(files, out, *extra) -> list[str]:
    return ["model=tiny-llama", "optim.batch_size=4", "eval_batch_size=8", "progress=false",
            "logging=none", "data.max_length=96", "data.format=messages", "log_every=1",
            f"output_dir={out}", *(f"data.{k}={v}" for k, v in files.items()), *extra]


def run(args, callbacks=()) -> tuple[Trainer, dict[str, torch.Tensor], list[dict]]:
    cfg = compose(args)
    with Trainer(cfg, cfg.output_dir, callbacks=callbacks) as trainer:
        trainer.train()
        weights = snapshot(trainer.engine)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return trainer, weights, records


STEPS = ["steps=4", "eval_every=2", "checkpoint.every=2"]


def test_the_probe_leaves_the_runs_weights_and_data_order_as_they_were(tmp_path):
    """A run with optim.lr=auto equals, bit for bit, the run given the probed lr as a
    number: the same step losses (the same batches in the same order) and the same final
    weights. The lr is logged (an lr_probe record with the curvatures, and the config
    record) and is what every step used."""
    files = chat_files(tmp_path, 24)
    auto, w_auto, rec_auto = run(run_overrides(files, tmp_path / "auto", "optim.lr=auto",
                                               *STEPS))
    probe = [r for r in rec_auto if r["event"] == "lr_probe"]
    assert len(probe) == 1 and len(probe[0]["curvatures"]) == lr_probe.PROBE_BATCHES
    lr = probe[0]["lr"]
    assert lr == auto.probe.lr and next(r for r in rec_auto if r["event"] == "config")["lr"] == lr
    _, w_num, rec_num = run(run_overrides(files, tmp_path / "number", f"optim.lr={lr!r}",
                                          *STEPS))
    steps = [(r["step"], r["loss"], r["lr"]) for r in rec_auto if r["event"] == "step"]
    assert steps == [(r["step"], r["loss"], r["lr"]) for r in rec_num if r["event"] == "step"]
    assert len(steps) == 4 and all(torch.equal(w_auto[k], w_num[k]) for k in w_auto)


class Crash(Callback):
    def on_save(self, trainer, step, folder) -> None:
        if step == 2:
            raise RuntimeError("crash after checkpoint 2")


def test_a_resumed_run_reuses_the_probed_lr_and_ends_as_the_uninterrupted_one(
        tmp_path, monkeypatch):
    files = chat_files(tmp_path, 24)
    _, whole, _ = run(run_overrides(files, tmp_path / "whole", "optim.lr=auto", *STEPS))
    with pytest.raises(RuntimeError, match="crash after checkpoint 2"):
        run(run_overrides(files, tmp_path / "cut", "optim.lr=auto", *STEPS),
            callbacks=[Crash()])

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr("zo2.trainer.choose_lr", no_probe)
    trainer, resumed, records = run(run_overrides(files, tmp_path / "cut", "optim.lr=auto",
                                                  *STEPS))
    assert str(trainer.resumed_from).endswith("step-00000002")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert len([r for r in records if r["event"] == "lr_probe"]) == 1  # the first run's


def test_a_bad_lr_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim.lr: 'fast' is not a float$"):
        OptimConfig(lr="fast")
    with pytest.raises(ConfigError, match=r"^optim.lr: 'fast' is not a float$"):
        compose(["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"^optim.lr: must be >= 0, got -1.0$"):
        OptimConfig(lr=-1)
    assert compose(["optim.lr=auto"]).optim.lr == "auto"
    assert OptimConfig(lr="1e-3").lr == 1e-3 and type(OptimConfig(lr=1).lr) is float
    for settings, what in (({"method": "zo-adam"}, "zo-adam steps lr per coordinate"),
                           ({"method": "zo-sign"}, "zo-sign steps lr per coordinate"),
                           ({"estimator": "fzoo", "q": 2}, "fzoo divides each step")):
        with pytest.raises(ConfigError, match=what):
            lr_probe.check(OptimConfig(lr="auto", **settings))
    lr_probe.check(OptimConfig(lr=1e-3, method="zo-adam"))  # a number: any rule
    batch = make_batch(batch=8, seed=0)
    flat = engine_at("llama", 1.0, eps=1e-30)  # w + 1e-30 z == w in float32: L+ = L- = L0
    with pytest.raises(TrainingError, match=r"measured no curvature .* raise optim.eps"):
        lr_probe.measure(flat, [batch] * 4)
    broken = engine_at("llama", 1.0)
    with torch.no_grad():
        broken.model.get_output_embeddings().weight[LABELS[0]] = float("nan")  # its logit
    with pytest.raises(TrainingError, match=r"on training batch 0 are not finite"):
        lr_probe.measure(broken, [batch] * 4)
