"""The NOTIFY payloads of the PostgreSQL store, written by Python (`note`) or by the
statement itself (`note_sql`): other processes get each event whole when it fits and
as a bare seq when not; a process skips its own."""

from __future__ import annotations

import asyncio

import pytest

from jobwire.model import Event, Status
from jobwire.store import Lease, open_store
from jobwire.store.pg_listen import Listener
from jobwire.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres


async def test_finishes_notified_by_sql_arrive_whole_or_by_seq(pg_url: str) -> None:
    reader, writer = PostgresStore(pg_url), open_store(pg_url)
    await reader.open()
    await writer.open()
    got: dict[str, list[tuple[int, Event | None]]] = {}
    reader.listen(lambda job, seq, ev: got.setdefault(job, []).append((seq, ev)))
    try:
        small, _ = await writer.submit("o", "t", {}, "small", 1)
        big, _ = await writer.submit("o", "t", {}, "big", 1)
        claimed = {j.id: j for j in await writer.claim("w", ["t"], 2, 30)}
        await asyncio.gather(*(writer.finish(Lease(job.id, "w", claimed[job.id].attempt),
                                             Status.COMPLETED, result)
                               for job, result in ((small, {"n": 1}), (big, "x" * 9000))))
        for _ in range(400):
            if all(len(got.get(j.id, [])) == 3 for j in (small, big)):
                break
            await asyncio.sleep(0.05)
        stored = {j.id: await writer.events(j.id, 0) for j in (small, big)}
    finally:
        await writer.close()
        await reader.close()
    assert got[small.id] == [(ev.seq, ev) for ev in stored[small.id]]
    assert got[big.id][:2] == [(ev.seq, ev) for ev in stored[big.id][:2]]
    assert got[big.id][2] == (3, None), "too big to notify: announced by seq"
    assert stored[big.id][2].data["result"] == "x" * 9000


async def test_a_listener_skips_its_own_notes_in_both_spellings(pg_url: str) -> None:
    got: list[int] = []
    mine = Listener(pg_url, "c", lambda job, seq, ev: got.append(seq), None)  # type: ignore[arg-type]
    other = Listener(pg_url, "c", lambda job, seq, ev: None, None)  # type: ignore[arg-type]
    ev = Event(job="j", seq=4, type="progress", data={"info": "x"}, at=1.5)
    store = open_store(pg_url)
    await store.open()
    try:
        [[by_sql]] = await store._query(  # type: ignore[attr-defined]
            "SELECT " + mine.note_sql("'j'", "5", "'progress'", "'{}'::json", "1.5"))
    finally:
        await store.close()
    mine._on_note(mine.note(ev))
    mine._on_note(by_sql)
    assert got == []
    mine._on_note(other.note(ev))
    mine._on_note(by_sql.replace(mine.origin, other.origin))
    assert got == [4, 5]
