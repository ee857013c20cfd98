"""MeZO's task suite: release readers, prompts, k-shot sampling, the choice objective,
continuation batches, generation F1 / EM, and a classification task through zo2-train."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from zo2.config import OptimConfig, compose, validate  # noqa: E402
from zo2.data.batching import encode, label_word_ids  # noqa: E402
from zo2.data.continuations import encode_answers, encode_choices  # noqa: E402
from zo2.data.examples import AnswerExample, ChoiceExample  # noqa: E402
from zo2.data.mezo import MEZO_TASKS, read_mezo  # noqa: E402
from zo2.data.tasks import load_task  # noqa: E402
from zo2.engine import ZOEngine  # noqa: E402
from zo2.errors import ConfigError, DataError  # noqa: E402
from zo2.evaluation import (  # noqa: E402
    best_over_golds,
    evaluate_generation,
    exact_match,
    f1_score,
    normalize_answer,
)
from zo2.loss import Objective  # noqa: E402
from zo2.models import embedded_tokenizer, load_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "mezo"

# (task, fixture, training pool size, validation size or None for a single file);
# "sst2_saved" is written by datasets' own save_to_disk (see saved_sst2)
CASES = [
    ("sst2", "sst2", 5, 2), ("sst2", "sst2_saved", 4, 2), ("rte", "rte", 8, 3),
    ("cb", "cb", 4, 2), ("boolq", "boolq", 4, 2), ("wsc", "wsc", 3, 2), ("wic", "wic", 3, 2),
    ("multirc", "multirc", 5, 2), ("copa", "copa", 4, 2), ("record", "record", 4, 1),
    ("squad", "squad", 3, 1), ("squad", "squad_flat.jsonl", 3, None), ("drop", "drop", 3, 1),
]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


SST2_SPLITS = {"train": [("a bright , tender comedy", 1), ("lifeless and far too long", 0),
                         ("one of the year 's most joyful films", 1),
                         ("it never finds its footing", 0)],
               "validation": [("sharp and surprising", 1), ("a chore to sit through", 0)]}


@pytest.fixture(scope="module")
def saved_sst2(tmp_path_factory) -> Path:
    """SST-2 as Hugging Face's glue/sst2 has it (sentence, ClassLabel label, idx), written
    by ``DatasetDict.save_to_disk``."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    folder = tmp_path_factory.mktemp("saved") / "sst2"
    datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"sentence": [r[0] for r in rows],
                                           "label": [r[1] for r in rows],
                                           "idx": list(range(len(rows)))}, features=features)
        for split, rows in SST2_SPLITS.items()}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("name,fixture,n_pool,n_val", CASES)
def test_every_task_parses_its_release_format(name, fixture, n_pool, n_val, request):
    source = request.getfixturevalue("saved_sst2") if fixture == "sst2_saved" else (
        FIXTURES / fixture)
    task, pool, validation = read_mezo(name, str(source))
    assert task.name == name and len(pool) == n_pool
    assert (None if validation is None else len(validation)) == n_val
    if task.kind == "label_words":
        assert {ex.label for ex in pool} <= set(range(len(task.label_words)))


def test_every_suite_task_is_covered():
    assert {case[0] for case in CASES} == set(MEZO_TASKS)


def test_prompts_are_mezos():
    _, rte, _ = read_mezo("rte", str(FIXTURES / "rte"))
    assert rte[0].text == (
        "The bakery on Elm Street opened in 1921 and is still run by the same family.\n"
        'Does this mean that "The bakery on Elm Street is over a century old." is true? '
        "Yes or No?\n")
    assert rte[0].label == 0 and MEZO_TASKS["rte"].label_words[0] == "Yes"
    _, sst2, _ = read_mezo("sst2", str(FIXTURES / "sst2"))
    assert sst2[1].text == "the plot drags and the jokes fall flat It was" and sst2[1].label == 0
    _, boolq, _ = read_mezo("boolq", str(FIXTURES / "boolq"))
    assert boolq[1].text.endswith("into flippers for swimming. Can penguins fly?\n")
    _, copa, _ = read_mezo("copa", str(FIXTURES / "copa"))
    assert copa[1] == ChoiceExample("The girl wore a heavy coat because",
                                    (" it was sunny.", " it was freezing outside."), 1)
    _, record, _ = read_mezo("record", str(FIXTURES / "record"))
    assert record[0].context.endswith("\n- Oslo bans cars from its centre\n"
                                      "- Mayor Ingrid Berg backs the plan\n-")
    assert record[0].candidates == (" The ban was supported by Oslo, the mayor.",
                                    " The ban was supported by Ingrid Berg, the mayor.")
    assert record[0].label == 1
    _, _, squad = read_mezo("squad", str(FIXTURES / "squad"))
    assert squad[0] == AnswerExample(
        "Title: Tea\nContext: Tea was first drunk in China, where it was used as a medicine "
        "before it became an everyday drink.\nQuestion: Where was tea first drunk?\nAnswer:",
        ("China", "in China"))
    _, drop, _ = read_mezo("drop", str(FIXTURES / "drop"))
    assert drop[1].prompt.startswith("Passage: The census") and drop[1].answers == ("900",)


