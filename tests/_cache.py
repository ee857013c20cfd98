"""The suite's own zo2 cache (``ZO2_CACHE``), never the user's ``~/.cache/zo2``.

zo2 converts the embedded SmolLM2 GGUF into ``$ZO2_CACHE`` (else ``~/.cache/zo2``) on
first use and reads it from there afterwards; the tiny models take their tokenizer
from it. A stale cache left there by an older zo2 or transformers would change what the
tests see, so the suite points ``ZO2_CACHE`` at a folder of its own, created empty for
the session (every test and every process the tests start share it: one conversion,
about a minute, per session). ``ZO2_TEST_CACHE=<folder>`` reuses a folder across
sessions instead (a developer's choice; CI leaves it unset). The session's folder is
removed at the end.

conftest.py: ``from _cache import zo2_cache  # noqa: F401`` (an autouse session fixture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def zo2_cache(tmp_path_factory) -> Path:
    """``ZO2_CACHE`` for the whole session, inherited by the processes tests start."""
    chosen = os.environ.get("ZO2_TEST_CACHE")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("zo2-cache")
    folder.mkdir(parents=True, exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("ZO2_CACHE", str(folder))
    yield folder
    mp.undo()
    if not chosen:  # the converted model is ~540 MB: not kept with pytest's old temp folders
        shutil.rmtree(folder, ignore_errors=True)
