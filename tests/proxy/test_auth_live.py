"""Authentication against a live server: keys, admin routes, open routes, tenant isolation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.proxy.conftest import ServerFactory
from tests.proxy.helpers import chat_body, text
from tests.support.live_server import LiveServer

ALICE = "sk-alice-0123456789"  # admin of tenant "alice"
BOB = "sk-bob-0123456789"  # tenant "bob", not an admin


@pytest.fixture(scope="module")
def auth_server(
    session_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{ALICE} alice admin\n{BOB} bob\n")
    return session_server_factory("--no-disk", "--api-keys", str(keys))


def _h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize("key", [None, "sk-wrong-0123456789", ALICE[:-1]], ids=["none", "wrong", "prefix"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/cache/stats"),
        ("DELETE", "/v1/cache"),
    ],
)
def test_v1_needs_a_valid_key(auth_server: LiveServer, key: str | None, method: str, path: str) -> None:
    body = chat_body("hello") if method == "POST" else None
    resp = httpx.request(method, auth_server.url + path, headers=_h(key), json=body, timeout=10)
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_open_routes_need_no_key(auth_server: LiveServer) -> None:
    for path in ("/health", "/metrics", "/dashboard"):
        assert httpx.get(auth_server.url + path, timeout=10).status_code == 200, path


def test_admin_routes_refuse_non_admin_keys(auth_server: LiveServer) -> None:
    for method, path, body in (
        ("GET", "/v1/cache/stats", None),
        ("DELETE", "/v1/cache", None),
        ("POST", "/v1/cache/warmup", {"items": [{"prompt": "hi"}]}),
    ):
        resp = httpx.request(method, auth_server.url + path, headers=_h(BOB), json=body, timeout=30)
        assert resp.status_code == 403, path
        assert resp.json()["error"]["type"] == "permission_error"
        ok = httpx.request(method, auth_server.url + path, headers=_h(ALICE), json=body, timeout=30)
        assert ok.status_code == 200, (path, ok.text)


def test_tenants_never_share_blocks(auth_server: LiveServer) -> None:
    body = chat_body(text(seed=70, words=100))

    def cached(key: str) -> int:
        resp = httpx.post(auth_server.url + "/v1/chat/completions", headers=_h(key), json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(ALICE) == 0
    assert cached(BOB) == 0, "bob must not see alice's blocks"
    assert cached(BOB) > 0, "bob's own second request hits"
    stats = httpx.get(auth_server.url + "/v1/cache/stats", headers=_h(ALICE), timeout=10).json()
    tenants = {r["tenant"] for r in stats["recent"]}
    assert {"alice", "bob"} <= tenants


def test_official_client_with_keys(auth_server: LiveServer) -> None:
    good = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=BOB, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["demo"]
    bad = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="sk-nope-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_keys_file_is_reported_with_its_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ALICE} alice admin\n{BOB} bob superuser\n")
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--api-keys", str(keys), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{keys}:2:" in proc.stderr
    assert BOB not in proc.stderr, "keys must never be printed"
