"""Your own data, end to end, on the embedded SmolLM2-135M-Instruct (issue 15's proof).

Two runs of ``zo2-train`` on data written as user files, each in its own process (so that
peak RSS is its own), with the default estimator and rule:

* ``chat``: the tweets as conversations (user: the tweet and a one-line question;
  assistant: ``positive`` or ``negative``) through the model's own chat template,
  assistant-only loss (``data.format=messages``); scored by exact match of the greedily
  generated answer on ``--n-test`` held-out balanced tweets;
* ``pc``: the drug reviews as prompt / completion (``data.format=prompt_completion``), the
  completion the rating word (negative / neutral / positive), scored the same way.

Each run evaluates zero-shot first, picks ``best/`` by dev exact match, and reports the
test exact match of ``best/``. The data is drawn once with a fixed seed (balanced per
label, disjoint train / dev / test), written as JSON lines under the run folder.

    python -m bench.sft [--parts chat,pc] [--steps 150] [-- optim.lr=2e-5 ...]

Writes bench/results/sft.json and sft.png (dev loss and dev exact match against step).
Last line: ``chat_zero_shot=... chat_tuned=... chat_minutes=... pc_zero_shot=... ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, report

QUESTION = "Is the sentiment of this tweet positive or negative? Answer with one word."
PC_PROMPT = "Review: {review}\nIs this review negative, neutral or positive?\nAnswer:"
TWEET_WORDS = ("negative", "positive")
DRUG_WORDS = ("negative", "neutral", "positive")


def chat_rows(sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    """Balanced tweets as user / assistant conversations, per split."""
    from zo2.data.tasks import kshot_split
    from zo2.data.tweets import load_tweets

    splits = kshot_split(load_tweets(), *sizes, seed=seed, balanced=True)
    return {name: [{"messages": [{"role": "user", "content": f"{ex.text}\n{QUESTION}"},
                                 {"role": "assistant", "content": TWEET_WORDS[ex.label]}]}
                   for ex in examples]
            for name, examples in zip(("train", "validation", "test"), splits)}


def pc_rows(sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict]]:
    """Balanced drug reviews as prompt / completion rows (the completion the rating word)."""
    from zo2.data.drugs import review_rows
    from zo2.data.sources import Example, dedupe
    from zo2.data.tasks import kshot_split

    examples = [Example(review, DRUG_WORDS.index(rating.strip().lower()))
                for _, review, rating in review_rows()
                if rating.strip().lower() in DRUG_WORDS]
    splits = kshot_split(dedupe(examples, "drug reviews"), *sizes, seed=seed, balanced=True)
    return {name: [{"prompt": PC_PROMPT.format(review=ex.text),
                    "completion": " " + DRUG_WORDS[ex.label]} for ex in examples]
            for name, examples in zip(("train", "validation", "test"), splits)}


PARTS = {  # part -> (rows, split sizes, data format, max length, generated tokens)
    "chat": (chat_rows, (1000, 200, 500), "messages", 160, 4),
    "pc": (pc_rows, (75, 30, 150), "prompt_completion", 192, 3),
}


def write_rows(rows: dict[str, list[dict]], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in rows.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


def run_part(part: str, args, out: Path) -> dict:
    make, sizes, fmt, max_length, new_tokens = PARTS[part]
    paths = write_rows(make(sizes, args.seed), out / "data")
    command = [sys.executable, "-m", "zo2.launch.train", f"output_dir={out / 'run'}",
               "progress=false", f"steps={args.steps}", f"eval_every={args.eval_every}",
               f"data.train={paths['train']}", f"data.validation={paths['validation']}",
               f"data.test={paths['test']}", f"data.format={fmt}",
               f"data.max_length={max_length}", f"data.max_new_tokens={new_tokens}",
               "eval_metric=exact_match", "eval_batch_size=50", *args.overrides]
    print("+", " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    summary = json.loads((out / "run" / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().split("\n")
             if line.strip()]
    curve = [(r["step"], r["dev"]["loss"], r["dev"]["exact_match"]) for r in evals
             if r.get("event") == "eval" and "dev" in r]
    return {f"{part}_zero_shot": summary["zero_shot_test"], f"{part}_tuned": summary["tuned_test"],
            f"{part}_best_step": summary["best_step"], f"{part}_minutes": summary["minutes"],
            f"{part}_peak_rss_mb": summary["peak_rss_mb"], f"{part}_curve": curve}


def plot(figures: dict, parts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_ax, em_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for part in parts:
        steps, losses, ems = zip(*figures[f"{part}_curve"])
        loss_ax.plot(steps, losses, marker="o", label=part)
        em_ax.plot(steps, ems, marker="o", label=part)
    loss_ax.set(xlabel="step", ylabel="dev loss (labelled tokens)", title="dev loss")
    em_ax.set(xlabel="step", ylabel="dev exact match", title="greedy answer exact match")
    for ax in (loss_ax, em_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="chat,pc", help="comma-separated: chat, pc")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42, help="the data sample")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="sft")
    parser.add_argument("overrides", nargs="*", help="zo2-train overrides, after --")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="zo2-bench-sft-") as tmp:
        for part in parts:
            figures.update(run_part(part, args, Path(tmp) / part))
    plot(figures, parts, args.out / f"{args.name}.png")
    figures["overrides"] = " ".join(args.overrides) or "defaults"
    curves = {k: figures.pop(k) for k in [k for k in figures if k.endswith("_curve")]}
    report(args.name, figures, args.out)  # the last line: the figures as key=value
    path = args.out / f"{args.name}.json"
    record = json.loads(path.read_text())
    record["curves"] = {k: [dict(zip(("step", "dev_loss", "dev_exact_match"), p)) for p in v]
                        for k, v in curves.items()}
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
