"""Reading the public releases of MeZO's datasets into plain rows.

A *record* is ``(where, row)``: ``row`` a dict as the release stores it and ``where``
the file and row it came from (``<file>: row 3``, rows numbered from 1 in file order,
blank lines not counted; a JSON path for SQuAD's nested file), so every later error can
name its origin. Every file is read by the ``datasets`` library, through
:func:`zo2.data.rows.load_file` (errors start with ``task.path: ``). Formats, by suffix:

* ``.jsonl``: one JSON object per line (SuperGLUE's ``train.jsonl`` / ``val.jsonl``,
  Hugging Face exports), datasets' ``json`` builder;
* ``.json``: a list of objects or JSON Lines, or SQuAD v1.1's nested
  ``{"data": [...]}`` (read with the ``json`` builder's ``field="data"``), flattened here
  to one row per question (``title``, ``context``, ``question``, ``answers.text``);
* ``.tsv``: a header row then tab-separated rows (GLUE's ``SST-2/train.tsv``), the ``csv``
  builder with ``delimiter="\\t"``, quotes kept as text and empty cells as empty strings;
* ``.parquet``: Hugging Face's hub files, the ``parquet`` builder;
* a ``datasets`` folder written by ``save_to_disk`` (``state.json`` plus Arrow files),
  ``datasets.load_from_disk``.

:func:`find_splits` locates the train and validation parts of a release folder.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from zo2.data.rows import load_file, saved_splits
from zo2.errors import DataError

Record = tuple[str, dict[str, Any]]

KEY = "task.path"  # the setting that names a release; every reading error starts with it
SUFFIXES = (".jsonl", ".json", ".tsv", ".parquet")
#: Builder and options per suffix (the rest: the builder of the suffix, no options).
#: GLUE's TSVs quote nothing (a ``"`` is text); an empty cell stays an empty string.
OPTIONS: dict[str, dict[str, Any]] = {
    ".tsv": {"builder": "csv", "delimiter": "\t", "quoting": csv.QUOTE_NONE,
             "keep_default_na": False},
}
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
            present = ", ".join(repr(k) for k, v in row.items() if v is not None
                                ) if isinstance(row, dict) else "none"
            raise DataError(f"{where}: missing field {dotted!r} (fields present: {present})")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(
            f"{where}: field {dotted!r} must be {names}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _numbered(path: Path, rows: list[dict[str, Any]]) -> list[Record]:
    """Each row with its origin, ``<path>: row <n>``, counted from 1."""
    return [(f"{path}: row {number}", row) for number, row in enumerate(rows, start=1)]


def _squad_nested(path: Path, data: list[Any]) -> list[Record]:
    """SQuAD v1.1's official layout (its ``data`` articles), one row per question."""
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


def _starts_with_object(path: Path) -> bool:
    """Whether the file's first non-blank character opens a JSON object."""
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 12):
            chunk = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if chunk:
                return chunk.startswith(b"{")
    return False


def _json(path: Path) -> list[Record]:
    """A ``.json`` file: SQuAD's ``{"data": [articles]}`` if it is one object holding
    ``data``, else rows (a list of objects, or JSON Lines)."""
    if _starts_with_object(path):
        try:
            articles = load_file(path, key=KEY, builder="json", field="data")
        except DataError:  # no 'data', or not one JSON document (JSON Lines): rows below
            pass
        else:
            return _squad_nested(path, articles.to_list())
    return _numbered(path, load_file(path, key=KEY, builder="json").to_list())


def read_records(path: str | Path) -> list[Record]:
    """Every row of one data file (or ``datasets`` split folder); DataError if it has none."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix not in SUFFIXES:
        raise DataError(f"{KEY}: {path}: unsupported file type {path.suffix!r}; "
                        f"allowed: {', '.join(SUFFIXES)} or a datasets folder")
    if path.is_file() and path.suffix == ".json":
        records = _json(path)
    else:
        records = _numbered(path, load_file(path, key=KEY, **OPTIONS.get(path.suffix, {}))
                            .to_list())
    if not records:
        raise DataError(f"{KEY}: {path} has no rows")
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
    if (folder / "dataset_dict.json").is_file():
        splits = saved_splits(folder, key=KEY)
        train = [folder / s for s in splits if s.startswith(TRAIN_PREFIXES)]
        val = [folder / s for s in splits if s.startswith(VALIDATION_PREFIXES)]
    else:
        train = _part_files(folder, TRAIN_PREFIXES)
        val = _part_files(folder, VALIDATION_PREFIXES)
    if not train:
        raise DataError(f"{folder}: no training split found (expected a file named train*"
                        f"{'|'.join(SUFFIXES)} or a datasets folder with a 'train' split)")
    return train, val
