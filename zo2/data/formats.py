"""One row of your own data (a dict, as ``datasets`` yields it) into one training example.

The formats and their fields follow TRL's conventions:

* ``text`` -- field ``text`` (a non-empty string). Ids: BOS (if the tokenizer adds one)
  + the text + EOS. Loss on every token (but the first, see below). Truncation: the right
  end is cut, so a text cut short loses its EOS (the document does not end there).
* ``prompt_completion`` -- fields ``prompt`` and ``completion``. Standard: two strings,
  tokenized separately; ids: BOS + prompt + completion + EOS; loss on the completion and
  its EOS only. Conversational: two lists of messages; ids: the chat template's rendering
  of prompt + completion; loss on the tokens after the rendering of the prompt with
  ``add_generation_prompt=True`` (no EOS is added: the template ends the turn).
* ``messages`` -- field ``messages``, a list of ``{"role", "content"}`` dicts (roles
  ``system``, ``user``, ``assistant``; string contents), rendered with the tokenizer's
  own chat template. Loss on the assistant turns only: the ``{% generation %}`` blocks
  when the template has them and the tokenizer is fast (``return_assistant_tokens_mask``
  needs token offsets); otherwise, per assistant turn ``i``, the tokens that
  ``messages[:i+1]`` adds to ``messages[:i]`` rendered with ``add_generation_prompt=True``.
  That rendering must be a token prefix of the longer one, else a :class:`DataError`.
  Messages after the last assistant turn carry no loss and are dropped.

End of turn: an assistant turn's labelled span ends with its end-of-turn token (ChatML's
``<|im_end|>``), which is labelled so the model learns to stop; the whitespace-only tokens
that close the span (ChatML's ``"\\n"`` after ``<|im_end|>``) stay in the input unlabelled
(prefix method and conversational completions; a ``{% generation %}`` template decides by
its tags).

Truncation to ``max_length`` tokens for the chat formats drops whole turns from the left:
the leading system messages stay, and the kept conversation restarts at the earliest user
turn that makes it fit (for a conversational completion, a user turn of the prompt). If
the last assistant turn (the completion) with the user turn before it does not fit, a
:class:`DataError`. A standard prompt is cut from its left, keeping at least its last token
(with no BOS, the first completion token needs it to be a target); the completion is never
cut. Every problem in a row raises :class:`DataError` with one line naming the source, the
row index and the field.

Labels follow the Hugging Face causal-LM convention (:mod:`zo2.loss`): ``labels[t]`` is
the token at position ``t`` when it is a target, else -100; logits at ``t`` predict
``labels[t+1]``. ``labels[0]`` is always -100: :func:`collate` left-pads a batch, and a pad
token's logits must not learn to predict an example's first token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from zo2.data.batching import IGNORE_INDEX, bos_ids, text_ids
from zo2.errors import ConfigError, DataError, ModelError

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


@dataclass(frozen=True)
class Encoded:
    """One example: token ids and their labels (the token where it is a target, else -100)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class RowAt:
    """Where a row comes from, to name it in errors."""

    source: str
    index: int

    def error(self, field: str | None, what: str) -> DataError:
        """A one-line DataError naming the source, the row and the field."""
        where = f"{self.source}: row {self.index}"
        if field is not None:
            where += f": field {field!r}"
        return DataError(f"{where}: {' '.join(what.split())}")


def _encoded(input_ids: list[int], labels: list[int]) -> Encoded:
    """An example whose first position is never a target: left padding puts a pad token
    before it, and the pad's logits must not be trained to predict it."""
    return Encoded(list(input_ids), [IGNORE_INDEX] + list(labels[1:]))


def _short(value: Any, limit: int = 40) -> str:
    """A one-line repr of ``value``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_of(row: Mapping, name: str, at: RowAt) -> Any:
    """``row[name]``, or a DataError listing the fields the row has."""
    if name not in row:
        have = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise at.error(name, f"missing (the row has fields {have})")
    return row[name]


def _string(value: Any, field: str, at: RowAt) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise at.error(field, f"expected a string, got {type(value).__name__}")
    return value


def _eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id (appended to texts and completions)."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token to end texts and completions with")
    return int(tokenizer.eos_token_id)


def _message(item: Any, field: str, at: RowAt) -> dict:
    """A validated copy of one message: a mapping with a known role and a string content."""
    if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
        raise at.error(field, f"expected a {{'role', 'content'}} mapping, got {_short(item)}")
    if item["role"] not in ROLES:
        raise at.error(f"{field}.role", f"unknown role {_short(item['role'])} "
                                        f"(expected one of {', '.join(ROLES)})")
    if not isinstance(item["content"], str):
        raise at.error(f"{field}.content",
                       f"expected a string, got {type(item['content']).__name__}")
    return dict(item)


def _messages(value: Any, field: str, at: RowAt) -> list[dict]:
    """A validated non-empty list of messages."""
    if not isinstance(value, (list, tuple)):
        raise at.error(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise at.error(field, "empty: no messages")
    return [_message(item, f"{field}[{k}]", at) for k, item in enumerate(value)]


def _chat_template(tokenizer: Any, field: str, at: RowAt) -> str:
    """The tokenizer's chat template, or a DataError if it has none."""
    try:
        return tokenizer.get_chat_template()
    except (ValueError, AttributeError) as exc:
        raise at.error(field, "the tokenizer has no chat template (or several and none "
                              "named 'default') to render messages with") from exc


