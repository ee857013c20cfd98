"""Your own labelled rows: data.format=classification|choice, any labels, a template."""

from __future__ import annotations

import json

import pytest
import torch

from zo2.config import DataConfig, compose
from zo2.data.examples import ChoiceExample
from zo2.data.labelled import LabelledRows
from zo2.data.sources import Example
from zo2.errors import ConfigError, DataError
from zo2.models import load_model
from zo2.trainer import Trainer

SMALL = ["model=tiny-llama", "optim.lr=1e-3", "optim.batch_size=4", "eval_batch_size=8",
         "progress=false", "logging=none", "data.max_length=64"]
MOODS = ("grim", "sunny", "dull")


def review(i: int) -> dict:
    """Row ``i``: a short review and its label (``neg`` / ``pos`` / ``mid``, by ``i % 3``)."""
    return {"title": f"film {i}", "body": f"a {MOODS[i % 3]} story",
            "label": ("neg", "pos", "mid")[i % 3]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-llama")[1]


def rows_of(cfg: DataConfig, rows: list[dict], tokenizer) -> tuple[LabelledRows, list]:
    labelled = LabelledRows(cfg, rows, tokenizer, "mine.jsonl")
    return labelled, labelled.examples(rows, range(len(rows)), "mine.jsonl")


def test_a_template_fills_row_fields_and_labels_map_to_their_words(tokenizer):
    cfg = DataConfig(format="classification", template="{title}: {body}. It was",
                     labels={"neg": "terrible", "pos": " great", "mid": "neutral"})
    labelled, examples = rows_of(cfg, [review(i) for i in range(3)], tokenizer)
    assert examples == [Example("film 0: a grim story. It was", 0),
                        Example("film 1: a sunny story. It was", 1),
                        Example("film 2: a dull story. It was", 2)]
    # one token each, first tokens distinct: MeZO's label words (one forward per row);
    # an answer follows its prompt after one space
    assert labelled.spec.kind == "label_words"
    assert labelled.spec.label_words == (" terrible", " great", " neutral")


def test_without_a_mapping_the_training_labels_answer_themselves(tokenizer):
    cfg = DataConfig(format="classification", template="{body}:")
    labelled, examples = rows_of(cfg, [review(i) for i in range(6)], tokenizer)
    assert labelled.classes.keys == ["mid", "neg", "pos"]  # sorted distinct labels
    assert [e.label for e in examples] == [1, 2, 0, 1, 2, 0]


def test_labels_of_several_tokens_are_scored_as_a_choice_of_continuations(tokenizer):
    cfg = DataConfig(format="classification", template="{body}. Verdict:",
                     labels={"neg": "very bad", "pos": "very good", "mid": "so so"})
    labelled, examples = rows_of(cfg, [review(i) for i in range(3)], tokenizer)
    assert labelled.spec.kind == "choice"
    words = (" very bad", " very good", " so so")
    assert examples[1] == ChoiceExample("a sunny story. Verdict:", words, 1)


def test_choice_rows_name_the_right_choice_by_index_or_by_text(tokenizer):
    cfg = DataConfig(format="choice", template="Q: {question} A:", label_field="answer")
    rows = [{"question": "sky?", "choices": ["blue", "green"], "answer": 0},
            {"question": "grass?", "choices": ["blue", "green", "red"], "answer": "green"}]
    _, examples = rows_of(cfg, rows, tokenizer)
    assert examples == [ChoiceExample("Q: sky? A:", (" blue", " green"), 0),
                        ChoiceExample("Q: grass? A:", (" blue", " green", " red"), 1)]


@pytest.mark.parametrize("cfg, row, message", [
    (DataConfig(format="classification", template="{title} {stars}",
                labels={"neg": "bad", "pos": "good"}), review(0),
     "mine.jsonl: row 0: field 'stars': missing"),
    (DataConfig(format="classification", labels={"neg": "bad", "pos": "good"}),
     {"text": "ok", "label": "mid"},
     "mine.jsonl: row 0: field 'label': unknown label 'mid' (labels: neg, pos)"),
    (DataConfig(format="classification", labels={"0": "bad", "1": "good"}),
     {"text": "ok", "label": 1.5}, "mine.jsonl: row 0: field 'label': expected a label"),
    (DataConfig(format="choice"), {"prompt": "p", "choices": "ab", "label": 0},
     "mine.jsonl: row 0: field 'choices': expected a list of 2 or more non-empty strings"),
    (DataConfig(format="choice"), {"prompt": "p", "choices": ["a", "b"], "label": 2},
     "mine.jsonl: row 0: field 'label': expected the index (0..1) or the text"),
])
def test_a_bad_row_is_one_line_naming_the_source_the_row_and_the_field(tokenizer, cfg, row,
                                                                        message):
    with pytest.raises(DataError) as caught:
        rows_of(cfg, [row], tokenizer)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_config_refuses_options_of_another_format():
    with pytest.raises(ConfigError, match="data.template: is for data.format"):
        DataConfig(format="messages", template="{text}")
    with pytest.raises(ConfigError, match="data.balanced: needs labelled rows"):
        DataConfig(format="text", balanced=True)
    with pytest.raises(ConfigError, match="data.max_new_tokens: classification rows"):
        DataConfig(format="classification", max_new_tokens=4)
    with pytest.raises(ConfigError, match="needs placeholders"):
        LabelledRows(DataConfig(format="classification", template="no fields"), [review(0)],
                     None, "x")


def label_counts(trainer) -> list[int]:
    counts = [0, 0, 0]
    for example in trainer.pipe.train.examples:
        counts[example.label] += 1
    return counts


def run(out, data, *extra):
    cfg = compose([*SMALL, "data.format=classification", "data.template='{body}. It was'",
                   "data.labels={neg: terrible, pos: great, mid: neutral}",
                   f"output_dir={out}", *extra])
    return Trainer(cfg, cfg.output_dir, data=data)


def test_balanced_sampling_draws_as_many_rows_of_every_label(tmp_path):
    rows = [review(i) for i in range(60)] + [review(3 * i + 1) for i in range(30)]  # pos x2
    with run(tmp_path / "a", {"train": rows}, "data.n_train=12", "data.balanced=true") as t:
        assert label_counts(t) == [4, 4, 4]
    with run(tmp_path / "b", {"train": rows}, "data.n_train=12") as t:  # as the rows come
        assert sum(label_counts(t)) == 12 and label_counts(t) != [4, 4, 4]


def test_rows_given_to_the_trainer_train_and_are_scored_by_label_accuracy(tmp_path):
    """Zero-shot accuracy equals a count of right answers from a plain HF forward."""
    train = [review(i) for i in range(24)]
    test = [review(100 + i) for i in range(9)]
    with run(tmp_path / "run", {"train": train, "validation": test, "test": test}, "steps=2",
             "eval_every=2") as trainer:
        summary = trainer.train()
        model, tokenizer = load_model("tiny-llama")
        words = [tokenizer(w, add_special_tokens=False)["input_ids"][0]
                 for w in (" terrible", " great", " neutral")]
        right = 0
        for row in test:
            ids = tokenizer(f"{row['body']}. It was", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1, words]
            right += int(logits.argmax()) == ("neg", "pos", "mid").index(row["label"])
    assert summary["eval_metric"] == "accuracy"
    assert summary["data"] == "rows given to the Trainer (train 24, validation 9, test 9)"
    assert summary["zero_shot_test"] == right / len(test)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 2]


