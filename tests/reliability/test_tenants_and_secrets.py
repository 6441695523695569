"""Tenant isolation and secrets against a live server whose shared tier is a password-protected
private Redis: tenants never reach each other's blocks (cache_salt only partitions further, and
the salt derivation is length-prefixed), admin routes refuse other keys, error messages echo no
prompt text and no Python internals, and the Redis password shows up nowhere."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.reliability.conftest import ServerFactory
from tests.reliability.helpers import chat, chat_body, text
from tests.support.live_server import LiveServer
from tests.support.redis_fixtures import RedisServer

PASSWORD = "s3cr3t-Pa55word-for-redis"
ORG_1 = "sk-org1-0123456789abcdef"
ORG_1_OTHER = "sk-org1-second-key-0123"  # a second key of the same tenant
ORG_12345 = "sk-org12345-0123456789ab"
ADMIN = "sk-admin-0123456789abcde"
SECRET_PROMPT = "zanzibar-quokka-prompt-words"
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/work/|/tmp/|site-packages|pydantic|Error\(")


@dataclass
class Rig:
    redis: RedisServer
    server: LiveServer


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_server_factory: ServerFactory) -> Iterator[Rig]:
    redis = RedisServer(tmp_path_factory.mktemp("redis-auth"), "--requirepass", PASSWORD).start()
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(
        f"{ORG_1} org_1\n{ORG_1_OTHER} org_1\n{ORG_12345} org_12345\n{ADMIN} ops admin\n", encoding="utf-8"
    )
    server = module_server_factory(
        "--api-keys", str(keys),
        "--no-disk",
        "--memory-bytes", "1",  # every hit comes from the shared tier, where isolation matters most
        "--redis-url", f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0",
        "--store-timeout-ms", "2000",
        "--breaker-cooldown-s", "1",
    )  # fmt: skip
    yield Rig(redis, server)
    redis.kill()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def cached(rig: Rig, key: str, body: dict[str, object]) -> int:
    reply = chat(rig.server, body, headers=auth(key))
    rig.server.wait_written(headers=auth(ADMIN))  # the next tenant could only find it in Redis
    return reply.cached


def test_tenants_never_share_blocks(rig: Rig) -> None:
    body = chat_body(text(seed=1000, words=80))
    assert cached(rig, ORG_1, body) == 0
    assert cached(rig, ORG_12345, body) == 0, "another tenant's blocks were restored"
    assert cached(rig, ORG_1, body) > 0, "the same tenant hits its own blocks"
    assert cached(rig, ORG_1_OTHER, body) > 0, "another key of the same tenant shares them"


def test_cache_salt_partitions_within_a_tenant_only(rig: Rig) -> None:
    body = chat_body(text(seed=1001, words=80))
    salted = {**body, "cache_salt": "team-a"}
    assert cached(rig, ORG_1, body) == 0
    assert cached(rig, ORG_1, salted) == 0, "a salt is a namespace of its own"
    assert cached(rig, ORG_1, salted) > 0
    # The same salt from another tenant reaches nothing of org_1's.
    assert cached(rig, ORG_12345, salted) == 0
    assert cached(rig, ORG_12345, {**body, "cache_salt": ""}) == 0


@pytest.mark.parametrize("first_tenant_first", [True, False], ids=["org_1-first", "org_12345-first"])
def test_salt_derivation_is_length_prefixed(rig: Rig, first_tenant_first: bool) -> None:
    """("org_1", "2345") and ("org_12345", "") would collide if tenant and salt were concatenated."""
    body = chat_body(text(seed=1002 + int(first_tenant_first), words=80))
    org_1_salted = (ORG_1, {**body, "cache_salt": "2345"})
    org_12345 = (ORG_12345, body)
    first, second = (org_1_salted, org_12345) if first_tenant_first else (org_12345, org_1_salted)
    assert cached(rig, *first) == 0
    assert cached(rig, *second) == 0, "the two namespaces collided"
    assert cached(rig, *first) > 0 and cached(rig, *second) > 0


def check_error(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, resp.text[:300]
    assert set(resp.json()) == {"error"}
    assert SECRET_PROMPT not in resp.text, "an error echoed prompt text"
    assert not INTERNALS.search(resp.text), f"an error shows Python internals: {resp.text[:300]}"


def test_admin_routes_refuse_other_keys_and_errors_leak_nothing(rig: Rig) -> None:
    url = rig.server.url
    warmup = {"items": [{"prompt": SECRET_PROMPT}]}
    for key, status in ((ORG_1, 403), (None, 401), ("sk-not-a-key-" + SECRET_PROMPT, 401)):
        headers = auth(key) if key else {}
        check_error(httpx.get(url + "/v1/cache/stats", headers=headers, timeout=10), status)
        check_error(httpx.delete(url + "/v1/cache", headers=headers, timeout=10), status)
        check_error(httpx.post(url + "/v1/cache/warmup", json=warmup, headers=headers, timeout=10), status)
    bad_bodies = [
        {"model": "demo", "messages": [{"role": SECRET_PROMPT, "content": SECRET_PROMPT}]},
        # (The model id itself is echoed in a 404, as OpenAI does: it is no prompt text.)
        {"model": "gpt-unknown", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        {"model": "demo", "messages": [{"role": "user", "content": SECRET_PROMPT * 400}], "max_tokens": 8},
        {
            "model": "demo",
            "messages": [{"role": "user", "content": SECRET_PROMPT}],
            "temperature": SECRET_PROMPT,
        },
        {"model": "demo", "prompt": [SECRET_PROMPT, SECRET_PROMPT]},
    ]
    for body in bad_bodies:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        resp = httpx.post(url + path, json=body, headers=auth(ORG_1), timeout=30)
        assert resp.status_code in (400, 404), resp.text[:300]
        check_error(resp, resp.status_code)
    resp = httpx.post(
        url + "/v1/chat/completions", content=b"{" + SECRET_PROMPT.encode(), headers=auth(ORG_1)
    )
    check_error(resp, 400)
    # An admin key works (the refusals above were about the key, not the route).
    assert httpx.get(url + "/v1/cache/stats", headers=auth(ADMIN), timeout=10).status_code == 200


def test_redis_password_is_never_shown(rig: Rig) -> None:
    # Drive a Redis outage too, so the failure paths (warnings with the URL) are logged as well.
    chat(rig.server, chat_body(text(seed=1010, words=60)), headers=auth(ORG_1))
    rig.redis.kill()
    for seed in range(4):
        chat(rig.server, chat_body(text(seed=1011 + seed, words=60)), headers=auth(ORG_1))
    assert rig.server.get_json("/health")["tiers"]["redis"]["breaker"] in ("open", "half_open")
    rig.redis.start()
    time.sleep(1.2)
    chat(rig.server, chat_body(text(seed=1020, words=60)), headers=auth(ORG_1))

    log = rig.server.log_text()
    startup = [line for line in log.splitlines() if "listening on" in line]
    assert startup and "redis://:***@127.0.0.1" in startup[0], startup
    assert "unavailable" in log, "the outage was not logged"
    shown = {
        "log": log,
        "/health": httpx.get(rig.server.url + "/health", timeout=10).text,
        "/metrics": httpx.get(rig.server.url + "/metrics", timeout=10).text,
        "/v1/cache/stats": httpx.get(
            rig.server.url + "/v1/cache/stats", headers=auth(ADMIN), timeout=10
        ).text,
        "/dashboard": httpx.get(rig.server.url + "/dashboard", timeout=10).text,
    }
    for where, body in shown.items():
        assert PASSWORD not in body, f"the Redis password appears in {where}"
    assert "***" in shown["/health"]
