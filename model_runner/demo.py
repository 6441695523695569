"""The ``demo`` model: served when no ``--model`` is given, so a fresh machine needs no download.

A Llama-style model with seeded random weights and a byte-level BPE tokenizer trained offline on
the text below, with a ChatML template. It is built on first use into the user cache dir and
reused. Every build writes byte-identical files (seeded weights, deterministic training, sorted
JSON), so its fingerprint -- and every cached block -- survives a rebuild or another machine.
Its output is gibberish: it exists to exercise the serving and caching path, not to answer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model_runner.tokenizer_builder import pseudo_word_corpus, train_bpe_tokenizer

DEMO_NAME = "demo"
DEMO_VERSION = 2
"""Bump when the recipe changes, so an old build in the cache dir is never mistaken for this one."""
DEMO_SEED = 20240601
DEMO_VOCAB = 4096

_TEXT = (
    "kvproxy is a prefix-caching server for language models. Every prompt is cut into blocks of "
    "tokens, and each block is hashed together with the blocks before it. When a new prompt starts "
    "with blocks that an earlier prompt already computed, their keys and values come back from "
    "memory, from a local disk or from Redis, and only the rest of the prompt is computed again.",
    "You are a helpful assistant. Answer the question as briefly as you can, "
    "and say so when you do not know.",
    "The system prompt is long and shared by many requests; the question at the end is short and "
    "different every time. That is exactly the case a prefix cache is made for.",
    "Once upon a time, in a small town by the sea, there lived an old clockmaker who repaired every "
    "clock in town. Children brought him broken toys, fishermen brought him compasses, and the mayor "
    "brought him the great tower clock, which had stopped at a quarter past three.",
    "Numbers: zero one two three four five six seven eight nine ten eleven twelve "
    "twenty thirty hundred thousand.",
    "Days and months: Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February "
    "March April May June July August September October November December.",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "SELECT name, count(*) FROM requests WHERE cached_tokens > 0 GROUP BY name ORDER BY 2 DESC;",
    '{"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}',
    "Weather report: cloudy in the morning, sunny in the afternoon, "
    "light rain in the evening; wind from the west.",
    "Recipe: mix flour, water, salt and yeast; knead for ten minutes; "
    "let the dough rise; bake at 230 degrees.",
    "Le cache garde les clés et les valeurs déjà calculées. Der Zwischenspeicher hält Schlüssel und "
    "Werte. La caché guarda claves y valores. 缓存保存已经计算好的键和值。 "
    "キャッシュはキーと値を保存します。",
    "Symbols and emoji: € £ ¥ ° ± × ÷ → ← ✓ ★ 🙂 🚀 🎉 👍",
)


def demo_corpus() -> list[str]:
    """The built-in training text, repeated so its frequent pairs merge first, then made-up words
    (seeded) so the vocabulary fills up to ``DEMO_VOCAB``."""
    return [f"{line}\n" for _ in range(40) for line in _TEXT] + pseudo_word_corpus(DEMO_SEED, 1500)


def demo_config(vocab_size: int) -> LlamaConfig:
    """Big enough to be a meaningful demo (about 7M parameters), fast on a CPU."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_demo_model(dest: Path) -> Path:
    """Write the demo model and tokenizer into ``dest`` (created); returns ``dest``."""
    tokenizer = train_bpe_tokenizer(demo_corpus(), DEMO_VOCAB)
    config = demo_config(len(tokenizer))
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(DEMO_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "norm" in name:
                param.fill_(1.0)
            else:
                # A wide LM head keeps greedy choices away from near ties.
                std = 1.0 if name.startswith("lm_head") else 0.05
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def demo_model_dir(cache_dir: Path) -> Path:
    """Where the demo model lives under ``cache_dir``."""
    return cache_dir / "models" / f"{DEMO_NAME}-v{DEMO_VERSION}"


def ensure_demo_model(cache_dir: Path) -> Path:
    """The demo model dir under ``cache_dir``, built first if it is not there yet.

    Built in a temp dir and renamed into place, so a crash mid-build leaves no half model and two
    processes building at once both end up with one complete copy.
    """
    target = demo_model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_demo_model(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
