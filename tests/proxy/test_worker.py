"""The model worker: one thread, a bounded queue, cancellation, shutdown.

These use a small in-test engine double (a generator function) only to exercise the queue; the
end-to-end tests drive the real Engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from proxy.worker import ModelWorker, QueueFull, WorkerClosed


def _counting(n: int, seen: list[int], delay_s: float = 0.0):
    def work(cancel: threading.Event) -> Iterator[int]:
        for i in range(n):
            if cancel.is_set():
                return
            seen.append(i)
            if delay_s:
                cancel.wait(delay_s)
            yield i

    return work


def test_items_arrive_in_order_on_the_loop() -> None:
    async def main() -> list[int]:
        worker = ModelWorker(4)
        worker.start()
        try:
            return [i async for i in worker.submit(_counting(5, []))]
        finally:
            worker.close(1.0)

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_full_queue_refuses_at_once() -> None:
    async def main() -> None:
        worker = ModelWorker(1)
        worker.start()
        gate = threading.Event()
        try:
            blocker = worker.submit(lambda cancel: iter([gate.wait(5)]))
            while not blocker.started.is_set():
                await asyncio.sleep(0.01)
            worker.submit(_counting(1, []))  # waits in the queue
            with pytest.raises(QueueFull):
                worker.submit(_counting(1, []))
            assert worker.stats().rejected == 1
            gate.set()
        finally:
            worker.close(1.0)

    asyncio.run(main())


def test_consumer_leaving_cancels_the_job() -> None:
    seen: list[int] = []

    async def main() -> None:
        worker = ModelWorker(4)
        worker.start()
        try:
            stream = worker.submit(_counting(1000, seen, delay_s=0.01))
            async for i in stream:
                if i == 2:
                    break
            stream.cancel()
            for _ in range(100):
                if not worker.busy:
                    break
                await asyncio.sleep(0.01)
            assert not worker.busy
        finally:
            worker.close(1.0)

    asyncio.run(main())
    assert len(seen) < 50


def test_errors_reach_the_caller_and_close_refuses_new_work() -> None:
    async def main() -> None:
        worker = ModelWorker(2)
        worker.start()

        def boom(cancel: threading.Event) -> int:
            raise ValueError("bad")

        with pytest.raises(ValueError):
            await worker.call(boom)
        assert await worker.call(lambda cancel: 7) == 7
        assert worker.close(1.0)
        with pytest.raises(WorkerClosed):
            worker.submit(_counting(1, []))

    asyncio.run(main())
