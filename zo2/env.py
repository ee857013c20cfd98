"""What this process runs on: package versions and the CPU's SIMD level.

``python -m zo2.env`` (or ``zo2-train --version``) prints one line per item, so a
result can be matched with the environment it came from. Numerical results on the
CPU can legitimately depend on the SIMD width torch dispatches to (AVX2 vs AVX-512
reduction orders); the test suite's tolerances say where.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("zo2", "torch", "transformers", "numba", "numpy", "triton", "peft",
            "safetensors", "accelerate", "hydra-core")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, str]:
    """Versions of zo2 and its numerical stack, the Python, and torch's CPU capability."""
    out = {name: _version(name) for name in PACKAGES}
    out["python"] = platform.python_version()
    out["machine"] = platform.machine()
    try:
        import torch

        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["cuda"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else "not available")
    except ImportError:
        pass
    return out


def main() -> None:
    for key, value in report().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
    sys.exit(0)
