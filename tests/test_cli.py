"""The zo2-train Hydra app end to end on a tiny model, and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["task.n_train=24", "task.n_dev=12", "task.n_test=12", "task.max_length=48",
         "optim.batch_size=4", "eval_batch_size=12", "progress=false", "logging=none"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "zo2.launch.train", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_train_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["model=tiny-llama", "steps=4", "eval_every=2", "log_every=1",
                    "optim.lr=1e-3", f"output_dir={out}", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # the process's peak is the larger of the load's and the training's (None: no reset)
    load, train = summary["load_peak_rss_mb"], summary["train_peak_rss_mb"]
    if load is not None:
        assert load <= summary["peak_rss_mb"] <= max(load, train)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("step") == 4 and events.count("eval") == 3 and events[-1] == "summary"
    assert not (out / "wandb").exists() and not (out / "curves.png").exists()  # logging=none
    evals = {r["step"]: r for r in records if r["event"] == "eval"}
    assert summary["zero_shot_test"] == evals[0]["test"]["accuracy"]
    assert summary["best_dev"] == evals[summary["best_step"]]["dev"]["accuracy"]
    assert summary["best_dev"] == max(r["dev"]["accuracy"] for r in evals.values())

    # The accuracies, counted here without the engine: the base model (zero-shot) and the
    # saved best/ folder (tuned), each loaded with transformers, predicting the label
    # word with the larger logit on the same test examples.
    from transformers import AutoModelForCausalLM

    from zo2.models import load_model

    base, tokenizer = load_model("tiny-llama")
    best = AutoModelForCausalLM.from_pretrained(out / "best").eval()
    assert summary["zero_shot_test"] == correct_fraction(base, tokenizer)
    assert summary["tuned_test"] == correct_fraction(best, tokenizer)
    assert (f"zero-shot test acc {summary['zero_shot_test']:.4f} | tuned test acc "
            f"{summary['tuned_test']:.4f}") in proc.stdout


def correct_fraction(model, tokenizer) -> float:
    """The fraction of the SMALL run's test examples whose label word gets the larger
    logit (the test split as the run samples it, in the run's one evaluation batch:
    sorted by length and left-padded, the padding changes the positions)."""
    import torch

    from zo2.config import compose
    from zo2.data.batching import encode
    from zo2.data.tasks import load_task

    cfg = compose(["model=tiny-llama", *SMALL])
    t = cfg.task
    task = load_task(t.name, seed=t.seed, n_train=t.n_train, n_dev=t.n_dev, n_test=t.n_test,
                     balanced=t.balanced)
    assert len(task.test) <= cfg.eval_batch_size  # one batch
    examples = sorted(task.test, key=lambda e: len(e.text))
    batch = encode(tokenizer, examples, task.spec, max_length=t.max_length)
    words = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in task.spec.label_words]
    with torch.no_grad():  # the logits at the position before the label word predict it
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, -2, words]
    predicted = logits.argmax(dim=1).tolist()
    return sum(p == e.label for p, e in zip(predicted, examples, strict=True)) / len(examples)


@pytest.mark.parametrize("args,line", [
    (["model.name=/nonexistent/model"], "error: model '/nonexistent/model' not found: not a "
     "local folder, 'smollm2-135m', or tiny-<family> with family in opt, llama, qwen2, qwen3, "
     "mistral, gpt2, gpt_neo, gpt_bigcode"),
    (["task=jsonl", "task.path=/nonexistent/data.jsonl", "model=tiny-llama"],
     "error: task.path: /nonexistent/data.jsonl not found"),
    (["optim.schedule=bogus"],
     "error: optim.schedule: 'bogus' is not one of ['constant', 'linear', 'cosine']"),
])
def test_bad_input_is_one_clear_message(tmp_path, args, line):
    """The cause in one last line of stderr: what is wrong, and what would be right."""
    proc = run_cli([*args, f"output_dir={tmp_path / 'out'}", *SMALL], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    assert sum(x.startswith("error:") for x in proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_bad_override_names_the_key(tmp_path):
    proc = run_cli(["optim.lrr=1"], tmp_path)
    assert proc.returncode == 2  # zo2's status for bad input, Hydra's refusals included
    # refused by the schema (the dataclass it is not in), named by its full key, one line
    assert proc.stderr.strip().splitlines() == [
        "error: optim.lrr: unknown key (OptimConfig has no field 'lrr')"], proc.stderr


def test_offloaded_run_from_the_cli_matches_the_resident_one(tmp_path):
    from safetensors.torch import load_file

    from zo2.models import load_model

    model, tokenizer = load_model("tiny-llama")  # a folder: offloaded, it is read lazily
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    common = [f"model.name={tmp_path / 'tiny'}", "steps=3", "eval_every=0", "log_every=1",
              "optim.lr=1e-2", *SMALL]
    resident, offloaded = tmp_path / "resident", tmp_path / "disk"
    for out, extra in ((resident, []), (offloaded, ["offload=disk", "offload.ring=1"])):
        proc = run_cli([*common, *extra, f"output_dir={out}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (offloaded / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert all(r["offload_up_mb"] > 0 for r in steps)
    assert list((offloaded / "offload-blocks").glob("*.safetensors"))  # the disk tier was used
    a, b = (load_file(out / "best" / "model.safetensors") for out in (resident, offloaded))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ra, rb = (json.loads((out / "summary.json").read_text()) for out in (resident, offloaded))
    assert (ra["best_step"], ra["tuned_test"]) == (rb["best_step"], rb["tuned_test"])


def test_torchrun_pertp_and_ddp_match_the_single_process_run(tmp_path):
    """`torchrun --nproc_per_node=2 -m zo2.launch.train parallel=...`, end to end."""
    common = ["model=tiny-llama", "steps=3", "eval_every=0", "log_every=1", "optim.lr=1e-2",
              *SMALL]

    def steps(out: Path) -> list[dict]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["event"] == "step"]

    # the references, one process each with the ranks' one thread: plain (PertP equals
    # it exactly), and summing the step losses as two data-parallel ranks do
    # (tests/train_with.py, dist_job.EmulatedDP; DDP equals it exactly)
    single, emulated = tmp_path / "single", tmp_path / "emulated"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for out, extra in ((single, {}), (emulated, {"ZO2_TEST_EMULATE_DP": "2"})):
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "train_with.py"),
                               *common, f"output_dir={out}"], cwd=tmp_path, capture_output=True,
                              text=True, env={**env, **extra}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("pertp", "ddp"):
        out = tmp_path / mode
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "zo2.launch.train", *common, f"parallel={mode}", f"output_dir={out}"],
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("tuned test acc") == 1  # the main rank reports
        summary = json.loads((out / "summary.json").read_text())
        assert summary["parallel"]["world"] == 2
        # pertp: each rank runs one of the two perturbations; ddp: each rank half the rows
        ref = steps(single if mode == "pertp" else emulated)
        for ours, theirs in zip(steps(out), ref, strict=True):
            assert ours["grads"] == theirs["grads"] and ours["loss"] == theirs["loss"]


def test_wandb_runs_offline_without_a_key_and_the_curves_are_plotted(tmp_path):
    out = tmp_path / "run"
    env_key = os.environ.pop("WANDB_API_KEY", None)
    try:
        proc = run_cli(["model=tiny-llama", "steps=2", "eval_every=1", "log_every=1",
                        f"output_dir={out}", *SMALL, "logging=default"], tmp_path)
    finally:
        if env_key is not None:
            os.environ["WANDB_API_KEY"] = env_key
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run's log
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_multirun_sweep_over_the_learning_rate(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny-llama", "optim.lr=1e-3,1e-2", "steps=1", "eval_every=0",
                    *SMALL, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    lrs = [json.loads(line)["config"]["optim"]["lr"]
           for path in sorted(sweep.glob("*/metrics.jsonl"))
           for line in path.read_text().splitlines()[:1]]
    assert lrs == [1e-3, 1e-2]
