"""Helpers shared by the benchmark scripts: the OPT-125m shape, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: run ``python -m bench.<name>`` here
RESULTS = ROOT / "bench" / "results"


SHAPES = {  # (hidden, layers, ffn, heads, word_embed_proj_dim) of the public OPT models
    "opt-125m": (768, 12, 3072, 12, 768),
    "opt-350m": (1024, 24, 4096, 16, 512),
}


def opt_shape(seed: int = 0, shape: str = "opt-125m"):
    """Random-weight OPT at a public OPT shape (default OPT-125m: 12 x 768, tied head)."""
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, ffn, heads, proj = SHAPES[shape]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                       num_attention_heads=heads, vocab_size=50272,
                       max_position_embeddings=2048, word_embed_proj_dim=proj,
                       do_layer_norm_before=shape != "opt-350m")
    config.use_cache = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
    return model.eval().requires_grad_(False)


def classification_batch(batch: int, seq: int, vocab: int, labels=(5, 9), seed: int = 0) -> dict:
    """Random prompts whose last token is a label word (MeZO's train-as-classification)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    ids[:, -1] = torch.tensor(labels)[torch.randint(0, len(labels), (batch,), generator=g)]
    target = torch.full_like(ids, -100)
    target[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": target}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(name: str, figures: dict, folder: Path = RESULTS) -> None:
    """Write <folder>/<name>.json (default bench/results) and print the figures as
    key=value (last line)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"bench": name, "figures": figures, "machine": {
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.is_available()}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in figures.items()))
