"""docker-compose.yml's `scale-out` topology without Docker: two replicas and the router on a
three-master Redis Cluster (private redis-server nodes on loopback), with the same cluster
settings (``redis_cluster=True`` on both sides, one startup node in the URL). A prompt warmed on
the replica its cold home rule would not pick draws the same prompt there through the router: the
replica's block events reached the router through the cluster, and the blocks are in the cluster."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.route.replicas import Replicas
from proxy.route.scoring import rendezvous
from proxy.route.server import build_picker, reference_info
from proxy.route.settings import RouteSettings
from proxy.settings import ServeSettings
from tests.proxy.route.harness import ADMIN_KEY, USER_KEY, RouterServer, write_api_keys
from tests.support.inprocess_server import FakeClock, InProcessServer
from tests.support.redis_fixtures import RedisClusterNodes

BLOCK = 16


def wait_until(cond: Callable[[], object], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cluster_keys(cluster: RedisClusterNodes, prefix: str) -> list[bytes]:
    found: list[bytes] = []
    for server in cluster.servers:
        with server.client() as client:
            found.extend(client.scan_iter(match=prefix + "*", count=1000))
    return found


def delete_prefix(cluster: RedisClusterNodes, prefix: str) -> None:
    for server in cluster.servers:
        with server.client() as client:
            for key in list(client.scan_iter(match=prefix + "*", count=1000)):
                client.unlink(key)


@pytest.mark.slow
def test_the_router_follows_block_events_through_a_redis_cluster(
    tiny_model_path: Callable[[str], Path], tmp_path: Path, redis_cluster: RedisClusterNodes
) -> None:
    model = tiny_model_path("llama")
    keys = write_api_keys(tmp_path / "keys.txt")
    prefix = f"kvptest:cluster-route:{uuid.uuid4().hex}:"
    replicas: list[InProcessServer] = []
    started: list[object] = []
    try:
        for i in range(2):
            settings = ServeSettings(
                model=str(model),
                served_model_name=["tiny"],
                disk_dir=tmp_path / f"blocks-{i}",
                block_size=BLOCK,
                max_context=512,
                default_max_tokens=4,
                api_keys=keys,
                redis_url=redis_cluster.url,
                redis_cluster=True,
                redis_prefix=prefix,
            )
            replicas.append(InProcessServer(settings, FakeClock()).start())
        urls = [r.url for r in replicas]
        route_settings = RouteSettings(
            replica=urls,
            replica_api_key=ADMIN_KEY,
            api_keys=keys,
            redis_url=redis_cluster.url,
            redis_cluster=True,
            redis_prefix=prefix,
        )
        info = reference_info(route_settings, 30.0)
        picker, feed = build_picker(route_settings, info, tmp_path / "router")
        started.append(feed)
        pool = Replicas(urls, health_interval_s=0.2)
        feed.refuse_with(pool.refuse)
        feed.start()
        router = RouterServer(pool, picker).start()  # type: ignore[arg-type]
        started.append(router)

        doc = "Document cluster: " + " ".join(f"fact cluster-{i} is worth remembering." for i in range(8))
        body = {
            "model": "tiny",
            "messages": [{"role": "system", "content": doc}, {"role": "user", "content": "Which fact?"}],
            "max_tokens": 2,
            "temperature": 0,
        }
        user = {"Authorization": f"Bearer {USER_KEY}"}
        hashes = picker.hasher.hashes("/v1/chat/completions", body, USER_KEY)
        assert hashes
        # Warm it on the replica the cold home rule would not pick, straight (not via the router).
        other = next(u for u in urls if u != rendezvous(hashes[0], urls)[0])
        warm = httpx.post(other + "/v1/chat/completions", json=body, headers=user, timeout=60)
        assert warm.status_code == 200, warm.text

        def held() -> set[bytes]:
            holdings = feed.holdings(other)
            return set(holdings.tiers["memory"]) if holdings is not None else set()

        wait_until(lambda: set(hashes) <= held(), what="the replica's block events through the cluster")
        before = router.metric("kvproxy_route_decisions_total", replica=other, reason="memory")
        resp = httpx.post(router.url + "/v1/chat/completions", json=body, headers=user, timeout=60)
        assert resp.status_code == 200, resp.text
        decisions = httpx.get(router.url + "/v1/route/stats", timeout=10).json()["replicas"]
        assert resp.headers["x-kvproxy-replica"] == other, decisions
        assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= (len(hashes) - 1) * BLOCK
        assert router.metric("kvproxy_route_decisions_total", replica=other, reason="memory") == before + 1
        # The shared tier is the cluster: the warmed blocks were written across its nodes.
        wanted = {(prefix + h.hex()).encode() for h in hashes}
        wait_until(
            lambda: wanted <= set(cluster_keys(redis_cluster, prefix)), what="the blocks in the cluster"
        )
        with redis_cluster.servers[0].client() as client:
            assert client.cluster("info")["cluster_state"] == "ok"
    finally:
        for thing in reversed(started):
            if isinstance(thing, RouterServer):
                thing.stop()
            else:
                thing.close()  # type: ignore[attr-defined]
        for replica in replicas:
            replica.stop()
        delete_prefix(redis_cluster, prefix)
