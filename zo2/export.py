"""Clean exports: the folders a user publishes, without zo2's engine state.

A run's ``best/`` and ``final/`` are written by :func:`export_folder`: a
``save_pretrained`` folder (safetensors weights, config, generation config, the
tokenizer with its chat template; with a peft adapter, peft's adapter folder), a model
card (``README.md``: base model, data, method, steps, the best step and its figures,
the run's seed log) and zo2's manifest (:data:`zo2.checkpoints.MANIFEST`). The engine
state (:data:`~zo2.folders.STATE_FILE`), the seed log and the update rule's moments
(:data:`~zo2.folders.RULE_STATE_FILE`) stay in ``checkpoints/``.

``python -m zo2.export CKPT OUT [--merge-lora] [--dequantize DTYPE]`` exports any run
checkpoint (``<run>/checkpoints/step-N``) or ``best/``/``final/`` to a clean folder: the
weights of an engine folder already are a ``save_pretrained`` folder, so its files are
copied without the engine state. ``--merge-lora`` (a LoRA run) loads the base model and
the adapter with peft and writes the merged weights (``merge_and_unload``).
``--dequantize bfloat16`` (a quantized run, :mod:`zo2.quantized`) writes the model with
every quantized layer dequantized (``scale * code``, transformers' ``dequantize``) into
plain weights of that dtype; without it a quantized run exports quantized.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zo2.adapters import is_peft_folder
from zo2.checkpoints import MANIFEST, RUN_STATE, file_sha256, fsync_path, verify, write_manifest
from zo2.config import to_dict
from zo2.errors import CheckpointError, ZO2Error
from zo2.folders import (
    DIRECTIONS_FILE,
    RULE_STATE_FILE,
    SEEDLOG_FILE,
    STATE_FILE,
    STATE_TENSOR_FILES,
    save_weights,
)
from zo2.models import load_model

CARD = "README.md"
ENGINE_FILES = (STATE_FILE, RULE_STATE_FILE, DIRECTIONS_FILE, SEEDLOG_FILE, RUN_STATE, MANIFEST)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dequantize
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "chat_template.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# ---- the model card -----------------------------------------------------------------------
def describe(config: Mapping, *, step: int, best_step: int | None = None,
             metric: str | None = None, figures: Mapping[str, Any] | None = None,
             merged: bool = False, data_name: str | None = None) -> dict:
    """What a model card says about the weights of ``step`` of the run ``config``
    (:func:`zo2.config.to_dict` of its TrainConfig); ``figures``: the summary's
    numbers (``zero_shot_dev``, ``best_dev``, ``tuned_test``, ...), None ones left out;
    ``data_name``: what the data was when no config key names it (rows given in Python)."""
    model, optim, data, task = (config.get(k, {}) for k in ("model", "optim", "data", "task"))
    adapter = (model.get("adapter") or {}).get("kind", "none")
    return {
        "base_model": model.get("name"),
        "data": data_name or data.get("train") or f"task {task.get('name')}",
        "method": optim.get("method"), "estimator": optim.get("estimator"),
        "lr": optim.get("lr"), "eps": optim.get("eps"), "q": optim.get("q"),
        "seed": config.get("seed"), "steps": config.get("steps"), "step": step,
        "best_step": best_step, "eval_metric": metric,
        "adapter": "none" if merged else adapter, "merged_from": adapter if merged else None,
        "figures": {k: v for k, v in (figures or {}).items() if v is not None},
        "seedlog": SEEDLOG_FILE,
    }


SUMMARY_FIGURES = ("zero_shot_dev", "zero_shot_test", "best_dev", "tuned_test")


def run_card(cfg, *, step: int, best: Mapping, metric: str,
             summary: Mapping | None = None, data_name: str | None = None) -> dict:
    """The card of a run's export (a :class:`~zo2.config.TrainConfig`): during the run
    the best dev scores so far; with the ``summary``, its figures. With
    ``export.merge_lora`` the export is the merged model."""
    if summary is None:
        dev = best.get("dev") or {}
        figures = {f"dev_{k}": v for k, v in dev.items() if isinstance(v, (int, float))}
    else:
        figures = {k: summary.get(k) for k in SUMMARY_FIGURES}
        if summary.get("tuned_test") is not None:
            figures["tuned_test_of"] = summary.get("tested")
    return describe(to_dict(cfg), step=step, best_step=best.get("step"), metric=metric,
                    figures=figures, merged=cfg.export.merge_lora, data_name=data_name)


def render(card: Mapping) -> str:
    """The card as Markdown with a Hugging Face metadata header."""
    peft = card.get("adapter", "none") != "none"
    lines = ["---", f"base_model: {card['base_model']}",
             f"library_name: {'peft' if peft else 'transformers'}",
             "tags:", "- zo2", "- zeroth-order", "- mezo", "---", "",
             f"# {card['base_model']} fine-tuned with zo2 ({card['method']})", "",
             f"Zeroth-order fine-tuning (zo2) of `{card['base_model']}` on "
             f"{_code(card['data'])}.", "",
             "| | |", "|---|---|"]
    rows = [("base model", card["base_model"]), ("data", card["data"]),
            ("method", card["method"]), ("estimator", card["estimator"]),
            ("lr", card["lr"]), ("eps", card["eps"]), ("q", card["q"]),
            ("seed", card.get("seed")), ("steps", card["steps"]),
            ("weights of step", card["step"]), ("best step", card.get("best_step")),
            ("adapter", card.get("adapter")),
            ("merged from adapter", card.get("merged_from"))]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    figures = card.get("figures") or {}
    if figures:
        metric = card.get("eval_metric") or "score"
        lines += ["", f"## Results ({metric})", "", "| | |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_number(v)} |" for k, v in figures.items()]
    lines += ["", "## Reproducing", "",
              f"Every update of the run is in its seed log, `{card['seedlog']}` in the run "
              "folder (a few bytes a step): `python -m zo2.seedlog replay` rebuilds the "
              "final weights from the base model.", ""]
    return "\n".join(lines)


def _code(text: Any) -> str:
    text = str(text)
    return text if text.startswith("task ") else f"`{text}`"


def _number(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_card(folder: str | Path, card: Mapping) -> None:
    """Write ``folder/README.md`` atomically (a complete card or the previous one)."""
    folder = Path(folder)
    tmp = folder / f".{CARD}.tmp"
    tmp.write_text(render(card))
    os.replace(tmp, folder / CARD)


def refresh_card(folder: str | Path, card: Mapping) -> None:
    """Replace the card of a published folder and its manifest entry (main rank)."""
    folder = Path(folder)
    write_card(folder, card)
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    readme = folder / CARD
    manifest["files"][CARD] = {"bytes": readme.stat().st_size, "sha256": file_sha256(readme)}
    fsync_path(readme)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(folder)


# ---- writing from an engine -----------------------------------------------------------------
def export_folder(engine, path: str | Path, tokenizer=None, card: Mapping | None = None,
                  merge_lora: bool = False, base: str | None = None,
                  dtype: str = "float32") -> Path:
    """Write the engine's current weights to ``path`` as a clean ``save_pretrained``
    folder (a peft adapter folder for a peft model), the tokenizer and ``card``.

    A collective with several ranks (offload slicing gathers the slices to rank 0):
    every rank calls it, the main rank writes. ``merge_lora``: the LoRA adapter merged
    into ``base`` (a name for :func:`zo2.models.load_model`; default: the adapter's
    base model), written as full weights.
    """
    path = Path(path)
    state_dict = engine.export_state_dict(writer_only=True)
    if engine.mesh.is_main:
        target = path.with_name(f".{path.name}.adapter") if merge_lora else path
        if merge_lora and target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        save_weights(engine.model, target, state_dict)
        _name_base(target, base or (card or {}).get("base_model"))
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        if merge_lora:
            path.mkdir(parents=True, exist_ok=True)
            merge_adapter(target, path, base=base, dtype=dtype)
            shutil.rmtree(target)
        if card is not None:
            write_card(path, card)
    engine.mesh.wait_for_writer()
    return path


def _name_base(folder: Path, base: str | None) -> None:
    """Name the base model in a peft folder's config when peft left it empty (a model
    built in memory, e.g. ``tiny-*``): ``--merge-lora`` loads it from there."""
    path = folder / "adapter_config.json"
    if base is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    if not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = str(base)
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None,
                  dtype: str = "float32") -> Path:
    """Load ``base`` and the LoRA adapter folder ``adapter`` with peft, merge
    (``merge_and_unload``) and write the merged model to ``out`` with the adapter
    folder's other files (the tokenizer)."""
    from peft import PeftConfig, PeftModel

    adapter, out = Path(adapter), Path(out)
    config = PeftConfig.from_pretrained(adapter)
    if config.peft_type != "LORA":
        raise CheckpointError(f"{adapter} holds a {config.peft_type} adapter: only LoRA "
                              "merges into the weights")
    base = base or config.base_model_name_or_path
    if not base:
        raise CheckpointError(f"{adapter} does not name its base model: pass --base")
    model, _ = load_model(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    _copy_files(adapter, out, skip=(*ENGINE_FILES, *ADAPTER_FILES, CARD))
    merged.save_pretrained(out)
    return out


# ---- exporting a checkpoint folder ----------------------------------------------------------
def _copy_files(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    for item in sorted(src.iterdir()):
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def _source_card(ckpt: Path, merged: bool) -> dict | None:
    """A card from a run checkpoint's ``run_state.json`` (None without one)."""
    try:
        states = json.loads((ckpt / RUN_STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    trainer = states.get("trainer", states)
    config, best = trainer.get("config") or {}, trainer.get("best") or {}
    if not config:
        return None
    figures = {}
    if isinstance(best.get("dev"), Mapping):
        figures = {f"best_dev_{k}": v for k, v in best["dev"].items()
                   if isinstance(v, (int, float))}
    return describe(config, step=trainer.get("step"), best_step=best.get("step"),
                    figures=figures, merged=merged)


def dequantize_folder(ckpt: Path, out: Path, dtype: str) -> None:
    """Write the quantized model of ``ckpt`` dequantized into plain ``dtype`` weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from zo2.quantized import portable

    config = json.loads((ckpt / "config.json").read_text())
    if "quantization_config" not in config:
        raise CheckpointError(f"--dequantize: {ckpt} is not a quantized model (its "
                              "config.json has no quantization_config)")
    model = portable(AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu"))
    model = model.dequantize().to(getattr(torch, dtype))
    model.save_pretrained(out)
    weights = {f.name for f in ckpt.iterdir() if f.name.endswith((".safetensors", ".json"))
               and f.name not in TOKENIZER_JSON}
    _copy_files(ckpt, out, skip=ENGINE_FILES + tuple(weights))  # the tokenizer, the card


def export_checkpoint(ckpt: str | Path, out: str | Path, merge_lora: bool = False,
                      base: str | None = None, dequantize: str | None = None) -> Path:
    """Export a zo2 checkpoint (``checkpoints/step-N``, ``best/``, ``final/`` or an engine
    folder) to ``out``, a clean folder; CheckpointError for bad input."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a folder")
    if not (ckpt / MANIFEST).is_file() and not (ckpt / STATE_FILE).is_file():
        raise CheckpointError(f"{ckpt} is not a zo2 checkpoint (no {MANIFEST} or {STATE_FILE})")
    manifest = verify(ckpt) if (ckpt / MANIFEST).is_file() else {}
    weights = [f for f in ckpt.glob("*.safetensors") if f.name not in STATE_TENSOR_FILES]
    if not weights:
        raise CheckpointError(f"{ckpt} holds no .safetensors weights")
    peft = is_peft_folder(ckpt)
    if merge_lora and not peft:
        raise CheckpointError(f"--merge-lora: {ckpt} is not a peft adapter folder (the run "
                              "trained the model's own weights)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty")
    config = {}
    try:
        config = json.loads((ckpt / RUN_STATE).read_text()).get("trainer", {}).get("config", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if merge_lora:
            model = config.get("model", {})
            merge_adapter(ckpt, tmp, base=base or model.get("name"),
                          dtype=model.get("dtype", "float32"))
            if (ckpt / CARD).is_file() and not (ckpt / RUN_STATE).is_file():
                card = (ckpt / CARD).read_text().replace("library_name: peft",
                                                         "library_name: transformers")
                (tmp / CARD).write_text(card)
        elif dequantize is not None:
            dequantize_folder(ckpt, tmp, dequantize)
        else:
            _copy_files(ckpt, tmp, skip=ENGINE_FILES)
        card = _source_card(ckpt, merged=merge_lora)
        if card is not None:
            write_card(tmp, card)
        write_manifest(tmp, **({"step": manifest["step"]} if "step" in manifest else {}))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zo2.export",
        description="Export a zo2 run checkpoint (checkpoints/step-N, best/, final/) to a "
                    "clean save_pretrained folder without the engine state.")
    parser.add_argument("checkpoint", help="the checkpoint folder")
    parser.add_argument("out", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge a LoRA adapter into the base model's weights")
    parser.add_argument("--base", default=None,
                        help="--merge-lora: the base model (default: the run's model.name, "
                             "else the adapter's base model)")
    parser.add_argument("--dequantize", choices=DTYPE_NAMES, default=None,
                        help="a quantized run: write plain weights of this dtype")
    args = parser.parse_args(argv)
    if args.merge_lora and args.dequantize:
        parser.error("--merge-lora and --dequantize: one at a time")
    try:
        out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora,
                                base=args.base, dequantize=args.dequantize)
    except (ZO2Error, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
