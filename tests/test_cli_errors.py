"""zo2-train's own face on Hydra: a refused config is one line ``error: <key>: ...`` and
exit status 2 (not Hydra's message and status 1), Hydra's files go in the run's own
directory, and ``--help`` says what zo2-train does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OPTIM_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "optim"
SMALL = ["task.n_train=8", "task.n_dev=4", "task.n_test=4", "task.max_length=48",
         "optim.batch_size=4", "eval_batch_size=8", "progress=false", "logging=none"]


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "zo2.launch.train", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args,line", [
    (["optim.lr=fast"], "error: optim.lr: 'fast' is not a float"),
    (["steps=many"], "error: steps: 'many' is not an integer"),
    (["progress=maybe"], "error: progress: 'maybe' is not a boolean (true or false)"),
    (["optim.lrr=1"], "error: optim.lrr: unknown key (OptimConfig has no field 'lrr')"),
    (["lrr=1"], "error: lrr: unknown key (TrainConfig has no field 'lrr')"),
    (["task=jsonl"], "error: task.path: task 'jsonl' needs a data file path"),
    (["optim.lr=???"], "error: optim.lr: missing value"),
    (["optim=nope"], "error: optim: no option 'nope' (options: "
                     + ", ".join(sorted(p.stem for p in OPTIM_PRESETS.glob("*.yaml"))) + ")"),
], ids=["ill-typed-float", "ill-typed-int", "ill-typed-bool", "unknown-key",
        "unknown-top-level-key", "missing-task-path", "missing-value", "unknown-option"])
def test_a_refused_config_is_one_line_and_exit_status_2(tmp_path, args, line):
    out = tmp_path / "out"
    proc = run_cli([*args, f"output_dir={out}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing left behind


def test_every_torchrun_rank_refuses_with_the_same_line(tmp_path):
    """Each rank composes its own config: under torchrun's environment each one says it."""
    proc = run_cli(["optim.lr=fast"], tmp_path, RANK="1", WORLD_SIZE="2",
                   TORCHELASTIC_RUN_ID="abc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: optim.lr: 'fast' is not a float"]


def test_hydra_files_go_in_the_output_dir(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["model=tiny-llama", "steps=0", "eval_every=0", *SMALL, f"output_dir={out}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").is_file()
    assert "output_dir=" in (out / ".hydra" / "overrides.yaml").read_text()
    assert (out / "summary.json").is_file()
    assert not (tmp_path / "runs").exists()  # one directory per run: no runs/<date>/<time>


def test_help_says_what_zo2_train_does(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "powered by Hydra" not in text and "zeroth-order" in text
    for group in ("model", "task", "optim", "offload", "parallel", "peft", "logging"):
        options = sorted(p.stem for p in
                         (Path(__file__).parents[1] / "configs" / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in text
    for key in ("model.name", "data.train", "data.validation", "data.test", "data.format",
                "task.name", "steps", "optim.lr", "optim.method", "output_dir", "seed"):
        assert f"\n  {key} " in text, key
    assert not (tmp_path / "runs").exists()
    assert "Hydra" in run_cli(["--hydra-help"], tmp_path).stdout  # Hydra's own help stays
