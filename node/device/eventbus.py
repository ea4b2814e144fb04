"""Fan-out of node events to any number of subscribers, without ever stalling the node.

Each subscriber has its own bounded queue. When it is full, further events for that subscriber are
counted instead of queued, and the subscriber receives one `EventsDropped(count)` before the next
event it does get: it learns it lagged and can re-read state (the database is the truth).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType

import trio

from node.device.config import EVENT_BUFFER
from node.device.events import Event, EventsDropped

__all__ = ["EventBus", "Subscription"]


class Subscription:
    """An async iterator of events; also a (sync or async) context manager that unsubscribes."""

    def __init__(self, bus: EventBus, capacity: int) -> None:
        self._bus = bus
        self._capacity = capacity
        self._queue: deque[Event] = deque()
        self._dropped = 0
        self._ready = trio.Event()
        self._closed = False

    def _offer(self, event: Event) -> None:
        if len(self._queue) >= self._capacity:
            self._dropped += 1
        else:
            self._queue.append(event)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._bus._subscribers.discard(self)
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._dropped and (not self._queue or len(self._queue) >= self._capacity):
                count, self._dropped = self._dropped, 0
                return EventsDropped(count=count)
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._ready = trio.Event()
            await self._ready.wait()

    def get_nowait(self) -> Event | None:
        """The next queued event, or None (for tests and polling loops)."""
        if self._dropped:
            count, self._dropped = self._dropped, 0
            return EventsDropped(count=count)
        return self._queue.popleft() if self._queue else None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class EventBus:
    def __init__(self, capacity: int = EVENT_BUFFER) -> None:
        self._capacity = capacity
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._capacity)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            subscriber._offer(event)

    def close(self) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close()
