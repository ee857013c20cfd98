"""The ZO engine: estimator quality, determinism, exactness, every architecture."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, make_batch, make_model

from zo2 import noise
from zo2.config import OptimConfig
from zo2.engine import ZOEngine, step_seed
from zo2.estimators import OneSided
from zo2.loss import Objective, positions_to_keep
from zo2.perturb import BatchShape, Plan, SplitError, merge_batch, mirror_, split_batch
from zo2.units import find_units, unique_params

LABELS = torch.tensor([5, 9])


def objective() -> Objective:
    return Objective("label_words", candidates=LABELS)


def engine_for(model, seed: int = 0, **optim) -> ZOEngine:
    optim.setdefault("lr", 1e-3)
    return ZOEngine(model, OptimConfig(**optim), objective(), seed=seed, total_steps=20)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_mezo(model, batches, *, seed: int, lr: float, eps: float = 1e-3, q: int = 1,
                   weight_decay: float = 0.0) -> list[float]:
    """A plain MeZO loop: separate +eps / -eps forwards, restore from a copy, update."""
    params = [(name, p, noise.param_key(name)) for name, p in model.named_parameters()]
    obj, losses = objective(), []
    for t, batch in enumerate(batches):
        keep = positions_to_keep(batch["labels"])
        grads, seeds = [], [step_seed(seed, t, j) for j in range(q)]
        for s in seeds:
            saved = [p.data.clone() for _, p, _ in params]
            pair = []
            for sign in (1, -1):
                for (_, p, key), w0 in zip(params, saved):
                    if sign == 1:
                        noise.combine(p.data.view(-1), w0.view(-1), s, key, eps)
                    else:
                        mirror_(p.data, w0)
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits[:, -keep:]
                pair.append(float(obj.loss(logits, batch["labels"])))
            for (_, p, _), w0 in zip(params, saved):
                p.data.copy_(w0)
            grads.append((pair[0] - pair[1]) / (2 * eps))
            losses.extend(pair)
        coefs = [-lr * g / q for g in grads]
        for _, p, key in params:
            decay = 1.0 - lr * weight_decay if p.ndim >= 2 else 1.0
            noise.add_(p.data.view(-1), seeds, coefs, key, decay=decay)
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_plain_mezo_loop(family):
    """Stacked forward + lazy fused update == a plain MeZO loop, bit for bit."""
    batches = [make_batch(seed=i) for i in range(4)]
    ref_model = make_model(family)
    ref_losses = reference_mezo(ref_model, batches, seed=3, lr=1e-2, q=2, weight_decay=0.1)
    model = make_model(family)
    engine = engine_for(model, seed=3, lr=1e-2, q=2, weight_decay=0.1)
    losses = []
    for batch in batches:
        losses.extend(engine.step(batch).losses)
    engine.flush()
    assert losses == ref_losses
    ref = weights(ref_model)
    for name, w in weights(model).items():
        assert torch.equal(w, ref[name]), name
    assert any(not torch.equal(w, make_model(family).state_dict()[n]) for n, w in ref.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_units_cover_every_parameter_once(family):
    model = make_model(family, layers=3)
    units = find_units(model)
    layer_units = [u for u in units if u.name.split(".")[-1].isdigit()]
    assert len(layer_units) == 3
    params = unique_params(units)
    assert {p.name for p in params} == {n for n, _ in model.named_parameters()}
    embedding = model.get_input_embeddings().weight
    holders = [u.name for u in units if any(p.param is embedding for p in u.params)]
    assert len(holders) == 2  # the input embedding and the tied LM head
    assert sum(p.param is embedding for p in params) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_unperturbed_stacked_forward_equals_separate_forwards(family):
    model = make_model(family)
    batch = make_batch(batch=3)
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    engine = engine_for(model)
    plan = Plan((OneSided().plan([1], 1e-3).slices[0],) * 3, 1e-3)
    engine.context.plan = plan
    engine.context.shape = BatchShape(3, 9, batch["input_ids"].shape[1])
    stacked = model(input_ids=batch["input_ids"].repeat(3, 1),
                    attention_mask=batch["attention_mask"].repeat(3, 1)).logits
    for part in stacked.chunk(3):
        assert torch.equal(part, plain)


def test_same_seed_same_weights_and_other_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        model = make_model("llama")
        engine = engine_for(model, seed=seed)
        for i in range(3):
            engine.step(make_batch(seed=i))
        engine.flush()
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_independent_of_global_rng():
    results = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        model = make_model("qwen2")
        engine = engine_for(model, seed=1)
        results.append([engine.step(make_batch(seed=i)).grads[0] for i in range(2)])
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_many_steps_at_lr_zero_leave_weights_bit_identical(dtype):
    model = make_model("llama", dtype=dtype)
    before = weights(model)
    engine = engine_for(model, lr=0.0, eps=1e-3)
    for i in range(60):
        result = engine.step(make_batch(seed=i % 3))
        assert math.isfinite(result.loss)
    engine.flush()
    assert all(torch.equal(before[k], w) for k, w in weights(model).items())
    assert any(g != 0.0 for g in result.grads)


def test_estimator_agrees_with_autograd():
    """mean(g*z) over n directions has cosine ~ sqrt(n/(n+d)) with the true gradient."""
    model = make_model("llama", layers=1, hidden=16, vocab=32)
    batch = make_batch(batch=8, seq=8, vocab=32)
    obj = objective()
    keep = positions_to_keep(batch["labels"])
    params = list(model.named_parameters())
    with torch.enable_grad():
        for _, p in params:
            p.requires_grad_(True)
        loss = obj.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              logits_to_keep=keep).logits, batch["labels"])
        true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for _, p in params])])
        for _, p in params:
            p.requires_grad_(False)
    d, n = true.numel(), 300
    engine = engine_for(model, lr=0.0, eps=1e-4)
    estimate = torch.zeros(d)
    for _ in range(n):
        seed = engine.plan(engine.step_index).slices[0].seed
        g = engine.step(batch).grads[0]
        z = torch.cat([_fill(p, seed, name) for name, p in params])
        estimate += g * z / n
    cosine = float(torch.nn.functional.cosine_similarity(estimate, true, dim=0))
    theory = math.sqrt(n / (n + d))
    assert 0.5 * theory < cosine < min(1.0, 1.6 * theory), (cosine, theory, d)
    assert cosine > 8 / math.sqrt(d)  # far above chance


def _fill(p: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    out = torch.empty(p.numel())
    noise.fill(out, seed, noise.param_key(name))
    return out


def test_one_sided_and_rademacher_run_and_reduce_loss():
    for estimator, direction in (("one-sided", "gaussian"), ("two-sided", "rademacher")):
        model = make_model("mistral")
        batch = make_batch(batch=8)
        engine = engine_for(model, lr=5e-3, eps=1e-3, estimator=estimator, direction=direction,
                            q=4)
        start = engine.evaluate([batch])["loss"]
        for _ in range(40):
            engine.step(batch)
        assert engine.evaluate([batch])["loss"] < start


def test_nonfinite_loss_skips_the_update():
    class Poisoned(Objective):
        def loss(self, logits, labels):
            return torch.tensor(float("nan"))

    model = make_model("llama")
    engine = ZOEngine(model, OptimConfig(lr=1e-2), Poisoned("label_words", candidates=LABELS))
    before = weights(model)
    result = engine.step(make_batch())
    engine.flush()
    assert result.skipped and engine.skipped_steps == 1 and engine.log == []
    assert all(torch.equal(before[k], w) for k, w in weights(model).items())


def test_evaluation_sees_the_pending_update():
    model = make_model("opt")
    engine = engine_for(model, lr=1e-2)
    batch = make_batch()
    engine.step(batch)
    evaluated = engine.evaluate([batch])["loss"]
    engine.close()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                   ).logits[:, -positions_to_keep(batch["labels"]):]
    assert evaluated == pytest.approx(float(objective().loss(logits, batch["labels"])), abs=0)
    assert "forward" not in model.model.decoder.layers[0].__dict__  # unwrapped


def test_scratch_is_one_unit_not_the_model():
    model = make_model("llama", layers=6, hidden=64)
    engine = engine_for(model)
    engine.step(make_batch())
    largest = max(u.numel for u in engine.units) * 4
    assert engine.context.scratch.nbytes() == largest
    assert all(p.grad is None for p in model.parameters())


def test_save_then_load_resumes_exactly(tmp_path):
    batches = [make_batch(seed=i) for i in range(5)]
    straight = make_model("qwen3")
    engine = engine_for(straight, seed=4)
    for batch in batches:
        engine.step(batch)
    engine.flush()

    first = make_model("qwen3")
    engine = engine_for(first, seed=4)
    for batch in batches[:3]:
        engine.step(batch)
    engine.save(tmp_path / "ckpt")
    resumed = make_model("qwen3", seed=99)  # other weights: all must come from the checkpoint
    engine = engine_for(resumed, seed=4)
    engine.load(tmp_path / "ckpt")
    assert engine.step_index == 3
    for batch in batches[3:]:
        engine.step(batch)
    engine.flush()
    expected = weights(straight)
    assert all(torch.equal(expected[k], w) for k, w in weights(resumed).items())


def test_loading_another_models_checkpoint_is_refused(tmp_path):
    from zo2.errors import CheckpointError

    engine_for(make_model("llama", hidden=32)).save(tmp_path / "small")
    target = make_model("llama", hidden=64)
    before = weights(target)
    with pytest.raises(CheckpointError, match="another model"):
        engine_for(target).load(tmp_path / "small")
    assert all(torch.equal(before[k], w) for k, w in weights(target).items())
    with pytest.raises(CheckpointError, match="not a zo2 checkpoint"):
        engine_for(target).load(tmp_path)


def test_the_splitting_rule_classifies_by_shape_and_names_what_it_cannot():
    shape = BatchShape(n=2, total=6, seq_len=5)  # 2 slices of 3 rows
    hidden, heads = torch.zeros(6, 5, 4), torch.zeros(24, 5, 5)  # rows; rows x 4 heads
    rotary, positions, per_row = torch.zeros(1, 5, 4), torch.arange(5), torch.arange(6)
    parts = split_batch({"h": hidden, "a": heads, "r": rotary, "p": positions, "w": per_row},
                        shape, "unit u: keyword argument")
    assert [tuple(p["h"].shape) for p in parts] == [(3, 5, 4)] * 2
    assert [tuple(p["a"].shape) for p in parts] == [(12, 5, 5)] * 2
    assert all(p["r"] is rotary and p["p"] is positions for p in parts)
    assert [p["w"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(SplitError, match=r"unit u: keyword argument\['bias'\] has shape \(4, 5\)"):
        split_batch({"bias": torch.zeros(4, 5)}, shape, "unit u: keyword argument")


def test_a_broadcast_output_is_expanded_to_each_slices_rows():
    # one row per slice (a position embedding of position_ids (1, seq)) -> 3 rows each
    a, b = torch.full((1, 2), 1.0), torch.full((1, 2), 2.0)
    merged = merge_batch([a, b], rows=3)
    assert merged.tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 3
    assert merge_batch([a, b], rows=1).tolist() == [[1.0, 1.0], [2.0, 2.0]]


def test_every_allowed_estimator_is_an_object_with_its_own_state():
    from zo2 import choices
    from zo2.estimators import ESTIMATORS, make_estimator

    assert tuple(ESTIMATORS) == choices.ESTIMATORS
    two = make_estimator("two-sided")
    assert [(s.seed, s.sign) for s in two.plan([7, 8], 0.5).slices] == [
        (7, 1), (7, -1), (8, 1), (8, -1)]
    assert two.grads([3.0, 1.0, 2.0, 2.5], 0.5) == [2.0, -0.5]
    assert make_estimator("one-sided").grads([1.0, 1.5, 0.5], 0.5) == [1.0, -1.0]
    # FZOO: (L_j - L_0) / std(L_1..L_q); std of (1.5, 0.5) is 0.5, exactly
    assert make_estimator("fzoo").grads([1.0, 1.5, 0.5], 0.5) == [1.0, -1.0]
    assert make_estimator("fzoo").grads([1.0, 2.0, 2.0], 0.5) == [0.0, 0.0]  # no spread
    assert all(math.isnan(g) for g in make_estimator("fzoo").grads([1.0, math.inf, 2.0], 0.5))
    point = make_estimator("one-point")
    assert point.grads([2.0], 0.5) == [0.0]  # no baseline on the first step
    point.observe([2.0])
    restored = make_estimator("one-point")
    restored.load_state_dict(point.state_dict())
    assert restored.grads([2.5], 0.5) == point.grads([2.5], 0.5) == [1.0]