def test_kshot_follows_mezo_train_dev_from_train_test_from_validation():
    task = load_task("rte", path=str(FIXTURES / "rte"), n_train=4, n_dev=2, n_test=1000, seed=3)
    _, pool, validation = read_mezo("rte", str(FIXTURES / "rte"))
    assert (len(task.train), len(task.dev), len(task.test)) == (4, 2, 3)  # all of validation
    assert set(task.test) == set(validation) and not set(task.train) & set(task.dev)
    assert set(task.train) | set(task.dev) <= set(pool)
    again = load_task("rte", path=str(FIXTURES / "rte"), n_train=4, n_dev=2, n_test=1000, seed=3)
    assert (again.train, again.dev, again.test) == (task.train, task.dev, task.test)
    single = load_task("squad", path=str(FIXTURES / "squad_flat.jsonl"), n_train=1, n_dev=1,
                       n_test=1)
    assert single.spec.kind == "lm" and len({*single.train, *single.dev, *single.test}) == 3
    copa = load_task("copa", path=str(FIXTURES / "copa"), n_train=2, n_dev=2, n_test=2)
    assert copa.spec.kind == "choice" and copa.choices == 2
    with pytest.raises(DataError, match="n_train 8"):
        load_task("rte", path=str(FIXTURES / "rte"), n_train=8, n_dev=2, n_test=2)


@pytest.mark.parametrize("name", [n for n, t in MEZO_TASKS.items() if t.kind == "label_words"])
def test_classification_label_words_encode(name, tokenizer):
    task = load_task(name, path=str(FIXTURES / name), n_train=2, n_dev=1, n_test=1)
    ids = label_word_ids(tokenizer, task.spec)
    assert len(set(ids.tolist())) == len(MEZO_TASKS[name].label_words)
    batch = encode(tokenizer, task.train, task.spec, max_length=64)
    assert set(batch["labels"][:, -1].tolist()) <= set(ids.tolist())


def _choice_logits(scores: list[list[float]], vocab: int = 4) -> tuple[torch.Tensor, ...]:
    """Rows of one-token candidates (token 1) whose log-probability is the given score;
    None: a padding row. Logits (R, 2, V) over the kept positions, labels (R, 2)."""
    rows = [s for group in scores for s in group]
    logits = torch.zeros(len(rows), 2, vocab)
    labels = torch.full((len(rows), 2), -100)
    for i, score in enumerate(rows):
        if score is None:
            continue
        labels[i, 1] = 1
        # log_softmax at token 1 equals ``score`` when the other V-1 logits share the rest
        rest = torch.log1p(-torch.tensor(score).exp()) - torch.log(torch.tensor(vocab - 1.0))
        logits[i, 0] = rest
        logits[i, 0, 1] = score
    return logits, labels


def test_choice_objective_on_hand_built_logits():
    # example 1: right candidate (first) most likely; example 2: the second one wins
    logits, labels = _choice_logits([[-0.5, -2.0, None], [-1.5, -0.2, -3.0]])
    objective = Objective("choice", choices=3)
    assert objective.correct(logits, labels) == (1, 2)
    # the candidates' log-probabilities the logits hold (the scores above, up to the
    # float32 rounding of building them), then the cross-entropy of each example's right
    # one (first) over its candidates, by hand
    held = torch.log_softmax(logits[:, 0], -1)[:, 1]
    first = torch.log_softmax(held[0:2], 0)[0]
    second = torch.log_softmax(held[3:6], 0)[0]
    expected = -(first + second) / 2
    # Both sides take a log-softmax of the same float32 scores (the padding row's -inf
    # adds an exact 0 to the sum of exponentials) and a mean of two: the same arithmetic
    # in another order, a few (<= 8 per side) roundings of values of magnitude <= 1 +
    # max|score|; |difference| <= 2 * 8 u (1 + 3), u = 2^-24.
    bound = 2 * 8 * 2.0**-24 * (1 + 3.0)
    assert abs(float(objective.loss(logits, labels)) - float(expected)) <= bound
    tie, tie_labels = _choice_logits([[-1.0, -1.0]])
    assert Objective("choice", choices=2).correct(tie, tie_labels) == (0, 1)  # ties are wrong
    with pytest.raises(ConfigError):
        Objective("choice", choices=1)


