"""The layout of an engine folder: what :meth:`zo2.engine.ZOEngine.save` writes and
:meth:`~zo2.engine.ZOEngine.load` reads back.

An engine folder is a ``save_pretrained`` folder (the weights as safetensors, the
model's config, the tokenizer when given) plus:

* :data:`STATE_FILE`: the engine state (step, seed, skipped steps, the optimiser
  settings, the estimator's state), without the seed log;
* :data:`SEEDLOG_FILE`: the seed log so far, stored once (:mod:`zo2.seedlog`);
* :data:`RULE_STATE_FILE`: the update rule's moments, for stateful rules only.
* :data:`DIRECTIONS_FILE`: HiZOO's curvature estimate (:mod:`zo2.hessian`), with it only.

zo2 0.1 folders kept the seed log in :data:`STATE_FILE`; :func:`load_folder` still
reads them. A peft adapter folder (:func:`zo2.adapters.is_peft_folder`) is read by
:func:`load_weights` as the adapter's weights only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zo2.adapters import from_peft_format, is_peft_folder
from zo2.errors import CheckpointError
from zo2.seedlog import SeedLog
from zo2.units import tensors_by_name

if TYPE_CHECKING:
    from zo2.engine import ZOEngine

STATE_FILE = "zo2_state.json"
RULE_STATE_FILE = "zo2_rule_state.safetensors"
DIRECTIONS_FILE = "zo2_directions_state.safetensors"  # HiZOO's curvature (zo2.hessian)
STATE_TENSOR_FILES = (RULE_STATE_FILE, DIRECTIONS_FILE)  # engine state, not weights
SEEDLOG_FILE = "run.seedlog"  # the seed log, stored once (not in STATE_FILE)


def save_folder(engine: ZOEngine, path: str | Path, tokenizer=None) -> Path:
    """Write a ``save_pretrained`` folder (safetensors) plus the engine state."""
    path = Path(path)
    # with offload slicing every rank takes part, block by block, in gathering the
    # slices to the writer (rank 0); only the writer ends up holding whole blocks
    state_dict = engine.export_state_dict(writer_only=True)
    rule_state = engine.store.rule_state(engine.rule, writer_only=True) \
        if engine.rule.stateful else {}
    if engine.mesh.is_main:
        save_weights(engine.model, path, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        state = engine.state_dict()
        SeedLog.from_engine(engine, engine.trainable).save(path / SEEDLOG_FILE)
        state.pop("log")  # stored once, in SEEDLOG_FILE
        (path / STATE_FILE).write_text(json.dumps(state, indent=2))
        if engine.rule.stateful:  # the rule's moments (zo-momentum / zo-adam buffers)
            save_file({k: v.contiguous().cpu() for k, v in rule_state.items()},
                      path / RULE_STATE_FILE)
        if engine.optim.hessian != "none":  # every rank keeps all of it: the writer's
            save_file({k: v.contiguous().cpu() for k, v in engine.directions.tensors().items()},
                      path / DIRECTIONS_FILE)
    engine.mesh.wait_for_writer()  # the folder is complete before any rank reads it
    return path


def save_weights(model, path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """``model.save_pretrained(path, state_dict=...)`` with the values of ``state_dict``
    (the engine's export: offloaded values come from host memory), also for a quantized
    model, which transformers saves from its own tensors (:func:`_holding`)."""
    with _holding(model, state_dict):
        model.save_pretrained(path, state_dict=state_dict)


@contextlib.contextmanager
def _holding(model, state_dict: dict[str, torch.Tensor]):
    """While a quantized model is saved, its tensors hold the exported values:
    transformers saves a quantized model from its own tensors (its quantizer's state
    dict), not from the state dict it is given, and offloaded ones hold placeholders."""
    if getattr(model, "hf_quantizer", None) is None:
        yield
        return
    saved = []
    for name, tensor in tensors_by_name(model).items():
        value = state_dict.get(name)
        if value is not None and value.data_ptr() != tensor.data_ptr():
            saved.append((tensor, tensor.data))
            tensor.data = value
    try:
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def load_folder(engine: ZOEngine, path: str | Path) -> None:
    """Restore a folder written by :func:`save_folder`: weights and engine state."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a zo2 checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_file} is corrupt: {err}") from None
    load_weights(engine, path)
    if "log" not in state:  # zo2 0.1 folders kept the log in STATE_FILE
        if not (path / SEEDLOG_FILE).is_file():
            raise CheckpointError(f"{path} has no seed log ({SEEDLOG_FILE})")
        state["log"] = SeedLog.load(path / SEEDLOG_FILE).records()
    engine.load_state_dict(state)
    if engine.rule.stateful:
        rule_file = path / RULE_STATE_FILE
        if not rule_file.is_file():
            raise CheckpointError(f"{path} has no {RULE_STATE_FILE}: it was not made with "
                                  f"optim.method={engine.optim.method}")
        engine.store.load_rule_state(engine.rule, load_file(rule_file))
    if engine.optim.hessian != "none":
        if not (path / DIRECTIONS_FILE).is_file():
            raise CheckpointError(f"{path} has no {DIRECTIONS_FILE}: it was not made with "
                                  f"optim.hessian={engine.optim.hessian}")
        engine.directions.load_tensors(load_file(path / DIRECTIONS_FILE), engine.device)


@torch.no_grad()
def load_weights(engine: ZOEngine, path: str | Path) -> None:
    """Copy the safetensors weights of a ``save_pretrained`` folder into the model.

    Raises CheckpointError, before any weight is changed, when the folder holds
    tensors this model does not have, misses some, or has other shapes (a
    checkpoint of another model): the files' headers say, before a tensor is read.
    Tied weights saved once are fine.

    The tensors are then read one at a time, each from a mapping of its file opened for
    it alone: the load adds at most one tensor to the process's memory. Reading the
    whole folder first (``load_file``) held a second copy of the model, and a file kept
    open keeps every page read from it resident until it closes.
    """
    path = Path(path)
    files = [f for f in sorted(path.glob("*.safetensors"))
             if f.name not in STATE_TENSOR_FILES]  # moments and curvatures are not weights
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path}")
    stored: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # name -> (file, key, shape)
    for file in files:
        try:  # safetensors checks the header against the file's length when it opens it
            with safe_open(file, "pt") as f:
                stored.update({k: (file, k, tuple(f.get_slice(k).get_shape()))
                               for k in f.keys()})
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {err}") from None
    adapter_only = is_peft_folder(path)
    if adapter_only:
        stored = from_peft_format(engine.model, stored)
    own = engine.model.state_dict(keep_vars=True)
    unexpected = sorted(stored.keys() - own.keys())
    loaded_ids = {id(own[k]) for k in stored.keys() & own.keys()}
    missing = sorted(k for k in own.keys() - stored.keys() if id(own[k]) not in loaded_ids)
    if adapter_only:  # the frozen base weights are the model's own
        trained = {id(p.param) for p in engine.params}
        missing = [k for k in missing if id(own[k]) in trained]
    wrong = [f"{k} {shape} != {tuple(own[k].shape)}" for k, (_, _, shape) in stored.items()
             if k in own and shape != tuple(own[k].shape)]
    if unexpected or missing or wrong:
        raise CheckpointError(
            f"{path} is a checkpoint of another model: unexpected {unexpected[:3]}, "
            f"missing {missing[:3]}, shape mismatch {wrong[:3]}")
    engine.pending.set(None)
    for name, (file, key, _) in stored.items():
        with safe_open(file, "pt") as f:
            engine.store.assign(own[name], f.get_tensor(key))
    engine.store.invalidate()
