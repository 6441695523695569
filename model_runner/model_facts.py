"""What the engine reads off a loaded model once: its end-of-sequence ids and its cache layer kinds."""

from __future__ import annotations

from typing import Any

from model_runner import capability
from model_runner.loading import LoadedModel


def eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """The ids that end a generation: the generation config's and the tokenizer's (int or list)."""
    ids: set[int] = set()
    candidates: list[Any] = [
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
        getattr(loaded.tokenizer, "eos_token_id", None),
    ]
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def layer_kinds(config: Any) -> list[str]:
    """The cache layer kinds of a model config (``capability``), or [] when they cannot be told."""
    try:
        return [k.kind for k in capability.cache_layer_kinds(config)]
    except (ValueError, TypeError, AttributeError, KeyError):
        return []


def sampling_defaults(loaded: LoadedModel) -> tuple[float, float, int]:
    """``(temperature, top_p, top_k)`` from the model's generation config: what a request that
    sets none of them gets where the API leaves the defaults to the model (Anthropic's). A config
    that does not sample (``do_sample`` false, transformers' default) means greedy."""
    config = getattr(loaded.model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return 0.0, 1.0, 0
    temperature = getattr(config, "temperature", None)
    top_p = getattr(config, "top_p", None)
    top_k = getattr(config, "top_k", None)
    return (
        float(temperature) if temperature is not None else 1.0,
        float(top_p) if top_p is not None else 1.0,
        int(top_k) if top_k is not None else 0,
    )
