"""Builders for tiny HF causal LMs (about 2 layers, hidden 64) saved to a directory.

Random weights from a transformers config plus a tokenizer trained in a second, written with
``save_pretrained`` so the real loading code is exercised. Weights come from a seeded generator
(not transformers' init) and the LM head gets a large std, so the top-1/top-2 logit margins that
the exactness tests rely on are wide instead of near ties.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import (
    AutoModelForCausalLM,
    FalconMambaConfig,
    Gemma2Config,
    Gemma3nTextConfig,
    Gemma3TextConfig,
    GPT2Config,
    GptOssConfig,
    GraniteMoeHybridConfig,
    Lfm2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3NextConfig,
)

from model_runner.tokenizer_builder import train_bpe_tokenizer

VOCAB = 384
MAX_POSITIONS = 512

_CORPUS_LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "A prefix cache stores the keys and values of tokens that many prompts share.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "Once upon a time there was a little model that learned to count: one, two, three, four.",
    "Les élèves étudient à l'école; ça coûte très cher. Grüße aus Köln!",
    "日本語のテキストも少し含めます。 中文也可以。 한국어도 조금.",
    "Emoji are four bytes: 🙂 🚀 🎉 and some symbols € £ ¥ ±.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
)


def tiny_corpus() -> list[str]:
    """Training text for the tiny tokenizers (deterministic, includes multi-byte characters)."""
    return [f"{line} {i}" for i in range(20) for line in _CORPUS_LINES]


def _common(tokenizer_vocab: int) -> dict[str, object]:
    # Untied LM head: it gets its own wide init (see init_weights).
    return {
        "vocab_size": tokenizer_vocab,  # every id the model can emit decodes
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }


def _llama(v: int) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _qwen2(v: int) -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _mistral(v: int) -> PretrainedConfig:
    # Keeps Mistral's default sliding_window (4096 >= the 512-token context): must be cached.
    return MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _gpt2(v: int) -> PretrainedConfig:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **_common(v))


def _sliding(v: int) -> PretrainedConfig:
    # A window far shorter than the context: served uncached.
    return Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        final_logit_softcapping=None,
        **_common(v),
    )


def _gemma3(v: int) -> PretrainedConfig:
    # Gemma 3: two local (sliding, own RoPE base) layers per global one; a window wider than a block.
    return Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=11,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _gptoss(v: int) -> PretrainedConfig:
    # gpt-oss: alternating windowed and full layers, attention sinks, a mixture of experts; YaRN
    # scaled 32x from a 16-token original context, as the real one is from 4096 (no warning).
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )
    config.rope_parameters["original_max_position_embeddings"] = MAX_POSITIONS // 32
    return config


def _hybrid(v: int) -> PretrainedConfig:
    # LFM2: a short-convolution (recurrent state) layer and an attention layer.
    return Lfm2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _qwen3next(v: int) -> PretrainedConfig:
    # Qwen3-Next: three gated delta-net layers (convolution + linear-attention state) per gated
    # full-attention one, a mixture of experts.
    return Qwen3NextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _granitehybrid(v: int) -> PretrainedConfig:
    # Granite 4 hybrid: a Mamba-2 layer and an attention layer.
    return GraniteMoeHybridConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_expand=2,
        num_local_experts=0,
        shared_intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


def _falconmamba(v: int) -> PretrainedConfig:
    # FalconMamba: a pure state-space model (no attention; Mamba-1 scan).
    return FalconMambaConfig(
        hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, **_common(v)
    )


def _kvshared(v: int) -> PretrainedConfig:
    # Gemma 3n: its last layers read the K/V of earlier ones (served uncached, with the reason).
    return Gemma3nTextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_kv_shared_layers=2,
        sliding_window=MAX_POSITIONS,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=v,
        laurel_rank=8,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4,
        max_position_embeddings=MAX_POSITIONS,
        **_common(v),
    )


TINY_MODELS: MappingProxyType[str, Callable[[int], PretrainedConfig]] = MappingProxyType(
    {
        "llama": _llama,
        "qwen2": _qwen2,
        "mistral": _mistral,
        "gpt2": _gpt2,
        "sliding": _sliding,
        "gemma3": _gemma3,
        "gptoss": _gptoss,
        "hybrid": _hybrid,
        "qwen3next": _qwen3next,
        "granitehybrid": _granitehybrid,
        "falconmamba": _falconmamba,
        "kvshared": _kvshared,
    }
)
"""Name -> config factory (taking the tokenizer's vocabulary size)."""


def init_weights(model: torch.nn.Module, *, seed: int, std: float = 0.08, head_std: float = 0.3) -> None:
    """Deterministic weights: norms at 1, biases at 0, the rest normal(0, std); the LM head wider."""
    gen = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param is head_weight:
                param.copy_(torch.randn(param.shape, generator=gen) * head_std)
            elif (param.ndim == 1 and "norm" in name) or name.endswith(
                ("ln_1.weight", "ln_2.weight", "ln_f.weight")
            ):
                # Gemma's RMSNorm scales by (1 + weight): 0 there is the identity (Gemma 3n's by weight).
                one_plus = "Gemma" in type(model).__name__ and "Gemma3n" not in type(model).__name__
                param.fill_(0.0 if one_plus else 1.0)
            elif param.ndim == 1 and name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_tiny_model(kind: str, dest: Path, *, seed: int = 0, max_positions: int | None = None) -> Path:
    """Build the tiny model ``kind`` (a key of ``TINY_MODELS``) into ``dest`` and return it;
    ``max_positions`` widens the context (tool schemas cost the tiny tokenizer many tokens)."""
    if kind not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {kind!r}; choose from {sorted(TINY_MODELS)}")
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(tiny_corpus(), VOCAB)
    config = TINY_MODELS[kind](len(tokenizer))
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
