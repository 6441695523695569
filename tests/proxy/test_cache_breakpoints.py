"""Cache breakpoints and pins on a real server driven by the official clients: a ``cache_control``
breakpoint keeps its prefix in memory through pressure that evicts everything else, until its TTL
passes (on a test clock the server's pins run on); the usage figures of a first write, a read and
an extension; ``prompt_cache_retention``; one tenant's pins never push out another's; the admin
pin routes; Claude Code's billing-header block does not break the cache.

The demo model's blocks of 16 tokens are records of 65,792 bytes (4 layers x K and V x 4 heads x
16 tokens x 32 dims x 4 bytes, plus the header): memory budgets below are counted in blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.settings import ServeSettings
from tests.support.inprocess_server import FakeClock, InProcessServer

BS = 16
BLOCK_BYTES = 65_792
SYSTEM = "You are a careful assistant for the kvproxy test suite. " * 7  # about 8 blocks
MEMORY_BLOCKS = 32


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


def serve(tmp: Path, **options: Any) -> InProcessServer:
    settings = ServeSettings(
        no_disk=True,
        disk_dir=tmp,
        block_size=BS,
        max_context=1024,
        default_max_tokens=4,
        **options,
    )
    return InProcessServer(settings, FakeClock()).start()


@pytest.fixture(scope="module")
def pressure_server(demo_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = serve(
        tmp_path_factory.mktemp("bp"),
        memory_bytes=MEMORY_BLOCKS * BLOCK_BYTES,
        max_pinned_bytes=MEMORY_BLOCKS // 2 * BLOCK_BYTES,
        max_pinned_tenant_share=1.0,
    )
    yield server
    server.stop()


def claude(server: InProcessServer, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0)


def ask(client: anthropic.Anthropic, system: Any, user: str, **extra: Any) -> anthropic.types.Message:
    return client.messages.create(
        model="demo",
        max_tokens=2,
        system=system,
        messages=[{"role": "user", "content": user}],
        **extra,
    )


def count(client: anthropic.Anthropic, system: Any, user: str) -> int:
    return client.messages.count_tokens(
        model="demo", system=system, messages=[{"role": "user", "content": user}]
    ).input_tokens


def flood(client: anthropic.Anthropic) -> None:
    """Distinct prompts without breakpoints, twice as many blocks as the memory tier holds."""
    blocks = 0
    for i in range(50):
        system = f"flood {i}: " + " ".join(f"w{i}x{j}" for j in range(60))
        blocks += count(client, system, "go") // BS
        ask(client, system, "go")
        if blocks >= 2 * MEMORY_BLOCKS:
            return
    raise AssertionError("the flood prompts are too short")


def memory_tokens(message: anthropic.types.Message) -> int:
    extra = message.usage.model_extra or {}
    return int(extra.get("kvproxy", {}).get("cached_by_tier", {}).get("memory", 0))


def pins(server: InProcessServer, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    resp = httpx.get(server.url + "/v1/cache/pins", headers=headers, timeout=10)
    resp.raise_for_status()
    return resp.json()["pins"]


def test_a_breakpoint_survives_pressure_until_its_ttl_passes(pressure_server: InProcessServer) -> None:
    client = claude(pressure_server)
    pinned = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first = ask(client, pinned, "first question")
    system_blocks = first.usage.cache_creation_input_tokens // BS
    assert system_blocks >= 8, first.usage
    [pin] = pins(pressure_server)
    assert (pin["tenant"], pin["source"], pin["ttl_s"], pin["tokens"]) == (
        "default",
        "cache_control",
        300,
        system_blocks * BS,
    )
    assert pin["bytes"] == system_blocks * BLOCK_BYTES
    stats = httpx.get(pressure_server.url + "/v1/cache/stats", timeout=10).json()["pins"]
    assert (stats["count"], stats["bytes"]) == (1, pin["bytes"])
    metrics = httpx.get(pressure_server.url + "/metrics", timeout=10).text
    assert f"kvproxy_pinned_bytes {float(pin['bytes'])}" in metrics

    unpinned = "An unpinned control prompt that memory pressure must evict. " * 12
    ask(client, unpinned, "control")
    flood(client)
    # The control proves the pressure was real: its blocks left memory.
    assert ask(client, unpinned, "control").usage.cache_read_input_tokens == 0
    again = ask(client, pinned, "second question")
    assert again.usage.cache_read_input_tokens == system_blocks * BS
    assert memory_tokens(again) == system_blocks * BS
    assert again.usage.cache_creation_input_tokens == 0

    # The hit refreshed the pin: 299 s later it still holds.
    pressure_server.clock.advance(299)
    flood(client)
    assert ask(client, pinned, "third question").usage.cache_read_input_tokens == system_blocks * BS
    # Its TTL passes with nothing reading it: it expires and the blocks become evictable.
    pressure_server.clock.advance(301)
    assert pins(pressure_server) == []
    flood(client)
    late = ask(client, SYSTEM, "after expiry")  # no breakpoint: nothing pins it again
    assert late.usage.cache_read_input_tokens == 0


def test_usage_for_a_write_a_read_and_an_extension(pressure_server: InProcessServer) -> None:
    client = claude(pressure_server)
    httpx.delete(pressure_server.url + "/v1/cache", timeout=10).raise_for_status()
    system = [
        {
            "type": "text",
            "text": "Extension test system prompt. " * 14,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    question = "Tell me about blocks. " * 6

    first = ask(client, system, question)
    u = first.usage
    total = count(client, system, question)
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == total
    assert u.cache_read_input_tokens == 0 and u.cache_creation_input_tokens > 0
    assert u.cache_creation_input_tokens % BS == 0
    assert u.cache_creation.ephemeral_1h_input_tokens == u.cache_creation_input_tokens
    assert u.cache_creation.ephemeral_5m_input_tokens == 0
    written = u.cache_creation_input_tokens

    read = ask(client, system, "Something else entirely.").usage
    assert read.cache_read_input_tokens == written and read.cache_creation_input_tokens == 0

    # The same prefix extended, with a second (5m) breakpoint on the new question.
    turn = [{"type": "text", "text": question + " And more. " * 4, "cache_control": {"type": "ephemeral"}}]
    extended = client.messages.create(
        model="demo",
        max_tokens=2,
        system=system,
        messages=[{"role": "user", "content": turn}],
    ).usage
    total = client.messages.count_tokens(
        model="demo", system=system, messages=[{"role": "user", "content": turn}]
    ).input_tokens
    # It reads the pinned prefix and, by automatic prefix caching, the blocks of the first
    # question it shares; it writes the rest up to its breakpoint.
    assert extended.cache_read_input_tokens > written
    assert extended.cache_creation.ephemeral_1h_input_tokens == 0  # the 1h part was read, not written
    assert extended.cache_creation.ephemeral_5m_input_tokens == extended.cache_creation_input_tokens > 0
    assert (
        extended.input_tokens + extended.cache_read_input_tokens + extended.cache_creation_input_tokens
        == total
    )
    assert extended.input_tokens < BS + 8  # only the tail after the last whole block (and the turn's end)
    ttls = sorted(p["ttl_s"] for p in pins(pressure_server) if p["tokens"] >= written)
    assert 3600 in ttls and 300 in ttls


def test_automatic_caching_pins_the_last_block(pressure_server: InProcessServer) -> None:
    client = claude(pressure_server)
    text = "Automatic caching puts the breakpoint on the last block. " * 10
    first = ask(client, None, text, extra_body={"cache_control": {"type": "ephemeral"}})
    assert first.usage.cache_creation_input_tokens >= (count(client, None, text) // BS - 1) * BS
    assert any(p["tokens"] == first.usage.cache_creation_input_tokens for p in pins(pressure_server))


def test_more_than_four_breakpoints_is_a_400(pressure_server: InProcessServer) -> None:
    client = claude(pressure_server)
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as err:
        ask(client, blocks, "hi")
    assert err.value.body["error"]["message"] == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    )


def test_prompt_cache_retention_pins_for_openai_clients(pressure_server: InProcessServer) -> None:
    client = openai.OpenAI(base_url=pressure_server.url + "/v1", api_key="unused", max_retries=0)
    system = "An OpenAI client asks to retain this prompt in memory. " * 10

    def chat(user: str, **extra: Any) -> Any:
        return client.chat.completions.create(
            model="demo",
            max_tokens=2,
            temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            extra_body=extra,
        )

    first = chat("one", prompt_cache_retention="in_memory", prompt_cache_key="team-a")
    mine = [p for p in pins(pressure_server) if p["source"] == "prompt_cache_retention"]
    assert len(mine) == 1 and mine[0]["ttl_s"] == 600
    assert mine[0]["tokens"] == first.usage.prompt_tokens // BS * BS
    flood(claude(pressure_server))
    again = chat("two")
    assert again.usage.prompt_tokens_details.cached_tokens >= mine[0]["tokens"] - 2 * BS
    stats = httpx.get(pressure_server.url + "/v1/cache/stats", timeout=10).json()
    assert any(r.get("cache_key") == "team-a" for r in stats["recent"])
    with pytest.raises(openai.BadRequestError):
        chat("three", prompt_cache_retention="forever")


def test_billing_header_nonce_does_not_break_the_cache(pressure_server: InProcessServer) -> None:
    client = claude(pressure_server)

    def system(nonce: str) -> list[dict[str, Any]]:
        return [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.0; cch={nonce};"},
            {"type": "text", "text": "You are Claude Code, run by the test suite. " * 10},
        ]

    first = ask(client, system("a1b2c"), "list the files")
    second = ask(client, system("f9e8d"), "list the files")
    assert (
        second.usage.cache_read_input_tokens >= count(client, system("x"), "list the files") // BS * BS - BS
    )
    assert first.content[0].text == second.content[0].text


@pytest.fixture(scope="module")
def tenant_server(demo_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.txt"
    keys.write_text("key-admin-0001 ops admin\nkey-tenant-a01 alpha\nkey-tenant-b01 beta\n")
    # Each tenant may pin 16 blocks: one of the 10-12 block system prompts below, not two.
    server = serve(
        tmp,
        api_keys=keys,
        memory_bytes=64 * BLOCK_BYTES,
        max_pinned_bytes=32 * BLOCK_BYTES,
        max_pinned_tenant_share=0.5,
    )
    yield server
    server.stop()


ADMIN = {"authorization": "Bearer key-admin-0001"}


def test_one_tenants_pins_never_evict_anothers(tenant_server: InProcessServer) -> None:
    alpha = claude(tenant_server, api_key="key-tenant-a01")
    beta = claude(tenant_server, api_key="key-tenant-b01")

    def pinned(text: str) -> list[dict[str, Any]]:
        return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]

    ask(alpha, pinned("Alpha's first system prompt, pinned for five minutes. " * 9), "hi")
    tenant_server.clock.advance(10)
    ask(beta, pinned("Beta's only system prompt, pinned for five minutes too. " * 9), "hi")
    by_tenant = {p["tenant"]: p for p in pins(tenant_server, ADMIN)}
    assert set(by_tenant) == {"alpha", "beta"}
    assert by_tenant["alpha"]["blocks"] >= 9 and by_tenant["beta"]["blocks"] >= 9
    beta_pin = by_tenant["beta"]["id"]

    # Alpha pins a second prefix: its share holds one, so alpha's own older pin yields.
    ask(alpha, pinned("Alpha's second system prompt replaces the first one here. " * 9), "hi")
    now = pins(tenant_server, ADMIN)
    assert [p["tenant"] for p in now].count("alpha") == 1
    assert beta_pin in {p["id"] for p in now}
    assert by_tenant["alpha"]["id"] not in {p["id"] for p in now}

    # Non-admin keys cannot see or change pins.
    resp = httpx.get(tenant_server.url + "/v1/cache/pins", headers={"authorization": "Bearer key-tenant-a01"})
    assert resp.status_code == 403


def test_admin_pin_routes(tenant_server: InProcessServer) -> None:
    url = tenant_server.url + "/v1/cache/pins"
    prompt = "An operator pins this shared document for the beta tenant. " * 8
    resp = httpx.post(url, json={"prompt": prompt, "ttl_s": 120, "tenant": "beta"}, headers=ADMIN, timeout=30)
    assert resp.status_code == 200, resp.text
    pin = resp.json()["pin"]
    assert (pin["tenant"], pin["source"], pin["ttl_s"]) == ("beta", "admin", 120)
    assert pin["id"] in {p["id"] for p in pins(tenant_server, ADMIN)}
    short = httpx.post(url, json={"prompt": "tiny", "ttl_s": 60}, headers=ADMIN, timeout=30)
    assert short.status_code == 400 and "shorter than one cache block" in short.json()["error"]["message"]
    bad = httpx.post(url, json={"prompt": prompt, "ttl_s": -1}, headers=ADMIN, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttl_s"
    assert httpx.delete(f"{url}/{pin['id']}", headers=ADMIN).status_code == 200
    assert pin["id"] not in {p["id"] for p in pins(tenant_server, ADMIN)}
    gone = httpx.delete(f"{url}/{pin['id']}", headers=ADMIN)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "pin_not_found"
    # Pins expire on the server's clock too.
    resp = httpx.post(url, json={"prompt": prompt, "ttl_s": 30, "tenant": "beta"}, headers=ADMIN, timeout=30)
    tenant_server.clock.advance(31)
    assert resp.json()["pin"]["id"] not in {p["id"] for p in pins(tenant_server, ADMIN)}
