"""Your own data end to end: rows in a file, a format, the Trainer and zo2-train."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _chat import chat, chat_files, write_jsonl

from zo2.config import compose
from zo2.trainer import Callback, Trainer

SMALL = ["model=tiny-llama", "optim.lr=1e-3", "optim.batch_size=4", "eval_batch_size=8",
         "progress=false", "logging=none", "data.max_length=96"]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return chat_files(tmp_path, 24)


def overrides(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*SMALL, *(f"data.{k}={v}" for k, v in files.items()), f"output_dir={out}",
            "data.format=messages", *extra]


def run(args: list[str], callbacks=()) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = compose(args)
    with Trainer(cfg, cfg.output_dir, callbacks=callbacks) as trainer:
        summary = trainer.train()
        weights = {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}
    return summary, weights


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_chat_dataset_trains_evaluates_and_keeps_the_lowest_dev_loss(files, tmp_path):
    out = tmp_path / "run"
    summary, _ = run(overrides(files, out, "steps=6", "eval_every=2", "checkpoint.every=3"))
    evals = {r["step"]: r for r in records(out) if r["event"] == "eval"}
    assert sorted(evals) == [0, 2, 4, 6]
    assert summary["eval_metric"] == "loss" and summary["data"] == str(files["train"])
    dev_losses = {step: r["dev"]["loss"] for step, r in evals.items()}
    best_step = min(dev_losses, key=lambda s: (dev_losses[s], s))  # the first of equals
    assert (summary["best_step"], summary["best_dev"]) == (best_step, dev_losses[best_step])
    assert summary["zero_shot_test"] == evals[0]["test"]["loss"]
    for scores in (evals[0]["dev"], evals[0]["test"]):
        assert scores["perplexity"] == math.exp(scores["loss"])  # the same float64
    assert (out / "best" / "model.safetensors").is_file()


def test_without_a_dev_split_best_is_the_final_weights(files, tmp_path):
    out = tmp_path / "run"
    only_train = {"train": files["train"]}
    summary, weights = run(overrides(only_train, out, "steps=3"))
    assert summary["best_step"] == 3 and summary["best_dev"] is None
    assert summary["zero_shot_test"] is None and summary["tuned_test"] is None
    from safetensors.torch import load_file

    best = load_file(out / "best" / "model.safetensors")
    assert all(torch.equal(best[k], weights[k]) for k in best)


def test_a_held_out_share_of_train_is_the_dev_split(files, tmp_path):
    out = tmp_path / "run"
    summary, _ = run(overrides({"train": files["train"]}, out, "steps=2",
                               "data.validation_split=0.25"))
    evals = [r for r in records(out) if r["event"] == "eval"]
    assert "dev" in evals[0] and "test" not in evals[0]
    assert summary["best_dev"] is not None


class Crash(Callback):
    def on_save(self, trainer, step, folder) -> None:
        if step == 2:
            raise RuntimeError("crash after checkpoint 2")


def test_a_resumed_run_on_your_own_data_ends_with_the_uninterrupted_weights(files, tmp_path):
    steps = ["steps=4", "eval_every=2", "checkpoint.every=2"]
    _, whole = run(overrides(files, tmp_path / "whole", *steps))
    with pytest.raises(RuntimeError, match="crash after checkpoint 2"):
        run(overrides(files, tmp_path / "cut", *steps), callbacks=[Crash()])
    summary, resumed = run(overrides(files, tmp_path / "cut", *steps))
    assert summary["resumed_from"].endswith("step-00000002")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_bad_row_is_one_line_and_nothing_is_written(files, tmp_path):
    bad = [chat(i) for i in range(6)]
    bad[3]["messages"][1]["role"] = "bot"
    write_jsonl(files["train"], bad)
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "zo2.launch.train",
                           *overrides({"train": files["train"]}, out, "steps=1")],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {files['train']}: row 3: field 'messages[1].role': unknown role 'bot' "
        "(expected one of system, user, assistant)")
    assert not out.exists()


def test_generated_answers_are_scored_against_the_last_assistant_turn(files, tmp_path):
    """The step-0 answers are the base model's own greedy continuations of the chat
    prompt (checked with transformers' generate), scored against the assistant's word."""
    out = tmp_path / "run"
    summary, _ = run(overrides(files, out, "steps=2", "eval_every=2", "data.max_new_tokens=4",
                               "data.samples=8", "eval_metric=exact_match"))
    zero = next(r for r in records(out) if r["event"] == "eval" and r["step"] == 0)["dev"]
    rows = [chat(100 + i) for i in range(8)]
    assert [s["reference"] for s in zero["samples"]] == [r["messages"][-1]["content"]
                                                         for r in rows]
    from zo2.evaluation import exact_match
    from zo2.models import load_model

    assert zero["exact_match"] == sum(exact_match(s["prediction"], s["reference"])
                                      for s in zero["samples"]) / 8
    assert 0.0 <= zero["f1"] <= 1.0 and summary["eval_metric"] == "exact_match"
    model, tokenizer = load_model("tiny-llama")
    for row, sample in zip(rows, zero["samples"]):
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True,
                                               return_dict=False)
        ids = torch.tensor([prompt])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=4, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        cut = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert sample["prediction"] == tokenizer.decode(cut, skip_special_tokens=True).strip()


def test_rows_given_in_memory_train_exactly_as_the_same_rows_from_files(files, tmp_path):
    """``Trainer(data=...)`` with a datasets.Dataset and a list of dicts: the weights of
    the run on the same rows read from the JSON lines files, bit for bit."""
    import datasets

    _, from_files = run(overrides(files, tmp_path / "files", "steps=3"))
    rows = {role: [json.loads(line) for line in path.read_text().splitlines()]
            for role, path in files.items()}
    given = {"train": datasets.Dataset.from_list(rows["train"]),
             "validation": rows["validation"], "test": rows["test"]}
    cfg = compose([*SMALL, "data.format=messages", f"output_dir={tmp_path / 'memory'}",
                   "steps=3"])
    with Trainer(cfg, cfg.output_dir, data=given) as trainer:
        summary = trainer.train()
        in_memory = trainer.engine.export_state_dict()
    assert summary["data"] == "rows given to the Trainer (train 24, validation 8, test 8)"
    assert in_memory.keys() == from_files.keys()
    assert all(torch.equal(in_memory[k], from_files[k]) for k in in_memory)


def test_generated_samples_are_a_wandb_table_per_split(files, tmp_path, monkeypatch):
    """An offline wandb run holds each evaluation's samples as a Table whose rows are the
    samples of metrics.jsonl."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    args = [a for a in overrides(files, out, "steps=1", "eval_every=1", "data.max_new_tokens=3",
                                 "data.samples=2") if a != "logging=none"]
    run([*args, "logging.wandb=offline", "logging.plot=false"])
    evals = [r for r in records(out) if r["event"] == "eval"]
    tables = sorted((out / "wandb").glob("offline-run-*/files/media/table/*/samples_*.table.json"))
    splits = [(r, split) for r in evals for split in ("dev", "test") if split in r]
    assert len(tables) == len(splits) == 3  # dev and test at step 0, dev at step 1
    logged = [json.loads(t.read_text()) for t in tables]
    expected = [[r["step"], s["prompt_end"], s["prediction"], s["reference"]]
                for r, split in splits for s in r[split]["samples"]]
    assert all(t["columns"] == ["step", "prompt_end", "prediction", "reference"] for t in logged)
    assert sorted(row for t in logged for row in t["data"]) == sorted(expected)
