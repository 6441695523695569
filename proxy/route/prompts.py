"""The router's view of a request's prompt: the same chained block hashes the replicas compute.

The router loads no weights. It takes the tokenizer files, block size and model fingerprint from
a replica (``GET /v1/cache/info``) and renders prompts with the replicas' own code (the chat
template through ``ChatPlanner``, Anthropic conversations through ``MessagesPlanner``, plain
prompts through ``ChatTemplate.encode_plain``), so a prompt's hashes here equal the ones the
replica that serves it stores, tenant and ``cache_salt`` included.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from transformers import AutoTokenizer

from cache_store.hashing import FORMAT_VERSION, block_hashes, namespace_hash
from model_runner.chat_template import ChatTemplate
from proxy.anthropic.plan import MessagesPlanner
from proxy.anthropic.schemas import CountTokensRequest, MessagesRequest
from proxy.auth import OPEN_ACCESS, KeyTable
from proxy.chat_plan import ChatPlanner
from proxy.errors import InvalidRequest
from proxy.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    PinCreateRequest,
    WarmupItem,
    WarmupRequest,
)

log = logging.getLogger("kvproxy.route")

MAX_TOKENIZER_FILE_BYTES = 64 << 20
"""A replica's answer is untrusted input too: no tokenizer file is larger than this."""


class ReplicaInfoError(ValueError):
    """A replica's ``/v1/cache/info`` answer is unusable (the message says why)."""


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica serves, as its ``GET /v1/cache/info`` says."""

    model: str
    fingerprint: str
    block_size: int
    max_context: int
    format_version: int
    tokenizer_files: Mapping[str, bytes]
    keep_billing_header: bool = False
    events_stream: str | None = None
    epoch: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> ReplicaInfo:
        if not isinstance(data, dict):
            raise ReplicaInfoError("the info answer is not a JSON object")
        try:
            files = {}
            for name, encoded in dict(data["tokenizer_files"]).items():
                if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                    raise ReplicaInfoError(f"bad tokenizer file name {name!r}")
                raw = base64.b64decode(encoded, validate=True)
                if len(raw) > MAX_TOKENIZER_FILE_BYTES:
                    raise ReplicaInfoError(f"tokenizer file {name} is too large")
                files[name] = raw
            events = data.get("events") or {}
            info = cls(
                model=str(data["model"]),
                fingerprint=str(data["fingerprint"]),
                block_size=int(data["block_size"]),
                max_context=int(data["max_context"]),
                format_version=int(data["format_version"]),
                tokenizer_files=files,
                keep_billing_header=bool(data.get("keep_billing_header", False)),
                events_stream=str(events["stream"]) if events.get("stream") else None,
                epoch=str(events["epoch"]) if events.get("epoch") else None,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            if isinstance(exc, ReplicaInfoError):
                raise
            raise ReplicaInfoError(
                f"the info answer is malformed ({exc.__class__.__name__}: {exc})"
            ) from None
        if info.block_size < 1:
            raise ReplicaInfoError("the info answer has no valid block size")
        return info

    def same_cache(self, other: ReplicaInfo) -> str | None:
        """Why a replica serving ``other`` cannot share this one's blocks, or ``None``."""
        if other.fingerprint != self.fingerprint:
            return f"model fingerprint {other.fingerprint[:12]} differs from {self.fingerprint[:12]}"
        if other.block_size != self.block_size:
            return f"block size {other.block_size} differs from {self.block_size}"
        if other.format_version != self.format_version:
            return f"record format {other.format_version} differs from {self.format_version}"
        return None


class PromptHasher:
    """Request body -> block hashes, exactly as the replica serving it will compute them."""

    def __init__(self, info: ReplicaInfo, workdir: Path, keys: KeyTable | None = None) -> None:
        if info.format_version != FORMAT_VERSION:
            raise ReplicaInfoError(
                f"the replica writes record format {info.format_version}, this router knows {FORMAT_VERSION}"
            )
        if not info.tokenizer_files:
            raise ReplicaInfoError("the replica's info answer has no tokenizer files")
        self.info = info
        self.block_size = info.block_size
        workdir.mkdir(parents=True, exist_ok=True)
        for name, raw in info.tokenizer_files.items():
            (workdir / name).write_bytes(raw)
        tokenizer = AutoTokenizer.from_pretrained(str(workdir))
        self.template = ChatTemplate(tokenizer)
        self._chat = ChatPlanner(self.template)
        self._messages = MessagesPlanner(
            self._chat, keep_billing_header=info.keep_billing_header, sampling_defaults=(1.0, 1.0, 0)
        )
        self._keys = keys

    def tenant(self, api_key: str | None) -> str | None:
        """The caller's tenant (``None``: a key the replicas will refuse; route it anywhere)."""
        if self._keys is None:
            return OPEN_ACCESS.tenant
        principal = self._keys.lookup(api_key.strip()) if api_key else None
        return principal.tenant if principal is not None else None

    def _admin(self, api_key: str | None) -> bool:
        if self._keys is None:
            return True
        principal = self._keys.lookup(api_key.strip()) if api_key else None
        return principal is not None and principal.admin

    def prompt_ids(self, route: str, body: Mapping[str, Any]) -> tuple[list[int], str] | None:
        """The prompt's token ids and its ``cache_salt``; ``None`` when the body is not one the
        replica would serve (it answers the client's error itself)."""
        try:
            if route == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(body)
                return self._chat.prompt_ids(chat), chat.cache_salt or ""
            if route == "/v1/completions":
                completion = CompletionRequest.model_validate(body)
                return self.template.encode_plain(completion.prompt_text()), completion.cache_salt or ""
            if route == "/v1/messages":
                conv = MessagesRequest.model_validate(body)
                return self._messages.prompt_ids(conv), conv.cache_salt or ""
            if route == "/v1/messages/count_tokens":
                counted = CountTokensRequest.model_validate(body)
                return self._messages.prompt_ids(counted), counted.cache_salt or ""
            if route in ("/v1/cache/warmup", "/v1/cache/pins"):
                # Warmup: routed by its first item (the whole request goes to one replica).
                item: WarmupItem
                if route == "/v1/cache/warmup":
                    item = WarmupRequest.model_validate(body).items[0]
                else:
                    item = PinCreateRequest.model_validate(body)
                salt = str(body.get("cache_salt") or "")
                if item.messages is not None:
                    chat = ChatCompletionRequest(model=self.info.model, messages=item.messages)
                    return self._chat.prompt_ids(chat), salt
                return self.template.encode_plain(item.prompt or ""), salt
        except (ValidationError, InvalidRequest, ValueError, TypeError) as exc:
            log.debug("cannot render the prompt of a %s request: %s", route, exc)
        return None

    def hashes(self, route: str, body: Mapping[str, Any], api_key: str | None) -> list[bytes] | None:
        """The chained hashes of the prompt's full blocks (``None``: cannot tell)."""
        tenant = self.tenant(api_key)
        if route.startswith("/v1/cache/") and isinstance(body.get("tenant"), str) and self._admin(api_key):
            tenant = body["tenant"]  # an operator warms or pins for a tenant
        rendered = self.prompt_ids(route, body)
        if tenant is None or rendered is None:
            return None
        ids, salt = rendered
        namespace = namespace_hash(
            model_fingerprint=self.info.fingerprint,
            block_size=self.block_size,
            tenant=tenant,
            cache_salt=salt,
        )
        return block_hashes(ids, self.block_size, namespace)
