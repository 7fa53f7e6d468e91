"""Fans committed events out to live subscribers, each exactly once and in seq order.

The store tells the hub that a job reached some seq (a hint, with the event when it
is at hand). Each job with subscribers has a channel that emits events strictly
contiguously, fetching from the store whatever hints skipped. Each subscription
keeps its own cursor: it starts by catching up from the store after the seq the
client saw, then follows the channel; any gap sends it back to the store. So a
notification lost anywhere costs latency, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from jobwire.model import Event
from jobwire.store import Store, StoreError

PAGE = 1000
RETRY_SECONDS = 0.5  # after a failed read: the database is away, the events are not lost
Deliver = Callable[[Event], None]
# Awaited before each replayed event: lets a slow consumer pace the catch-up from the
# store (live events are not paced; a consumer that falls behind them is dropped).
Ready = Callable[[], Awaitable[object]]


class Subscription:
    __slots__ = ("_catch_up", "_deliver", "_ready", "channel", "closed", "cursor")

    def __init__(self, channel: Channel, after: int, deliver: Deliver,
                 ready: Ready | None = None) -> None:
        self.channel = channel
        self.cursor = max(after, 0)
        self._deliver = deliver
        self._ready = ready
        self._catch_up: asyncio.Task[None] | None = None
        self.closed = False

    def offer(self, ev: Event) -> None:
        if self.closed or self._catch_up is not None or ev.seq <= self.cursor:
            return
        if ev.seq == self.cursor + 1:
            self._emit(ev)
        else:
            self.start_catch_up()

    def _emit(self, ev: Event) -> None:
        self.cursor = ev.seq
        self.channel.hub.delivered += 1
        self._deliver(ev)
        if ev.terminal:
            # Nothing can follow a terminal event. Closed here rather than by each
            # consumer, so it holds even when delivered before subscribe() returned.
            self.close()

    def start_catch_up(self) -> None:
        if self._catch_up is None and not self.closed:
            self._catch_up = asyncio.create_task(self._read_store())

    async def _read_store(self) -> None:
        store = self.channel.hub.store
        try:
            while not self.closed:
                try:
                    events = await store.events(self.channel.job, self.cursor, PAGE)
                except StoreError:
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                for ev in events:
                    if self._ready is not None:
                        await self._ready()
                    if self.closed:
                        return
                    if ev.seq == self.cursor + 1:
                        self._emit(ev)
                # No await between this check and rejoining the channel, so no event
                # the channel emits can fall between the store read and live delivery.
                if not events or (len(events) < PAGE and self.channel.head <= self.cursor):
                    break  # caught up (or the job was deleted under us)
        finally:
            self._catch_up = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._catch_up is not None:
            self._catch_up.cancel()
        self.channel.remove(self)


class Channel:
    """The contiguous live stream of one job's events."""

    __slots__ = ("_dirty", "_filling", "_started", "head", "hub", "job", "starting", "subs")

    def __init__(self, hub: Hub, job: str) -> None:
        self.hub = hub
        self.job = job
        self.head = 0
        self.subs: set[Subscription] = set()
        self._started = False  # a flag, not an asyncio.Event: nothing waits on it
        self._filling: asyncio.Task[None] | None = None
        self._dirty = False
        self.starting: asyncio.Task[None]  # set by Hub.subscribe; awaited by every joiner

    async def start(self) -> None:
        job = await self.hub.store.get_job(self.job)
        self.head = job.seq if job is not None else 0
        self._started = True
        self.request_fill()  # hints that came while we looked are caught here

    def hint(self, seq: int, ev: Event | None) -> None:
        if not self._started:
            return  # start() fills after it learns the head
        if seq <= self.head:
            return
        if ev is not None and seq == self.head + 1 and self._filling is None:
            self._emit(ev)
        else:
            self.request_fill()

    def _emit(self, ev: Event) -> None:
        self.head = seq = ev.seq
        subs = tuple(self.subs)  # a copy: delivering may close subscriptions
        if ev.terminal:
            for sub in subs:
                sub.offer(ev)  # closes each
            return
        # Run per event x subscriber: a live subscription at the previous seq takes the
        # event with no call but its deliver (what offer() and _emit() would do); any
        # other (catching up, behind, closed) goes through offer().
        prev = seq - 1
        delivered = 0
        for sub in subs:
            if sub.cursor == prev and sub._catch_up is None and not sub.closed:
                sub.cursor = seq
                sub._deliver(ev)
                delivered += 1
            else:
                sub.offer(ev)
        self.hub.delivered += delivered

    def request_fill(self) -> None:
        self._dirty = True
        if self._filling is None:
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while self._dirty and self.subs:
                self._dirty = False
                try:
                    events = await self.hub.store.events(self.job, self.head, PAGE)
                except StoreError:
                    self._dirty = True
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                for ev in events:
                    if ev.seq == self.head + 1:
                        self._emit(ev)
                self._dirty = self._dirty or len(events) == PAGE
        finally:
            self._filling = None

    def remove(self, sub: Subscription) -> None:
        self.subs.discard(sub)
        if not self.subs:
            self.hub._drop(self)


