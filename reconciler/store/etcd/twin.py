"""The etcd store's renewal twin: publish() and read() from a thread other than the event loop's.

A gRPC channel belongs to the event loop it was made on, so the thread that renews the
agent's lease (reconciler/cluster/renewal.py) gets a twin of the store on an event loop of its
own, run in that thread. The twin holds the node's etcd lease and keeps it alive; the store's
claims bind to that lease, and the twin's reads count for the store's watch (EtcdStore).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

S = TypeVar("S")


class Twin(Generic[S]):
    """`make()` builds the twin store, at the first run()."""

    def __init__(self, make: Callable[[], S]):
        self._make = make
        self.store: S | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, call: Callable[[S], Awaitable]):
        """The coroutine call(twin) run to completion in the calling thread, on the twin's
        event loop. Call it from one thread at a time."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self.store is None:
            self.store = self._make()
        return self._loop.run_until_complete(call(self.store))

    async def close(self, close: Callable[[S], Awaitable]) -> None:
        """close(twin) on its loop, and that loop closed, from another event loop."""
        if self.store is not None and self._loop is not None:
            # The twin's loop is idle by now (the renewal thread has stopped): run its close
            # on a worker thread, as this thread already runs a loop.
            twin, loop = self.store, self._loop
            await asyncio.to_thread(lambda: (loop.run_until_complete(close(twin)), loop.close()))
            self.store = self._loop = None
