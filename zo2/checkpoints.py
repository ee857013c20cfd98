"""Atomic, verified run checkpoints: the last N, written so that a crash loses nothing.

A checkpoint is a folder ``<root>/step-00000050`` holding whatever the caller writes
into it (the engine's ``save_pretrained`` weights and state, the run's state) plus
``MANIFEST.json``: the size and SHA-256 of every file. Writing goes to a hidden
temporary folder in the same directory, every file and the folder are fsync'ed, the
manifest is written last, and one ``rename`` publishes it; only then are checkpoints
beyond the newest ``keep`` deleted. So a crash (SIGKILL, power loss) at any moment
leaves the previous checkpoints intact, and at worst a temporary folder that the next
save removes. On load the manifest is checked: a truncated or corrupt checkpoint is
reported by name and the previous one is used.

With several ranks every rank calls :meth:`CheckpointManager.save` (writing may be a
collective, e.g. gathering offloaded slices); only the main rank touches the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from zo2.config import TrainConfig, to_dict
from zo2.errors import CheckpointError, ConfigError
from zo2.parallel.mesh import Mesh

log = logging.getLogger("zo2")

MANIFEST = "MANIFEST.json"
FORMAT = "zo2-checkpoint"
PREFIX = "step-"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, **extra) -> None:
    """Record every file's size and SHA-256 in ``folder/MANIFEST.json`` (fsync'ed)."""
    files = {}
    for path in _files(folder):
        fsync_path(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size,
                                                "sha256": file_sha256(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "version": 1, **extra, "files": files},
                                   indent=1))
    fsync_path(manifest)
    fsync_path(folder)


def verify(folder: str | Path) -> dict:
    """Check ``folder`` against its manifest; return the manifest or raise CheckpointError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} not found (no such folder)")
    if not path.is_file():
        raise CheckpointError(f"{folder} is incomplete: no {MANIFEST} (not a zo2 checkpoint, "
                              "or its write was cut short)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a zo2 checkpoint manifest")
    for name, want in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, the manifest "
                                  f"says {want['bytes']} (truncated?)")
        if file_sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} fails its SHA-256 check "
                                  "(corrupt)")
    return manifest


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the complete folder ``tmp`` as ``final``, replacing an older ``final``.

    The old folder is renamed aside first and deleted after, so at every moment one
    complete version exists under ``final`` or its ``.old`` name.
    """
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


class CheckpointManager:
    """The checkpoints of one run under ``root``, newest ``keep`` kept.

    Args:
        root: the folder holding ``step-*`` checkpoints (created on first save).
        keep: how many complete checkpoints to keep (>= 1).
        mesh: the run's mesh (``is_main``, ``barrier``); one process when None.
    """

    def __init__(self, root: str | Path, keep: int = 2, mesh: Mesh | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.mesh = mesh or Mesh.local()

    def path(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    def all(self) -> list[Path]:
        """Published checkpoints, oldest first (verified or not)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                 and p.name[len(PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step`` atomically; ``write(folder)`` fills the folder.

        Called on every rank (``write`` may be a collective); the main rank publishes.
        """
        final = self.path(step)
        tmp = self.root / f".{final.name}.tmp"
        if self.mesh.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".*.tmp"):  # a save cut short earlier
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.mesh.barrier()
        write(tmp)
        if self.mesh.is_main:
            write_manifest(tmp, step=step)
            replace_dir(tmp, final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old)
        self.mesh.wait_for_writer()  # the manifest hashes every file: its own timeout
        return final

    def latest(self) -> Path | None:
        """The newest checkpoint that passes verification; broken ones are reported and
        passed over (the previous one is used)."""
        for folder in reversed(self.all()):
            try:
                verify(folder)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s; trying the previous one", err)
                continue
            return folder
        return None


# ---- one run's checkpoints: resume point, run state, best/ ------------------------------
RUN_STATE = "run_state.json"

# Run settings that may change on resume: they do not change the trajectory.
RESUMABLE_CHANGES = ("offload", "parallel", "logging", "checkpoint", "eval_batch_size",
                     "log_every", "output_dir", "threads", "progress")


class Stateful(Protocol):
    """What a checkpoint saves besides the engine: a JSON-able state and its inverse."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RunCheckpoints:
    """Every checkpoint of one run under ``out``: ``checkpoints/step-*`` and ``best/``.

    A save takes the states to write, as torchtitan's checkpointer does: the engine
    (weights, engine state, the update rule's moments; :meth:`ZOEngine.save`) and any
    :class:`Stateful` objects by name (the trainer's progress, the data position), whose
    states go to ``run_state.json``. Every folder, ``best/`` included, is published
    atomically with a manifest. Called on every rank; the main rank writes.
    """

    def __init__(self, out: Path, keep: int, mesh: Mesh) -> None:
        self.out = out
        self.steps = CheckpointManager(out / "checkpoints", keep=keep, mesh=mesh)
        self.mesh = mesh

    # -- resuming ---------------------------------------------------------------------------
    def resume_point(self, resume: str) -> str | None:
        """The checkpoint folder to resume from, or None for a fresh start (main rank).

        ``resume``: ``auto`` (the newest valid checkpoint, if any), ``never`` (refuse a
        directory that holds a run) or an explicit folder (verified whole).
        """
        if resume not in ("auto", "never"):
            verify(resume)
            return str(resume)
        published = self.steps.all()
        if resume == "never":
            if published or (self.out / "metrics.jsonl").exists():
                raise ConfigError(f"checkpoint.resume=never, but {self.out} already holds a "
                                  "run (use checkpoint.resume=auto to continue it, or another "
                                  "output_dir)")
            return None
        latest = self.steps.latest()
        if latest is None and published:
            raise CheckpointError(f"every checkpoint in {self.steps.root} fails verification "
                                  "(see the warnings above); move them away to start afresh")
        return str(latest) if latest is not None else None

    @staticmethod
    def read_run_state(folder: str | Path, config: dict) -> dict[str, dict]:
        """The named states saved with ``folder``; ConfigError if ``config`` changed what
        the run computes (the model, task, optimizer, seed or number of steps)."""
        path = Path(folder) / RUN_STATE
        try:
            states = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read the run state {path}: {err}") from None
        if "trainer" not in states:  # the flat layout of zo2 0.1 checkpoints
            states = {"trainer": states, "data": states.get("data", {})}
        # a key the checkpoint predates had its default value when it was written
        saved = {**to_dict(TrainConfig()), **states["trainer"].get("config", {})}
        changed = [f"{key} ({saved.get(key)} -> {config[key]})" for key in config
                   if key not in RESUMABLE_CHANGES and saved.get(key) != config[key]]
        if changed:
            raise ConfigError(f"cannot resume from {folder}: the config changed "
                              f"{'; '.join(changed)[:600]} (use another output_dir, or "
                              "checkpoint.resume=never there)")
        return states

    def copy_best_from(self, folder: str | Path) -> None:
        """Resumed into another directory: take the source run's ``best/`` along."""
        source = Path(folder).parent.parent / "best"  # <run>/checkpoints/step-N
        if self.mesh.is_main and not (self.out / "best").exists() and source.is_dir():
            shutil.copytree(source, self.out / "best")

    # -- saving -----------------------------------------------------------------------------
    def save(self, step: int, engine, states: dict[str, Stateful]) -> Path:
        """Write ``checkpoints/step-N``: the engine's folder plus ``run_state.json``."""

        def write(folder: Path) -> None:
            engine.save(folder)
            if self.mesh.is_main:
                run_state = {name: obj.state_dict() for name, obj in states.items()}
                (folder / RUN_STATE).write_text(json.dumps(run_state, indent=1))

        return self.steps.save(step, write)

    def publish(self, name: str, step: int, write: Callable[[Path], None]) -> Path:
        """Write ``<out>/<name>`` (``best/``, ``final/``; a collective with several ranks):
        ``write(tmp)`` fills a temporary folder (every rank calls it), which is published
        atomically with a manifest like every checkpoint."""
        folder, tmp = self.out / name, self.out / f".{name}.tmp"
        if self.mesh.is_main and tmp.exists():
            shutil.rmtree(tmp)
        write(tmp)
        if self.mesh.is_main:
            write_manifest(tmp, step=step)
            replace_dir(tmp, folder)
        self.mesh.wait_for_writer()
        return folder

    def latest(self) -> Path | None:
        return self.steps.latest()
