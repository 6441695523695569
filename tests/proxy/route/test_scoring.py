"""The cache-aware picker's decisions, on a real tokenizer, real block hashes and a real Redis for
the shared tier: memory beats home, a fresh route sticks, swamped replicas are relieved, cold
prompts spread over stable homes, prompt_cache_key keeps a home, tenants never share blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache_store.hashing import FORMAT_VERSION
from cache_store.redis_store import RedisStore
from proxy.auth import KeyTable, Principal
from proxy.route.holdings import Holdings
from proxy.route.picking import Pick, RouteRequest
from proxy.route.prompts import PromptHasher, ReplicaInfo
from proxy.route.replicas import ReplicaState
from proxy.route.scoring import CachePicker, RouteWeights, rendezvous

BLOCK = 16
A, B = "http://replica-a:8000", "http://replica-b:8000"
DOC = "The quick brown fox jumps over the lazy dog while the prefix cache keeps every block. " * 6


def tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in model_dir.iterdir()
        if p.is_file() and ("token" in p.name or p.name in ("chat_template.jinja", "special_tokens_map.json"))
    }


@pytest.fixture(scope="module")
def info(tiny_model_path: Callable[[str], Path]) -> ReplicaInfo:
    return ReplicaInfo(
        model="tiny",
        fingerprint="f" * 64,
        block_size=BLOCK,
        max_context=512,
        format_version=FORMAT_VERSION,
        tokenizer_files=tokenizer_files(tiny_model_path("llama")),
    )


@pytest.fixture(scope="module")
def hasher(info: ReplicaInfo, tmp_path_factory: pytest.TempPathFactory) -> PromptHasher:
    return PromptHasher(info, tmp_path_factory.mktemp("route-tokenizer"))


class Feed:
    """Exact holdings per replica, as ``EventFeed`` hands them over."""

    def __init__(self) -> None:
        self.held: dict[str, Holdings] = {}

    def holdings(self, replica: str) -> Holdings | None:
        return self.held.get(replica)

    def forget(self, replica: str) -> None:
        self.held.pop(replica, None)

    def hold(self, replica: str, memory: list[bytes] = (), disk: list[bytes] = ()) -> None:  # type: ignore[assignment]
        holdings = Holdings()
        holdings.reset("epoch", 0, {"memory": memory, "disk": disk})
        self.held[replica] = holdings


def hashes_of(hasher: PromptHasher, request: RouteRequest) -> bytes:
    """The first block's hash (the cold home's key)."""
    found = hasher.hashes(request.route, request.body, None)
    assert found
    return found[0]


def chat(text: str, **extra: object) -> RouteRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], **extra}
    return RouteRequest("/v1/chat/completions", body, None)


def replicas(**in_flight: int) -> list[ReplicaState]:
    return [
        ReplicaState(A, healthy=True, in_flight=in_flight.get("a", 0)),
        ReplicaState(B, healthy=True, in_flight=in_flight.get("b", 0)),
    ]


def run(picker: CachePicker, request: RouteRequest, reps: list[ReplicaState], answered: bool = True) -> Pick:
    """One pick; ``answered``: its first choice answered (as the router tells the picker)."""
    pick = asyncio.run(picker.pick(request, reps))
    if answered:
        picker.routed(request, pick.order[0], pick)
    return pick


@pytest.fixture
def shared(redis_url: str, redis_prefix: str) -> Iterator[RedisStore]:
    store = RedisStore(redis_url, prefix=redis_prefix)
    yield store
    store.close()


def test_a_cold_prompt_goes_to_its_rendezvous_home(hasher: PromptHasher) -> None:
    picker = CachePicker(hasher, Feed())
    request = chat(DOC + " first")
    hashes = hasher.hashes(request.route, request.body, None)
    assert hashes and len(hashes) >= 4
    pick = run(picker, request, replicas())
    assert pick.reason == "cold_home" and pick.expected_cached_tokens == 0
    assert pick.order[0] == rendezvous(hashes[0], [A, B])[0]
    # Another prompt with the same first block has the same home.
    again = run(picker, chat(DOC + " second, with another question"), replicas())
    assert again.order[0] == pick.order[0]
    # Different first blocks spread over both replicas.
    homes = {(run(picker, chat(f"{i} {DOC}"), replicas())).order[0] for i in range(24)}
    assert homes == {A, B}


def test_memory_beats_home_and_a_fresh_route_sticks(hasher: PromptHasher) -> None:
    feed = Feed()
    picker = CachePicker(hasher, feed)
    request = chat(DOC + " held")
    hashes = hasher.hashes(request.route, request.body, None)
    assert hashes is not None
    home = rendezvous(hashes[0], [A, B])[0]
    other = B if home == A else A
    feed.hold(other, memory=hashes[:3])
    pick = run(picker, request, replicas())
    assert pick.order[0] == other and pick.reason == "memory"
    assert pick.expected_cached_tokens == 3 * BLOCK
    # A burst on a new prefix: the first request goes to a replica that is not its home (the home
    # is busy), and the next ones follow it there while it is still prefilling, though the home
    # is idle again by then.
    fresh = "A brand new shared document nobody has sent before. " * 6
    fresh_home = rendezvous(hashes_of(hasher, chat(fresh + " one")), [A, B])[0]
    busy = {"a": 9} if fresh_home == A else {"b": 9}
    first = run(picker, chat(fresh + " one"), replicas(**busy), answered=False)
    assert first.order[0] != fresh_home and first.reason == "least_loaded"
    for question in (" two", " three"):
        follow = run(picker, chat(fresh + question), replicas(), answered=False)
        assert follow.reason == "memory" and follow.order[0] == first.order[0]


def test_a_swamped_replica_is_relieved(hasher: PromptHasher) -> None:
    feed = Feed()
    picker = CachePicker(hasher, feed, weights=RouteWeights(imbalance_abs=4, imbalance_rel=2.0))
    request = chat(DOC + " busy")
    hashes = hasher.hashes(request.route, request.body, None)
    assert hashes is not None
    feed.hold(A, memory=hashes)
    assert len(hashes) > 3 * picker.weights.load_weight
    assert run(picker, request, replicas(a=3)).order[0] == A  # busy, but the hit is worth it
    pick = run(picker, request, replicas(a=12, b=1))
    assert pick.reason == "imbalance" and pick.order[0] == B


def test_the_imbalance_gate_overrides_a_cheap_hit(hasher: PromptHasher) -> None:
    feed = Feed()
    weights = RouteWeights(load_weight=0.5, imbalance_abs=4, imbalance_rel=2.0)
    picker = CachePicker(hasher, feed, weights=weights)
    request = chat(DOC + " gate")
    hashes = hasher.hashes(request.route, request.body, None)
    assert hashes is not None
    feed.hold(A, memory=hashes)
    assert run(picker, request, replicas(a=4, b=1)).order[0] == A  # within both thresholds
    pick = run(picker, request, replicas(a=12, b=1))
    assert pick.reason == "imbalance" and pick.order == [B, A]


def test_shared_tier_blocks_count_as_a_cheap_restore(hasher: PromptHasher, shared: RedisStore) -> None:
    feed = Feed()
    picker = CachePicker(hasher, feed, shared)
    request = chat(DOC + " shared")
    hashes = hasher.hashes(request.route, request.body, None)
    assert hashes is not None
    shared.put_many([(h, b"record") for h in hashes[:4]])
    pick = run(picker, request, replicas())
    assert pick.reason == "shared" and pick.expected_cached_tokens == 4 * BLOCK
    # Memory on one replica beyond what Redis holds wins over the shared tier.
    feed.hold(B, memory=hashes[:2])
    pick = run(CachePicker(hasher, feed, shared), request, replicas())
    assert pick.order[0] == B and pick.reason == "memory" and pick.expected_cached_tokens == 4 * BLOCK


def test_prompt_cache_key_keeps_one_home(hasher: PromptHasher) -> None:
    picker = CachePicker(hasher, Feed())
    picks = [run(picker, chat(f"{i} {DOC}", prompt_cache_key="tenant-7-agent"), replicas()) for i in range(8)]
    assert {p.reason for p in picks} == {"key"}
    assert len({p.order[0] for p in picks}) == 1


def test_short_or_invalid_prompts_go_to_the_least_loaded(hasher: PromptHasher) -> None:
    picker = CachePicker(hasher, Feed())
    assert (run(picker, chat("hi"), replicas(a=2))).order[0] == B
    bad = RouteRequest("/v1/chat/completions", {"messages": "not a list"}, None)
    pick = run(picker, bad, replicas(b=5))
    assert pick.reason == "least_loaded" and pick.order[0] == A


def test_tenants_and_salts_never_share_blocks(info: ReplicaInfo, tmp_path: Path) -> None:
    keys = KeyTable({"key-a": Principal("acme", False), "key-b": Principal("globex", False)})
    hasher = PromptHasher(info, tmp_path, keys)
    body = chat(DOC).body
    a = hasher.hashes("/v1/chat/completions", body, "key-a")
    b = hasher.hashes("/v1/chat/completions", body, "key-b")
    salted = hasher.hashes("/v1/chat/completions", {**body, "cache_salt": "s1"}, "key-a")
    assert a and b and salted
    assert not set(a) & set(b) and not set(a) & set(salted)
    assert hasher.hashes("/v1/chat/completions", body, "no-such-key") is None


def test_prefill_work_still_queued_on_a_replica_counts_against_it(hasher: PromptHasher) -> None:
    picker = CachePicker(hasher, Feed())
    big = chat("An unrelated long document that takes a while to prefill. " * 8)
    small = chat(DOC + " queued")
    home = rendezvous(hashes_of(hasher, small), [A, B])[0]
    # The big prompt is sent to the small one's home and has not answered yet.
    busy = {"a": 9} if home == B else {"b": 9}
    sent = run(picker, big, replicas(**busy), answered=False)
    assert sent.order[0] == home
    assert picker.prefill_backlog(home) == len(hasher.hashes(big.route, big.body, None) or [])
    pick = run(picker, small, replicas(), answered=False)
    assert pick.order[0] != home and pick.reason == "least_loaded"
    # Once it answered, its blocks are no longer queued work: the home takes the next cold prompt.
    picker.routed(big, home, sent)
    assert picker.prefill_backlog(home) == 0
    again = run(CachePicker(hasher, Feed()), small, replicas())
    assert again.order[0] == home and again.reason == "cold_home"
