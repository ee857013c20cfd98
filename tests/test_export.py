"""Clean exports: best/ and final/ without engine state, and ``python -m zo2.export``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _chat import chat_files
from safetensors.torch import load_file

from zo2.checkpoints import verify
from zo2.config import compose
from zo2.folders import RULE_STATE_FILE, SEEDLOG_FILE, STATE_FILE
from zo2.trainer import Callback, Trainer

ENGINE_STATE = (STATE_FILE, RULE_STATE_FILE, SEEDLOG_FILE, "run_state.json")
SMALL = ["model=tiny-llama", "optim.batch_size=4", "eval_batch_size=8", "progress=false",
         "logging=none", "data.max_length=96", "data.format=messages"]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return chat_files(tmp_path, 16, system=False)


class Snapshots(Callback):
    """The engine's exported weights after every dev evaluation and every save."""

    def __init__(self) -> None:
        self.evaluated: dict[int, dict] = {}
        self.saved: dict[int, dict] = {}

    @staticmethod
    def _weights(trainer) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in trainer.engine.export_state_dict().items()}

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.evaluated[step] = self._weights(trainer)

    def on_save(self, trainer, step, folder) -> None:
        self.saved[step] = self._weights(trainer)


def train(files, out: Path, *extra: str) -> tuple[dict, Snapshots]:
    cfg = compose([*SMALL, *(f"data.{k}={v}" for k, v in files.items()),
                   f"output_dir={out}", *extra])
    snaps = Snapshots()
    with Trainer(cfg, cfg.output_dir, callbacks=[snaps]) as trainer:
        summary = trainer.train()
    return summary, snaps


