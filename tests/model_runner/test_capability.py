"""Cacheability comes from the cache layer types transformers builds, not from model names."""

from __future__ import annotations

import pytest
from transformers import (
    FalconMambaConfig,
    Gemma2Config,
    Gemma3nTextConfig,
    GPT2Config,
    Lfm2Config,
    LlamaConfig,
    MistralConfig,
    NemotronHConfig,
    PretrainedConfig,
    Qwen2Config,
    T5Config,
    Zamba2Config,
)

from model_runner.capability import analyze_cache_support, cache_layer_kinds
from model_runner.loading import default_context


@pytest.mark.parametrize(
    ("config", "context", "cacheable", "reason_has"),
    [
        (LlamaConfig(num_hidden_layers=2), 2048, True, "full-attention"),
        (GPT2Config(n_layer=2), 1024, True, "full-attention"),
        (Qwen2Config(num_hidden_layers=2), 32768, True, "full-attention"),
        # Mistral's default window (4096) at a context it covers: full attention in effect.
        (MistralConfig(num_hidden_layers=2), 4096, True, "full-attention"),
        (MistralConfig(num_hidden_layers=2), 4097, False, "4096-token sliding window"),
        (
            Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64, max_window_layers=1),
            32768,
            False,
            "sliding",
        ),
        (Gemma2Config(num_hidden_layers=2), 8192, False, "sliding window"),
        # Recurrent state is cached at block boundaries (LFM2 convolution, Mamba, gated delta-net).
        (
            Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
            4096,
            True,
            "1 recurrent layer",
        ),
        (FalconMambaConfig(num_hidden_layers=2), 4096, True, "2 recurrent layer"),
        # Nemotron-H: MLP-only layers keep no cache at all.
        (
            NemotronHConfig(num_hidden_layers=3, layers_block_type=["mamba", "attention", "mlp"]),
            4096,
            True,
            "1 layer(s) keep no cache",
        ),
        # Zamba2: a hybrid layer keeps state and K/V.
        (
            Zamba2Config(num_hidden_layers=2, layers_block_type=["mamba", "hybrid"]),
            4096,
            True,
            "1 hybrid layer",
        ),
        # Gemma 3n: layers that read another layer's K/V.
        (
            Gemma3nTextConfig(num_hidden_layers=4, num_kv_shared_layers=2, sliding_window=8192),
            4096,
            False,
            "shares another",
        ),
        (T5Config(num_layers=2), 512, False, "encoder-decoder"),
    ],
)
def test_cache_support_table(
    config: PretrainedConfig, context: int, cacheable: bool, reason_has: str
) -> None:
    support = analyze_cache_support(config, context)
    assert support.cacheable is cacheable
    assert reason_has in support.reason


def test_layer_kinds_name_the_transformers_classes() -> None:
    kinds = cache_layer_kinds(Gemma2Config(num_hidden_layers=2, sliding_window=16))
    assert [(k.kind, k.cache_class, k.window) for k in kinds] == [
        ("sliding", "DynamicSlidingWindowLayer", 16),
        ("full", "DynamicLayer", None),
    ]


def test_default_context_caps_a_uniform_sliding_window_so_mistral_is_cached() -> None:
    config = MistralConfig(num_hidden_layers=2)  # window 4096, 131072 positions
    context, note = default_context(config, 131072)
    assert context == 4096 and "sliding window" in note
    assert analyze_cache_support(config, context).cacheable


def test_default_context_leaves_mixed_models_alone() -> None:
    config = Gemma2Config(num_hidden_layers=2)
    assert default_context(config, 8192) == (8192, "")
    assert default_context(LlamaConfig(num_hidden_layers=2), 2048) == (2048, "")
