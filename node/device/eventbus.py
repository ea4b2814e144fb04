"""Fan-out of node events to any number of subscribers, without ever stalling the node.

Each subscriber has its own bounded queue. When it is full, further events for that subscriber are
counted instead of queued, and the subscriber receives one `EventsDropped(count)` before the next
event it does get: it learns it lagged and can re-read state (the database is the truth).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

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
        """Unsubscribe: no new events arrive; iteration ends once the queued ones are read."""
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class EventBus:
    """Hands each published event to every subscriber's bounded queue, never blocking."""

    def __init__(self, capacity: int = EVENT_BUFFER) -> None:
        self._capacity = capacity
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        """A new subscription: it gets every event published from now on."""
        subscription = Subscription(self, self._capacity)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        """Offer `event` to every subscriber (one that lags counts it as dropped)."""
        for subscriber in list(self._subscribers):
            subscriber._offer(event)

    def close(self) -> None:
        """End every subscription (the node is closing)."""
        for subscriber in list(self._subscribers):
            subscriber.close()
