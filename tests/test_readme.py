"""The README's Hugging Face Trainer and TRL scripts run as written (on a tiny model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Hugging Face Trainer and TRL"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def section_blocks() -> list[str]:
    text = README.read_text()
    body = text[text.index(SECTION):]
    body = body[: body.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny model folder and the scripts' two data files, in the working directory."""
    from zo2.models import load_model

    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = [{"text": f"review {i}: the film was {'good' if i % 2 else 'bad'}."}
            for i in range(20)]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"prompt": [{"role": "user", "content": f"Was film {i} good?"}],
             "completion": [{"role": "assistant", "content": "yes" if i % 2 else "no"}]}
            for i in range(20)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_a_trainer_and_an_sft_script():
    blocks = section_blocks()
    assert len(blocks) == 2 and "ZOTrainer(" in blocks[0] and "ZOSFTTrainer(" in blocks[1]
    assert all(len(b.strip().splitlines()) <= 22 for b in blocks)


@pytest.mark.parametrize("index", [0, 1])
def test_a_readme_script_runs_as_written(workdir, index):
    code = section_blocks()[index]
    code = re.sub(r'model_id = "[^"]+"', f'model_id = "{workdir / "tiny"}"', code)
    code, n = re.subn(r"max_steps=\d+", "max_steps=2", code)  # the one change: fewer steps
    assert n == 1
    exec(compile(code, f"README block {index}", "exec"), {"__name__": "readme"})
    final = workdir / "out" / ("zo" if index == 0 else "zo-sft") / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
