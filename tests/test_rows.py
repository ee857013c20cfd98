"""Tests of zo2.data.rows: user data files, save_to_disk folders and cached hub datasets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import huggingface_hub  # noqa: E402
import pandas as pd  # noqa: E402
from datasets.packaged_modules.json.json import Json  # noqa: E402

from zo2.data.rows import load_archived, load_file, load_rows, saved_splits  # noqa: E402
from zo2.errors import DataError  # noqa: E402

ROWS = [{"text": "good film", "label": 1}, {"text": "dull, long", "label": 0},
        {"text": "ok \u00e9t\u00e9", "label": 1}]
COLUMNS = {"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}


@pytest.fixture(autouse=True)
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every cache datasets could use points into tmp_path (and starts out missing)."""
    paths = {name: tmp_path / name for name in ("hf-datasets", "hf-hub", "tmp")}
    paths["tmp"].mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", paths["hf-datasets"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(paths["hf-hub"]))
    monkeypatch.setattr(tempfile, "tempdir", str(paths["tmp"]))
    return paths


def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    return folder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_file(folder: Path, kind: str) -> Path:
    if kind == "jsonl":
        return write(folder / "rows.jsonl", jsonl(ROWS))
    if kind == "json":
        return write(folder / "rows.json", json.dumps(ROWS, indent=1))
    if kind == "csv":
        path = folder / "rows.csv"
        pd.DataFrame(ROWS).to_csv(path, index=False)
        return path
    path = folder / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    return path


def load_unchanged(source: Path, role: str = "train") -> datasets.Dataset:
    """load_rows(source), asserting that nothing was written next to the data."""
    folder = source if source.is_dir() else source.parent
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    rows = load_rows(str(source), role=role)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    return rows


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_files(tmp_path: Path, caches: dict[str, Path], kind: str) -> None:
    rows = load_unchanged(write_file(data_dir(tmp_path), kind))
    assert isinstance(rows, datasets.Dataset)
    assert rows.column_names == ["text", "label"]
    assert rows.to_dict() == COLUMNS
    assert rows.cache_files == []  # in memory: no Arrow file behind it
    assert not caches["hf-datasets"].exists()  # the user's datasets cache is untouched
    assert list(caches["tmp"].iterdir()) == []  # the throw-away cache is gone


def test_quiet_and_settings_restored(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    path = write_file(data_dir(tmp_path), "jsonl")
    bad = write(path.with_name("bad.jsonl"), '{"text": "a"}\n{"text": \n')
    verbosity = datasets.logging.get_verbosity()
    bars_off = datasets.are_progress_bars_disabled()
    load_rows(str(path), role="train")
    with pytest.raises(DataError):
        load_rows(str(bad), role="train")
    assert capfd.readouterr() == ("", "")  # no progress bars, no datasets log lines
    assert datasets.logging.get_verbosity() == verbosity
    assert datasets.are_progress_bars_disabled() == bars_off


def test_dataset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(COLUMNS).save_to_disk(str(folder))
    rows = load_unchanged(folder, role="test")
    assert rows.to_dict() == COLUMNS
    assert rows.cache_files == []  # a later .map() cannot write into the user's folder


def save_dict(folder: Path, splits: list[str]) -> Path:
    parts = {name: datasets.Dataset.from_dict({"text": [name], "label": [i]})
             for i, name in enumerate(splits)}
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("role, split", [("train", "train"), ("validation", "validation"),
                                         ("test", "test")])
def test_dataset_dict_folder(tmp_path: Path, role: str, split: str) -> None:
    folder = save_dict(tmp_path / "dd", ["train", "validation", "test"])
    assert load_unchanged(folder, role=role)["text"] == [split]


@pytest.mark.parametrize("alias", ["dev", "val"])
def test_validation_aliases(tmp_path: Path, alias: str) -> None:
    folder = save_dict(tmp_path / "dd", ["train", alias])
    assert load_rows(str(folder), role="validation")["text"] == [alias]


def test_unknown_split(tmp_path: Path) -> None:
    folder = save_dict(tmp_path / "dd", ["train", "extra"])
    with pytest.raises(DataError) as err:
        load_rows(str(folder), role="validation")
    assert str(err.value) == (f"data.validation: {folder} has no split 'validation' / 'dev' / "
                              "'val' (its splits: 'train', 'extra')")


def test_folder_of_files(tmp_path: Path) -> None:
    folder = data_dir(tmp_path)
    write(folder / "train.jsonl", jsonl(ROWS))
    write(folder / "test.jsonl", jsonl(ROWS[:1]))
    assert load_unchanged(folder, role="test").to_dict() == {"text": ["good film"], "label": [1]}


def cache_hub_dataset(cache: Path, tmp_path: Path, repo_id: str, splits: list[str]) -> None:
    """Lay out what an online ``load_dataset(repo_id)`` leaves in the datasets cache.

    A hub dataset of data files is built by a packaged builder (here json) named after the
    repo; offline, datasets finds it under <owner>___<name>/<config>/<version>/<hash>.
    """
    owner, name = repo_id.split("/")
    files = {s: str(write(tmp_path / f"{s}.jsonl", jsonl([{"text": s, "label": i}])))
             for i, s in enumerate(splits)}
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name=name, config_name="default",
                   hash="0123456789abcdef", data_files=files)
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123456789abcdef"
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


