"""Which models can be prefix-cached, judged from the Cache layers transformers builds for them.

A restored prefix is exact only when every layer keeps, per token, K/V that depend on nothing
but the tokens before it, and keeps all of them. We ask the installed transformers which cache
layer each decoder layer gets (``DynamicCache(config=...)``) instead of keeping a list of model
names: full attention (``DynamicLayer``) is cacheable; a sliding window counts as full attention
when it is at least the served context (nothing ever slides out); recurrent / linear-attention
state, KV-shared layers, other layer kinds and encoder-decoder models are not.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin


@dataclass(frozen=True)
class LayerKind:
    """One decoder layer as its cache sees it: ``full``, ``sliding`` (with its window),
    ``linear`` (recurrent/convolution state), ``shared`` (reads another layer's K/V) or
    ``other``, with the transformers class name that decided it."""

    kind: str
    cache_class: str
    window: int | None = None


@dataclass(frozen=True)
class CacheSupport:
    """Whether prefix caching is exact for a model at a given context, and why not if not."""

    cacheable: bool
    reason: str
    layers: tuple[LayerKind, ...]


def cache_layer_kinds(config: PretrainedConfig) -> tuple[LayerKind, ...]:
    """The kind of each decoder layer's cache, from ``DynamicCache(config=config)``."""
    cache = DynamicCache(config=config)
    kinds: list[LayerKind] = []
    for layer, is_linear, is_dummy in zip(cache.layers, cache.is_linear, cache.is_dummy, strict=True):
        name = type(layer).__name__
        if is_dummy:
            kinds.append(LayerKind("shared", name))
        elif is_linear or isinstance(layer, LinearAttentionCacheLayerMixin):
            # Hybrid layers (linear state + attention) are linear too: the state cannot be sliced.
            kinds.append(LayerKind("linear", name))
        elif type(layer) is DynamicSlidingWindowLayer:
            kinds.append(LayerKind("sliding", name, int(layer.sliding_window)))
        elif type(layer) is DynamicLayer:
            kinds.append(LayerKind("full", name))
        else:
            kinds.append(LayerKind("other", name))
    return tuple(kinds)


def sliding_windows(config: PretrainedConfig) -> list[int]:
    """The sliding windows of the model's layers (empty when none slides)."""
    try:
        return [k.window for k in cache_layer_kinds(config) if k.kind == "sliding" and k.window is not None]
    except (ValueError, TypeError, AttributeError, KeyError):
        return []


def analyze_cache_support(config: PretrainedConfig, max_context: int) -> CacheSupport:
    """Decide whether a model with ``config``, served up to ``max_context`` tokens, can be
    prefix-cached exactly."""
    if getattr(config, "is_encoder_decoder", False):
        return CacheSupport(False, "encoder-decoder models are not prefix-cached", ())
    try:
        layers = cache_layer_kinds(config)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return CacheSupport(False, f"cache layout unknown for this model ({type(exc).__name__})", ())
    if not layers:
        return CacheSupport(False, "transformers builds no per-layer cache for this model", ())
    for index, layer in enumerate(layers):
        if layer.kind == "full":
            continue
        if layer.kind == "sliding" and layer.window is not None and layer.window >= max_context:
            continue
        return CacheSupport(False, _why_not(index, layer, max_context), layers)
    return CacheSupport(True, "every layer keeps full-attention K/V", layers)


def _why_not(index: int, layer: LayerKind, max_context: int) -> str:
    if layer.kind == "sliding":
        return (
            f"layer {index} uses a {layer.window}-token sliding window, shorter than the "
            f"{max_context}-token context"
        )
    if layer.kind == "linear":
        return (
            f"layer {index} keeps recurrent/linear-attention state ({layer.cache_class}), "
            "which cannot be sliced per token"
        )
    if layer.kind == "shared":
        return f"layer {index} shares another layer's K/V"
    return f"layer {index} uses an unsupported cache layer ({layer.cache_class})"
