"""The batching bench's model: random Qwen2-style weights built in code (no hub), saved to a dir.

8 layers, hidden 512, 8 query / 2 KV heads (GQA), intermediate 1408, float32 weights; the vocabulary
is the bench tokenizer's (``model_runner.tokenizer_builder``: byte-level BPE with ChatML, trained on
pseudo words, 8192 tokens). The EOS row of ``lm_head`` is zeroed so greedy decoding never stops
early: every answer runs to ``max_tokens`` in every arm, so arms generate the same token counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from model_runner.tokenizer_builder import pseudo_word_corpus, train_bpe_tokenizer

BATCH_MODEL = "bench-qwen2-8x512"


def build_qwen_model(dest: Path, seed: int = 0) -> Path:
    """Write the model and its tokenizer to ``dest`` (deterministic for a seed); returns ``dest``."""
    tokenizer = train_bpe_tokenizer(pseudo_word_corpus(seed, 3000), 8192)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if "lm_head" in name else 0.03))
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = 0
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