def test_choice_batches_group_candidates_right_one_first(tokenizer):
    examples = [ChoiceExample("The sky was", (" blue", " loud"), 1),
                ChoiceExample("She ate the", (" apple", " chair", " idea"), 0)]
    batch = encode_choices(tokenizer, examples, choices=3, max_length=32)
    labels = batch["labels"]
    assert labels.shape[0] == 6 and (labels[2] == -100).all()  # the padding row
    loud = tokenizer(" loud", add_special_tokens=False)["input_ids"]
    assert labels[0][labels[0] != -100].tolist() == loud  # label 1 ("loud") comes first
    assert batch["attention_mask"][2].sum() == 1


def test_choice_and_answer_tasks_train_with_the_engine_unchanged(tiny):
    model, tokenizer = tiny
    copa = load_task("copa", path=str(FIXTURES / "copa"), n_train=2, n_dev=2, n_test=2)
    engine = ZOEngine(model, OptimConfig(lr=1e-3), Objective("choice", choices=copa.choices))
    result = engine.step(encode_choices(tokenizer, copa.train, copa.choices, max_length=48))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    dev = encode_choices(tokenizer, copa.dev, copa.choices, 48)
    metrics = engine.evaluate([dev])
    # counted here: each row's mean log-likelihood of its labelled tokens (the candidate
    # continuation; float32, as the objective); an example is right when its first row
    # (the right candidate) scores strictly highest (a tie is wrong)
    with torch.no_grad():
        logits = engine.model(input_ids=dev["input_ids"],
                              attention_mask=dev["attention_mask"]).logits[:, :-1]
    targets = dev["labels"][:, 1:]
    rows = []
    for row in range(targets.shape[0]):
        keep = targets[row] != -100
        lp = torch.log_softmax(logits[row][keep].float(), -1)
        rows.append(lp.gather(1, targets[row][keep].unsqueeze(1)).mean().item()
                    if keep.any() else -math.inf)
    groups = [rows[i:i + copa.choices] for i in range(0, len(rows), copa.choices)]
    right = sum(g[0] > max(g[1:]) for g in groups)
    assert len(groups) == len(copa.dev) == 2
    assert metrics["accuracy"] == right / len(groups)
    engine.close()
    squad = load_task("squad", path=str(FIXTURES / "squad"), n_train=2, n_dev=1, n_test=1)
    engine = ZOEngine(model, OptimConfig(lr=1e-3), Objective("lm"))
    batch = encode_answers(tokenizer, squad.train, max_length=96)
    answer = tokenizer(squad.train[0].target, add_special_tokens=False)["input_ids"]
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == answer
    assert all(torch.isfinite(torch.tensor(engine.step(batch).losses)))
    engine.flush()
    scores = evaluate_generation(engine.model, tokenizer, squad.test, max_new_tokens=8)
    (prediction,) = scores["predictions"]
    assert "\n" not in prediction
    f1, em = best_over_golds(prediction, squad.test[0].answers)  # unit-tested below
    assert (scores["f1"], scores["exact_match"], scores["accuracy"]) == (f1, em, f1)
    engine.close()


def test_offloaded_generation_equals_resident(tiny):
    """Greedy decoding through the offloader (every token streams the blocks) gives the
    resident engine's tokens and logits bit for bit, after a ZO step of each."""
    from zo2.config import OffloadConfig

    model, tokenizer = tiny
    squad = load_task("squad", path=str(FIXTURES / "squad"), n_train=2, n_dev=1, n_test=1)
    batch = encode_answers(tokenizer, squad.train, max_length=96)
    prompts = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(0))
    outputs, uploads = [], []
    for offload in (None, OffloadConfig(enabled=True, ring=1)):
        engine = ZOEngine(copy.deepcopy(model), OptimConfig(lr=1e-2), Objective("lm"),
                          offload=offload)
        engine.step(batch)
        engine.flush()
        before = engine.residency.report().get("offload_uploads", 0)
        out = engine.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                    max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True,
                                    pad_token_id=0)
        uploads.append(engine.residency.report().get("offload_uploads", 0) - before)
        outputs.append(out)
        engine.close()
    resident, offloaded = outputs
    assert torch.equal(resident.sequences, offloaded.sequences)
    assert all(torch.equal(a, b) for a, b in zip(resident.logits, offloaded.logits))
    assert uploads[1] > 0  # the blocks were streamed for the generation