class EventQueue(asyncio.Queue[Event | None]):
    """A stream's buffer, bounded in bytes of encoded events rather than in events."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.held = 0
        self.drained = asyncio.Event()  # set while at most half full
        self.drained.set()

    def fits(self, ev: Event) -> bool:
        # An event bigger than the whole buffer still goes through, alone.
        return self.held == 0 or self.held + len(ev.wire) <= self.limit

    def _put(self, item: Event | None) -> None:
        super()._put(item)
        self.held += 0 if item is None else len(item.wire)
        if self.held > self.limit // 2:
            self.drained.clear()

    def _get(self) -> Event | None:
        item = super()._get()
        self.held -= 0 if item is None else len(item.wire)
        if self.held <= self.limit // 2:
            self.drained.set()
        return item


class Hub:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._channels: dict[str, Channel] = {}
        self.delivered = 0
        store.listen(self._hint)

    @property
    def subscriptions(self) -> int:
        return sum(len(ch.subs) for ch in self._channels.values())

    @property
    def channels(self) -> int:
        return len(self._channels)

    def subscriptions_of(self, job: str) -> int:
        ch = self._channels.get(job)
        return len(ch.subs) if ch else 0

    def _hint(self, job: str, seq: int, ev: Event | None) -> None:
        ch = self._channels.get(job)
        if ch is not None:
            ch.hint(seq, ev)

    def _drop(self, ch: Channel) -> None:
        if self._channels.get(ch.job) is ch:
            del self._channels[ch.job]
            if ch._filling is not None:
                ch._filling.cancel()

    async def subscribe(self, job: str, after: int, deliver: Deliver,
                        ready: Ready | None = None) -> Subscription:
        """Deliver every event of `job` with seq > after, in order, until closed or
        until its terminal event (which may come before this returns: check `closed`)."""
        ch = self._channels.get(job)
        if ch is None:
            ch = self._channels[job] = Channel(self, job)
            ch.starting = asyncio.create_task(ch.start())
        sub = Subscription(ch, after, deliver, ready)
        ch.subs.add(sub)
        try:
            await asyncio.shield(ch.starting)
        except BaseException:
            sub.close()
            if ch.starting.done() and not ch.starting.cancelled() and ch.starting.exception():
                self._drop(ch)  # the next subscriber starts a fresh channel
            raise
        sub.start_catch_up()
        return sub

    @contextlib.asynccontextmanager
    async def stream(self, job: str, after: int, buffer_bytes: int = 4 << 20
                     ) -> AsyncIterator[EventQueue]:
        """A queue of the job's events holding at most `buffer_bytes` of them (encoded);
        None in it means the consumer fell behind live events and must resume from its
        last seq. Replays from the store wait for the consumer instead."""
        queue = EventQueue(buffer_bytes)

        def deliver(ev: Event) -> None:
            if queue.fits(ev):
                queue.put_nowait(ev)
            else:
                sub.close()
                queue.put_nowait(None)

        sub = await self.subscribe(job, after, deliver, queue.drained.wait)
        try:
            yield queue
        finally:
            sub.close()

    async def wait(self, job: str, after: int, seconds: float) -> list[Event]:
        """Events after `after`, waiting up to `seconds` for the first (long-poll)."""
        events = await self.store.events(job, after, PAGE)
        if events or seconds <= 0:
            return events
        async with self.stream(job, after) as queue:
            try:
                first = await asyncio.wait_for(queue.get(), seconds)
            except TimeoutError:
                return []
            got = [first] if first is not None else []
            while not queue.empty():
                ev = queue.get_nowait()
                if ev is not None:
                    got.append(ev)
            return got
