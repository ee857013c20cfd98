"""Run pytest test modules on a machine without pytest (a bare GPU machine).

    python -m bench.gpu_tests tests/test_gpu.py [--json out.json] [--shim]

With pytest installed this runs ``pytest -q`` on the modules. Without it (or with
``--shim``, which is how the CPU check keeps this path alive), a stand-in ``pytest``
module is put in this process's ``sys.modules`` before the modules are imported. It
knows what the GPU tests use: ``mark.<name>`` (``skipif`` and ``parametrize`` act, the
rest are labels), ``pytestmark``, ``raises``, ``skip``, ``importorskip``, ``approx``
(relative 1e-6, as pytest's default) and the ``tmp_path`` fixture. Each test function
runs once per combination of its ``parametrize`` marks, as pytest would collect it.
Exit status 1 when a test failed (or none was found), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path


class Skipped(Exception):
    """A test skipped itself (``pytest.skip``)."""


class Mark:
    """``pytest.mark.<name>(...)``: applied to a function it is recorded on it."""

    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            args[0].__dict__.setdefault("pytestmark", []).append(self)
            return args[0]
        return Mark(self.name, args, kwargs)


class _Marks:
    def __getattr__(self, name: str) -> Mark:
        return Mark(name)


def _raises(kind, match: str | None = None):
    @contextlib.contextmanager
    def check():
        try:
            yield
        except kind as err:
            if match is not None and match not in str(err):
                raise AssertionError(f"{kind.__name__} raised, but without {match!r}") from err
            return
        raise AssertionError(f"did not raise {kind.__name__}")
    return check()


def _skip(reason: str = "") -> None:
    raise Skipped(reason)


def _importorskip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Skipped(f"needs {name}") from None


class _Approx:
    def __init__(self, expected, rel: float = 1e-6, abs: float = 1e-12) -> None:  # noqa: A002
        self.expected, self.rel, self.abs = expected, rel, abs

    def __eq__(self, other) -> bool:
        pairs = (zip(other, self.expected) if isinstance(self.expected, (list, tuple))
                 else [(other, self.expected)])
        return all(math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs) for a, b in pairs)


def shim() -> types.ModuleType:
    """The stand-in ``pytest`` module."""
    module = types.ModuleType("pytest")
    module.mark = _Marks()
    module.raises = _raises
    module.skip = _skip
    module.importorskip = _importorskip
    module.approx = _Approx
    module.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))
    module.__zo2_shim__ = True
    return module


def cases(module) -> list[tuple[str, object, dict, str | None]]:
    """(test id, function, arguments, skip reason) of every collected test of ``module``."""
    found = []
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    for name, fn in vars(module).items():
        if not (name.startswith("test") and callable(fn)):
            continue
        marks = module_marks + list(getattr(fn, "pytestmark", []))
        reason = next((m.kwargs.get("reason", "skipif") for m in marks
                       if m.name == "skipif" and m.args and m.args[0]), None)
        reason = reason or next((m.kwargs.get("reason", m.args[0] if m.args else "skip")
                                 for m in marks if m.name == "skip"), None)
        axes = []  # as pytest: the innermost mark (applied first) first in the id
        for m in [m for m in marks if m.name == "parametrize"]:
            names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) \
                else list(m.args[0])
            values = [v if len(names) > 1 else (v,) for v in m.args[1]]
            axes.append([(dict(zip(names, v)),
                          "-".join(_label(x, n, i) for x, n in zip(v, names)))
                         for i, v in enumerate(values)])
        for combo in itertools.product(*axes) if axes else [()]:
            args = {k: v for part, _ in combo for k, v in part.items()}
            label = "-".join(lab for _, lab in combo)
            found.append((f"{name}[{label}]" if label else name, fn, args, reason))
    return found


def _label(value, name: str, index: int) -> str:
    """pytest's id of a parameter value: itself if plain, else the name and index."""
    plain = value is None or isinstance(value, (str, int, float, bool))
    return str(value) if plain else f"{name}{index}"


def run_case(fn, args: dict) -> tuple[str, str]:
    """('passed' | 'failed' | 'skipped', detail)."""
    import inspect

    tmp = None
    try:
        for param in inspect.signature(fn).parameters:
            if param == "tmp_path":
                tmp = Path(tempfile.mkdtemp(prefix="zo2-gpu-test-"))
                args = {**args, "tmp_path": tmp}
            elif param not in args:
                return "skipped", f"fixture {param!r} is not available without pytest"
        fn(**args)
        return "passed", ""
    except Skipped as err:
        return "skipped", str(err)
    except Exception:  # a failing test: report it and go on
        return "failed", traceback.format_exc(limit=8)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run_without_pytest(paths: list[Path]) -> dict:
    if "pytest" not in sys.modules or not getattr(sys.modules["pytest"], "__zo2_shim__", 0):
        sys.modules["pytest"] = shim()
    results = []
    for path in paths:
        sys.path.insert(0, str(path.resolve().parent))  # the tests import conftest
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for test_id, fn, args, reason in cases(module):
            start = time.perf_counter()
            outcome, detail = ("skipped", reason) if reason else run_case(fn, args)
            results.append({"test": f"{path.name}::{test_id}", "outcome": outcome,
                            "detail": detail, "s": round(time.perf_counter() - start, 3)})
            print(f"{outcome.upper():8s} {path.name}::{test_id}"
                  + (f"  ({detail.strip().splitlines()[-1]})" if detail else ""), flush=True)
    return {"runner": "shim", "results": results}


def run_with_pytest(paths: list[Path]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           *map(str, paths)]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], flush=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for part in tail.split(","):
        words = part.split()
        for i, word in enumerate(words[1:], 1):
            if word.rstrip("s") in counts and words[i - 1].isdigit():
                counts[word.rstrip("s")] += int(words[i - 1])
    return {"runner": "pytest", "summary": tail, "counts": counts, "returncode": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("--shim", action="store_true", help="the stand-in even with pytest")
    args = parser.parse_args()
    has_pytest = importlib.util.find_spec("pytest") is not None
    report = run_with_pytest(args.paths) if has_pytest and not args.shim \
        else run_without_pytest(args.paths)
    if "results" in report:
        outcomes = [r["outcome"] for r in report["results"]]
        report["counts"] = {k: outcomes.count(k) for k in ("passed", "failed", "skipped")}
    counts = report["counts"]
    failed = counts.get("failed", 0) + counts.get("error", 0) > 0 or not sum(counts.values())
    print("gpu-tests " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