def test_squad_normalisation_f1_and_exact_match():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    # precision and recall are exact binary fractions here: 2 p r / (p + r), rounded once
    assert f1_score("in the city of Paris", "Paris") == 2 * 0.25 / 1.25
    assert f1_score("cat sat", "the cat sat on a mat") == 2 * 1 * 0.5 / 1.5
    assert f1_score("dog", "cat") == 0.0 and f1_score("the", "a") == 1.0  # both empty
    assert best_over_golds("China", ["in China", "China"]) == (1.0, 1.0)


class _Echo:
    """A stand-in model whose greedy generation appends fixed tokens."""

    def __init__(self, tail: list[int]) -> None:
        self.tail = tail

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        extra = torch.tensor([self.tail[:max_new_tokens]] * input_ids.shape[0])
        return torch.cat([input_ids, extra], dim=1)


def test_generation_scores_cut_at_the_newline(tokenizer):
    tail = tokenizer(" The China\nmore text", add_special_tokens=False)["input_ids"]
    examples = [AnswerExample("Q: where?\nAnswer:", ("China",)),
                AnswerExample("Q: who?\nAnswer:", ("Ada Lovelace",))]
    scores = evaluate_generation(_Echo(tail), tokenizer, examples, max_new_tokens=len(tail))
    assert scores["predictions"] == ["The China", "The China"]
    assert scores["exact_match"] == 0.5 and scores["f1"] == 0.5


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_files_name_the_cause(tmp_path):
    row = json.loads((FIXTURES / "rte" / "train.jsonl").read_text().splitlines()[0])
    with pytest.raises(DataError, match="not found"):
        load_task("rte", path=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="empty"):
        read_mezo("rte", _write(tmp_path / "empty.jsonl", "\n"))
    bad = _write(tmp_path / "bad.jsonl", json.dumps(row) + "\n{oops\n")
    with pytest.raises(DataError, match=r"task.path: cannot read .*bad\.jsonl: line 2: "
                                        "malformed JSON"):
        read_mezo("rte", bad)
    missing = _write(tmp_path / "missing.jsonl", json.dumps({**row, "hypothesis": None}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl: row 1: missing field 'hypothesis'"):
        read_mezo("rte", missing)
    label = _write(tmp_path / "label.jsonl", json.dumps({**row, "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"label\.jsonl: row 1: field 'label' has 'maybe'"):
        read_mezo("rte", label)
    nested = json.loads((FIXTURES / "squad" / "dev-v1.1.json").read_text())
    del nested["data"][0]["paragraphs"][0]["qas"][0]["question"]
    squad = _write(tmp_path / "dev.json", json.dumps(nested))
    with pytest.raises(DataError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field "
                                        "'question'"):
        read_mezo("squad", squad)
    with pytest.raises(DataError, match=r"drop\.parquet: row 1: missing field 'passage'"):
        read_mezo("drop", _parquet_without_passage(tmp_path))
    with pytest.raises(DataError, match="no training split"):
        read_mezo("rte", str(tmp_path))
    with pytest.raises(DataError, match="unsupported file type"):
        read_mezo("rte", _write(tmp_path / "data.xml", "<a/>"))
    with pytest.raises(ConfigError, match="task.path"):
        load_task("copa")


def _parquet_without_passage(folder: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "drop.parquet"
    pq.write_table(pa.table({"question": ["How many?"]}), path)
    return str(path)


def test_presets_compose_and_validate():  # tests/test_configs.py validates every preset
    for name in ("rte", "copa", "squad"):
        cfg = compose([f"task={name}", f"task.path={FIXTURES / name}"])
        assert cfg.task.name == name and validate(cfg)


@pytest.mark.parametrize("task,sizes", [
    ("rte", ["task.n_train=4", "task.n_dev=2", "task.n_test=2"]),  # label words
    ("copa", ["task.n_train=2", "task.n_dev=1", "task.n_test=4"]),  # candidate choice
    ("squad", ["task.n_train=2", "task.n_dev=1", "task.n_test=4"]),  # generation, F1
])
def test_each_kind_trains_through_the_cli(tmp_path, task, sizes):
    out = tmp_path / "run"
    args = ["model=tiny-llama", f"task={task}", f"task.path={FIXTURES / task}", "steps=2",
            *sizes, "task.max_length=64", "eval_every=1",
            "optim.batch_size=2", "eval_batch_size=4", "progress=false", "logging=none",
            f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "zo2.launch.train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["steps"] == 2
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    if task == "squad":
        assert {"f1", "exact_match"} <= evals[0]["dev"].keys()


def test_flattened_hugging_face_rows(tmp_path):
    multirc = {"paragraph": "Omar baked bread.", "question": "What did Omar bake?",
               "answer": "Bread", "idx": {"paragraph": 0, "question": 0, "answer": 0},
               "label": 1}
    [ex] = read_mezo("multirc", _write(tmp_path / "m.jsonl", json.dumps(multirc)))[1]
    assert ex.label == 1 and ex.text.endswith('I found this answer "Bread". '
                                              "Is that correct? Yes or No?\n")
    record = {"passage": "Ana met Ben in Rome.\n@highlight\nA trip", "query": "@placeholder "
              "was the city.", "entities": ["Ana", "Ben", "Rome"], "answers": ["Rome"]}
    [ex] = read_mezo("record", _write(tmp_path / "r.jsonl", json.dumps(record)))[1]
    assert ex.context == "Ana met Ben in Rome.\n- A trip\n-" and ex.label == 2
    assert ex.candidates[2] == " Rome was the city."
    with pytest.raises(ConfigError, match="objective 'choice'"):
        label_word_ids(embedded_tokenizer(), load_task(
            "copa", path=str(FIXTURES / "copa"), n_train=1, n_dev=1, n_test=1).spec)


def test_copa_choices_continue_the_sentence_as_mezo_writes_them():
    from zo2.data.mezo.choice import copa

    row = {"premise": "My body cast a shadow over the grass.", "choice1": "I stood up.",
           "choice2": "The sun was rising.", "question": "cause", "label": 1}
    (example,) = copa("row", row)
    assert example.context == "My body cast a shadow over the grass because"
    assert example.candidates == (" I stood up.", " the sun was rising.")
    assert example.label == 1


def test_release_files_are_read_through_datasets(tmp_path, saved_sst2):
    from zo2.data.mezo.records import find_splits, read_records

    tsv = _write(tmp_path / "train.tsv", 'sentence\tlabel\n"odd start \t1\n\n'
                                         'a "quoted" word\t0\n')
    assert read_records(tsv) == [(f"{tsv}: row 1", {"sentence": '"odd start ', "label": 1}),
                                 (f"{tsv}: row 2", {"sentence": 'a "quoted" word', "label": 0})]
    rows = [{"premise": "p", "hypothesis": "h", "label": "entailment"}]
    as_list = _write(tmp_path / "list.json", json.dumps(rows))
    as_lines = _write(tmp_path / "lines.json", json.dumps(rows[0]) + "\n" + json.dumps(rows[0]))
    assert read_records(as_list) == [(f"{as_list}: row 1", rows[0])]
    assert [w for w, _ in read_records(as_lines)] == [f"{as_lines}: row 1", f"{as_lines}: row 2"]
    train, validation = find_splits(saved_sst2)
    assert (train, validation) == ([saved_sst2 / "train"], [saved_sst2 / "validation"])
    first = read_records(saved_sst2 / "validation")[0]
    assert first == (f"{saved_sst2 / 'validation'}: row 1",
                     {"sentence": "sharp and surprising", "label": 1, "idx": 0})


def test_unreadable_release_files_are_one_line_naming_the_file(tmp_path, saved_sst2):
    import datasets

    from zo2.data.mezo.records import read_records

    wide = _write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\ntoo\tmany\tcells\n")
    bad_parquet = _write(tmp_path / "train.parquet", "not parquet")
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"sentence": []}).save_to_disk(str(empty))
    plain = tmp_path / "plain"
    plain.mkdir()
    broken = tmp_path / "broken"  # a split folder whose Arrow file was cut short
    datasets.load_from_disk(str(saved_sst2 / "train")).save_to_disk(str(broken))
    (arrow,) = broken.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    for source, message in [
        (wide, f"task.path: cannot read {wide}: Error tokenizing data. C error: Expected 2 "
               "fields in line 3, saw 3"),
        (bad_parquet, f"task.path: cannot read {bad_parquet}: Parquet magic bytes"),
        (empty, f"task.path: {empty} has no rows"),
        (plain, f"task.path: {plain} is a folder but not a datasets split saved with "
                "save_to_disk (no state.json)"),
        (broken, f"task.path: cannot read {broken}: "),
    ]:
        with pytest.raises(DataError) as err:
            read_records(source)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