def _render(tokenizer: Any, conversation: list[dict], field: str, at: RowAt,
            generation_prompt: bool = False) -> list[int]:
    """Token ids of the chat template's rendering of ``conversation``."""
    ids = _apply_template(tokenizer, conversation, field, at, return_dict=False,
                          add_generation_prompt=generation_prompt)
    return list(ids)


def _apply_template(tokenizer: Any, conversation: list[dict], field: str, at: RowAt,
                    **options: Any) -> Any:
    """``apply_chat_template`` (tokenized); a template that cannot render the row is a
    DataError naming the row and the field."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=True, **options)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise at.error(field, f"the chat template cannot render it: {first}") from exc


def _check_prefix(short: list[int], long: list[int], field: str, at: RowAt, what: str) -> None:
    """Raise unless ``short`` is a token prefix of ``long`` (the prefix method needs it)."""
    if long[: len(short)] != short:
        raise at.error(field, f"the chat template's rendering {what} is not a token prefix of "
                              "the longer conversation's, so the loss mask cannot be computed "
                              "by the prefix method; mark the assistant turns with "
                              "{% generation %} in the template")


def _labelled_end(tokenizer: Any, ids: list[int], start: int, end: int) -> int:
    """``end`` less the whitespace-only tokens that close the span (kept: one token)."""
    while end - start > 1 and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def _fit_turns(messages: list[dict], limit: int, tokenizer: Any, max_length: int, field: str,
               at: RowAt) -> tuple[list[dict], list[int]]:
    """The longest conversation that fits: leading system messages + ``messages[start:]``,
    ``start`` the first message after them or a user turn before ``limit``; with the kept
    messages' indices in ``messages``."""
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    starts = [system] + [i for i in range(system + 1, limit) if messages[i]["role"] == "user"]
    lengths = []
    for start in starts:
        kept = list(range(system)) + list(range(start, len(messages)))
        lengths.append(len(_render(tokenizer, [messages[i] for i in kept], field, at)))
        if lengths[-1] <= max_length:
            return [messages[i] for i in kept], kept
    full, length = lengths[0], lengths[-1]
    raise at.error(field, f"the conversation is {full} tokens; even its system messages and "
                          f"last exchange are {length} tokens, more than max_length {max_length}")


def _prefix_mask(tokenizer: Any, conversation: list[dict], origin: list[int], field: str,
                 at: RowAt) -> tuple[list[int], list[bool]]:
    """Ids and assistant mask by the prefix-difference method."""
    full = _render(tokenizer, conversation, field, at)
    mask = [False] * len(full)
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        here = f"{field}[{origin[i]}]"
        if i == 0:
            raise at.error(here, "the conversation starts with an assistant turn; the prefix "
                                 "method needs a message before it ({% generation %} does not)")
        start = _render(tokenizer, conversation[:i], here, at, generation_prompt=True)
        end = _render(tokenizer, conversation[: i + 1], here, at)
        _check_prefix(start, end, here, at, "before this assistant turn")
        _check_prefix(end, full, here, at, "up to this assistant turn")
        for t in range(len(start), _labelled_end(tokenizer, full, len(start), len(end))):
            mask[t] = True
    return full, mask


def _generation_mask(tokenizer: Any, conversation: list[dict], field: str,
                     at: RowAt) -> tuple[list[int], list[bool]]:
    """Ids and assistant mask from the template's ``{% generation %}`` blocks."""
    out = _apply_template(tokenizer, conversation, field, at, return_dict=True,
                          return_assistant_tokens_mask=True)
    mask = [bool(m) for m in out["assistant_masks"]]
    if not any(mask):
        raise at.error(field, "the chat template's {% generation %} blocks mark no token")
    return list(out["input_ids"]), mask


def _encode_messages(row: Mapping, at: RowAt, tokenizer: Any, max_length: int) -> Encoded:
    """The ``messages`` format: loss on the assistant turns."""
    messages = _messages(field_of(row, "messages", at), "messages", at)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise at.error("messages", "no assistant turn to train on")
    template = _chat_template(tokenizer, "messages", at)
    kept, origin = _fit_turns(messages[: last + 1], last, tokenizer, max_length, "messages", at)
    if _GENERATION_TAG.search(template) and getattr(tokenizer, "is_fast", False):
        ids, mask = _generation_mask(tokenizer, kept, "messages", at)
    else:
        ids, mask = _prefix_mask(tokenizer, kept, origin, "messages", at)
    return _encoded(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])


