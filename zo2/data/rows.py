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
rows is an error. When datasets refuses a JSON file, the error names its first bad line.

The task readers that know their format (the MeZO suite's release files, the ``jsonl`` /
``csv`` tasks, the packaged corpora) read through :func:`load_file` instead: one file with
the builder and builder options they choose (``delimiter="\\t"``, ``field="data"``...), or one
``save_to_disk`` split folder, with errors that start with the config key they pass
(``task.path: ``); :func:`load_archived` reads a file of a zip file, and
:func:`saved_splits` lists a ``DatasetDict`` folder's splits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
import zipfile
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
    return _load_one(path, source, key=key, builder=builder)


def load_file(path: str | Path, *, key: str, builder: str | None = None,
              **options: Any) -> datasets.Dataset:
    """The rows of one local data file, or of one ``save_to_disk`` split folder.

    For readers that know their format: ``builder`` is the datasets builder (``"json"``,
    ``"csv"``, ``"parquet"``; by default the one of the file's suffix, :data:`BUILDERS`) and
    ``options`` go to it (a folder takes neither: ``datasets.load_from_disk`` reads it).
    Every error is one DataError line that starts with ``key`` (the config setting that
    named the file, e.g. ``task.path``) and names the path: not found, a folder without
    ``state.json``, an unknown suffix, ``is empty`` (nothing but whitespace), ``has a
    header but no rows`` (a CSV), ``has no rows``, or ``cannot read`` with datasets' reason
    (for JSON, the first line that is not UTF-8, not valid JSON or not an object).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{key}: {path} not found")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise DataError(f"{key}: {path} is a folder but not a datasets split saved with "
                            "save_to_disk (no state.json)")
        rows, empty = _read(key, str(path), _load_saved, path), "has no rows"
    else:
        builder = builder or BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{key}: unsupported file type {path.suffix or '(no suffix)'!r}: "
                            f"{path} (expected one of {', '.join(BUILDERS)})")
        if _is_blank(path):
            raise DataError(f"{key}: {path} is empty")
        empty = "has a header but no rows" if builder == "csv" else "has no rows"
        rows = _load_one(path, str(path), key=key, builder=builder, empty=empty, **options)
    if rows.num_rows == 0:
        raise DataError(f"{key}: {path} {empty}")
    return rows


def load_archived(archive: Path, member: str, *, key: str, builder: str,
                  **options: Any) -> datasets.Dataset:
    """The rows of the file ``member`` of the zip file ``archive``, read as :func:`load_file`
    reads a file; errors name ``archive!member``.

    The member is extracted to a throw-away folder first: datasets reads a ``zip://`` URL
    as a remote file, which offline mode (``HF_HUB_OFFLINE=1``) refuses.
    """
    what = f"{archive}!{member}"
    with tempfile.TemporaryDirectory(prefix="zo2-archive-") as folder:
        try:
            with zipfile.ZipFile(archive) as zipped:
                path = Path(zipped.extract(member, folder))
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{key}: cannot read {what}: {exc}") from None
        rows = _load_one(path, what, key=key, builder=builder, **options)
    if rows.num_rows == 0:
        raise DataError(f"{key}: {what} has no rows")
    return rows


def saved_splits(folder: str | Path, *, key: str) -> list[str]:
    """The split names of a ``save_to_disk`` DatasetDict folder, as datasets lists them.

    The splits are memory-mapped, not read: only their names are wanted here.
    """
    loaded = _read(key, str(folder), datasets.load_from_disk, str(folder))
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{key}: {folder} is one datasets split, not a DatasetDict folder")
    return list(loaded)


def _load_one(path: Path, what: str, *, key: str, builder: str, empty: str = "has no rows",
              **options: Any) -> datasets.Dataset:
    """One data file through ``builder`` (its split ``train``, the only one a file has).

    The rows are validated in full: pyarrow's JSON reader takes strings that are not UTF-8,
    which would only fail later, when a row is read.
    """
    try:
        with _quiet():
            rows = _load_files(builder, data_files=str(path.resolve()), split="train",
                               **options)
        rows.data.validate(full=True)
        return rows
    except Exception as exc:  # anything datasets raises here is about the data, for the user
        lines = builder == "json" and "field" not in options  # JSON Lines or a JSON list
        fault = _json_fault(path) if lines and not _means_no_rows(exc) else None
        if fault is not None:
            raise DataError(f"{key}: cannot read {what}: {fault}") from exc
        raise _data_error(key, what, exc, empty=empty) from exc


def _is_blank(path: Path) -> bool:
    """Whether the file holds nothing but whitespace (read until its first other byte)."""
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _json_fault(path: Path) -> str | None:
    """Where a JSON file that datasets refused stops being UTF-8 JSON Lines of objects (or a
    JSON document), e.g. ``line 2: malformed JSON (...)``; None if no line is at fault.

    Only called after datasets failed, for the message: pyarrow's own error counts rows from
    0 within a block of the file, which names no line a user can find.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"line {line} is not valid UTF-8 (byte offset {exc.start})"
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        return None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: malformed JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object, got {type(value).__name__}"
    return None


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


def _data_error(key: str, what: str, exc: BaseException, *,
                empty: str = "has no rows") -> DataError:
    """The one-line DataError for ``exc``, raised by datasets while reading ``what``."""
    if _means_no_rows(exc):
        return DataError(f"{key}: {what} {empty}")
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
