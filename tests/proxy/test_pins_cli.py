"""`kvproxy pins`, `pin` and `unpin` against one real server with --api-keys (blocks of 16 tokens):
a pinned prompt is listed with its tenant and tokens (table and --json) until it is unpinned; files
are read as `kvproxy warmup` reads them and every refusal is reported with the server's reason and
a non-zero exit; a non-admin key is refused in one line; --ttl takes 300, 5m, 1h30m."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import httpx
import pytest

from proxy.cli import parse_duration
from proxy.cli_client import SHORT_PIN_ID, format_duration, resolve_pin_id
from proxy.settings import format_size
from tests.proxy.conftest import BLOCK_SIZE, ServerFactory
from tests.proxy.helpers import text
from tests.proxy.test_cli import kvproxy
from tests.support.live_server import LiveServer

ADMIN = "sk-admin-pins-0123456789"
USER = "sk-user-pins-0123456789"
PINNED = re.compile(r"^pinned (pin_[0-9a-f]+) ", re.MULTILINE)


@pytest.fixture(scope="module")
def pin_server(module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    keys = tmp_path_factory.mktemp("pin-keys") / "keys.txt"
    keys.write_text(f"{ADMIN} ops admin\n{USER} app\n")
    return module_server_factory("--no-disk", "--api-keys", str(keys))


def admin_cli(server: LiveServer, *args: str) -> tuple[int, str, str]:
    proc = kvproxy(*args, "--server", server.url, env={"KVPROXY_API_KEY": ADMIN})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def listing(server: LiveServer) -> dict:
    resp = httpx.get(server.url + "/v1/cache/pins", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def pins_by_id(server: LiveServer) -> dict[str, dict]:
    return {p["id"]: p for p in listing(server)["pins"]}


def test_pin_is_listed_until_unpinned(pin_server: LiveServer) -> None:
    prompt = text(seed=150, words=80)
    rc, out, err = admin_cli(pin_server, "pin", "--prompt", prompt, "--ttl", "5m", "--tenant", "acme")
    assert rc == 0, err
    (pin_id,) = PINNED.findall(out)
    made = pins_by_id(pin_server)[pin_id]
    assert (made["tenant"], made["source"], made["ttl_s"]) == ("acme", "admin", 300.0)
    assert made["tokens"] == made["blocks"] * BLOCK_SIZE >= BLOCK_SIZE
    assert f"tenant acme, {made['tokens']:,} tokens in {made['blocks']} blocks" in out
    assert "pinned 1 of 1" in out

    rc, out, err = admin_cli(pin_server, "pins")
    assert rc == 0, err
    (row,) = [line for line in out.splitlines() if pin_id[:SHORT_PIN_ID] in line]
    for cell in ("acme", "admin", f"{made['tokens']:,}", format_size(made["bytes"])):
        assert cell in row
    now = listing(pin_server)
    assert (
        f"{format_size(now['pinned_bytes'])} pinned of {format_size(now['max_pinned_bytes'])} "
        f"(at most {format_size(now['tenant_max_bytes'])} per tenant)" in out
    )

    rc, out, err = admin_cli(pin_server, "pins", "--json")
    assert rc == 0, err
    shown = {p["id"]: p for p in json.loads(out)["pins"]}
    assert {k: shown[pin_id][k] for k in ("tenant", "tokens", "bytes")} == {
        k: made[k] for k in ("tenant", "tokens", "bytes")
    }
    assert 0 < shown[pin_id]["expires_in_s"] <= 300

    rc, out, err = admin_cli(pin_server, "unpin", pin_id[:SHORT_PIN_ID])  # the id as the table shows it
    assert rc == 0, err
    assert f"unpinned {pin_id}: tenant acme" in out
    assert pin_id not in pins_by_id(pin_server)
    rc, _, err = admin_cli(pin_server, "unpin", pin_id)
    assert rc == 2 and f"no pin '{pin_id}'" in err


def test_pin_files_reports_every_refusal_and_keeps_the_rest(pin_server: LiveServer, tmp_path: Path) -> None:
    jsonl = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": text(seed=151, words=70)}, {"role": "user", "content": "hello"}]
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"prompt": text(seed=152, words=70)}),
                json.dumps({"messages": messages}),
                json.dumps({"prompt": "too short"}),
                "{not json",
            ]
        )
    )
    plain = tmp_path / "system.txt"
    plain.write_text(text(seed=153, words=60))
    rc, out, err = admin_cli(pin_server, "pin", str(jsonl), str(plain), "--ttl", "1h30m", "--tenant", "files")
    assert rc == 1, out + err
    ids = PINNED.findall(out)
    assert len(ids) == 3 and "pinned 3 of 5" in out
    assert f"not pinned {jsonl}:3: The prompt is" in err and "shorter than one cache block (16)" in err
    assert f"skipped {jsonl}:4: not valid JSON" in err
    pinned = pins_by_id(pin_server)
    assert {(pinned[i]["tenant"], pinned[i]["ttl_s"]) for i in ids} == {("files", 5400.0)}

    # A prefix that names several pins drops none of them.
    rc, _, err = admin_cli(pin_server, "unpin", "pin_")
    assert rc == 2 and "names" in err and "give more of the id" in err
    assert set(ids) <= set(pins_by_id(pin_server))
    rc, out, err = admin_cli(pin_server, "unpin", *ids)
    assert rc == 0, err
    assert out.count("unpinned pin_") == 3
    assert not set(ids) & set(pins_by_id(pin_server))


@pytest.mark.parametrize(
    ("prompt", "ttl", "needle"),
    [
        ("too short to pin", "5m", "shorter than one cache block (16): there is nothing to pin"),
        (text(seed=154, words=80), "8d", "ttl_s"),  # past the server's 7-day bound
    ],
    ids=["short-prompt", "ttl-over-7d"],
)
def test_a_refused_pin_exits_nonzero_with_the_servers_reason(
    pin_server: LiveServer, prompt: str, ttl: str, needle: str
) -> None:
    rc, out, err = admin_cli(pin_server, "pin", "--prompt", prompt, "--ttl", ttl, "--tenant", "refused")
    assert rc == 1
    assert "not pinned --prompt: " in err and needle in err
    assert "pinned 0 of 1" in out
    assert not [p for p in listing(pin_server)["pins"] if p["tenant"] == "refused"]


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [(USER, 403, "This route needs an admin API key."), (None, 401, "KVPROXY_API_KEY")],
    ids=["user-key", "no-key"],
)
@pytest.mark.parametrize(
    "command",
    [["pins"], ["pin", "--prompt", text(seed=155, words=80), "--ttl", "300"], ["unpin", "pin_0"]],
    ids=["pins", "pin", "unpin"],
)
def test_an_admin_key_is_needed(
    pin_server: LiveServer, command: list[str], key: str | None, status: int, message: str
) -> None:
    proc = kvproxy(*command, "--server", pin_server.url, *(["--api-key", key] if key else []))
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvproxy: error: ") and f"HTTP {status}" in proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("ttl", ["5x", "0", "-1m", "m5", "1h 30m", "inf"])
def test_a_bad_ttl_is_refused_before_any_request(ttl: str) -> None:
    proc = kvproxy("pin", "--prompt", "x", "--ttl", ttl, "--server", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "argument --ttl" in proc.stderr and "cannot reach" not in proc.stderr


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        ("300", 300),
        ("90s", 90),
        ("5m", 300),
        ("1h", 3600),
        ("24h", 86_400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 7D ", 604_800),
    ],
)
def test_parse_duration(spec: str, seconds: float) -> None:
    assert parse_duration(spec) == seconds


def test_parse_duration_refuses_garbage() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (300, "5m"),
        (299.4, "4m 59s"),
        (5400, "1h 30m"),
        (86_400, "1d"),
        (90_061, "1d 1h"),
    ],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_resolve_pin_id() -> None:
    pins = {"pins": [{"id": "pin_abc1"}, {"id": "pin_abc2"}, {"id": "pin_def"}]}
    assert resolve_pin_id("pin_def", pins) == "pin_def"
    assert resolve_pin_id("pin_abc1", pins) == "pin_abc1"
    assert resolve_pin_id("de", pins) == "pin_def"  # the "pin_" may be left out
