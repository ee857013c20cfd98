"""The seed log: export, file format, bit-exact replay, error messages, command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_batch, make_model
from safetensors.torch import save_file

from zo2.config import OffloadConfig, OptimConfig
from zo2.engine import ZOEngine, step_seed
from zo2.errors import CheckpointError
from zo2.loss import Objective
from zo2.models import model_identity
from zo2.seedlog import SeedLog, main, replay

LABELS = torch.tensor([5, 9])
BATCHES = [make_batch(seed=i) for i in range(6)]


def fine_tune(model, *, trainable=("*",), offload=None, steps: int = 6, **optim) -> ZOEngine:
    optim.setdefault("lr", 1e-2)
    engine = ZOEngine(model, OptimConfig(**optim), Objective("label_words", candidates=LABELS),
                      seed=5, total_steps=steps, trainable=trainable, offload=offload)
    for batch in BATCHES[:steps]:
        engine.step(batch)
    return engine


def assert_replays(engine: ZOEngine, base, tmp_path: Path, trainable=("*",)) -> None:
    """Saved, loaded and replayed onto ``base``, the log gives the engine's weights exactly."""
    before = {k: v.clone() for k, v in base.state_dict().items()}
    path = SeedLog.from_engine(engine, trainable).save(tmp_path / "run.seedlog")
    expected = engine.export_state_dict()
    replay(base, SeedLog.load(path))
    got = base.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name
    assert any(not torch.equal(before[k], got[k]) for k in got), "nothing was trained"