def test_hub_dataset_from_datasets_cache(tmp_path: Path, caches: dict[str, Path]) -> None:
    cache_hub_dataset(caches["hf-datasets"], tmp_path, "owner/tiny", ["train", "test"])
    assert load_rows("owner/tiny", role="test")["text"] == ["test"]
    assert load_rows("owner/tiny", role="train")["text"] == ["train"]
    assert load_rows("owner/tiny:train", role="test")["text"] == ["train"]
    with pytest.raises(DataError) as err:
        load_rows("owner/tiny:dev", role="validation")
    assert str(err.value) == ("data.validation: owner/tiny:dev has no split 'dev' "
                              "(its splits: 'train', 'test')")


def test_hub_dataset_from_hub_snapshot(caches: dict[str, Path]) -> None:
    repo = caches["hf-hub"] / "datasets--owner--snap"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    write(repo / "refs" / "main", commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    write(data / "train.jsonl", jsonl(ROWS))
    write(data / "dev.jsonl", jsonl(ROWS[1:]))
    rows = load_unchanged(repo / "snapshots" / commit / "data" / "dev.jsonl")  # as a file
    assert rows["text"] == ["dull, long", "ok \u00e9t\u00e9"]
    assert load_rows("owner/snap", role="validation")["text"] == ["dull, long", "ok \u00e9t\u00e9"]
    assert load_rows("owner/snap", role="train").to_dict() == COLUMNS


def test_hub_never_touches_the_network(tmp_path: Path, caches: dict[str, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache_hub_dataset(caches["hf-datasets"], tmp_path, "owner/tiny", ["train"])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if the env said online
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert load_rows("owner/tiny", role="train")["text"] == ["train"]
    with pytest.raises(DataError, match="not in the local cache"):
        load_rows("owner/absent", role="train")
    assert attempts == []
    assert datasets.config.HF_HUB_OFFLINE is False  # restored


@pytest.mark.parametrize("source, repo_id", [("stanfordnlp/imdb:test", "stanfordnlp/imdb"),
                                             ("imdb", "imdb")])
def test_hub_dataset_not_cached(caches: dict[str, Path], source: str, repo_id: str) -> None:
    with pytest.raises(DataError) as err:
        load_rows(source, role="train")
    assert str(err.value) == (
        f"data.train: {source!r} is not a local path, and hub dataset {repo_id!r} is not in the "
        f"local cache (datasets cache: {caches['hf-datasets']}, hub cache: {caches['hf-hub']}); "
        "the hub is not consulted")


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv", "train.parquet"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "no" / name
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == f"data.train: no such file: {path}"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_rows(str(tmp_path / "nothing"), role="test")
    assert str(err.value) == f"data.test: no such file or folder: {tmp_path / 'nothing'}"


def test_malformed_jsonl(tmp_path: Path) -> None:
    path = write(data_dir(tmp_path) / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b"\n')
    with pytest.raises(DataError) as err:
        load_unchanged(path, role="validation")
    assert str(err.value) == (f"data.validation: cannot read {path}: line 2: malformed JSON "
                              "(Expecting ',' delimiter at column 13)")


@pytest.mark.parametrize("text, fault", [
    ('{"text": "a"}\n\n[1, 2]\n', "line 3: expected a JSON object, got list"),
    ('[{"text": "a"},\n {"text": }]', "line 2: malformed JSON (Expecting value at column 11)"),
])
def test_json_fault_names_the_line(tmp_path: Path, text: str, fault: str) -> None:
    path = write(data_dir(tmp_path) / "bad.json", text)
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == f"data.train: cannot read {path}: {fault}"


def test_json_not_utf8(tmp_path: Path) -> None:
    path = data_dir(tmp_path) / "latin.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "\xe9t\xe9", "label": 0}\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == (f"data.train: cannot read {path}: line 2 is not valid UTF-8 "
                              "(byte offset 37)")


def test_malformed_csv(tmp_path: Path) -> None:
    path = write(data_dir(tmp_path) / "bad.csv", "text,label\na,1\nb,0,extra,more\n")
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == (f"data.train: cannot read {path}: Error tokenizing data. "
                              "C error: Expected 2 fields in line 3, saw 4")


def test_not_parquet(tmp_path: Path) -> None:
    path = write(data_dir(tmp_path) / "bad.parquet", "not parquet")
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value).startswith(f"data.train: cannot read {path}: Parquet magic bytes")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                        ("empty.json", "[]"), ("header.csv", "text,label\n")])
def test_empty(tmp_path: Path, name: str, text: str) -> None:
    path = write(data_dir(tmp_path) / name, text)
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == f"data.train: {path} has no rows"