def export_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "zo2.export", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def assert_clean(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert not names & set(ENGINE_STATE), names
    assert "README.md" in names and "MANIFEST.json" in names
    verify(folder)  # the manifest matches, the refreshed card included


def assert_equal_weights(loaded: dict, expected: dict) -> None:
    common = loaded.keys() & expected.keys()  # a file holds tied weights once
    assert len(common) >= len(expected) - 1 and common
    for k in common:
        assert torch.equal(loaded[k], expected[k]), k


def test_best_and_final_are_clean_save_pretrained_folders(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo2.models import load_model

    out = tmp_path / "run"
    summary, snaps = train(files, out, "optim=adam", "optim.lr=1e-2", "steps=4",
                           "eval_every=2", "checkpoint.every=2")
    best_step = summary["best_step"]
    base, tokenizer = load_model("tiny-llama")
    at_best = (snaps.evaluated[best_step] if best_step else
               {k: v.clone() for k, v in base.state_dict().items()})
    for name, expected in (("best", at_best), ("final", snaps.saved[4])):
        folder = out / name
        assert_clean(folder)
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert_equal_weights(model.state_dict(), expected)  # bit for bit
        saved = AutoTokenizer.from_pretrained(folder)
        assert saved.get_vocab() == tokenizer.get_vocab()
        assert saved.chat_template == tokenizer.chat_template
        card = (folder / "README.md").read_text()
        for text in ("base_model: tiny-llama", str(files["train"]), "zo-adam", "two-sided",
                     "| steps | 4 |", f"| best step | {best_step} |", "run.seedlog",
                     f"{summary['tuned_test']:.4f}", f"{summary['best_dev']:.4f}"):
            assert text in card, text
    assert "| weights of step | 4 |" in (out / "final" / "README.md").read_text()
    assert summary["final"] == str(out / "final")
    # the checkpoints keep the engine state and the rule's moments
    assert (out / "checkpoints" / "step-00000004" / RULE_STATE_FILE).is_file()

    # python -m zo2.export: a checkpoint to a clean folder with its weights
    ckpt = out / "checkpoints" / "step-00000002"
    exported = tmp_path / "exported"
    proc = export_cli(ckpt, exported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_clean(exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert_equal_weights(model.state_dict(), load_file(ckpt / "model.safetensors"))
    assert_equal_weights(model.state_dict(), snaps.saved[2])
    card = (exported / "README.md").read_text()
    assert "| weights of step | 2 |" in card and "zo-adam" in card
    # best/ exports too (its card is kept)
    proc = export_cli(out / "best", tmp_path / "from-best")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "from-best" / "README.md").read_text() == (out / "best" / "README.md"
                                                                   ).read_text()

    # bad input: one line, exit 2
    (tmp_path / "not-a-ckpt").mkdir()
    for args in ((tmp_path / "missing", tmp_path / "x"), (tmp_path / "not-a-ckpt", tmp_path / "y"),
                 (ckpt, exported), (ckpt, tmp_path / "z", "--merge-lora")):
        proc = export_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_lora_exports_are_peft_folders_and_merge(files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zo2.models import load_model

    out = tmp_path / "run"
    summary, snaps = train(files, out, "peft=lora", "optim.lr=1e-2", "steps=2",
                           "eval_every=1", "checkpoint.every=2")
    for name in ("best", "final"):
        folder = out / name
        assert_clean(folder)
        assert (folder / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists()
        assert "library_name: peft" in (folder / "README.md").read_text()
    final = snaps.saved[2]
    loaded = PeftModel.from_pretrained(load_model("tiny-llama")[0], out / "final")
    adapter = {k: v for k, v in loaded.state_dict().items() if ".lora_" in k}
    assert adapter and all(torch.equal(v, final[k]) for k, v in adapter.items())

    merged_dir = tmp_path / "merged"
    proc = export_cli(out / "final", merged_dir, "--merge-lora")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    expected = loaded.merge_and_unload().state_dict()  # peft's own merge
    assert merged.keys() == expected.keys()
    for k in merged:
        assert torch.equal(merged[k], expected[k]), k
    # a checkpoint merges too (the base model named by its run state)
    proc = export_cli(out / "checkpoints" / "step-00000002", tmp_path / "merged2", "--merge-lora")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged2").state_dict()
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_export_merge_lora_writes_best_and_final_merged(files, tmp_path):
    """``export.merge_lora=true``: best/ and final/ are full models, equal to peft's merge
    of the same run's adapter (the run without the key, same seeds, gives the adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zo2.models import load_model

    args = ("peft=lora", "optim.lr=1e-2", "steps=2", "eval_every=1", "checkpoint.every=0")
    train(files, tmp_path / "adapter", *args)
    train(files, tmp_path / "merged", *args, "export.merge_lora=true")
    for name in ("best", "final"):
        folder = tmp_path / "merged" / name
        assert_clean(folder)
        assert not (folder / "adapter_config.json").exists()
        assert "merged from adapter" in (folder / "README.md").read_text()
        merged = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        peft_model = PeftModel.from_pretrained(load_model("tiny-llama")[0],
                                               tmp_path / "adapter" / name)
        expected = peft_model.merge_and_unload().state_dict()
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in merged), name


def test_export_merge_lora_needs_a_lora_adapter():
    from zo2.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export.merge_lora: needs a LoRA adapter \(peft=lora"):
        compose([*SMALL, "export.merge_lora=true"])


def test_an_offloaded_run_exports_the_same_folders_as_a_resident_one(files, tmp_path):
    """best/ and final/ of an offloaded run (weights streamed from the host store) hold
    the weights of the same run resident, bit for bit."""
    from safetensors.torch import load_file

    args = ("optim.lr=1e-2", "steps=3", "eval_every=1", "checkpoint.every=0")
    train(files, tmp_path / "resident", *args)
    train(files, tmp_path / "offloaded", *args, "offload.enabled=true")
    for name in ("best", "final"):
        folder = tmp_path / "offloaded" / name
        assert_clean(folder)
        ours = load_file(folder / "model.safetensors")
        theirs = load_file(tmp_path / "resident" / name / "model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
