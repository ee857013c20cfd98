"""Tests of zo2.data.formats: text, prompt/completion and chat rows into labelled examples."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _chat import CHATML_GENERATION  # noqa: E402
from conftest import make_model  # noqa: E402

from zo2.data.formats import (  # noqa: E402
    FORMATS,
    Encoded,
    collate,
    encode_row,
    encode_rows,
    pad_id,
)
from zo2.errors import ConfigError, DataError  # noqa: E402
from zo2.loss import Objective, positions_to_keep  # noqa: E402
from zo2.models import embedded_tokenizer  # noqa: E402

IGNORE = -100
SOURCE = "data.jsonl"

# ChatML without a default system prompt, and the same with the assistant content and its
# end-of-turn token marked for return_assistant_tokens_mask (the "\n" after it is not).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2 tokenizer: no BOS added, EOS = pad = <|im_end|>, a ChatML template that
    adds a default system prompt and has no {% generation %} blocks."""
    return embedded_tokenizer()


def _with_template(tokenizer, template: str | None):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


@pytest.fixture(scope="module")
def chatml(tokenizer):
    return _with_template(tokenizer, CHATML)


@pytest.fixture(scope="module")
def chatml_generation(tokenizer):
    return _with_template(tokenizer, CHATML_GENERATION)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def enc(row, tokenizer, fmt: str, max_length: int = 256, index: int = 3) -> Encoded:
    return encode_row(row, index, fmt=fmt, tokenizer=tokenizer, max_length=max_length,
                      source=SOURCE)


