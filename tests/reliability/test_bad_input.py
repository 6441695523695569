"""Bad input beyond tests/proxy's table: a schemathesis fuzz run over the server's OpenAPI schema
(no 5xx, no crash), lone surrogates and invalid UTF-8 anywhere in a body, and generations that
stop in the middle of a multi-byte character (U+FFFD, never a crash)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import BaseModel
from schemathesis import GenerationMode

from proxy.anthropic.schemas import CountTokensRequest, MessagesRequest
from proxy.schemas import ChatCompletionRequest, CompletionRequest, PinCreateRequest, WarmupRequest
from tests.reliability.conftest import ServerFactory
from tests.support.live_server import LiveServer

FUZZ_BUDGET_S = 60.0
MAX_FUZZ_TOKENS = 4
# The routes read their JSON bodies themselves (the 16 MiB cap is applied while reading, every
# failure is a precise 400); the app documents those bodies in its OpenAPI schema itself.
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/cache/warmup": WarmupRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/v1/cache/pins": PinCreateRequest,
}


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> LiveServer:
    return module_server_factory("--no-disk", "--default-max-tokens", str(MAX_FUZZ_TOKENS))


def served_model_only(raw: dict[str, Any]) -> dict[str, Any]:
    """Check that the server documents every request body, then narrow ``model`` to the one served
    model, so most cases reach the engine instead of stopping at a 404."""
    components = raw["components"]["schemas"]
    for path, model in REQUEST_BODIES.items():
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}, path
        if "model" in components[model.__name__].get("properties", {}):
            components[model.__name__]["properties"]["model"] = {"type": "string", "enum": ["demo"]}
    return raw


def _capped(body: Any) -> Any:
    """Keep generations and warmups short: the fuzzer is after crashes, not long decodes."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[name] = MAX_FUZZ_TOKENS
    if isinstance(body.get("items"), list):
        body["items"] = body["items"][:2]
    return body


@dataclass
class FuzzRun:
    server: LiveServer
    session: requests.Session
    deadline: float
    calls: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def fuzz(self, operation: Any, mode: GenerationMode, examples: int) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases on every run
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def run(case: Any) -> None:
            if time.monotonic() > self.deadline:
                return
            case.body = _capped(case.body)
            response = case.call(base_url=self.server.url, session=self.session, timeout=60)
            self.calls += 1
            self.statuses[response.status_code] += 1
            where = f"{case.method} {case.formatted_path} ({mode.value})"
            if response.status_code >= 500:
                self.problems.append(f"{where}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and case.formatted_path.startswith("/v1/messages"):
                body = response.json()
                if body.get("type") != "error" or set(body.get("error", {})) != {"type", "message"}:
                    self.problems.append(f"{where}: not the Anthropic error shape: {response.text[:200]}")
            elif response.status_code >= 400:
                error = response.json().get("error", {})
                if set(error) != {"message", "type", "param", "code"}:
                    self.problems.append(f"{where}: not the OpenAI error shape: {response.text[:200]}")

        try:
            run()
        except Unsatisfiable:
            # Negative mode on a route with no input at all: there is nothing to make invalid.
            if mode is not GenerationMode.NEGATIVE:
                raise


@pytest.mark.slow
def test_fuzz_openapi_no_5xx(server: LiveServer) -> None:
    raw = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(served_model_only(raw))
    started = time.monotonic()
    fuzz = FuzzRun(server, requests.Session(), deadline=started + FUZZ_BUDGET_S)
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = 25 if operation.method.upper() == "POST" else 5
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz.fuzz(operation, mode, examples)
    print(f"fuzz: {fuzz.calls} calls in {time.monotonic() - started:.1f}s, statuses {dict(fuzz.statuses)}")
    server_errors = [p for p in fuzz.problems if "): 5" in p]
    assert not fuzz.problems, server_errors[:5] + fuzz.problems[:5]
    assert fuzz.calls >= 50, f"only {fuzz.calls} fuzz calls ran"
    assert fuzz.statuses[200] >= 10, "the fuzzer never got a request through to the model"
    assert server.proc is not None and server.proc.poll() is None, "the server died"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


# -- lone surrogates and invalid UTF-8 ------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'

# (id, path, raw body): every place a string can sit, with a JSON-escaped lone surrogate.
SURROGATES = [
    ("prompt", COMPLETIONS, r'{"model": "demo", "prompt": "a\ud800b"}'),
    ("prompt-list", COMPLETIONS, r'{"model": "demo", "prompt": ["\udfff"]}'),
    ("low-high-reversed", COMPLETIONS, r'{"model": "demo", "prompt": "\udc00\ud800"}'),
    ("system-message", CHAT, r'{"model": "demo", "messages": [{"role": "system", "content": "\ud83d"}]}'),
    (
        "content-part",
        CHAT,
        r'{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
    ),
    ("stop", CHAT, r'{"model": "demo", ' + OK_MESSAGES + r', "stop": "\ud800"}'),
    ("cache-salt", CHAT, r'{"model": "demo", ' + OK_MESSAGES + r', "cache_salt": "\ud800"}'),
    ("model", CHAT, r'{"model": "\ud800", ' + OK_MESSAGES + "}"),
    ("role", CHAT, r'{"model": "demo", "messages": [{"role": "\ud800", "content": "hi"}]}'),
    ("warmup-item", "/v1/cache/warmup", r'{"items": [{"prompt": "\ud800"}]}'),
    ("warmup-tenant", "/v1/cache/warmup", r'{"items": [{"prompt": "hi"}], "tenant": "\ud800"}'),
]

# (id, path, raw bytes): bodies that are not UTF-8 at all.
INVALID_UTF8 = [
    ("lone-continuation", CHAT, b'{"model": "demo", "messages": [{"role": "user", "content": "\x80"}]}'),
    ("truncated-sequence", COMPLETIONS, b'{"model": "demo", "prompt": "caf\xc3"}'),
    ("overlong-slash", COMPLETIONS, b'{"model": "demo", "prompt": "\xc0\xaf"}'),
    ("utf8-encoded-surrogate", COMPLETIONS, b'{"model": "demo", "prompt": "\xed\xa0\x80"}'),
    ("beyond-u10ffff", COMPLETIONS, b'{"model": "demo", "prompt": "\xf4\x90\x80\x80"}'),
    ("in-a-key", CHAT, b'{"mo\xffdel": "demo", "messages": []}'),
    ("latin-1-body", COMPLETIONS, '{"model": "demo", "prompt": "café"}'.encode("latin-1")),
    ("utf-16-body", COMPLETIONS, '{"model": "demo", "prompt": "hi"}'.encode("utf-16")),
]


def _post_raw(server: LiveServer, path: str, body: bytes) -> httpx.Response:
    return httpx.post(
        server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30
    )


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in SURROGATES], ids=[c[0] for c in SURROGATES])
def test_lone_surrogates_are_a_clear_400(server: LiveServer, path: str, body: str) -> None:
    resp = _post_raw(server, path, body.encode("ascii"))
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"], error


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in INVALID_UTF8], ids=[c[0] for c in INVALID_UTF8])
def test_invalid_utf8_bodies_are_a_clear_400(server: LiveServer, path: str, body: bytes) -> None:
    resp = _post_raw(server, path, body)
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["code"] == "invalid_encoding"


