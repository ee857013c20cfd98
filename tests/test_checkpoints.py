"""Atomic, verified checkpoints (zo2/checkpoints.py): a crash mid-write, a truncated or
corrupt file, a missing manifest; the newest good checkpoint is always found."""

from __future__ import annotations

import logging

import pytest

from zo2.checkpoints import CheckpointManager, verify
from zo2.errors import CheckpointError


def _writer(payload: bytes, crash_after: int | None = None):
    def write(folder):
        (folder / "weights.bin").write_bytes(payload)
        if crash_after is not None:
            (folder / "partial.bin").write_bytes(payload[:crash_after])
            raise KeyboardInterrupt("killed mid-write")
        (folder / "state.json").write_text('{"ok": true}')
    return write


def test_save_publishes_and_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", keep=2)
    for step in (10, 20, 30):
        manager.save(step, _writer(bytes([step]) * 1000))
    assert [p.name for p in manager.all()] == ["step-00000020", "step-00000030"]
    assert manager.latest() == manager.path(30)
    manifest = verify(manager.path(30))
    assert manifest["step"] == 30 and set(manifest["files"]) == {"weights.bin", "state.json"}


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", keep=1)
    manager.save(10, _writer(b"a" * 1000))
    with pytest.raises(KeyboardInterrupt):
        manager.save(20, _writer(b"b" * 1000, crash_after=10))
    assert manager.all() == [manager.path(10)]  # the half-written one was never published
    assert manager.latest() == manager.path(10)
    assert (manager.path(10) / "weights.bin").read_bytes() == b"a" * 1000
    manager.save(20, _writer(b"b" * 1000))  # the next save clears the leftover
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000020"]


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "weights.bin").write_bytes(b"x" * 999), "has 999 bytes"),
    (lambda f: (f / "weights.bin").write_bytes(b"x" * 1000), "SHA-256"),
    (lambda f: (f / "state.json").unlink(), "state.json is missing"),
    (lambda f: (f / "MANIFEST.json").unlink(), "incomplete"),
    (lambda f: (f / "MANIFEST.json").write_text("{not json"), "corrupt"),
])
def test_damage_is_named_and_the_previous_one_is_used(tmp_path, caplog, damage, message):
    manager = CheckpointManager(tmp_path / "ck", keep=3)
    manager.save(1, _writer(b"a" * 1000))
    manager.save(2, _writer(b"b" * 1000))
    damage(manager.path(2))
    with pytest.raises(CheckpointError, match=message):
        verify(manager.path(2))
    with caplog.at_level(logging.WARNING, logger="zo2"):
        assert manager.latest() == manager.path(1)
    assert "step-00000002" in caplog.text and "previous" in caplog.text


def test_no_good_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ck")
    assert manager.latest() is None
    manager.save(1, _writer(b"a" * 10))
    (manager.path(1) / "weights.bin").write_bytes(b"")
    assert manager.latest() is None


def test_an_engine_folder_stores_the_seed_log_once_and_resumes_from_it(tmp_path):
    """zo2_state.json holds no log: the folder's run.seedlog is the one copy, and a
    resumed engine continues with exactly the log (and weights) of an uninterrupted one."""
    import json

    import torch
    from conftest import make_batch, make_model

    from zo2 import Objective, OptimConfig, ZOEngine
    from zo2.engine import SEEDLOG_FILE, STATE_FILE
    from zo2.seedlog import SeedLog

    def engine():
        return ZOEngine(make_model("llama"), OptimConfig(lr=1e-2, q=2),
                        Objective("label_words", torch.tensor([5, 9])), seed=3)

    whole, first = engine(), engine()
    for t in range(4):
        whole.step(make_batch(seed=t))
    for t in range(2):
        first.step(make_batch(seed=t))
    first.save(tmp_path / "ckpt")
    assert "log" not in json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    assert SeedLog.load(tmp_path / "ckpt" / SEEDLOG_FILE).records() == [
        {**r, "grads": [], "lr": 0.0} for r in first.log]  # zo-sgd keeps no grads
    resumed = engine()
    resumed.load(tmp_path / "ckpt")
    for t in range(2, 4):
        resumed.step(make_batch(seed=t))
    assert [r["coefs"] for r in resumed.log] == [r["coefs"] for r in whole.log]
    a, b = resumed.export_state_dict(), whole.export_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
