"""Unit tests of node.server.admission.Admission: the in-flight limit, the FIFO queue, queue
timeouts and cancellations, and that the counts stay right through all of them."""

from __future__ import annotations

import asyncio

import pytest

from node.errors import Overloaded
from node.server.admission import Admission


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_limit_then_queue():
    adm = Admission(max_in_flight=2, max_queue=5, queue_timeout=30, retry_after=3)
    await adm.acquire()
    await adm.acquire()
    assert (adm.in_flight, adm.queued) == (2, 0)
    waiter = asyncio.ensure_future(adm.acquire())
    await settle()
    assert not waiter.done()
    assert (adm.in_flight, adm.queued) == (2, 1)
    adm.release()  # the slot passes to the waiter
    await waiter
    assert (adm.in_flight, adm.queued) == (2, 0)
    adm.release()
    adm.release()
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_queue_full_is_overloaded_with_retry_after():
    adm = Admission(max_in_flight=1, max_queue=1, queue_timeout=30, retry_after=9)
    await adm.acquire()
    waiter = asyncio.ensure_future(adm.acquire())
    await settle()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.retry_after == 9
    assert (info.value.status, info.value.code) == (429, "OVERLOADED")
    assert (adm.in_flight, adm.queued) == (1, 1)
    adm.release()
    await waiter
    adm.release()
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_no_queue_refuses_at_once():
    adm = Admission(max_in_flight=1, max_queue=0, queue_timeout=30, retry_after=1)
    await adm.acquire()
    with pytest.raises(Overloaded):
        await adm.acquire()
    assert (adm.in_flight, adm.queued) == (1, 0)


async def test_queue_timeout_is_overloaded_and_leaves_counts():
    adm = Admission(max_in_flight=1, max_queue=4, queue_timeout=0.05, retry_after=2)
    await adm.acquire()
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.retry_after == 2
    assert (adm.in_flight, adm.queued) == (1, 0)
    adm.release()
    assert (adm.in_flight, adm.queued) == (0, 0)
    await adm.acquire()  # the slot is usable again
    assert adm.in_flight == 1


async def test_fifo_order():
    adm = Admission(max_in_flight=1, max_queue=10, queue_timeout=30, retry_after=1)
    await adm.acquire()
    order: list[int] = []

    async def worker(i: int) -> None:
        async with adm.slot():
            order.append(i)
            await asyncio.sleep(0)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.ensure_future(worker(i)))
        await settle()  # each is queued before the next
    assert adm.queued == 5
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_cancelled_waiter_leaves_counts_right():
    adm = Admission(max_in_flight=1, max_queue=4, queue_timeout=30, retry_after=1)
    await adm.acquire()
    first = asyncio.ensure_future(adm.acquire())
    second = asyncio.ensure_future(adm.acquire())
    await settle()
    assert adm.queued == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (adm.in_flight, adm.queued) == (1, 1)
    adm.release()  # goes to `second`, not to the cancelled one
    await second
    assert (adm.in_flight, adm.queued) == (1, 0)
    adm.release()
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_cancelled_just_after_being_woken_passes_the_slot_on():
    adm = Admission(max_in_flight=1, max_queue=4, queue_timeout=30, retry_after=1)
    await adm.acquire()
    woken = asyncio.ensure_future(adm.acquire())
    next_in_line = asyncio.ensure_future(adm.acquire())
    await settle()
    adm.release()  # hands the slot to `woken` ...
    woken.cancel()  # ... which is cancelled before it runs
    try:
        await woken
        holds = True  # Python 3.11's wait_for may return the result instead of raising
    except asyncio.CancelledError:
        holds = False
    if holds:
        adm.release()
    await asyncio.wait_for(next_in_line, 5)  # the slot was not lost
    assert (adm.in_flight, adm.queued) == (1, 0)
    adm.release()
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_slot_releases_on_exception_and_cancellation():
    adm = Admission(max_in_flight=1, max_queue=1, queue_timeout=30, retry_after=1)
    with pytest.raises(RuntimeError):
        async with adm.slot():
            assert adm.in_flight == 1
            raise RuntimeError("boom")
    assert adm.in_flight == 0

    entered = asyncio.Event()

    async def hold() -> None:
        async with adm.slot():
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(hold())
    await entered.wait()
    assert adm.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (adm.in_flight, adm.queued) == (0, 0)


async def test_many_concurrent_users_never_exceed_the_limit():
    adm = Admission(max_in_flight=3, max_queue=100, queue_timeout=30, retry_after=1)
    peak = 0
    active = 0

    async def user(i: int) -> None:
        nonlocal peak, active
        async with adm.slot():
            active += 1
            peak = max(peak, active)
            assert adm.in_flight <= 3
            for _ in range(i % 4):
                await asyncio.sleep(0)
            active -= 1

    tasks = [asyncio.ensure_future(user(i)) for i in range(50)]
    await settle()
    for task in tasks[::7]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    assert peak == 3
    assert (adm.in_flight, adm.queued) == (0, 0)
