"""Admission control: at most `max_in_flight` requests hold a slot, at most `max_queue` wait;
rate limits per client under a global cap (`RateLimiter`)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

from ..errors import Overloaded


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout: float, retry_after: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(self.retry_after)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # The slot is handed over by release(), so in_flight already counts us when woken.
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # woken just as we gave up: pass the slot on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded(self.retry_after) from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class TokenBucket:
    """`per_minute` requests a minute (or per `period` seconds), bursts up to `per_minute`; the
    caller passes the time."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, per_minute: int, now: float, period: float = 60.0) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / period
        self.tokens = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, count: int = 1) -> int:
        """Whole seconds until `count` tokens are there (0: they are there now)."""
        return 0 if self.tokens >= count else int((count - self.tokens) / self.rate) + 1


class RateLimiter:
    """One bucket per client (an API token, else an address) under one global cap, so that one
    client's burst takes at most its own share and cannot starve the others.

    At most `max_clients` buckets are kept (least recently used go first): a client that comes
    back after eviction starts with a full bucket, and the global cap still holds.
    """

    def __init__(self, per_minute: int, per_client_per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.per_client_per_minute = per_client_per_minute
        self.max_clients = max_clients
        self._global: TokenBucket | None = None
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, client: str, now: float) -> None:
        """Take one request for `client`, or raise Overloaded with the seconds to wait."""
        if self._global is None:
            self._global = TokenBucket(self.per_minute, now)
        bucket = self._clients.get(client)
        if bucket is None:
            if len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
            bucket = self._clients[client] = TokenBucket(self.per_client_per_minute, now)
        else:
            self._clients.move_to_end(client)
        bucket.refill(now)
        self._global.refill(now)
        wait = bucket.wait() or self._global.wait()
        if wait:
            raise Overloaded(wait)
        bucket.tokens -= 1
        self._global.tokens -= 1
