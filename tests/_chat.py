"""Chat rows on disk for the tests of your own data (test_sft, test_export)."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("positive", "negative")

# ChatML without a default system prompt, the assistant content and its end-of-turn token
# marked for return_assistant_tokens_mask (the "\n" after it is not).
CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat(i: int, system: bool = True) -> dict:
    """Row ``i``: (a system line,) a user review and the assistant's one-word answer."""
    turns = [{"role": "system", "content": "Answer with one word."}] if system else []
    turns += [
        {"role": "user", "content": f"Review {i}: the film was {'good' if i % 2 else 'bad'}."},
        {"role": "assistant", "content": WORDS[i % 2]}]
    return {"messages": turns}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_files(root: Path, n_train: int, system: bool = True) -> dict[str, Path]:
    """``train`` (rows 0..n_train-1), ``validation`` (100..107) and ``test`` (200..207)
    JSON lines files under ``root/data``."""
    data = root / "data"
    data.mkdir()
    first = {"train": (0, n_train), "validation": (100, 8), "test": (200, 8)}
    names = {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}
    return {role: write_jsonl(data / names[role], [chat(start + i, system) for i in range(n)])
            for role, (start, n) in first.items()}
