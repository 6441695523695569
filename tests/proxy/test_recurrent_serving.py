"""Hybrid and state-space models through a real server and the official openai client: a repeat
reads its prefix from the cache and answers the same (a pure state-space model once answered
every chat request with HTTP 500: its cache has no sequence length to ask)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from proxy.settings import ServeSettings
from tests.support.inprocess_server import FakeClock, InProcessServer

SYSTEM = "You are a careful assistant for the kvproxy test suite. Answer briefly and precisely. " * 3


@pytest.fixture(scope="module", params=["falconmamba", "qwen3next"])
def server(
    request: pytest.FixtureRequest,
    tiny_model_path: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp(f"recurrent-{request.param}")
    settings = ServeSettings(
        model=str(tiny_model_path(request.param)),
        disk_dir=tmp / "blocks",
        block_size=16,
        max_context=512,
        default_max_tokens=8,
    )
    started = InProcessServer(settings, FakeClock()).start()
    yield started
    started.stop()


def test_a_repeated_chat_is_read_from_the_cache_and_answers_the_same(server: InProcessServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Count to four."}]
    first = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    again = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    # Streamed, the same text again, and the next turn reads the history the first one left.
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        == first.choices[0].message.content
    )
    assert parts[-1].usage.prompt_tokens_details.cached_tokens == cached
    turn = [
        *messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Again."},
    ]
    follow = client.chat.completions.create(model=model, messages=turn, temperature=0, max_tokens=4)
    assert follow.usage.prompt_tokens_details.cached_tokens >= cached
