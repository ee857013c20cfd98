"""Shared fixtures: tiny random-weight decoder models of several families and batches."""

from __future__ import annotations

import os

import pytest
import torch
from _cache import zo2_cache  # noqa: F401  (autouse: the suite's own ZO2_CACHE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# GPT-2-style families (Conv1D weights, learned absolute positions whose position_ids
# have batch dimension 1, a tied head) besides the rotary ones.
FAMILIES = ("opt", "llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neo", "gpt_bigcode")
VOCAB = 128


def make_model(family: str, *, layers: int = 2, hidden: int = 32, vocab: int = VOCAB,
               dtype: torch.dtype = torch.float32, seed: int = 0, tie: bool = True):
    """A tiny random-weight causal LM, built without touching global RNG state."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=128,
                  tie_word_embeddings=tie)
    if family == "opt":
        config = tf.OPTConfig(ffn_dim=2 * hidden, word_embed_proj_dim=hidden,
                              enable_bias=True, **common)
        cls = tf.OPTForCausalLM
    elif family in ("gpt2", "gpt_bigcode"):
        config_cls, cls = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
                           "gpt_bigcode": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM)}[family]
        config = config_cls(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                            n_inner=2 * hidden, n_positions=128, tie_word_embeddings=tie)
    elif family == "gpt_neo":
        config = tf.GPTNeoConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                 num_heads=4, intermediate_size=2 * hidden,
                                 attention_types=[[[("global", "local")[i % 2]], 1]
                                                  for i in range(layers)],
                                 window_size=8, max_position_embeddings=128,
                                 tie_word_embeddings=tie)
        cls = tf.GPTNeoForCausalLM
    else:
        config_cls, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[family]
        extra = {"head_dim": hidden // 4} if family == "qwen3" else {}
        config = config_cls(intermediate_size=2 * hidden, num_key_value_heads=2, **common,
                            **extra)
    config.use_cache = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(dtype).eval().requires_grad_(False)


def make_batch(batch: int = 4, seq: int = 12, vocab: int = VOCAB, seed: int = 0,
               label_ids: tuple[int, ...] = (5, 9), pad_left: int = 3) -> dict:
    """Left-padded prompts whose last token is one of ``label_ids`` (the label word)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch, 2):  # every other row left-padded
        ids[row, :pad_left] = 0
        mask[row, :pad_left] = 0
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    choice = torch.randint(0, len(label_ids), (batch,), generator=g)
    ids[:, -1] = torch.tensor(label_ids)[choice]
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
