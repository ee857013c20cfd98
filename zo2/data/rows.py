"""Load the rows of a user's dataset (``data.train`` / ``data.validation`` / ``data.test``).

Everything is read through the ``datasets`` library; this module only decides *which* loader
to call and turns whatever goes wrong into one :class:`~zo2.errors.DataError` line that starts
with ``data.<role>: ``. A source is resolved in this order:

1. **An existing path** (``~`` expanded) is always a local source:

   - a file, by suffix: ``.json`` / ``.jsonl`` (JSON Lines, or one JSON list of objects) ->
     ``load_dataset("json")``, ``.csv`` -> ``"csv"``, ``.parquet`` -> ``"parquet"``; any other
     suffix is an error;
   - a ``save_to_disk`` folder (it holds ``state.json`` or ``dataset_dict.json``) ->
     ``datasets.load_from_disk``;
   - any other folder -> ``load_dataset(folder)``, i.e. datasets' own data-file layout
     (``train.csv``, ``data/test-*.parquet``, a README with configs...).

2. **A missing path with a data suffix** (``.json``, ``.jsonl``, ``.csv``, ``.parquet``) is a
   missing file (``data.train: no such file: <path>``), never a hub id.

3. **A hub dataset id**, ``name`` or ``owner/name``, optionally ``:split``
   (``stanfordnlp/imdb:test``), is read from the local caches only, the hub is never asked:
   first the ``datasets`` cache (``datasets.config.HF_DATASETS_CACHE``, where an earlier online
   ``load_dataset`` left it prepared), then a ``huggingface_hub`` snapshot of the dataset repo
   (``huggingface_hub.constants.HF_HUB_CACHE``, e.g. from ``hf download --repo-type dataset``).

4. Anything else is a missing path.

A source holding several splits (a ``DatasetDict`` folder, a folder of files, a hub dataset)
yields the split named by ``:split`` or else by the role; ``validation`` also accepts ``dev``
and ``val``. An unknown split is an error that lists the splits there are. A source with no
rows is an error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from zo2.errors import DataError

#: File suffix -> the packaged ``datasets`` builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: Role -> the split names it accepts in a multi-split source, in order of preference.
SPLITS = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?(?::[\w.-]+)?")
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes

Loaded = datasets.Dataset | datasets.DatasetDict


def load_rows(source: str, *, role: str) -> datasets.Dataset:
    """The rows of ``source`` (a file, a folder or a cached hub id) as a ``datasets.Dataset``.

    ``role`` is ``'train'``, ``'validation'`` or ``'test'``: it names the config key
    ``data.<role>`` in errors and is the split taken from a multi-split source.
    """
    if role not in SPLITS:
        raise ValueError(f"role must be one of {', '.join(SPLITS)}, not {role!r}")
    key = f"data.{role}"
    path = Path(source).expanduser()
    if path.exists():
        rows = _load_path(path, source, key=key, role=role)
    elif path.suffix.lower() in BUILDERS:
        raise DataError(f"{key}: no such file: {source}")
    elif _HUB_ID.fullmatch(source):
        rows = _load_hub(source, key=key, role=role)
    else:
        raise DataError(f"{key}: no such file or folder: {source}")
    if rows.num_rows == 0:
        raise DataError(f"{key}: {source} has no rows")
    return rows


def _load_path(path: Path, source: str, *, key: str, role: str) -> datasets.Dataset:
    """A local file by suffix, a ``save_to_disk`` folder, or a folder of data files."""
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = _read(key, source, _load_saved, path)
        else:
            loaded = _read(key, source, _load_files, str(path.resolve()))
        return _pick_split(loaded, key=key, source=source, role=role)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: unsupported file type {path.suffix or '(no suffix)'!r}: "
                        f"{source} (expected one of {', '.join(BUILDERS)})")
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {source} has no rows")
    return _read(key, source, _load_files, builder, data_files=str(path.resolve()),
                 split="train")


def _load_files(path: str, **kwargs: Any) -> Loaded:
    """``load_dataset`` that writes its Arrow files to a throw-away cache and keeps the rows.

    datasets 5.2 has no way to build a Dataset from files without writing Arrow files:
    ``download_and_prepare`` always writes them to ``cache_dir`` (``keep_in_memory`` only
    decides whether the result is then read into memory or memory-mapped). So the cache is a
    temporary directory, not ``~/.cache/huggingface/datasets`` nor the run's output folder, and
    ``keep_in_memory=True`` makes the result independent of those files, which lets the
    directory go as soon as the rows are loaded; nothing is ever written next to the data. An
    in-memory Dataset also has no cache files, so later ``.map()`` calls write none either.
    Fine-tuning sets are small; the price is one extra copy of the rows while loading.
    """
    with tempfile.TemporaryDirectory(prefix="zo2-datasets-") as cache:
        return datasets.load_dataset(path, cache_dir=cache, keep_in_memory=True, **kwargs)


def _load_saved(path: Path) -> Loaded:
    """``load_from_disk``, in memory so that a later .map() writes no cache-*.arrow into it."""
    try:
        return datasets.load_from_disk(str(path), keep_in_memory=True)
    except IndexError as exc:  # datasets 5.2 saves 0 rows as no shard, then cannot load that
        if not any(path.rglob("*.arrow")):
            raise _NoRows from exc
        raise


class _NoRows(Exception):
    """A source that datasets cannot load because it holds no rows at all."""


def _load_hub(source: str, *, key: str, role: str) -> datasets.Dataset:
    """A hub dataset id, from the ``datasets`` cache or else a hub snapshot; never the network."""
    repo_id, _, split = source.partition(":")
    loaded = _from_datasets_cache(repo_id, key=key, source=source)
    if loaded is None:
        loaded = _from_hub_snapshot(repo_id, key=key, source=source)
    if loaded is None:
        raise DataError(
            f"{key}: {source!r} is not a local path, and hub dataset {repo_id!r} is not in the "
            f"local cache (datasets cache: {datasets.config.HF_DATASETS_CACHE}, hub cache: "
            f"{huggingface_hub.constants.HF_HUB_CACHE}); the hub is not consulted")
    return _pick_split(loaded, key=key, source=source, role=role, split=split or None)


def _from_datasets_cache(repo_id: str, *, key: str, source: str) -> Loaded | None:
    """The dataset as an earlier online ``load_dataset`` prepared it, or None if not there."""
    with _hub_offline():
        try:
            with _quiet():
                return datasets.load_dataset(repo_id)  # memory-mapped from the datasets cache
        except ConnectionError:  # offline and not cached: "Couldn't reach '<id>' on the Hub"
            return None
        except Exception as exc:
            raise _data_error(key, f"hub dataset {source!r}", exc) from exc


def _from_hub_snapshot(repo_id: str, *, key: str, source: str) -> Loaded | None:
    """The data files of a cached hub snapshot of the dataset repo, or None if there is none."""
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, repo_type="dataset", local_files_only=True,
            cache_dir=huggingface_hub.constants.HF_HUB_CACHE)
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return _read(key, f"hub dataset {source!r}", _load_files, str(folder))


def _pick_split(loaded: Loaded, *, key: str, source: str, role: str,
                split: str | None = None) -> datasets.Dataset:
    """``loaded`` itself if it is one Dataset, else its split ``split`` or the role's split."""
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise DataError(f"{key}: {source} has a single split, so it takes no ':{split}'")
        return loaded
    wanted = (split,) if split is not None else SPLITS[role]
    for name in wanted:
        if name in loaded:
            return loaded[name]
    asked = " / ".join(repr(name) for name in wanted)
    have = ", ".join(repr(name) for name in loaded) or "none"
    raise DataError(f"{key}: {source} has no split {asked} (its splits: {have})")


