"""`kvproxy route`: build the router from its settings and run it.

At start the router asks the replicas what they serve (``GET /v1/cache/info`` with
``--replica-api-key``) until one answers: its tokenizer files (or the ones under ``--model``),
block size and model fingerprint become the router's, and every replica whose answer differs is
refused (a clear log line; it never gets a request), since its block hashes would not match.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import httpx

from cache_store.redis_store import RedisStore
from proxy.auth import KeyTable
from proxy.route.feed import EventFeed
from proxy.route.prompts import PromptHasher, ReplicaInfo, ReplicaInfoError
from proxy.route.scoring import CachePicker
from proxy.route.settings import RouteSettings

log = logging.getLogger("kvproxy.route")

INFO_RETRY_S = 1.0
_TOKENIZER_NAMES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")


def admin_headers(settings: RouteSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.replica_api_key}"} if settings.replica_api_key else {}


def fetch_info(url: str, headers: dict[str, str], timeout_s: float = 10.0) -> ReplicaInfo:
    """One replica's info answer (raises ``ReplicaInfoError`` / ``httpx.HTTPError``)."""
    response = httpx.get(url.rstrip("/") + "/v1/cache/info", headers=headers, timeout=timeout_s)
    if response.status_code in (401, 403):
        raise ReplicaInfoError(
            f"{url} refused /v1/cache/info ({response.status_code}): give an admin key of the "
            "replicas with --replica-api-key"
        )
    response.raise_for_status()
    return ReplicaInfo.from_json(response.json())


def local_tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    files = {
        p.name: p.read_bytes()
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name.startswith(_TOKENIZER_NAMES)
    }
    if not files:
        raise ReplicaInfoError(f"--model {model_dir}: no tokenizer files there")
    return files


def reference_info(settings: RouteSettings, wait_s: float) -> ReplicaInfo:
    """The first replica's info (retried until ``wait_s``), tokenizer from ``--model`` if given."""
    headers = admin_headers(settings)
    deadline = time.monotonic() + wait_s
    while True:
        for url in settings.replica:
            try:
                info = fetch_info(url, headers)
            except ReplicaInfoError:
                raise
            except (httpx.HTTPError, ValueError) as exc:
                log.info("replica %s not ready yet (%s)", url, exc.__class__.__name__)
                continue
            if settings.model is not None:
                info = ReplicaInfo(
                    model=info.model,
                    fingerprint=info.fingerprint,
                    block_size=info.block_size,
                    max_context=info.max_context,
                    format_version=info.format_version,
                    tokenizer_files=local_tokenizer_files(settings.model),
                    keep_billing_header=info.keep_billing_header,
                )
            log.info(
                "routing for %s (block size %d, fingerprint %s) from %s",
                info.model,
                info.block_size,
                info.fingerprint[:12],
                url,
            )
            return info
        if time.monotonic() >= deadline:
            raise ReplicaInfoError(f"no replica answered /v1/cache/info within {wait_s:.0f}s")
        time.sleep(INFO_RETRY_S)


def build_picker(settings: RouteSettings, info: ReplicaInfo, workdir: Path) -> tuple[CachePicker, EventFeed]:
    keys = KeyTable.from_file(settings.api_keys) if settings.api_keys else None
    hasher = PromptHasher(info, workdir, keys)
    feed = EventFeed(
        settings.replica,
        settings.redis_url,
        cluster=settings.redis_cluster,
        admin_headers=admin_headers(settings),
        reference=info,
    )
    shared = None
    if settings.redis_url is not None:
        shared = RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout_ms=settings.store_timeout_ms,
            cluster=settings.redis_cluster,
        )
    return CachePicker(hasher, feed, shared, settings.weights()), feed


def run(settings: RouteSettings, *, wait_s: float = 120.0) -> int:
    import uvicorn

    from proxy.route.app import create_route_app
    from proxy.route.replicas import Replicas

    if not settings.replica:
        raise ReplicaInfoError("give at least one --replica URL")
    info = reference_info(settings, wait_s)
    with tempfile.TemporaryDirectory(prefix="kvproxy-route-") as tmp:
        picker, feed = build_picker(settings, info, Path(tmp))
        replicas = Replicas(settings.replica, health_interval_s=settings.health_interval_s)
        feed.refuse_with(replicas.refuse)
        feed.start()
        app = create_route_app(replicas, picker)
        try:
            uvicorn.Server(
                uvicorn.Config(
                    app, host=settings.host, port=settings.port, log_level="warning", access_log=False
                )
            ).run()
        finally:
            feed.close()
    return 0
