"""Admission control: at most ``max_concurrency`` requests in flight, ``queue_size`` more waiting."""

from __future__ import annotations

import asyncio
from collections import deque


class Overloaded(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Limiter:
    def __init__(self, max_concurrency: int = 0, queue_size: int = 0, queue_timeout: float = 60.0) -> None:
        self.max = max_concurrency  # 0: unlimited
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        if not self.max or self.active < self.max:
            self.active += 1
            return True
        return False

    async def enter(self) -> None:
        """Wait for a slot; Overloaded(429) when the queue is full, (503) when the wait times out."""
        if self.try_enter():
            return
        if len(self._waiters) >= self.queue_size:
            raise Overloaded(429, f"router is at its limit of {self.max} concurrent requests and "
                                  f"{self.queue_size} queued; retry later")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.queue_timeout)  # a slot is handed over with the result
        except asyncio.TimeoutError:
            raise Overloaded(503, f"request waited {self.queue_timeout:g} s in the router queue") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.leave()  # we were handed a slot but are going away: pass it on
            raise
        finally:
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def leave(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand our slot over; ``active`` stays the same
                return
        self.active -= 1