def _encode_chat_completion(row: Mapping, at: RowAt, tokenizer: Any,
                            max_length: int) -> Encoded:
    """Conversational ``prompt_completion``: loss on the tokens after the rendered prompt."""
    prompt = _messages(row["prompt"], "prompt", at)
    completion = _messages(row["completion"], "completion", at)
    _chat_template(tokenizer, "prompt", at)
    kept, _ = _fit_turns(prompt + completion, len(prompt), tokenizer, max_length,
                         "completion", at)
    cut = len(kept) - len(completion)
    head = _render(tokenizer, kept[:cut], "prompt", at, generation_prompt=True)
    ids = _render(tokenizer, kept, "completion", at)
    _check_prefix(head, ids, "prompt", at, "of the prompt (with the generation prompt)")
    end = _labelled_end(tokenizer, ids, len(head), len(ids))
    labels = [IGNORE_INDEX] * len(head) + ids[len(head): end] + [IGNORE_INDEX] * (len(ids) - end)
    return _encoded(ids, labels)


def _encode_prompt_completion(row: Mapping, at: RowAt, tokenizer: Any,
                              max_length: int) -> Encoded:
    """``prompt_completion``: loss on the completion and its EOS."""
    prompt, completion = field_of(row, "prompt", at), field_of(row, "completion", at)
    if isinstance(prompt, (list, tuple)):
        if not isinstance(completion, (list, tuple)):
            raise at.error("completion", "expected a list of messages like the prompt's, got "
                                         f"{type(completion).__name__}")
        return _encode_chat_completion(row, at, tokenizer, max_length)
    prompt, completion = _string(prompt, "prompt", at), _string(completion, "completion", at)
    if not completion:
        raise at.error("completion", "empty: nothing to train on")
    head, body = bos_ids(tokenizer), text_ids(tokenizer, prompt)
    tail = text_ids(tokenizer, completion) + [_eos_id(tokenizer)]
    need = len(head) + min(len(body), 1) + len(tail)
    if need > max_length:
        raise at.error("completion", f"the completion is {len(tail)} tokens with its EOS; with "
                                     f"the BOS and the prompt's last token it needs {need}, "
                                     f"more than max_length {max_length}")
    body = body[max(len(body) - (max_length - len(head) - len(tail)), 0):]
    return _encoded(head + body + tail, [IGNORE_INDEX] * (len(head) + len(body)) + tail)


def _encode_text(row: Mapping, at: RowAt, tokenizer: Any, max_length: int) -> Encoded:
    """``text``: loss on every token, cut on the right."""
    text = _string(field_of(row, "text", at), "text", at)
    if not text:
        raise at.error("text", "empty: nothing to train on")
    ids = (bos_ids(tokenizer) + text_ids(tokenizer, text) + [_eos_id(tokenizer)])[:max_length]
    return _encoded(ids, list(ids))


_TARGET_FIELD = {"text": "text", "prompt_completion": "completion", "messages": "messages"}
_ENCODERS = {"text": _encode_text, "prompt_completion": _encode_prompt_completion,
             "messages": _encode_messages}


def _check_options(fmt: str, max_length: int) -> None:
    """Raise ConfigError for an unknown format or a max_length below 2."""
    if fmt not in FORMATS:
        raise ConfigError(f"data format {fmt!r} is not one of {', '.join(FORMATS)}")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (a context and a target), "
                          f"got {max_length}")


def encode_row(row: Any, index: int, *, fmt: str, tokenizer: Any, max_length: int,
               source: str) -> Encoded:
    """Encode one row of format ``fmt``; problems raise a one-line DataError naming
    ``source``, the row ``index`` and the field."""
    _check_options(fmt, max_length)
    at = RowAt(source, index)
    if not isinstance(row, Mapping):
        raise at.error(None, f"expected a mapping of fields, got {type(row).__name__}")
    encoded = _ENCODERS[fmt](row, at, tokenizer, max_length)
    if all(t == IGNORE_INDEX for t in encoded.labels):
        raise at.error(_TARGET_FIELD[fmt], "no token to train on")
    return encoded


def encode_rows(rows: Iterable[Any], *, fmt: str, tokenizer: Any, max_length: int,
                source: str) -> list[Encoded]:
    """Encode every row (a list of dicts, a ``datasets.Dataset``...), indexed from 0."""
    _check_options(fmt, max_length)
    return [encode_row(row, i, fmt=fmt, tokenizer=tokenizer, max_length=max_length,
                       source=source) for i, row in enumerate(rows)]


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the pad token, else EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    return int(pad)


def collate(examples: Sequence[Encoded], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Left-pad examples into ``input_ids``, ``attention_mask`` and ``labels`` (B, T) LongTensors;
    padding is masked out and labelled -100."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, width - n:] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, width - n:] = 1
        labels[i, width - n:] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