def test_given_rows_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="data: no 'train' rows"):
        run(tmp_path / "run", {"test": [review(0)]})
    with pytest.raises(ConfigError, match="unknown split"):
        run(tmp_path / "run", {"train": [review(0)], "dev": [review(1)]})
    with pytest.raises(ConfigError, match="expected a datasets.Dataset or a list of dicts"):
        run(tmp_path / "run", {"train": "rows.jsonl"})
    with pytest.raises(DataError, match="data.train: row 1: field 'body': missing"):
        run(tmp_path / "run", {"train": [review(0), {"label": "neg"}, review(2)]})
    assert not (tmp_path / "run").exists()


def test_answers_of_several_tokens_are_scored_by_their_mean_log_likelihood(tmp_path):
    """Zero-shot accuracy of a choice between multi-token answers equals the count of rows
    whose right answer has the highest mean token log-probability in a plain HF forward."""
    words = {"neg": "very bad", "pos": "very good", "mid": "so so"}
    test = [review(200 + i) for i in range(12)]
    cfg = compose([*SMALL, "data.format=classification", "data.template='{body}. Verdict:'",
                   "data.labels={neg: 'very bad', pos: 'very good', mid: 'so so'}",
                   "steps=0", f"output_dir={tmp_path / 'run'}"])
    with Trainer(cfg, cfg.output_dir, data={"train": test, "test": test}) as trainer:
        assert trainer.pipe.objective.kind == "choice"
        summary = trainer.train()
    model, tokenizer = load_model("tiny-llama")

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    right = 0
    for row in test:
        prompt = ids(f"{row['body']}. Verdict:")
        scores = []
        for word in words.values():
            answer = ids(" " + word)
            with torch.no_grad():
                logp = model(torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
            steps = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
            scores.append(sum(float(logp[t, a]) for t, a in zip(steps, answer)) / len(answer))
        right += max(range(3), key=scores.__getitem__) == list(words).index(row["label"])
    assert summary["zero_shot_test"] == right / len(test)
