"""Which models can be prefix-cached, judged from the Cache layers transformers builds for them.

A restored prefix is exact only when every layer keeps, per token, K/V that depend on nothing
but the tokens before it, and keeps all of them. We ask the installed transformers which cache
layer each decoder layer gets (``DynamicCache(config=...)``) instead of keeping a list of model
names: full attention (``DynamicLayer``) is cacheable; a sliding window counts as full attention
when it is at least the served context (nothing ever slides out), and on the engine's packed path
(``packed_reason`` is ``None``) at any size: there every token's K/V of every layer stays in the
request's buffers and the window is only a mask. Recurrent / linear-attention state, KV-shared
layers, other layer kinds and encoder-decoder models are not cacheable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
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


def analyze_cache_support(
    config: PretrainedConfig, max_context: int, *, keeps_every_token: bool = False
) -> CacheSupport:
    """Decide whether a model with ``config``, served up to ``max_context`` tokens, can be
    prefix-cached exactly. ``keeps_every_token``: the model runs on the packed path, whose
    per-request K/V holds every token of every layer (a sliding window is a mask there, nothing
    slides out), so sliding layers are cached whole like full ones."""
    if getattr(config, "is_encoder_decoder", False):
        return CacheSupport(False, "encoder-decoder models are not prefix-cached", ())
    try:
        layers = cache_layer_kinds(config)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return CacheSupport(False, f"cache layout unknown for this model ({type(exc).__name__})", ())
    if not layers:
        return CacheSupport(False, "transformers builds no per-layer cache for this model", ())
    sliding = 0
    for index, layer in enumerate(layers):
        if layer.kind == "full":
            continue
        if layer.kind == "sliding" and layer.window is not None and layer.window >= max_context:
            continue
        if layer.kind == "sliding" and keeps_every_token:
            sliding += 1
            continue
        return CacheSupport(False, _why_not(index, layer, max_context), layers)
    if sliding:
        return CacheSupport(
            True,
            f"{sliding} sliding-window layer(s) cached whole beside {len(layers) - sliding} full-attention "
            "layer(s) (the packed path keeps every token's K/V; the window is a mask)",
            layers,
        )
    return CacheSupport(True, "every layer keeps full-attention K/V", layers)


def packed_reason(model: PreTrainedModel, layer_kinds: Sequence[str]) -> str | None:
    """Why ``model`` cannot take the engine's packed path (``None`` when it can): the packed path
    drives every layer through ``model_runner.attention``, which keeps every token's K/V."""
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route its attention through transformers' AttentionInterface"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models run one request at a time"
    odd = sorted({k for k in layer_kinds if k not in ("full", "sliding")})
    if odd or not layer_kinds:
        return f"layers of kind {', '.join(odd) or 'unknown'} read a packed batch as one sequence"
    return None


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
