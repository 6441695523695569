"""The official openai client, unchanged, against a live server: chat and completions, streamed
and not; the same prompt twice gives the same text and the expected cached_tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from openai import OpenAI

from tests.proxy.helpers import expected_cached, salt, text
from tests.support.live_server import LiveServer


@dataclass
class Result:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    kvproxy: dict[str, Any]


def _usage(usage: Any) -> tuple[int, int, dict[str, Any]]:
    extra = usage.model_extra or {}
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, extra.get("kvproxy", {})


def run(client: OpenAI, api: str, stream: bool, prompt: str, cache_salt: str) -> Result:
    common: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"cache_salt": cache_salt},
    }
    if stream:
        common["stream_options"] = {"include_usage": True}
    if api == "chat":
        messages: Any = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": prompt},
        ]
        if not stream:
            resp = client.chat.completions.create(messages=messages, **common)
            choice = resp.choices[0]
            return Result(choice.message.content or "", choice.finish_reason, *_usage(resp.usage))
        parts, finish, usage = [], None, None
        for chunk in client.chat.completions.create(messages=messages, stream=True, **common):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None, "include_usage must add a final usage chunk"
        return Result("".join(parts), finish, *_usage(usage))
    if not stream:
        resp_c = client.completions.create(prompt=prompt, **common)
        return Result(resp_c.choices[0].text, resp_c.choices[0].finish_reason, *_usage(resp_c.usage))
    parts, finish, usage = [], None, None
    for chunk_c in client.completions.create(prompt=prompt, stream=True, **common):
        if chunk_c.choices:
            parts.append(chunk_c.choices[0].text)
            finish = chunk_c.choices[0].finish_reason or finish
        if chunk_c.usage is not None:
            usage = chunk_c.usage
    assert usage is not None
    return Result("".join(parts), finish, *_usage(usage))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_same_prompt_twice_is_a_hit_with_identical_text(client: OpenAI, api: str, stream: bool) -> None:
    prompt, cache_salt = text(seed=11, words=150), salt()
    first = run(client, api, stream, prompt, cache_salt)
    second = run(client, api, stream, prompt, cache_salt)
    assert first.text == second.text and first.text
    assert first.finish_reason == second.finish_reason and first.finish_reason in ("stop", "length")
    assert first.prompt_tokens == second.prompt_tokens > 64
    assert first.cached_tokens == 0
    assert first.kvproxy["miss_reason"] == "no_shared_prefix"
    assert second.cached_tokens == expected_cached(second.prompt_tokens)
    assert second.kvproxy["miss_reason"] == "full_hit"
    assert second.kvproxy["cached_by_tier"].get("memory") == second.cached_tokens
    assert second.kvproxy["ttft_ms"] > 0
    for usage in (first.kvproxy, second.kvproxy):  # where the time to the first token went
        parts = ("lookup_ms", "queue_ms", "restore_ms", "prefill_ms")
        phases = sum(usage[p] for p in parts)
        assert min(usage[p] for p in parts) >= 0
        assert abs(phases - usage["ttft_ms"]) < 0.01  # rounding of four figures
    assert first.kvproxy["prefill_ms"] > first.kvproxy["restore_ms"]  # a miss computes, a hit restores
    assert second.kvproxy["restore_ms"] > 0


def test_streamed_and_plain_agree(client: OpenAI) -> None:
    prompt = text(seed=12, words=60)
    plain = run(client, "chat", False, prompt, salt())
    streamed = run(client, "chat", True, prompt, salt())
    assert plain.text == streamed.text
    assert plain.prompt_tokens == streamed.prompt_tokens


def test_models_list(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_unknown_model_is_404(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
