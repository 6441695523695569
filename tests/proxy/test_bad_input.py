"""Every client mistake gets the right status and the OpenAI error shape, never echoes the prompt,
and leaves the server healthy."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.proxy.conftest import MAX_CONTEXT
from tests.proxy.helpers import chat_body
from tests.support.live_server import LiveServer

SECRET = "zebra-secret-prompt-words"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def _long_prompt() -> str:
    return " ".join(f"{SECRET} {i}" for i in range(MAX_CONTEXT))


# (id, path, body bytes, status, param, code)
CASES: list[tuple[str, str, bytes, int, str | None, str | None]] = [
    ("missing-model", CHAT, _raw({"messages": [{"role": "user", "content": SECRET}]}), 400, "model", None),
    ("missing-messages", CHAT, _raw({"model": "demo"}), 400, "messages", None),
    ("missing-prompt", COMPLETIONS, _raw({"model": "demo"}), 400, "prompt", None),
    ("messages-not-list", CHAT, _raw({"model": "demo", "messages": SECRET}), 400, "messages", None),
    ("empty-messages", CHAT, _raw({"model": "demo", "messages": []}), 400, "messages", None),
    ("empty-content", CHAT, _raw(chat_body("")), 400, "messages", None),
    (
        "bad-role",
        CHAT,
        _raw({"model": "demo", "messages": [{"role": "wizard", "content": SECRET}]}),
        400,
        "messages[0].role",
        None,
    ),
    (
        "image-part",
        CHAT,
        _raw(
            {
                "model": "demo",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
                ],
            }
        ),
        400,
        "messages[0].content[0].type",
        "unsupported_parameter",
    ),
    ("model-not-string", CHAT, _raw({**chat_body(SECRET), "model": 123}), 400, "model", None),
    ("temperature-string", CHAT, _raw(chat_body(SECRET, temperature="hot")), 400, "temperature", None),
    ("temperature-high", CHAT, _raw(chat_body(SECRET, temperature=5)), 400, "temperature", None),
    ("top-p-zero", CHAT, _raw(chat_body(SECRET, top_p=0)), 400, "top_p", None),
    ("stop-wrong-type", CHAT, _raw(chat_body(SECRET, stop=7)), 400, "stop", None),
    ("seed-huge", CHAT, _raw(chat_body(SECRET, seed=2**70)), 400, "seed", None),
    ("n-too-many", CHAT, _raw(chat_body(SECRET, n=17)), 400, "n", None),
    ("n-zero", CHAT, _raw(chat_body(SECRET, n=0)), 400, "n", None),
    ("stream-not-bool", CHAT, _raw(chat_body(SECRET, stream="yes please")), 400, "stream", None),
    ("max-tokens-negative", CHAT, _raw(chat_body(SECRET, max_tokens=-1)), 400, "max_tokens", None),
    ("max-tokens-zero", CHAT, _raw(chat_body(SECRET, max_tokens=0)), 400, "max_tokens", None),
    (
        "max-tokens-over-context",
        CHAT,
        _raw(chat_body(SECRET, max_tokens=MAX_CONTEXT)),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "max-completion-tokens-zero",
        CHAT,
        _raw(chat_body(SECRET, max_completion_tokens=0)),
        400,
        "max_completion_tokens",
        None,
    ),
    (
        "prompt-over-context",
        COMPLETIONS,
        _raw({"model": "demo", "prompt": _long_prompt(), "max_tokens": 4}),
        400,
        None,
        "context_length_exceeded",
    ),
    ("chat-over-context", CHAT, _raw(chat_body(_long_prompt())), 400, None, "context_length_exceeded"),
    ("json-array", CHAT, b"[]", 400, None, "invalid_json"),
    ("json-null", CHAT, b"null", 400, None, "invalid_json"),
    ("json-number", CHAT, b"123", 400, None, "invalid_json"),
    ("json-string", CHAT, b'"hello"', 400, None, "invalid_json"),
    ("malformed-json", CHAT, b'{"model": "demo", "messages": [', 400, None, "invalid_json"),
    ("empty-body", CHAT, b"", 400, None, "invalid_json"),
    (
        "invalid-utf8",
        CHAT,
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        "invalid_encoding",
    ),
    (
        "lone-surrogate",
        CHAT,
        b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800"}]}',
        400,
        "messages[0].content",
        None,
    ),
    ("unknown-model", CHAT, _raw({**chat_body(SECRET), "model": "gpt-9"}), 404, "model", "model_not_found"),
    ("warmup-empty-items", "/v1/cache/warmup", _raw({"items": []}), 400, "items", None),
    ("warmup-bad-item", "/v1/cache/warmup", _raw({"items": [{"text": SECRET}]}), 400, "items[0]", None),
    # Fields that would change the answer and are not implemented: a 400 naming them.
    *[
        (f"unsupported-{field}", path, _raw({**body, field: value}), 400, field, "unsupported_parameter")
        for field, value in (
            # the demo's chat template has no tool support
            ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            ("audio", {"voice": "alloy", "format": "wav"}),
            ("modalities", ["text", "audio"]),
            ("prediction", {"type": "content", "content": "x"}),
        )
        for path, body in ((CHAT, chat_body(SECRET)),)
    ],
    (
        "unsupported-echo",
        COMPLETIONS,
        _raw({"model": "demo", "prompt": SECRET, "echo": True}),
        400,
        "echo",
        None,
    ),
    (
        "unsupported-best-of",
        COMPLETIONS,
        _raw({"model": "demo", "prompt": SECRET, "best_of": 3}),
        400,
        "best_of",
        None,
    ),
]


def check_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:300]
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert SECRET not in resp.text, "error messages must not echo prompt text"
    assert "Traceback" not in resp.text and "pydantic" not in resp.text.lower()
    return err


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(
    server: LiveServer, path: str, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    resp = httpx.post(
        server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    err = check_error(resp, status)
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if status == 400:
        assert err["type"] == "invalid_request_error"


def test_body_over_16_mib_is_413(server: LiveServer) -> None:
    filler = "x" * (17 * 1024 * 1024)
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": filler}]}).encode()
    resp = httpx.post(
        server.url + CHAT, content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    check_error(resp, 413)


def test_unknown_route_and_method(server: LiveServer) -> None:
    check_error(httpx.get(server.url + "/v1/nope", timeout=10), 404)
    check_error(httpx.get(server.url + CHAT, timeout=10), 405)


def test_server_healthy_after_bad_input(server: LiveServer) -> None:
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    resp = httpx.post(server.url + CHAT, json=chat_body("a good request after the bad ones"), timeout=30)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_defaults_of_unsupported_fields_are_accepted(server: LiveServer) -> None:
    """Clients send these with their do-nothing values: that changes nothing and stays a 200."""
    body = chat_body(
        "hello",
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        logprobs=False,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
    )
    resp = httpx.post(server.url + CHAT, json=body, timeout=60)
    assert resp.status_code == 200, resp.text
