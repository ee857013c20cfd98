"""Build an offloaded model straight from a checkpoint, without holding it in memory.

A model larger than host memory cannot be loaded whole before offloading it. Instead
the model is created with its parameters on the ``meta`` device (no storage; see
:func:`zo2.models.load_model` with ``empty=True``) and the offloader fills each
block from :class:`SafetensorsWeights`, one tensor at a time, read through a memory
map; with the disk tier each block is then written to its own file. Peak host
memory is the resident units plus one block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from zo2.errors import CheckpointError


class SafetensorsWeights:
    """The tensors of a ``save_pretrained`` folder by name, read lazily.

    Args:
        folder: a folder holding ``*.safetensors`` files (sharded or not).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors weights in {self.folder}")
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {err}") from None
            self._handles[file] = handle
            for name in handle.keys():
                self._file_of[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __call__(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r} in the checkpoint")
        return self._handles[file].get_tensor(name)


def empty_model(config) -> nn.Module:
    """A causal LM of ``config`` with parameters on ``meta`` and tied weights tied.

    Buffers (rotary tables) are real: they are computed, not stored in checkpoints.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model


def assign(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the storage ``value``, also when ``param`` is still on ``meta``."""
    if param.is_meta:
        torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=False))
    else:
        param.data = value


def load_into(model: nn.Module, weights: SafetensorsWeights, device: torch.device) -> None:
    """Fill a model built on ``meta``: load every parameter still on ``meta`` from
    ``weights`` onto ``device``."""
    for name, param in model.named_parameters():
        if param.is_meta:
            assign(param, weights(name).to(device=device, dtype=param.dtype))
