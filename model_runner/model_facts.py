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