def chatml_pieces(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Expected ids and labels of a ChatML conversation, built turn by turn: loss on each
    assistant content and its <|im_end|>, not on the header or the "\\n" after it."""
    input_ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = ids(tokenizer, f"<|im_start|>{m['role']}\n")
        body = ids(tokenizer, m["content"]) + ids(tokenizer, "<|im_end|>")
        tail = ids(tokenizer, "\n")
        input_ids += head + body + tail
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else
                                          [IGNORE] * len(body)) + [IGNORE] * len(tail)
    return input_ids, labels


def test_formats_constant() -> None:
    assert FORMATS == ("text", "prompt_completion", "messages")


def test_text_labels_every_token_and_cuts_right(tokenizer) -> None:
    assert tokenizer.bos_token_id is not None and not tokenizer.add_bos_token  # no BOS here
    text = "The quick brown fox jumps over the lazy dog."
    expected = ids(tokenizer, text) + [tokenizer.eos_token_id]
    # labels are the ids, but position 0 is never a target (left padding puts a pad before it)
    assert enc({"text": text}, tokenizer, "text") == Encoded(expected, [IGNORE] + expected[1:])
    cut = enc({"text": text}, tokenizer, "text", max_length=4)
    assert cut == Encoded(expected[:4], [IGNORE] + expected[1:4])  # the right end, EOS, cut


def test_prompt_completion_labels_completion_and_eos(tokenizer) -> None:
    row = {"prompt": "Translate to French: cat", "completion": " chat"}
    prompt, completion = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
    eos = [tokenizer.eos_token_id]
    got = enc(row, tokenizer, "prompt_completion")
    assert got.input_ids == prompt + completion + eos
    assert got.labels == [IGNORE] * len(prompt) + completion + eos


def test_prompt_cut_from_left_completion_kept(tokenizer) -> None:
    row = {"prompt": " ".join(f"word{i}" for i in range(40)), "completion": " the answer"}
    prompt, completion = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
    tail = completion + [tokenizer.eos_token_id]
    got = enc(row, tokenizer, "prompt_completion", max_length=len(tail) + 5)
    assert got.input_ids == prompt[-5:] + tail
    assert got.labels == [IGNORE] * 5 + tail
    # the smallest max_length keeps the prompt's last token, the first target's context
    got = enc(row, tokenizer, "prompt_completion", max_length=len(tail) + 1)
    assert got.input_ids == prompt[-1:] + tail
    message = (f"{SOURCE}: row 3: field 'completion': the completion is {len(tail)} tokens with "
               f"its EOS; with the BOS and the prompt's last token it needs {len(tail) + 1}, "
               f"more than max_length {len(tail)}")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        enc(row, tokenizer, "prompt_completion", max_length=len(tail))


def test_messages_both_mask_methods_agree_with_hand_built(chatml, chatml_generation) -> None:
    expected = Encoded(*chatml_pieces(chatml, CONVERSATION))
    by_prefix = enc({"messages": CONVERSATION}, chatml, "messages")
    by_generation = enc({"messages": CONVERSATION}, chatml_generation, "messages")
    assert by_prefix == expected
    assert by_generation == expected
    labelled = [chatml.decode([t]) for t in expected.labels if t != IGNORE]
    assert "".join(labelled) == "Four.<|im_end|>Six, of course.<|im_end|>"


def test_messages_with_the_tokenizers_own_template(tokenizer, chatml) -> None:
    # SmolLM2's template prepends a default system prompt when the first turn is not one;
    # the prefix method sees it in both renderings, so only the assistant turns are labelled
    messages = CONVERSATION[1:]
    got = enc({"messages": messages}, tokenizer, "messages")
    default = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, "
                                             "trained by Hugging Face"}]
    assert got == Encoded(*chatml_pieces(chatml, default + messages))


def test_messages_after_the_last_assistant_turn_are_dropped(chatml) -> None:
    trailing = CONVERSATION + [{"role": "user", "content": "Thanks!"}]
    assert enc({"messages": trailing}, chatml, "messages") == enc(
        {"messages": CONVERSATION}, chatml, "messages")


def test_messages_truncation_drops_leading_turns_keeps_system(chatml) -> None:
    full = enc({"messages": CONVERSATION}, chatml, "messages")
    short = [CONVERSATION[0]] + CONVERSATION[3:]
    expected = Encoded(*chatml_pieces(chatml, short))
    assert len(expected.input_ids) < len(full.input_ids)
    for max_length in (len(expected.input_ids), len(full.input_ids) - 1):
        assert enc({"messages": CONVERSATION}, chatml, "messages", max_length) == expected
    assert enc({"messages": CONVERSATION}, chatml, "messages", len(full.input_ids)) == full
    message = (f"{SOURCE}: row 3: field 'messages': the conversation is {len(full.input_ids)} "
               f"tokens; even its system messages and last exchange are "
               f"{len(expected.input_ids)} tokens, more than max_length "
               f"{len(expected.input_ids) - 1}")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        enc({"messages": CONVERSATION}, chatml, "messages", len(expected.input_ids) - 1)


def test_conversational_prompt_completion(chatml) -> None:
    row = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    input_ids, labels = chatml_pieces(chatml, CONVERSATION)
    first_answer = chatml_pieces(chatml, CONVERSATION[:3])[0]
    labels[: len(first_answer)] = [IGNORE] * len(first_answer)  # loss on the completion only
    assert enc(row, chatml, "prompt_completion") == Encoded(input_ids, labels)
    # too long: whole leading prompt turns go, the system message stays
    short = enc(row, chatml, "prompt_completion", max_length=len(input_ids) - 1)
    kept = [CONVERSATION[0]] + CONVERSATION[3:]
    assert short == enc({"messages": kept}, chatml, "messages")


def test_first_position_is_never_a_target(tokenizer) -> None:
    # an empty prompt and no BOS: the first completion token has no context to predict it
    completion = ids(tokenizer, " yes")
    got = enc({"prompt": "", "completion": " yes"}, tokenizer, "prompt_completion")
    assert got == Encoded(completion + [tokenizer.eos_token_id],
                          [IGNORE] + completion[1:] + [tokenizer.eos_token_id])
    # a template whose generation block opens the rendering: its first token is not labelled
    bare = _with_template(tokenizer, "{% for m in messages %}{% generation %}{{ m['content'] }}"
                                     "{% endgeneration %}{% endfor %}")
    answer = ids(tokenizer, "Four, since 2 + 2 = 4.")
    got = enc({"messages": [{"role": "assistant", "content": "Four, since 2 + 2 = 4."}]}, bare,
              "messages")
    assert got == Encoded(answer, [IGNORE] + answer[1:])


def test_collate_left_pads(tokenizer) -> None:
    rows = [{"prompt": "Question: one?", "completion": " yes"},
            {"prompt": "A much longer question, with many more words?", "completion": " no"}]
    examples = encode_rows(rows, fmt="prompt_completion", tokenizer=tokenizer, max_length=64,
                           source=SOURCE)
    batch = collate(examples, tokenizer)
    width = max(len(ex.input_ids) for ex in examples)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, width) for k in batch}
    assert all(v.dtype == torch.long for v in batch.values())
    for i, ex in enumerate(examples):
        pad = width - len(ex.input_ids)
        assert batch["input_ids"][i].tolist() == [pad_id(tokenizer)] * pad + ex.input_ids
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(ex.input_ids)
        assert batch["labels"][i].tolist() == [IGNORE] * pad + ex.labels
    assert pad_id(tokenizer) == tokenizer.pad_token_id
    with pytest.raises(DataError, match="^cannot collate an empty list of examples$"):
        collate([], tokenizer)


def test_lm_loss_equals_hugging_face_loss(family: str, chatml) -> None:  # every tiny family
    examples = [
        enc({"prompt": "Name a colour:", "completion": " red"}, chatml, "prompt_completion"),
        enc({"messages": CONVERSATION}, chatml, "messages"),
        enc({"text": "Plain text is trained on every token."}, chatml, "text"),
    ]
    batch = collate(examples, chatml)  # left-padded: rows differ in length
    model = make_model(family, vocab=len(chatml))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    labels = batch["labels"]
    k = positions_to_keep(labels)
    ours = Objective("lm").loss(out.logits[:, -k:], labels)
    # One forward gives both losses the same logits, so padding (which shifts positions for
    # some families) cannot make them differ. Both are float32 means of the same n
    # cross-entropy terms, only summed in another order (HF also adds exact zeros for the
    # ignored positions): each sum is within (n-1)·u·sum of the exact one (u = 2**-24), so
    # the two means differ by at most 2·n·u·mean, plus a few ulps for the division (seen: 0
    # to 2 ulps of a loss near 10.8, i.e. <= 2e-6; the bound here is about 3e-5).
    n = int((labels[:, 1:] != IGNORE).sum())
    assert n == sum(sum(t != IGNORE for t in ex.labels[1:]) for ex in examples)
    bound = 2 * n * 2**-24 * float(out.loss) + 4 * torch.finfo(torch.float32).eps
    assert abs(float(ours) - float(out.loss)) <= bound


BAD_ROWS = [  # (format, row, the message after "data.jsonl: row 3: ")
    ("text", ["not", "a", "dict"], "expected a mapping of fields, got list"),
    ("text", {"txt": "hello"}, "field 'text': missing (the row has fields 'txt')"),
    ("text", {"text": 5}, "field 'text': expected a string, got int"),
    ("text", {"text": ""}, "field 'text': empty: nothing to train on"),
    ("prompt_completion", {"completion": "a"},
     "field 'prompt': missing (the row has fields 'completion')"),
    ("prompt_completion", {"prompt": "q"},
     "field 'completion': missing (the row has fields 'prompt')"),
    ("prompt_completion", {"prompt": "q", "completion": 3},
     "field 'completion': expected a string, got int"),
    ("prompt_completion", {"prompt": None, "completion": "a"},
     "field 'prompt': expected a string, got NoneType"),
    ("prompt_completion", {"prompt": "q", "completion": ""},
     "field 'completion': empty: nothing to train on"),
    ("prompt_completion", {"prompt": CONVERSATION[:2], "completion": "Four."},
     "field 'completion': expected a list of messages like the prompt's, got str"),
    ("prompt_completion", {"prompt": CONVERSATION[:2], "completion": []},
     "field 'completion': empty: no messages"),
    ("messages", {"messages": "hello"}, "field 'messages': expected a list of messages, got str"),
    ("messages", {"messages": []}, "field 'messages': empty: no messages"),
    ("messages", {"messages": ["hello"]},
     "field 'messages[0]': expected a {'role', 'content'} mapping, got 'hello'"),
    ("messages", {"messages": [{"role": "user"}]},
     "field 'messages[0]': expected a {'role', 'content'} mapping, got {'role': 'user'}"),
    ("messages", {"messages": [CONVERSATION[1], {"role": "bot", "content": "hi"}]},
     "field 'messages[1].role': unknown role 'bot' (expected one of system, user, assistant)"),
    ("messages", {"messages": [CONVERSATION[1], {"role": "assistant", "content": ["hi"]}]},
     "field 'messages[1].content': expected a string, got list"),
    ("messages", {"messages": CONVERSATION[:2]}, "field 'messages': no assistant turn to train on"),
    ("messages", {"messages": CONVERSATION[2:3]},
     "field 'messages[0]': the conversation starts with an assistant turn; the prefix method "
     "needs a message before it ({% generation %} does not)"),
]


@pytest.mark.parametrize("fmt, row, message", BAD_ROWS)
def test_bad_rows_one_line(fmt: str, row, message: str, chatml) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(f'{SOURCE}: row 3: {message}')}$"):
        enc(row, chatml, fmt)


TEMPLATE_ERRORS = [  # (template, message after "data.jsonl: row 3: field ")
    (None, "'messages': the tokenizer has no chat template (or several and none named "
           "'default') to render messages with"),
    ("{{ raise_exception('Conversation roles must alternate') }}",
     "'messages': the chat template cannot render it: Conversation roles must alternate"),
    # the number of messages up front: no shorter rendering is a prefix of a longer one
    ("{{ messages | length }}" + CHATML,
     "'messages[2]': the chat template's rendering before this assistant turn is not a token "
     "prefix of the longer conversation's, so the loss mask cannot be computed by the prefix "
     "method; mark the assistant turns with {% generation %} in the template"),
    (CHATML_GENERATION.replace("{{ m['content'] + '<|im_end|>' }}{% endgeneration %}",
                               "{% endgeneration %}{{ m['content'] + '<|im_end|>' }}"),
     "'messages': the chat template's {% generation %} blocks mark no token"),
]


@pytest.mark.parametrize("template, message", TEMPLATE_ERRORS)
def test_template_problems_one_line(template, message: str, tokenizer) -> None:
    other = _with_template(tokenizer, template)
    with pytest.raises(DataError, match=f"^{re.escape(f'{SOURCE}: row 3: field {message}')}$"):
        enc({"messages": CONVERSATION}, other, "messages")


def test_encode_rows_names_the_bad_row(tokenizer) -> None:
    rows = iter([{"text": "fine"}, {"text": "also fine"}, {"text": 7}])
    with pytest.raises(DataError, match=r"^train\.jsonl: row 2: field 'text': expected a string"):
        encode_rows(rows, fmt="text", tokenizer=tokenizer, max_length=16, source="train.jsonl")
    good = encode_rows([{"text": "fine"}], fmt="text", tokenizer=tokenizer, max_length=16,
                       source="train.jsonl")
    assert good == [enc({"text": "fine"}, tokenizer, "text")]


def test_bad_options_are_config_errors(tokenizer) -> None:
    with pytest.raises(ConfigError, match="^data format 'chat' is not one of text, "):
        encode_rows([], fmt="chat", tokenizer=tokenizer, max_length=16, source=SOURCE)
    with pytest.raises(ConfigError, match="^max_length must be at least 2"):
        enc({"text": "hi"}, tokenizer, "text", max_length=1)
