"""What a replica tells a cache-aware router, on a real in-process server with a Redis tier: a chat
request's blocks show up as ``stored`` events in the replica's stream and in ``/v1/cache/blocks``;
``/v1/cache/info`` hands out a tokenizer that encodes like the server's and the namespace inputs
from which the router computes the very block hashes the replica holds; ``/health`` shows the
epoch; both routes want an admin key."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import transformers

from cache_store.hashing import FORMAT_VERSION, block_hashes, namespace_hash
from model_runner.chat_template import ChatTemplate
from proxy.settings import ServeSettings
from tests.support.inprocess_server import FakeClock, InProcessServer

BS = 16
ADMIN = "sk-admin-0123456789"  # admin of tenant "alice"
USER = "sk-user-0123456789"  # tenant "bob", not an admin
SYSTEM = "You are a careful assistant for the kvproxy test suite. Answer briefly and precisely. " * 3
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Count to four."}]


@pytest.fixture(scope="module")
def demo_env(kvp_cache_dir: Path) -> Iterator[None]:
    """The in-process server loads the demo model from the session's cache dir."""
    before = os.environ.get("KVPROXY_CACHE_DIR")
    os.environ["KVPROXY_CACHE_DIR"] = str(kvp_cache_dir)
    yield
    if before is None:
        os.environ.pop("KVPROXY_CACHE_DIR", None)
    else:
        os.environ["KVPROXY_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def module_redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"kvptest:{os.urandom(8).hex()}:"
    yield prefix
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.unlink(*keys)


@pytest.fixture(scope="module")
def server(
    demo_env: None, tmp_path_factory: pytest.TempPathFactory, redis_url: str, module_redis_prefix: str
) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("replica-info")
    keys = tmp / "keys.txt"
    keys.write_text(f"{ADMIN} alice admin\n{USER} bob\n")
    settings = ServeSettings(
        disk_dir=tmp / "blocks",
        redis_url=redis_url,
        redis_prefix=module_redis_prefix,
        store_timeout_ms=2000,
        api_keys=keys,
        block_size=BS,
        max_context=1024,
        default_max_tokens=4,
        no_history_warming=True,  # nothing stored after the reply: the test sees a quiet replica
    )
    started = InProcessServer(settings, FakeClock()).start()
    yield started
    started.stop()


def get(server: InProcessServer, path: str, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, headers=headers, timeout=30)


def read_stream(redis_url: str, stream: str) -> list[tuple[int, str, str, list[str]]]:
    """(seq, op, tier, hex hashes) per entry."""
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        entries = client.xrange(stream)
    out = []
    for _id, fields in entries:
        raw = fields[b"hashes"]
        hashes = [raw[i : i + 16].hex() for i in range(0, len(raw), 16)]
        out.append((int(fields[b"seq"]), fields[b"op"].decode(), fields[b"tier"].decode(), hashes))
    return out


def replay(held: dict[str, set[str]], entries: list[tuple[int, str, str, list[str]]]) -> dict[str, set[str]]:
    """What a router makes of a snapshot and the events after it."""
    state = {tier: set(hashes) for tier, hashes in held.items()}
    for _seq, op, tier, hashes in entries:
        if op == "stored":
            state[tier] |= set(hashes)
        elif op == "cleared":
            state[tier] = set()
        else:
            state[tier] -= set(hashes)
    return state


def quiet(server: InProcessServer) -> None:
    """Every block written to every tier and every event published."""
    runtime = server.services.runtime
    assert runtime is not None and runtime.events is not None
    assert runtime.drain(30)
    assert runtime.events.flush(30)


def test_a_chat_request_is_told_as_stored_events_and_listed_in_blocks(
    server: InProcessServer, redis_url: str
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    reply = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens >= 3 * BS
    quiet(server)
    info = get(server, "/v1/cache/info").json()
    blocks = get(server, "/v1/cache/blocks").json()
    assert blocks["epoch"] == info["events"]["epoch"]
    entries = read_stream(redis_url, info["events"]["stream"])
    assert [seq for seq, *_ in entries] == list(range(1, len(entries) + 1))
    assert blocks["seq"] == len(entries)
    assert {op for _, op, _, _ in entries} == {"stored"}, "a big memory tier evicts nothing"
    stored = {
        tier: {h for _, _, t, hashes in entries if t == tier for h in hashes} for tier in ("memory", "disk")
    }
    assert stored["memory"] and stored["memory"] == set(blocks["memory"])
    assert stored["disk"] == set(blocks["disk"]) == stored["memory"]
    assert replay({"memory": set(), "disk": set()}, entries) == {
        "memory": stored["memory"],
        "disk": stored["disk"],
    }

    # A second turn after the snapshot: the snapshot plus the events after its seq is the state.
    turn = [*MESSAGES, {"role": "assistant", "content": reply.choices[0].message.content}]
    client.chat.completions.create(
        model="demo", messages=[*turn, {"role": "user", "content": "Again."}], temperature=0, max_tokens=4
    )
    quiet(server)
    later = read_stream(redis_url, info["events"]["stream"])
    after = [entry for entry in later if entry[0] > blocks["seq"]]
    assert after, "the second turn stored new blocks"
    now = get(server, "/v1/cache/blocks").json()
    snapshot = {"memory": set(blocks["memory"]), "disk": set(blocks["disk"])}
    assert replay(snapshot, after) == {"memory": set(now["memory"]), "disk": set(now["disk"])}


def test_info_lets_a_router_tokenize_and_hash_like_the_replica(
    server: InProcessServer, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=2)
    quiet(server)
    info = get(server, "/v1/cache/info").json()
    runtime = server.services.runtime
    assert runtime is not None
    assert info["model"] == "demo" and info["served_model_names"] == ["demo"]
    assert info["fingerprint"] == runtime.engine.fingerprint
    assert (info["block_size"], info["max_context"], info["format_version"]) == (BS, 1024, FORMAT_VERSION)
    assert info["redis_prefix"] == server.settings.redis_prefix
    assert info["events"]["stream"] == f"{server.settings.redis_prefix}events:{info['events']['epoch']}"
    # A router re-checking the replica leaves the tokenizer out; the rest is the same.
    lean = get(server, "/v1/cache/info?tokenizer=false").json()
    assert lean["tokenizer_files"] == {} and info["tokenizer_files"]
    assert {k: v for k, v in lean.items() if k != "tokenizer_files"} == {
        k: v for k, v in info.items() if k != "tokenizer_files"
    }

    for name, data in info["tokenizer_files"].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(base64.b64decode(data))
    rebuilt = transformers.AutoTokenizer.from_pretrained(tmp_path)
    served = runtime.engine.loaded.tokenizer
    text = "Prefix caching: blocks of 16 tokens, hashed in a chain. Ünïcödé too! 12345"
    assert rebuilt(text)["input_ids"] == served(text)["input_ids"]

    # The router's hashes of the chat prompt are blocks this replica holds in memory.
    ids = ChatTemplate(rebuilt).encode(MESSAGES)
    namespace = namespace_hash(model_fingerprint=info["fingerprint"], block_size=BS, tenant="alice")
    expected = [h.hex() for h in block_hashes(ids, BS, namespace)]
    assert len(expected) >= 3
    assert set(expected) <= set(get(server, "/v1/cache/blocks").json()["memory"])


def test_health_shows_the_epoch(server: InProcessServer) -> None:
    health = get(server, "/health", key=None).json()
    info = get(server, "/v1/cache/info").json()
    assert health["epoch"] == info["events"]["epoch"]
    assert health["events"]["stream"] == info["events"]["stream"]
    assert health["events"]["dropped"] == 0


@pytest.mark.parametrize("path", ["/v1/cache/info", "/v1/cache/blocks"])
@pytest.mark.parametrize(("key", "status"), [(None, 401), ("sk-wrong-0123456789", 401), (USER, 403)])
def test_the_routes_want_an_admin_key(
    server: InProcessServer, path: str, key: str | None, status: int
) -> None:
    resp = get(server, path, key=key)
    assert resp.status_code == status
    body: dict[str, Any] = resp.json()
    assert "tokenizer_files" not in body and "memory" not in body
