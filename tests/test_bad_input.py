"""Bad input ends in one clear message, before any existing output is touched.

Every case runs the zo2-train CLI in a subprocess on a tiny model, with an output
directory that already holds an earlier run's files. It must exit with status 2 and
one line ``error: <message>`` on stderr naming the cause, show no traceback, and
leave every file of that directory byte for byte as it was. Each CLI start costs
seconds of imports, so one module fixture runs all cases concurrently and one test
per case then checks its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

SMALL = ["task.n_train=8", "task.n_dev=4", "task.n_test=4", "task.max_length=48",
         "optim.batch_size=4", "eval_batch_size=8", "progress=false", "logging=none"]
COMMON = ["model=tiny-llama", "steps=1", "eval_every=0", *SMALL]
# An earlier run's files in every case's output directory: they must survive untouched.
EARLIER = {
    "metrics.jsonl": '{"event": "eval", "step": 0, "dev": {"accuracy": 0.5}}\n'
                     '{"event": "step", "step": 1, "loss": 0.69}\n',
    "summary.json": '{"steps": 1, "tuned_test": 0.5}\n',
}
ROW = '{"text": "a fine day", "label": 1}\n'
WORKERS = 3  # CLI starts in flight at once (mostly imports; 2-3 fill two cores)


@dataclass(frozen=True)
class Case:
    """One bad input: CLI arguments (``{tmp}`` and ``{ckpt}`` filled in) and the
    substrings that name its cause in the message."""

    id: str
    args: tuple[str, ...]
    needles: tuple[str, ...]
    hydra: bool = False  # rejected by Hydra while composing (the same one line, status 2)


def data(name: str, *needles: str, fmt: str = "jsonl") -> Case:
    """A ``task=jsonl`` (or csv) case on the file ``{tmp}/data/<name>`` (its content in
    DATA; absent there: no such file); the message must name the file."""
    args = ["task=jsonl", f"task.path={{tmp}}/data/{name}"]
    if fmt == "csv":
        args.append("task.name=csv")  # there is no configs/task/csv.yaml
    return Case(f"data-{name}", tuple(args), (f"data/{name}", *needles))


DATA = {  # file name -> content, written by the fixture
    "empty.jsonl": "\n  \n",
    "malformed.jsonl": ROW + '{"text": "cut", "label": 0\n',
    "no-text.jsonl": ROW + '{"sentence": "no text here", "label": 0}\n',
    "no-label.jsonl": ROW + '{"text": "no label here"}\n',
    "bad-label.jsonl": ROW + '{"text": "so-so", "label": 7}\n',
    "all-empty.jsonl": '{"text": "  ", "label": 0}\n{"text": "", "label": 1}\n',
    "header-only.csv": "text,label\n",
}

CASES = [
    # config
    # Hydra / OmegaConf: the schema refuses the key, or the value as the field's type,
    # naming the full key (not just the user's override echoed back)
    Case("unknown-key", ("optim.lrr=1",),
         ("error: optim.lrr: unknown key (OptimConfig has no field 'lrr')",), hydra=True),
    Case("ill-typed", ("steps=abc",), ("error: steps: 'abc' is not an integer",), hydra=True),
    Case("out-of-range", ("optim.eps=0",), ("optim.eps", "> 0")),
    Case("bad-enum", ("optim.schedule=bogus",), ("optim.schedule", "'bogus'", "cosine")),
    # model
    Case("model-missing", ("model.name={tmp}/no-such-model",), ("no-such-model", "not found")),
    Case("model-no-config", ("model.name={tmp}/data",), ("data", "config.json is missing")),
    Case("model-encoder", ("model.name={tmp}/bert",),
         ("bert", "encoder", "not a decoder-only causal LM")),
    # data
    data("missing.jsonl", "not found"),
    data("empty.jsonl", "is empty"),
    data("malformed.jsonl", "line 2", "malformed JSON"),
    data("no-text.jsonl", "row 2", "missing field(s) 'text'"),
    data("no-label.jsonl", "row 2", "missing field(s) 'label'"),
    data("bad-label.jsonl", "row 2", "label 7 is not in the label set"),
    data("all-empty.jsonl", "no usable rows"),
    data("header-only.csv", "header but no rows", fmt="csv"),
    # sequences longer than the model's context (tiny models: 512 positions)
    Case("context", ("task.max_length=1024",), ("task.max_length", "1024", "512")),
    # checkpoints
    Case("resume-other-model", ("model=tiny-opt", "checkpoint.resume={ckpt}"),
         ("{ckpt}", "model", "tiny-llama", "tiny-opt")),
    Case("resume-missing", ("checkpoint.resume={tmp}/no-such-checkpoint",),
         ("no-such-checkpoint", "not found")),
    Case("resume-not-a-checkpoint", ("checkpoint.resume={tmp}/data",),
         ("data", "MANIFEST.json")),
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "zo2.launch.train", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _write_inputs(tmp: Path) -> None:
    (tmp / "data").mkdir()
    for name, content in DATA.items():
        (tmp / "data" / name).write_text(content)
    # A BertModel folder's config: all the check reads (before any weights; T5 and the
    # other branches are unit-tested in test_models.py).
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))


def _checkpoint(tmp: Path) -> Path:
    """A run checkpoint of tiny-llama (one step), for resuming with another model."""
    out = tmp / "ckpt-run"
    proc = run_cli([*COMMON, "checkpoint.every=1", f"output_dir={out}"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (out / "checkpoints").glob("step-*")
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Future]:
    """Run every case (concurrently); per case ``(process, before, after, ckpt)``, where
    before and after are snapshots of the output directory (and a resume source)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    _write_inputs(tmp)

    def run_case(case: Case, ckpt: Future | None) -> tuple:
        fill = {"tmp": tmp, "ckpt": ckpt.result() if ckpt is not None else ""}
        out = tmp / f"out-{case.id}"
        out.mkdir()
        for name, content in EARLIER.items():
            (out / name).write_text(content)
        kept = [out] + ([fill["ckpt"]] if ckpt is not None else [])  # a resume source too
        before = [snapshot(folder) for folder in kept]
        args = [a.format(**fill) for a in case.args]
        proc = run_cli([*COMMON, *args, f"output_dir={out}"], tmp)
        return proc, before, [snapshot(folder) for folder in kept], str(fill["ckpt"])

    with ThreadPoolExecutor(WORKERS) as pool:
        ckpt = pool.submit(_checkpoint, tmp)  # first: the cases that need it wait on it
        futures = {case.id: pool.submit(run_case, case, ckpt if "{ckpt}" in
                                        " ".join(case.args) else None)
                   for case in CASES}
        return futures


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_message_and_nothing_is_lost(case: Case, results) -> None:
    proc, before, after, ckpt = results[case.id].result()
    stderr = proc.stderr.strip()
    shown = f"status {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in stderr, shown
    assert proc.returncode == 2, shown
    if case.hydra:  # refused while composing: nothing else is printed
        assert stderr == case.needles[0], shown
    assert stderr.startswith("error:"), shown
    assert sum(line.startswith("error:") for line in stderr.splitlines()) == 1, shown
    for needle in case.needles:
        assert needle.format(ckpt=ckpt) in stderr, f"{needle!r} not named; {shown}"
    assert after == before, "earlier files in the output directory or the checkpoint changed"


def test_check_context_reads_the_config_and_names_both_lengths() -> None:
    from zo2.errors import ConfigError
    from zo2.models import check_context, context_length

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config), zo2_name="m")

    check_context(model(max_position_embeddings=512), 512)
    check_context(model(), 10**6)  # no stated context length: nothing to check
    assert context_length(model(n_positions=1024)) == 1024  # gpt2's key
    with pytest.raises(ConfigError, match=r"task.max_length: 1025 .* 'm' \(1024 positions\)"):
        check_context(model(n_positions=1024), 1025)