def test_surrogates_in_ignored_fields_do_no_harm(server: LiveServer) -> None:
    """Fields kvproxy never uses may carry anything JSON can: the request is served normally. (A
    message's ``name`` is not one of them: chat templates may render it, so it must be text.)"""
    body = r'{"model": "demo", "messages": [{"role": "user", "content": "hi", "x": "\ud800"}], "user": "\udfff", "max_tokens": 2, "\ud800": 1}'  # noqa: E501
    resp = _post_raw(server, CHAT, body.encode("ascii"))
    assert resp.status_code == 200, resp.text[:300]
    named = body.replace('"x": "\\ud800"', '"name": "\\ud800"')
    resp = _post_raw(server, CHAT, named.encode("ascii"))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[0].name", resp.text[:300]


# A prompt whose greedy continuation (demo model, recipe v2) starts with the token b"\xd2": the
# first byte of a two-byte character, so a 1-token generation ends in the middle of it. Found by
# searching short prompts with the model loaded in-process (argmax of the next-token logits).
MID_CHARACTER_PROMPT = "chunk model "


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_generation_ending_mid_character_is_replacement_char(server: LiveServer, stream: bool) -> None:
    body = {
        "model": "demo",
        "prompt": MID_CHARACTER_PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "stream": stream,
    }
    resp = httpx.post(server.url + COMPLETIONS, json=body, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    resp.content.decode("utf-8")  # strict: whatever was sent is valid UTF-8
    if stream:
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        out = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        data = resp.json()
        assert data["usage"]["completion_tokens"] == 1
        out = data["choices"][0]["text"]
    assert out.endswith("\ufffd"), (
        f"{out!r}: the demo model no longer stops mid-character here; search a new prompt "
        "(greedy first token that ends in an incomplete UTF-8 sequence)"
    )
    # One more token completes or replaces the character; either way the text is whole.
    body = {**body, "max_tokens": 2}
    resp = httpx.post(server.url + COMPLETIONS, json=body, timeout=30)
    assert resp.status_code == 200 and resp.content.decode("utf-8")