def test_empty_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(folder))
    with pytest.raises(DataError) as err:
        load_rows(str(folder), role="train")
    assert str(err.value) == f"data.train: {folder} has no rows"


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = write(data_dir(tmp_path) / "rows.txt", "hello\n")
    with pytest.raises(DataError) as err:
        load_rows(str(path), role="train")
    assert str(err.value) == (f"data.train: unsupported file type '.txt': {path} "
                              "(expected one of .json, .jsonl, .csv, .parquet)")


def test_load_file_with_a_key_and_builder_options(tmp_path: Path) -> None:
    folder = data_dir(tmp_path)
    tsv = write(folder / "rows.tsv", 'text\tlabel\n"quoted" text\t1\n')
    rows = load_file(tsv, key="task.path", builder="csv", delimiter="\t", quoting=3)
    assert rows.to_list() == [{"text": '"quoted" text', "label": 1}]
    assert rows.cache_files == [] and list(folder.iterdir()) == [tsv]
    as_text = write(folder / "rows.txt", jsonl(ROWS))  # the builder, not the suffix, decides
    assert load_file(as_text, key="task.path", builder="json").to_dict() == COLUMNS
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(COLUMNS).save_to_disk(str(saved))
    assert load_file(saved, key="task.path").to_dict() == COLUMNS
    save_dict(tmp_path / "dd", ["train", "dev"])
    assert saved_splits(tmp_path / "dd", key="task.path") == ["train", "dev"]


@pytest.mark.parametrize("name, text, message", [
    ("rows.jsonl", None, "{path} not found"),
    ("blank.jsonl", "\n  \n", "{path} is empty"),
    ("blank.csv", "", "{path} is empty"),
    ("header.csv", "text,label\n", "{path} has a header but no rows"),
    ("empty.json", "[]", "{path} has no rows"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', "cannot read {path}: line 2: malformed JSON "
                                                "(Expecting value at column 10)"),
    ("rows.xml", "<a/>", "unsupported file type '.xml': {path} (expected one of .json, "
                         ".jsonl, .csv, .parquet)"),
    ("folder", "", "{path} is a folder but not a datasets split saved with save_to_disk "
                   "(no state.json)"),
])
def test_load_file_errors_start_with_the_key(tmp_path: Path, name: str, text: str | None,
                                              message: str) -> None:
    path = data_dir(tmp_path) / name
    if name == "folder":
        path.mkdir()
    elif text is not None:
        write(path, text)
    with pytest.raises(DataError) as err:
        load_file(path, key="task.path")
    assert str(err.value) == "task.path: " + message.format(path=path)


def test_load_archived_reads_a_member_in_place(tmp_path: Path, caches: dict[str, Path]) -> None:
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a/rows.tsv", "text\tlabel\ngood film\t1\n")
    rows = load_archived(archive, "a/rows.tsv", key="task=x", builder="csv", delimiter="\t")
    assert rows.to_list() == [{"text": "good film", "label": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip", "tmp"]  # no cache
    assert list(caches["tmp"].iterdir()) == []  # the extracted copy is gone
    with pytest.raises(DataError) as err:
        load_archived(archive, "b.tsv", key="task=x", builder="csv")
    assert str(err.value) == (f"task=x: cannot read {archive}!b.tsv: \"There is no item named "
                              "'b.tsv' in the archive\"")
