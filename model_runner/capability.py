"""Which models can be prefix-cached, judged from the Cache layers transformers builds for them.

A restored prefix is exact when every layer gets back exactly what it kept after the prefix. We
ask the installed transformers which cache layer each decoder layer gets
(``DynamicCache(config=...)``) instead of keeping a list of model names, and cache each kind its
own way:

- full attention (``DynamicLayer``): its K/V per block;
- a sliding window: counts as full attention when it is at least the served context (nothing
  ever slides out), and on the engine's packed path (``packed_reason`` is ``None``) at any size:
  there every token's K/V of every layer stays in the request's buffers and the window is only a
  mask, so the layer is cached whole;
- recurrent state (SSM, linear attention, short convolution: ``LinearAttentionLayer``, and
  ``LinearAttentionAndFullAttentionLayer`` beside its K/V): the state after a block boundary, in
  that block's record (``recurrent``); whether the model continues a restored state exactly is
  measured when it loads;
- a layer with no cache at all (an MLP-only layer): nothing to store.

Layers that read another layer's K/V, other cache layer classes and encoder-decoder models are
served uncached, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)


@dataclass(frozen=True)
class LayerKind:
    """One decoder layer as its cache sees it: ``full``, ``sliding`` (with its window),
    ``linear`` (recurrent/convolution state), ``linear+attention`` (state and full-attention K/V
    in one layer), ``none`` (keeps nothing), ``shared`` (reads another layer's K/V) or ``other``,
    with the transformers class name that decided it."""

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
    sharing = getattr(config, "kv_sharing_modes", None) or ()
    kinds: list[LayerKind] = []
    for index, (layer, is_linear, is_dummy) in enumerate(
        zip(cache.layers, cache.is_linear, cache.is_dummy, strict=True)
    ):
        name = type(layer).__name__
        if is_dummy:
            shared = index < len(sharing) and sharing[index] == "reuse"
            kinds.append(LayerKind("shared" if shared else "none", name))
        elif type(layer) is LinearAttentionAndFullAttentionLayer:
            kinds.append(LayerKind("linear+attention", name))
        elif type(layer) is LinearAttentionLayer:
            kinds.append(LayerKind("linear", name))
        elif is_linear or isinstance(layer, LinearAttentionCacheLayerMixin):
            kinds.append(LayerKind("other", name))  # e.g. linear state beside a sliding window
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


STATE_KINDS = frozenset({"linear", "linear+attention"})
"""Layer kinds that keep recurrent state."""

_KIND_WORDS = {
    "full": "full-attention layer(s) store their K/V per block",
    "sliding": (
        "sliding-window layer(s) cached whole (the packed path keeps every token's K/V; the window is a mask)"
    ),
    "linear": "recurrent layer(s) store their state at block boundaries",
    "linear+attention": "hybrid layer(s) store K/V per block and their state at block boundaries",
    "none": "layer(s) keep no cache",
}


def analyze_cache_support(
    config: PretrainedConfig, max_context: int, *, keeps_every_token: bool = False
) -> CacheSupport:
    """Decide whether a model with ``config``, served up to ``max_context`` tokens, can be
    prefix-cached exactly, and report how each kind of layer is cached. ``keeps_every_token``:
    the model runs on the packed path, whose per-request K/V holds every token of every layer (a
    sliding window is a mask there, nothing slides out), so sliding layers are cached whole."""
    if getattr(config, "is_encoder_decoder", False):
        return CacheSupport(False, "encoder-decoder models are not prefix-cached", ())
    try:
        layers = cache_layer_kinds(config)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return CacheSupport(False, f"cache layout unknown for this model ({type(exc).__name__})", ())
    if not layers:
        return CacheSupport(False, "transformers builds no per-layer cache for this model", ())
    counts: dict[str, int] = {}
    for index, layer in enumerate(layers):
        kind = layer.kind
        if kind == "sliding" and layer.window is not None and layer.window >= max_context:
            kind = "full"  # nothing ever slides out
        elif kind == "sliding" and not keeps_every_token:
            return CacheSupport(False, _why_not(index, layer, max_context), layers)
        if kind not in _KIND_WORDS:
            return CacheSupport(False, _why_not(index, layer, max_context), layers)
        counts[kind] = counts.get(kind, 0) + 1
    if set(counts) <= {"full", "none"}:
        return CacheSupport(True, "every layer keeps full-attention K/V", layers)
    report = "; ".join(f"{counts[kind]} {_KIND_WORDS[kind]}" for kind in _KIND_WORDS if kind in counts)
    return CacheSupport(True, report, layers)


def keeps_state(support: CacheSupport) -> bool:
    """Whether some layer of the model keeps recurrent state."""
    return any(layer.kind in STATE_KINDS for layer in support.layers)


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
    if layer.kind == "shared":
        return f"layer {index} shares another layer's K/V"
    return f"layer {index} uses an unsupported cache layer ({layer.cache_class})"
