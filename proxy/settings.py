"""`kvproxy serve` options as one validated settings object (pydantic-settings at the edge).

Every option is also an environment variable ``KVPROXY_<NAME>`` (``--block-size`` is
``KVPROXY_BLOCK_SIZE``). The CLI passes only the options the user gave, so a command-line flag
beats the environment, which beats the defaults. Nothing here runs at import time: settings are
built by the CLI (or a test) when it needs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model_runner.paths import default_cache_dir

_UNITS: Mapping[str, int] = MappingProxyType(
    {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "m": 1000**2,
        "mb": 1000**2,
        "g": 1000**3,
        "gb": 1000**3,
        "t": 1000**4,
        "tb": 1000**4,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
        "tib": 1024**4,
    }
)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes from ``1048576``, ``"512MiB"``, ``"4GiB"``, ``"10GB"`` (binary and decimal units)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like 512MiB")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if match is None:
            raise ValueError(f"not a size: {value!r} (use bytes or a unit such as 512MiB, 4GiB)")
        number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    size = int(number * _UNITS[unit])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def format_size(nbytes: int) -> str:
    """``1073741824`` -> ``"1GiB"``; for the startup summary and the stats table."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor:
            value = nbytes / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes}B"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, the summary and /health)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def default_disk_dir() -> Path:
    """``<user cache dir>/kvproxy/blocks`` (``KVPROXY_CACHE_DIR`` moves the whole cache dir)."""
    return default_cache_dir() / "blocks"


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class ServeSettings(BaseSettings):
    """Everything `kvproxy serve` (and the offline `kvproxy warmup`) can be told."""

    model_config = SettingsConfigDict(
        env_prefix="KVPROXY_", frozen=True, extra="forbid", protected_namespaces=()
    )

    model: str | None = Field(default=None, description="HF model id or path; none serves `demo`")
    served_model_name: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Names clients may send for the one served model (aliases: agents hard-code theirs)."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    block_size: int = Field(default=64, ge=1, le=65536)
    memory_bytes: Size = 1024**3
    no_memory_reserve: bool = False
    no_history_warming: bool = False
    disk_dir: Path = Field(default_factory=default_disk_dir)
    no_disk: bool = False
    disk_bytes: Size = 10 * 1024**3
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_prefix: str = "kvp:v1:"
    redis_ttl: int | None = Field(default=None, ge=1)
    store_timeout_ms: int = Field(default=200, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    max_queue: int = Field(default=64, ge=1)
    max_context: int | None = Field(default=None, ge=2)
    default_max_tokens: int = Field(default=256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    api_keys: Path | None = None
    max_batch: int | None = Field(default=None, ge=1, le=4096)
    max_batch_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    kv_budget_bytes: Annotated[int, BeforeValidator(parse_size), Field(ge=1)] | None = None
    max_pinned_bytes: Size | None = None
    """What cache breakpoints and pins may hold in memory (default: half of --memory-bytes)."""
    max_pinned_tenant_share: float = Field(default=0.5, gt=0.0, le=1.0)
    """The share of --max-pinned-bytes one tenant's pins may take."""
    keep_billing_header: bool = False

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # DELETE /v1/cache scans `<prefix>*`: an empty prefix would wipe every key in the database.
        if not value:
            raise ValueError("must not be empty")
        if any(ch in value for ch in "*?[]"):
            raise ValueError("must not contain glob characters (* ? [ ])")
        return value

    @field_validator("model")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value: str | list[str] | None) -> list[str]:
        # One flag per name on the command line; a comma-separated list in the environment.
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        names = [name.strip() for item in items for name in str(item).split(",")]
        return list(dict.fromkeys(name for name in names if name))

    @model_validator(mode="after")
    def _check_pinned_bytes(self) -> ServeSettings:
        if self.max_pinned_bytes is not None and self.max_pinned_bytes > self.memory_bytes:
            raise ValueError(
                f"max_pinned_bytes ({format_size(self.max_pinned_bytes)}) cannot exceed memory_bytes "
                f"({format_size(self.memory_bytes)}): pins live in the memory tier"
            )
        return self

    @model_validator(mode="after")
    def _check_api_keys_file(self) -> ServeSettings:
        if self.api_keys is not None and not self.api_keys.is_file():
            raise ValueError(f"api_keys: no such file: {self.api_keys}")
        return self

    @property
    def model_name(self) -> str:
        """The served model's id: the first ``--served-model-name``, else ``--model`` as given."""
        return self.served_model_names[0]

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name a request may use for the model (``--served-model-name`` may repeat)."""
        return tuple(self.served_model_name) or (self.model or "demo",)

    @property
    def tiers(self) -> list[str]:
        tiers = ["memory"]
        if not self.no_disk:
            tiers.append("disk")
        if self.redis_url:
            tiers.append("redis")
        return tiers

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def summary(self, *, device: str, dtype: str) -> str:
        """The one-line startup summary; never shows a Redis password."""
        tiers = [f"memory {format_size(self.memory_bytes)}"]
        if not self.no_disk:
            tiers.append(f"disk {format_size(self.disk_bytes)} at {self.disk_dir}")
        if self.redis_url:
            tiers.append(f"redis {redact_url(self.redis_url)} prefix {self.redis_prefix}")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            f"kvproxy: model {self.model_name} on {device} ({dtype}), block size {self.block_size}, "
            f"tiers: {', '.join(tiers)}; listening on http://{host}:{self.port}"
        )
