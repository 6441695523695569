"""Load a HuggingFace causal LM (hub id, local path, or the built-in ``demo``) for serving.

Everything is loaded from one local directory (a hub id is resolved to its snapshot first), so
the fingerprint is computed from exactly the files the weights and tokenizer came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from model_runner import recurrent
from model_runner.capability import (
    CacheSupport,
    analyze_cache_support,
    cache_layer_kinds,
    keeps_state,
    packed_reason,
)
from model_runner.demo import DEMO_NAME, ensure_demo_model
from model_runner.fingerprint import model_fingerprint
from model_runner.kv import cache_argument
from model_runner.paths import default_cache_dir
from model_runner.recurrent import Continuation

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_FALLBACK_CONTEXT = 2048


class LoadError(ValueError):
    """The model could not be loaded; the message says why (never a traceback for users)."""


class ModelNotFound(LoadError):
    """No such local directory, or a hub id that is neither cached nor downloadable."""


class InvalidOption(LoadError):
    """A device, dtype or context option that cannot be honoured."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve. ``cacheable``/``cache_reason``: whether prefix caching is exact
    for it at ``max_context`` (see ``capability``), and why (not)."""

    model: Any
    tokenizer: Any
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    max_context: int
    cacheable: bool
    cache_reason: str
    model_dir: Path
    state_continuation: Continuation | None = None
    """For a model with recurrent layers: how a restored state is continued ("chunk": many
    tokens per step; "token": one at a time), as measured at load (``recurrent``)."""


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if device not in DEVICES:
        raise InvalidOption(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOption("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU (CPU half precision is slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidOption(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_model_dir(model: str | None, cache_dir: Path) -> Path:
    """The local directory holding ``model``: the demo, a local path, or a hub snapshot."""
    if model is None or model == DEMO_NAME:
        return ensure_demo_model(cache_dir)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFound(f"{model!r} is not a model directory (no config.json)")
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or not model.strip():
        raise ModelNotFound(f"no model directory at {model!r}")
    return _hub_snapshot(model)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as exc:
        raise ModelNotFound(f"{repo_id!r} is neither a local directory nor a valid hub id") from exc
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot get it"
        raise ModelNotFound(f"could not fetch {repo_id!r} from the model hub ({type(exc).__name__})") from exc
    if not (local / "config.json").is_file():
        raise ModelNotFound(f"hub repo {repo_id!r} has no config.json")
    if not any(local.glob("*.safetensors")):
        raise ModelNotFound(f"hub repo {repo_id!r} has no safetensors weights")
    return local


def native_context(config: PretrainedConfig, tokenizer: Any) -> int:
    """The model's own context limit: its position table, else the tokenizer's limit."""
    text = config.get_text_config(decoder=True)
    for name in _CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return _FALLBACK_CONTEXT


def default_context(config: PretrainedConfig, native: int) -> tuple[int, str]:
    """The served context when none is asked for, with a note when it is below ``native``.

    A model whose every layer slides over the same window W (Mistral's default config) is
    served up to min(native, W): within that, sliding is full attention and the prefix cache is
    exact. Asking for a longer context serves it uncached.
    """
    try:
        kinds = cache_layer_kinds(config)
    except (ValueError, TypeError, AttributeError, KeyError):
        return native, ""
    windows = {k.window for k in kinds if k.kind == "sliding"}
    if kinds and all(k.kind == "sliding" for k in kinds) and len(windows) == 1:
        (window,) = windows
        if window is not None and window < native:
            return (
                window,
                f"context capped at the {window}-token sliding window so prefix caching stays exact",
            )
    return native, ""


def load_model(
    model: str | None,
    device: str = "auto",
    dtype: str = "auto",
    *,
    max_context: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``model`` (hub id, local dir, ``demo`` or ``None`` for the demo) for serving.

    ``max_context``: serve at most this many tokens (prompt + completion); default the model's
    own limit. ``cache_dir``: where the demo model and the fingerprint cache live (default
    ``default_cache_dir()``). Raises a ``LoadError`` subclass with a clear message.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    model_dir = resolve_model_dir(model, cache_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"could not read the config/tokenizer of {model or DEMO_NAME!r}: {exc}") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise LoadError(f"{model!r} is an encoder-decoder model; kvproxy serves causal LMs only")

    native = native_context(config, tokenizer)
    note = ""
    if max_context is None:
        max_context, note = default_context(config, native)
    elif max_context < 2 or max_context > native:
        raise InvalidOption(
            f"max_context must be between 2 and the model's limit {native}, got {max_context}"
        )
    support = analyze_cache_support(config, max_context)
    reason = f"{support.reason}; {note}" if note else support.reason

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"could not load {model or DEMO_NAME!r} as a causal LM: {exc}") from exc
    hf_model.to(torch_device)
    hf_model.train(False)  # inference mode: the same switch as Module.eval, no dropout
    if not support.cacheable and packed_reason(hf_model, [k.kind for k in support.layers]) is None:
        # Batched, every token's K/V stays in the request's buffers: sliding layers cache whole.
        support = analyze_cache_support(config, max_context, keeps_every_token=True)
        reason = f"{support.reason}; {note}" if note else support.reason

    continuation: Continuation | None = None
    if support.cacheable and keeps_state(support):
        probe = recurrent.probe_continuation(hf_model, torch_device, cache_argument(hf_model))
        continuation = probe.mode
        if probe.mode is None:
            support = CacheSupport(
                False,
                "a restored recurrent state did not continue exactly (largest logit difference "
                f"{probe.chunk_error:.2e} over many tokens, {probe.token_error:.2e} one at a time, "
                f"tolerance {probe.tolerance:.2e})",
                support.layers,
            )
            reason = f"{support.reason}; {note}" if note else support.reason
        else:
            fed = "many tokens per step" if probe.mode == "chunk" else "one token per step after a restore"
            reason = f"{reason}; a restored state continues exactly, {fed}"

    fingerprint = model_fingerprint(
        model_dir, dtype=str(torch_dtype).removeprefix("torch."), cache_file=cache_dir / "fingerprints.json"
    )
    if not support.cacheable:
        log.warning("prefix caching is off for %s: %s", model or DEMO_NAME, support.reason)
    elif any(layer.kind != "full" for layer in support.layers):
        log.info("prefix caching for %s: %s", model or DEMO_NAME, reason)
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        model_id=model or DEMO_NAME,
        device=torch_device,
        dtype=torch_dtype,
        fingerprint=fingerprint,
        max_context=max_context,
        cacheable=support.cacheable,
        cache_reason=reason,
        model_dir=model_dir,
        state_continuation=continuation,
    )