def _read(key: str, what: str, load: Callable[..., Loaded], *args: Any,
          **kwargs: Any) -> Loaded:
    """``load(*args, **kwargs)`` quietly; whatever it raises becomes one DataError line."""
    try:
        with _quiet():
            return load(*args, **kwargs)
    except Exception as exc:  # anything datasets raises here is about the data, for the user
        raise _data_error(key, what, exc) from exc


def _data_error(key: str, what: str, exc: BaseException) -> DataError:
    """The one-line DataError for ``exc``, raised by datasets while reading ``what``."""
    if _means_no_rows(exc):
        return DataError(f"{key}: {what} has no rows")
    return DataError(f"{key}: cannot read {what}: {_reason(exc)}")


def _means_no_rows(exc: BaseException) -> bool:
    """datasets' ways of saying a source had nothing in it (e.g. ``[]``, a header-only CSV)."""
    return isinstance(exc, (_NoRows, StopIteration)) or "corresponds to no data" in str(exc)


def _reason(exc: BaseException) -> str:
    """The first line of the error under datasets' generic "error while generating" wrapper."""
    while isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No datasets progress bars or log lines for the load; both settings restored after.

    Log lines are muted up to ERROR because the failures datasets logs ("Failed to load JSON
    from file ...") are raised as well, and reported once, as a DataError.
    """
    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 wins, with a warning
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off and datasets.are_progress_bars_disabled():
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets' offline switch on for the call, whatever the environment said at import.

    zo2's CLI sets ``HF_HUB_OFFLINE=1``, but datasets reads it once, into
    ``datasets.config.HF_HUB_OFFLINE``, when first imported; setting that attribute makes
    ``load_dataset(<id>)`` skip the hub and fall back to the cached copy in every case.
    """
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
