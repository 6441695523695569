"""The batching bench's model: random Qwen2-style weights built in code (no hub), saved to a dir.

8 layers, hidden 512, 8 query / 2 KV heads (GQA), intermediate 1408, float32 weights; the vocabulary
is the bench tokenizer's (``model_runner.tokenizer_builder``: byte-level BPE with ChatML, trained on
pseudo words, 8192 tokens). The EOS row of ``lm_head`` is zeroed so greedy decoding never stops
early: every answer runs to ``max_tokens`` in every arm, so arms generate the same token counts.
The same builder as the other benches' Llama-style model (``model_runner_bench``), as Qwen2.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.model_runner_bench import build_bench_model

BATCH_MODEL = "bench-qwen2-8x512"


def build_qwen_model(dest: Path, seed: int = 0) -> Path:
    """Write the model and its tokenizer to ``dest`` (deterministic for a seed); returns ``dest``."""
    return build_bench_model(dest, seed, Qwen2Config, Qwen2ForCausalLM, use_sliding_window=False)
