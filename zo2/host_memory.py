"""Host memory after a quantized load: what the load freed goes back to the OS, and no
float tensor keeps the checkpoint's file mapped.

Two measured effects of loading a model quantized on the fly
(``bench/results/quantized-1.7b.json``: a 1.7B-parameter shape in nf4, 1.0 GiB of
tensors, held 4.9 GiB anonymous memory and 3.3 GiB of its checkpoint's pages after the
load):

* glibc's ``malloc`` serves a request from its heap unless it is at least the mmap
  threshold (128 KiB at start), and each time a mapped block is freed the threshold rises
  to that block's size (up to 32 MiB). The quantizer frees one float transient per
  weight, so from the first few on they came from the heap, which kept them once freed.
  :func:`transients_returned` pins the threshold at 128 KiB for the load (each transient
  is unmapped when freed), then sets it to glibc's 32 MiB ceiling, where the dynamic
  threshold ends up, and trims the heap. Nothing where the C library is not glibc.
* safetensors maps the checkpoint file, and a tensor read in the dtype it is stored in is
  a view of the mapping; the few tensors a quantized model keeps in float (embeddings,
  norms) kept the whole file mapped, every page read during the quantization resident.
  :func:`own_float_tensors` copies them into memory of their own (their bytes once), so
  the mapping closes. Unquantized models are left alone: their tensors are the whole
  file, and a view costs no more than a copy.
* While transformers quantizes, it reads the checkpoint through that mapping, and every
  page it has read stays resident until the load ends: the whole float checkpoint (3.3
  GB at the 1.7B shape) on top of the quantized model. :func:`unmapped_checkpoint`
  opens the files with safetensors' ``pread`` backend instead, which reads each tensor
  into memory of its own, freed once it is quantized; the model is loaded from those
  lazy slices (the same objects transformers makes of a mapped file).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
GLIBC_START = 128 * 1024  # the threshold glibc starts with
GLIBC_CEILING = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def transients_returned() -> Iterator[None]:
    """Within: blocks of 128 KiB and more are unmapped when freed; after: the threshold
    at 32 MiB and the heap trimmed (glibc only)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_START)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_CEILING)
        libc.malloc_trim(0)


def own_float_tensors(model: nn.Module) -> nn.Module:
    """Give every floating parameter and buffer of ``model`` memory of its own (tensors
    that shared a storage still share one); returns ``model``."""
    copies: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not t.is_floating_point():
                    continue
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
                if key not in copies:
                    copies[key] = t.detach().clone()
                if isinstance(t, nn.Parameter):
                    t.data = copies[key]
                else:
                    table[name] = copies[key]
    return model


@contextlib.contextmanager
def unmapped_checkpoint(folder: Path) -> Iterator[dict | None]:
    """Within: the tensors of ``folder``'s safetensors checkpoint (its index's files, or
    ``model.safetensors``) as lazy slices read with ``pread``, nothing mapped; None for a
    folder without one (``.bin`` weights: transformers' own reading then)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        yield None
        return
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(folder / name), framework="pt",
                                               device="cpu", backend="pread"))
                 for name in names]
        yield {key: f.get_slice(key) for f in files for key in f.keys()}
