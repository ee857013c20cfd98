"""Reading the public releases of MeZO's datasets into plain rows.

A *record* is ``(where, row)``: ``row`` a dict as the release stores it and ``where``
the file and line (or row, or JSON path) it came from, so every later error can name
its origin. Formats, by file suffix:

* ``.jsonl``: one JSON object per line (SuperGLUE's ``train.jsonl`` / ``val.jsonl``,
  Hugging Face exports);
* ``.json``: a list of objects, or SQuAD v1.1's nested ``data[].paragraphs[].qas[]``,
  flattened to one row per question (``title``, ``context``, ``question``,
  ``answers.text``);
* ``.tsv``: a header row then tab-separated rows (GLUE's ``SST-2/train.tsv``);
* ``.parquet``: Hugging Face's hub files;
* a ``datasets`` folder written by ``save_to_disk`` (``state.json`` plus Arrow stream
  files), read with pyarrow, so the ``datasets`` package is not needed.

:func:`find_splits` locates the train and validation parts of a release folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from zo2.data.sources import read_text
from zo2.errors import DataError

Record = tuple[str, dict[str, Any]]

SUFFIXES = (".jsonl", ".json", ".tsv", ".parquet")
TRAIN_PREFIXES = ("train",)
VALIDATION_PREFIXES = ("val", "dev", "validation")
_MISSING = object()


def need(row: dict[str, Any], dotted: str, where: str, kind: type | tuple = object) -> Any:
    """``row[a][b]`` for ``dotted`` ``"a.b"``; DataError naming ``where`` and the field if it
    is missing, null, or not of ``kind``."""
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING or value is None:
            present = ", ".join(repr(k) for k in row) if isinstance(row, dict) else "none"
            raise DataError(f"{where}: missing field {dotted!r} (fields present: {present})")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(
            f"{where}: field {dotted!r} must be {names}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        records.append((where, row))
    return records


def _squad_nested(path: Path, data: Any) -> list[Record]:
    """SQuAD v1.1's official layout, one row per question."""
    if not isinstance(data, list):
        raise DataError(f"{path}: field 'data' must be a list of articles")
    records = []
    for i, article in enumerate(data):
        here = f"{path}: data[{i}]"
        title = need(article, "title", here, str) if isinstance(article, dict) else ""
        for j, paragraph in enumerate(need(article, "paragraphs", here, list)):
            para_where = f"{here}.paragraphs[{j}]"
            context = need(paragraph, "context", para_where, str)
            for k, qa in enumerate(need(paragraph, "qas", para_where, list)):
                where = f"{para_where}.qas[{k}]"
                answers = need(qa, "answers", where, list)
                texts = [need(a, "text", f"{where}.answers[{n}]", str)
                         for n, a in enumerate(answers)]
                row = {"id": qa.get("id"), "title": title, "context": context,
                       "question": need(qa, "question", where, str), "answers": {"text": texts}}
                records.append((where, row))
    return records


def _json(path: Path) -> list[Record]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and "data" in data:
        return _squad_nested(path, data["data"])
    if isinstance(data, list):
        records = [(f"{path}: item {i}", row) for i, row in enumerate(data)]
        bad = [w for w, row in records if not isinstance(row, dict)]
        if bad:
            raise DataError(f"{bad[0]}: expected a JSON object")
        return records
    raise DataError(f"{path}: expected a list of objects or SQuAD's {{'data': [...]}}")


def _tsv(path: Path) -> list[Record]:
    lines = read_text(path).split("\n")
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    records = []
    for number, cells in enumerate(reader, start=2):
        if not cells or not "".join(cells).strip():
            continue
        where = f"{path}: line {number}"
        if len(cells) != len(header):
            raise DataError(f"{where}: expected {len(header)} tab-separated columns "
                            f"({', '.join(header)}), got {len(cells)}")
        records.append((where, dict(zip(header, cells))))
    return records


def _rows_of_table(path: Path, table: Any) -> list[Record]:
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def _parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return _rows_of_table(path, table)


def _saved_dataset(folder: Path) -> list[Record]:
    """A ``datasets`` ``save_to_disk`` folder of one split: its Arrow stream files."""
    import pyarrow as pa

    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text())
        files = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{state_file}: not a datasets state file ({exc})") from None
    records: list[Record] = []
    for name in files:
        path = folder / name
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: not a readable Arrow file ({exc})") from None
        records.extend(_rows_of_table(path, table))
    return records


def read_records(path: str | Path) -> list[Record]:
    """Every row of one data file (or ``datasets`` split folder); DataError if it has none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} not found")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise DataError(f"{path} is a folder but not a datasets split (no state.json)")
        records = _saved_dataset(path)
    else:
        readers = {".jsonl": _jsonl, ".json": _json, ".tsv": _tsv, ".parquet": _parquet}
        if path.suffix not in readers:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; "
                            f"allowed: {', '.join(SUFFIXES)} or a datasets folder")
        records = readers[path.suffix](path)
    if not records:
        raise DataError(f"data file {path} has no rows")
    return records


def _part_files(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and p.name.lower().startswith(prefixes))


def find_splits(folder: Path) -> tuple[list[Path], list[Path]]:
    """(train parts, validation parts) of a release folder; DataError if there is no train part.

    A ``datasets`` DatasetDict (``dataset_dict.json``) gives its ``train`` and
    ``validation`` split folders; otherwise files named ``train*`` and ``val*`` /
    ``dev*`` / ``validation*`` with a known suffix, searched below ``folder``.
    """
    listing = folder / "dataset_dict.json"
    if listing.is_file():
        try:
            splits = json.loads(listing.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{listing}: not a datasets split list ({exc})") from None
        train = [folder / s for s in splits if s.startswith(TRAIN_PREFIXES)]
        val = [folder / s for s in splits if s.startswith(VALIDATION_PREFIXES)]
    else:
        train = _part_files(folder, TRAIN_PREFIXES)
        val = _part_files(folder, VALIDATION_PREFIXES)
    if not train:
        raise DataError(f"{folder}: no training split found (expected a file named train*"
                        f"{'|'.join(SUFFIXES)} or a datasets folder with a 'train' split)")
    return train, val
