"""`kvproxy route` as users run it: a subprocess in front of replicas, configured by flags and
environment, that refuses a replica whose blocks it cannot hash (another block size) with a
clear log line and routes everything to the ones it can."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from proxy.settings import ServeSettings
from tests.proxy.route.harness import ADMIN_KEY, USER_KEY, write_api_keys
from tests.support.inprocess_server import FakeClock, InProcessServer
from tests.support.live_server import LiveServer


def replica(model: Path, tmp: Path, keys: Path, block_size: int) -> InProcessServer:
    settings = ServeSettings(
        model=str(model),
        served_model_name=["tiny"],
        disk_dir=tmp / f"blocks-{block_size}",
        block_size=block_size,
        max_context=512,
        default_max_tokens=4,
        api_keys=keys,
    )
    return InProcessServer(settings, FakeClock()).start()


@pytest.mark.slow
def test_kvproxy_route_serves_through_the_replicas_it_can_hash(
    tiny_model_path: Callable[[str], Path], tmp_path: Path
) -> None:
    keys = write_api_keys(tmp_path / "keys.txt")
    good = replica(tiny_model_path("llama"), tmp_path, keys, 16)
    other = replica(tiny_model_path("llama"), tmp_path, keys, 32)
    router = LiveServer(
        ["--replica", good.url, "--replica", other.url, "--api-keys", str(keys)],
        log_path=tmp_path / "route.log",
        cache_dir=tmp_path / "cache",
        env={"KVPROXY_ROUTE_REPLICA_API_KEY": ADMIN_KEY},
        command="route",
    )
    try:
        router.start()
        client = openai.OpenAI(base_url=router.url + "/v1", api_key=USER_KEY, max_retries=0)
        doc = "A shared document the router keeps on one replica. " * 8
        for question in ("First?", "Second?", "Third?"):
            raw = client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=[{"role": "system", "content": doc}, {"role": "user", "content": question}],
                max_tokens=2,
            )
            assert raw.headers["x-kvproxy-replica"] == good.url
        assert raw.parse().usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
        log = router.log_text()
        assert f"replica {other.url} refused: block size 32 differs from 16" in log
        assert "routing for tiny (block size 16" in log
    finally:
        router.stop()
        good.stop()
        other.stop()
