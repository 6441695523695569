"""`kvproxy route` options (pydantic-settings: every option is also ``KVPROXY_ROUTE_<NAME>``,
except the ones it shares with `kvproxy serve`, which keep their ``KVPROXY_<NAME>`` names so one
environment configures both: redis_url, redis_cluster, redis_prefix, api_keys, store_timeout_ms)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from proxy.route.scoring import RouteWeights

_W = RouteWeights()

HELP = {
    "replica": "base URL of a `kvproxy serve` replica; repeat it for each one",
    "replica_api_key": "an admin key of the replicas (the router reads their info and block snapshots)",
    "model": "local model dir whose tokenizer and chat template the router uses (default: fetched "
    "from a replica)",
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to bind (default 8080)",
    "api_keys": "the replicas' `KEY TENANT [admin]` file: the router hashes each tenant's prompts as they do",
    "redis_url": "the replicas' shared Redis: their block events and the shared tier",
    "redis_cluster": "the Redis URL names a Redis Cluster",
    "redis_prefix": "the replicas' --redis-prefix (default kvp:v1:)",
    "store_timeout_ms": "bound on every Redis call (default 200)",
    "health_interval_s": "seconds between health probes of each replica (default 1)",
    "restore_weight": "cost of a block restored from disk/Redis against a recomputed one "
    f"(default {_W.restore_weight})",
    "load_weight": f"prefill blocks one in-flight request is worth (default {_W.load_weight})",
    "imbalance_abs": "requests more than the least loaded replica that make one swamped "
    f"(default {_W.imbalance_abs})",
    "imbalance_rel": f"... and how many times its load (default {_W.imbalance_rel})",
    "soon_ttl_s": f"seconds a routed prefix counts as in its replica's memory (default {_W.soon_ttl_s})",
    "approx_ttl_s": "seconds a routed prefix is remembered when there are no block events "
    f"(default {_W.approx_ttl_s})",
    "prefill_ttl_s": "seconds a routed request's blocks count as prefill queued on its replica until it "
    f"answers (default {_W.prefill_ttl_s})",
    "shared_check_blocks": "blocks looked up in Redis per request, at most "
    f"(default {_W.shared_check_blocks})",
}


def _shared(name: str) -> AliasChoices:
    # Only the prefixed name from the environment (a bare REDIS_URL must not configure us); the
    # CLI passes field names (populate_by_name).
    return AliasChoices(f"KVPROXY_{name.upper()}")


class RouteSettings(BaseSettings):
    """Everything `kvproxy route` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="KVPROXY_ROUTE_",
        frozen=True,
        extra="forbid",
        protected_namespaces=(),
        populate_by_name=True,
    )

    replica: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Base URLs of the `kvproxy serve` replicas (repeat the flag; comma-separated in the env)."""
    replica_api_key: str | None = None
    """An admin key of the replicas: the router reads their info and block snapshots with it."""
    model: Path | None = None
    """A local model dir with the replicas' tokenizer (default: fetched from a replica)."""
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_keys: Path | None = Field(default=None, validation_alias=_shared("api_keys"))
    redis_url: str | None = Field(default=None, validation_alias=_shared("redis_url"))
    redis_cluster: bool = Field(default=False, validation_alias=_shared("redis_cluster"))
    redis_prefix: str = Field(default="kvp:v1:", validation_alias=_shared("redis_prefix"))
    store_timeout_ms: int = Field(default=200, ge=1, validation_alias=_shared("store_timeout_ms"))
    health_interval_s: float = Field(default=1.0, gt=0)
    restore_weight: float = Field(default=_W.restore_weight, ge=0)
    load_weight: float = Field(default=_W.load_weight, ge=0)
    imbalance_abs: int = Field(default=_W.imbalance_abs, ge=0)
    imbalance_rel: float = Field(default=_W.imbalance_rel, ge=1.0)
    soon_ttl_s: float = Field(default=_W.soon_ttl_s, ge=0)
    approx_ttl_s: float = Field(default=_W.approx_ttl_s, ge=0)
    prefill_ttl_s: float = Field(default=_W.prefill_ttl_s, ge=0)
    shared_check_blocks: int = Field(default=_W.shared_check_blocks, ge=0, le=100_000)

    @field_validator("replica", mode="before")
    @classmethod
    def _replicas(cls, value: str | list[str] | None) -> list[str]:
        items = [value] if isinstance(value, str) else list(value or [])
        urls = [u.strip().rstrip("/") for item in items for u in str(item).split(",") if u.strip()]
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                raise ValueError(f"not an http(s) URL: {url!r}")
        return list(dict.fromkeys(urls))

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if urlsplit(value).scheme not in ("redis", "rediss"):
            raise ValueError("must start with redis:// or rediss://")
        return value

    def weights(self) -> RouteWeights:
        return RouteWeights(
            restore_weight=self.restore_weight,
            load_weight=self.load_weight,
            imbalance_abs=self.imbalance_abs,
            imbalance_rel=self.imbalance_rel,
            soon_ttl_s=self.soon_ttl_s,
            approx_ttl_s=self.approx_ttl_s,
            prefill_ttl_s=self.prefill_ttl_s,
            shared_check_blocks=self.shared_check_blocks,
        )
