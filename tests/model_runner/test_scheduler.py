"""The scheduler alone: what goes into a step, FIFO admission, the budgets, waiting on in-flight
blocks. Sequences here are real ``Sequence`` records with small real K/V buffers."""

from __future__ import annotations

import threading

import pytest
import torch

from cache_store.prefix_cache import PrefixHit
from model_runner.kv import RequestKV
from model_runner.records import GenerationRequest
from model_runner.sampling import SamplingParams
from model_runner.scheduler import Scheduler, SchedulerConfig
from model_runner.sequence import Sequence

SHAPES = [((2, 4, 8), (2, 4, 8))] * 2


def seq(
    n_prompt: int,
    *,
    id_: int,
    max_tokens: int = 4,
    hashes: list[bytes] | None = None,
    reserve: int = 0,
) -> Sequence:
    request = GenerationRequest(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))
    s = Sequence(id=id_, request=request, sink=lambda _e: None, cancel=threading.Event())
    s.phase = "waiting"
    s.reserve_bytes = reserve
    if hashes is not None:
        s.hit = PrefixHit.miss(hashes, "no_shared_prefix", 0)
    return s


def admit(scheduler: Scheduler) -> list[Sequence]:
    """Schedule once and do what the engine does for the admitted: give them K/V."""
    plan = scheduler.schedule()
    for s in plan.admitted:
        s.kv = RequestKV(
            SHAPES, len(s.prompt) + s.request.sampling.max_tokens, torch.float32, torch.device("cpu")
        )
        s.phase = "prefill"
    return list(plan.admitted)


def test_a_step_is_decodes_then_chunks_then_admissions_within_the_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batch_tokens=10, kv_budget_bytes=1 << 30))
    decoding = [seq(3, id_=i) for i in range(3)]
    for s in decoding:
        sched.add(s)
    admit(sched)
    for s in decoding:
        s.kv.length = 3  # type: ignore[union-attr]
        s.phase = "decode"
        s.generated.append(7)
    long = seq(25, id_=10)
    sched.add(long)
    plan = sched.schedule()
    assert [(p.seq.id, p.n_tokens) for p in plan.runs] == [(0, 1), (1, 1), (2, 1), (10, 7)]
    assert plan.admitted == (long,)
    long.kv = RequestKV(SHAPES, 30, torch.float32, torch.device("cpu"))
    long.phase = "prefill"
    long.kv.length = 7
    # Next step: the decodes again, then the rest of the budget for the prefilling request.
    plan = sched.schedule()
    assert [(p.seq.id, p.n_tokens) for p in plan.runs] == [(0, 1), (1, 1), (2, 1), (10, 7)]
    assert long.next_input(7) == list(range(8, 15))


@pytest.mark.parametrize("max_batch", [1, 2])
def test_max_batch_caps_running_requests(max_batch: int) -> None:
    sched = Scheduler(SchedulerConfig(max_batch=max_batch, max_batch_tokens=100, kv_budget_bytes=1 << 30))
    for i in range(4):
        sched.add(seq(5, id_=i))
    assert [s.id for s in admit(sched)] == list(range(max_batch))
    assert admit(sched) == []
    sched.remove(sched.running[0])
    assert [s.id for s in admit(sched)] == [max_batch]  # FIFO: the oldest waiting one


def test_the_kv_budget_holds_admission_in_fifo_order() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batch_tokens=100, kv_budget_bytes=100))
    first, big, small = seq(5, id_=1, reserve=60), seq(5, id_=2, reserve=60), seq(5, id_=3, reserve=10)
    for s in (first, big, small):
        sched.add(s)
    assert admit(sched) == [first]
    # `big` does not fit and holds `small` back: a large request is never starved.
    assert admit(sched) == []
    assert sched.stats().waiting_for_kv
    sched.remove(first)
    assert admit(sched) == [big, small]
    assert sched.kv_used == 70


def test_a_request_waits_for_blocks_a_running_request_is_computing() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batch_tokens=100, kv_budget_bytes=1 << 30))
    shared = [b"a" * 16, b"b" * 16, b"c" * 16]
    producer = seq(12, id_=1, hashes=shared)
    follower = seq(12, id_=2, hashes=[*shared, b"d" * 16])
    other = seq(12, id_=3, hashes=[b"x" * 16])
    sched.add(producer)
    assert admit(sched) == [producer]
    sched.add(follower)
    sched.add(other)
    # The follower's first missing block is in flight: it waits, and lets `other` pass.
    assert admit(sched) == [other]
    assert follower.waiting_on is producer and producer.followers == [follower]
    assert sched.stats().waiting_on_blocks == 1
    released = sched.prefill_done(producer)
    assert released == [follower] and follower.waiting_on is None
    # The engine looks it up again (now a hit); nothing is in flight any more.
    assert admit(sched) == [follower]


def test_removing_a_producer_releases_its_followers() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batch_tokens=100, kv_budget_bytes=1 << 30))
    shared = [b"a" * 16, b"b" * 16]
    producer, follower = seq(8, id_=1, hashes=shared), seq(8, id_=2, hashes=shared)
    sched.add(producer)
    admit(sched)
    sched.add(follower)
    assert admit(sched) == []
    assert sched.remove(producer) == [follower]
    assert admit(sched) == [follower]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        SchedulerConfig(max_batch=0, max_batch_tokens=4, kv_budget_bytes=1)
    with pytest.raises(ValueError, match="one request"):
        SchedulerConfig(max_batch=2, max_batch_tokens=None, kv_budget_bytes=1)


def test_followers_are_found_while_the_batch_is_full() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=1, max_batch_tokens=100, kv_budget_bytes=1 << 30))
    shared = [b"a" * 16, b"b" * 16]
    producer, follower = seq(8, id_=1, hashes=shared), seq(8, id_=2, hashes=shared)
    sched.add(producer)
    admit(sched)
    sched.add(follower)
    assert admit(sched) == []
    # Registered as waiting on the producer although no slot was free to admit it.
    assert follower.waiting_on is producer


def test_a_lookup_that_missed_blocks_cached_since_is_redone() -> None:
    cached: set[bytes] = set()
    sched = Scheduler(
        SchedulerConfig(max_batch=4, max_batch_tokens=100, kv_budget_bytes=1 << 30),
        cached=cached.__contains__,
    )
    late = seq(8, id_=1, hashes=[b"a" * 16, b"b" * 16])
    sched.add(late)
    cached.add(b"a" * 16)  # stored by a request that has finished meanwhile
    plan = sched.schedule()
    assert plan.stale == (late,) and plan.admitted == ()


def test_two_requests_ready_in_the_same_step_share_the_blocks_of_the_first() -> None:
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batch_tokens=100, kv_budget_bytes=1 << 30))
    shared = [b"a" * 16, b"b" * 16]
    first, second = seq(8, id_=1, hashes=shared), seq(12, id_=2, hashes=[*shared, b"c" * 16])
    sched.add(first)
    sched.add(second)
    assert admit(sched) == [first]
    assert second.waiting_on is first