CASES = {
    "q2-weight-decay": dict(family="llama", optim=dict(q=2, weight_decay=0.1)),
    "rademacher-one-sided": dict(family="qwen2",
                                 optim=dict(direction="rademacher", estimator="one-sided")),
    "bf16-stochastic": dict(family="llama", dtype=torch.bfloat16,
                            optim=dict(rounding="stochastic", weight_decay=0.1)),
    "offloaded": dict(family="opt", offload=OffloadConfig(enabled=True, ring=2),
                      optim=dict(weight_decay=0.1)),
    "layer-0-only": dict(family="mistral", trainable=("*layers.0*",), optim=dict(q=2)),
    # the other update rules: their records also keep the grads and learning rates
    "momentum-buffer": dict(family="llama", optim=dict(method="zo-momentum", lr=1e-3)),
    "momentum-history": dict(family="qwen2",
                             optim=dict(method="zo-momentum", history=3, lr=1e-3, q=2)),
    "adam-bf16-state": dict(family="llama", optim=dict(method="zo-adam", lr=1e-3,
                                                       state_dtype="bfloat16",
                                                       weight_decay=0.1)),
    "sign-rademacher": dict(family="opt", optim=dict(method="zo-sign", lr=1e-3, q=2,
                                                     direction="rademacher")),
    "adam-offloaded": dict(family="opt", offload=OffloadConfig(enabled=True, ring=2),
                           optim=dict(method="zo-adam", lr=1e-3)),
    "fzoo": dict(family="llama", optim=dict(estimator="fzoo", q=3, direction="rademacher",
                                            lr=1e-4)),
    # sparse directions: the replay recomputes the thresholds and masks from the base
    "sparse-offloaded": dict(family="opt", offload=OffloadConfig(enabled=True, ring=2),
                             optim=dict(sparsity=0.5, weight_decay=0.1)),
    "sparse-bf16": dict(family="llama", dtype=torch.bfloat16, optim=dict(sparsity=0.75, q=2)),
    "low-rank-adam": dict(family="qwen2", optim=dict(method="zo-adam", rank=2, lr=1e-3)),
    # HiZOO: the records keep each step's curvature, from which the replay rebuilds D
    "hizoo": dict(family="llama", optim=dict(estimator="hizoo", hessian="diagonal",
                                             hessian_smooth=0.1, q=2)),
    "hizoo-light-offloaded": dict(family="opt", offload=OffloadConfig(enabled=True, ring=2),
                                  optim=dict(estimator="hizoo", hessian="factored",
                                             hessian_smooth=0.1, method="zo-momentum")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_replay_reproduces_the_fine_tune_bit_for_bit(case, tmp_path):
    model = make_model(case["family"], layers=3, dtype=case.get("dtype", torch.float32))
    base = copy.deepcopy(model)
    trainable = case.get("trainable", ("*",))
    engine = fine_tune(model, trainable=trainable, offload=case.get("offload"), **case["optim"])
    assert len(engine.log) == 6
    assert_replays(engine, base, tmp_path, trainable)


def test_a_rules_log_keeps_its_settings_and_is_a_few_bytes_more_a_step(tmp_path):
    engine = fine_tune(make_model("llama"), steps=3, method="zo-adam", lr=1e-3, q=2,
                       beta2=0.99, state_dtype="bfloat16")
    log = SeedLog.from_engine(engine)
    assert log.rule == {"method": "zo-adam", "beta1": 0.9, "beta2": 0.99, "adam_eps": 1e-8,
                        "state_dtype": "bfloat16"}
    assert log.lr == [r["lr"] for r in engine.log] and len(log.grads) == 3
    back = SeedLog.load(log.save(tmp_path / "adam.seedlog"))
    assert back == log
    sgd = SeedLog.from_engine(fine_tune(make_model("llama"), steps=3, q=2))
    assert sgd.rule == {"method": "zo-sgd"} and sgd.grads == [] and sgd.lr == []
    with pytest.raises(ValueError, match="is not the settings of one of"):
        SeedLog(base={}, seed=1, rule={"method": "zo-adam", "lr_typo": 1.0})
    with pytest.raises(ValueError, match="needs the grads and lr of every record"):
        SeedLog(base={}, seed=1, steps=[0], coefs=[(0.1,)], decay=[1.0],
                rule={"method": "zo-sign"})


def test_version_1_files_read_as_zo_sgd(tmp_path):
    log = SeedLog.from_engine(fine_tune(make_model("llama"), steps=2))
    header = {k: v for k, v in log.header().items() if k != "rule"}
    old = tmp_path / "v1.seedlog"
    save_file({"steps": torch.tensor(log.steps), "coefs": torch.tensor(log.coefs,
               dtype=torch.float64), "decay": torch.tensor(log.decay, dtype=torch.float64)},
              old, metadata={"zo2": json.dumps({**header, "version": 1})})
    assert SeedLog.load(old) == log


def test_skipped_steps_are_not_logged_and_replay_still_matches(tmp_path):
    class NaNLoss(Objective):
        def loss(self, logits, labels):
            return torch.tensor(float("nan"))

    model = make_model("llama")
    base = copy.deepcopy(model)
    engine = fine_tune(model, steps=2)
    engine.objective = NaNLoss("label_words", candidates=LABELS)
    assert engine.step(BATCHES[2]).skipped
    engine.objective = Objective("label_words", candidates=LABELS)
    for batch in BATCHES[3:5]:
        engine.step(batch)
    assert [r["step"] for r in engine.log] == [0, 1, 3, 4]
    assert_replays(engine, base, tmp_path)


def test_thousand_steps_are_tens_of_kilobytes(tmp_path):
    base = model_identity(make_model("llama"))
    for q, limit in ((1, 32 * 1024), (4, 64 * 1024)):
        coefs = [tuple(1e-4 * (i + j) / 3 for j in range(q)) for i in range(1000)]
        log = SeedLog(base=base, seed=1, steps=list(range(1000)), coefs=coefs,
                      decay=[1.0 - 1e-6] * 1000)
        path = log.save(tmp_path / f"q{q}.seedlog")
        assert path.stat().st_size < limit
        back = SeedLog.load(path)
        assert back == log and back.q == q


def test_records_with_other_seeds_are_rejected():
    records = [{"step": 0, "seeds": [step_seed(1, 0, 0)], "coefs": [0.1], "decay": 1.0}]
    assert len(SeedLog.from_records(records, base={}, seed=1)) == 1
    with pytest.raises(ValueError, match="run seed 2"):
        SeedLog.from_records(records, base={}, seed=2)


def test_from_engine_rejects_other_trainable_globs():
    engine = fine_tune(make_model("llama"), trainable=("*layers.0*",), steps=1)
    with pytest.raises(ValueError, match="selects other parameters"):
        SeedLog.from_engine(engine)


def test_from_engine_rejects_a_log_without_the_steps_before_a_resume():
    engine = fine_tune(make_model("llama"), steps=2)
    state = engine.state_dict()
    state.pop("log", None)  # a checkpoint that did not keep the log
    resumed = fine_tune(engine.model, steps=0)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks 2 of its updates"):
        SeedLog.from_engine(resumed)


def test_bad_files_and_other_models_raise_checkpoint_errors(tmp_path):
    model = make_model("llama")
    log = SeedLog.from_engine(fine_tune(copy.deepcopy(model), steps=1))
    good = log.save(tmp_path / "good.seedlog")

    with pytest.raises(CheckpointError, match="missing.seedlog not found"):
        SeedLog.load(tmp_path / "missing.seedlog")
    garbage = tmp_path / "garbage.seedlog"
    garbage.write_bytes(b"\x07not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.seedlog is not a zo2 seed log"):
        SeedLog.load(garbage)
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, weights)
    with pytest.raises(CheckpointError, match="weights.safetensors is not a zo2 seed log"):
        SeedLog.load(weights)
    future = tmp_path / "future.seedlog"
    save_file({"steps": torch.zeros(0, dtype=torch.int64)}, future,
              metadata={"zo2": json.dumps({**log.header(), "version": 99})})
    with pytest.raises(CheckpointError, match="future.seedlog: seed log version 99"):
        SeedLog.load(future)
    truncated = tmp_path / "truncated.seedlog"
    truncated.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated.seedlog"):
        SeedLog.load(truncated)

    with pytest.raises(CheckpointError, match="another model.*config"):
        replay(make_model("llama", layers=3), log)
    with pytest.raises(CheckpointError, match="load the base with dtype=float32"):
        replay(copy.deepcopy(model).to(torch.bfloat16), log)


def _tiny_folder(path: Path):
    """A tiny llama with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t1",
                                        pad_token="t0", eos_token="t2")
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "zo2.seedlog", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_info_and_replay(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from zo2.models import load_model

    base_dir, out = tmp_path / "base", tmp_path / "tuned"
    _tiny_folder(base_dir)
    model, _ = load_model(str(base_dir))
    engine = fine_tune(model, steps=3, q=2)
    path = SeedLog.from_engine(engine).save(tmp_path / "run.seedlog")

    info = _cli("info", str(path))
    assert info.returncode == 0, info.stderr[-2000:]
    assert '"format": "zo2-seedlog"' in info.stdout and "records: 3 (steps 0..2)" in info.stdout
    assert f"file size: {path.stat().st_size} bytes" in info.stdout

    rep = _cli("replay", "--base", str(base_dir), "--log", str(path), "--out", str(out))
    assert rep.returncode == 0, rep.stderr[-2000:]
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in engine.export_state_dict().items():
        assert torch.equal(tuned[name], value), name

    other = tmp_path / "other"
    make_model("llama", layers=3).save_pretrained(other)
    (other / "tokenizer.json").symlink_to(base_dir / "tokenizer.json")
    (other / "tokenizer_config.json").symlink_to(base_dir / "tokenizer_config.json")
    assert main(["replay", "--base", str(other), "--log", str(path), "--out", str(out)]) == 2
    assert "another model" in capsys.readouterr().err
