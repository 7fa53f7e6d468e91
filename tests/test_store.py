"""Store semantics on every backend: dedup under real concurrency, the event-log/count
invariant, fenced writes and lease expiry."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from typing import Any

import pytest

from jobwire.model import IllegalTransition, ItemStatus, Status, apply_event, counts_of
from jobwire.store import End, ItemUpdate, Lease, LeaseLost, Store, open_store


async def replay(store: Store, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fold the whole event log, checking at every seq that counts match item states."""
    snap: dict[str, Any] = {"seq": 0}
    items: dict[str, Any] = {}
    after = 0
    while events := await store.events(job_id, after):
        for ev in events:
            assert ev.seq == snap["seq"] + 1, "the log has a gap or a duplicate"
            snap, items = apply_event(snap, items, {"seq": ev.seq, "type": ev.type,
                                                    "data": ev.data, "at": None})
            assert snap["progress"] == counts_of(items.values()), f"disagree at seq {ev.seq}"
        after = events[-1].seq
    return snap, items


async def test_counts_equal_item_states_at_every_seq(store: Store) -> None:
    """Many jobs, many concurrent writers trying random (also illegal) item transitions."""
    jobs = [(await store.submit("o", "t", {}, None, 3))[0] for _ in range(6)]
    claimed = await store.claim("w", ["t"], 10, 30)
    assert {j.id for j in claimed} == {j.id for j in jobs}
    leases = [Lease(j.id, "w", j.attempt) for j in claimed]
    for lease in leases:
        await store.declare_items(lease, [f"r{k}" for k in range(12)])
    rng = random.Random(7)
    rejected = 0

    async def writer(lease: Lease) -> None:
        nonlocal rejected
        for _ in range(40):
            updates = [ItemUpdate(f"r{rng.randrange(12)}", rng.choice(list(ItemStatus)))
                       for _ in range(rng.randint(1, 3))]
            try:
                await store.update_items(lease, updates)
            except IllegalTransition:
                rejected += 1  # the whole batch is rolled back

    await asyncio.gather(*(writer(lease) for lease in leases for _ in range(3)))
    assert rejected > 0, "the test should exercise illegal transitions too"
    for lease in leases:
        snap, items = await replay(store, lease.job)
        found = await store.job_with_items(lease.job)
        assert found is not None
        job, rows = found
        assert snap["seq"] == job.seq
        assert job.progress.as_dict() == counts_of([i.as_dict() for i in rows])
        assert {i.ref: i.status.value for i in rows} == {r: it["status"] for r, it in items.items()}


async def test_writes_need_the_current_lease(store: Store) -> None:
    job, _ = await store.submit("o", "t", {}, None, 2)
    [claimed] = await store.claim("w1", ["t"], 1, 0.01)
    lease = Lease(job.id, "w1", claimed.attempt)
    await store.declare_items(lease, ["a", "b"])
    await store.update_items(lease, [ItemUpdate("a", ItemStatus.DONE)])
    await asyncio.sleep(0.05)
    assert await store.expire_leases() == 1
    with pytest.raises(LeaseLost):
        await store.update_items(lease, [ItemUpdate("b", ItemStatus.DONE)])
    [again] = await store.claim("w2", ["t"], 1, 30)
    assert again.attempt == 2
    lease2 = Lease(job.id, "w2", again.attempt)
    # The attempt fences too, not only the worker id: w2's own earlier attempt (a task
    # of the same worker that outlived its lease) is refused while attempt 2 runs.
    stale = Lease(job.id, "w2", again.attempt - 1)
    with pytest.raises(LeaseLost):
        await store.update_items(stale, [ItemUpdate("b", ItemStatus.DONE)])
    with pytest.raises(LeaseLost):
        await store.report(stale, {"stale": True})
    with pytest.raises(LeaseLost):
        await store.finish(stale, Status.COMPLETED)
    assert await store.heartbeat([stale], 30) == {}
    _, items = await store.declare_items(lease2, ["a", "b"])
    assert {i.ref: i.status for i in items} == {"a": ItemStatus.DONE, "b": ItemStatus.PENDING}
    with pytest.raises(IllegalTransition):  # a finished item is never counted twice
        await store.update_items(lease2, [ItemUpdate("a", ItemStatus.DONE)])
    await store.update_items(lease2, [ItemUpdate("b", ItemStatus.DONE)])
    # Whatever the stale attempt writes, it hears LeaseLost, never about the items (both
    # are done now): its error never reads as the task's own mistake.
    for stale in (lambda: store.update_items(lease, [ItemUpdate("a", ItemStatus.DONE)]),
                  lambda: store.update_items(lease, [ItemUpdate("b", ItemStatus.RUNNING),
                                                     ItemUpdate("b", ItemStatus.DONE)]),
                  lambda: store.declare_items(lease, ["a", "c"]),
                  lambda: store.finish(lease, Status.FAILED, error="stale")):
        with pytest.raises(LeaseLost):
            await stale()
    await store.finish(lease2, Status.COMPLETED, {"ok": True})
    snap, _ = await replay(store, job.id)
    assert snap["status"] == "completed" and snap["progress"]["done"] == 2
    types = [e.type for e in await store.events(job.id, 0)]
    assert types.count("retrying") == 1 and types.count("started") == 2


async def test_hand_back_is_fenced_and_does_not_count_the_attempt(store: Store) -> None:
    """Only the lease's holder, on the same attempt, hands a job back; a job with a cancel
    requested is not requeued (it expires as cancelled)."""
    job, _ = await store.submit("o", "t", {}, None, 1)  # one attempt: its last
    other, _ = await store.submit("o", "t", {}, None, 1)
    await store.claim("w", ["t"], 2, 30)
    lease, lease2 = Lease(job.id, "w", 1), Lease(other.id, "w", 1)
    await store.declare_items(lease, ["a", "b"])
    await store.update_items(lease, [ItemUpdate("a", ItemStatus.DONE),
                                     ItemUpdate("b", ItemStatus.RUNNING)])
    await store.request_cancel(other.id, "o")
    assert await store.hand_back([Lease(job.id, "intruder", 1), Lease(job.id, "w", 2),
                                  Lease(job.id, "w", 0), lease2]) == 0
    assert (await store.get_job(job.id)).status == Status.RUNNING  # type: ignore[union-attr]
    assert await store.hand_back([lease]) == 1
    assert await store.hand_back([lease]) == 0  # no longer held: once
    back = await store.get_job(job.id)
    assert back is not None and back.status == Status.QUEUED and back.attempt == 0
    assert back.error == "worker stopped; requeued" and back.progress.done == 1
    last = (await store.events(job.id, back.seq - 1))[-1]
    assert last.type == "retrying" and last.data["attempt"] == 0 and last.data["reset"] == ["b"]
    [again] = await store.claim("w2", ["t"], 1, 30)
    assert again.id == job.id and again.attempt == 1  # its one attempt, not a second


async def test_lease_expiry_fails_after_max_attempts(store: Store) -> None:
    job, _ = await store.submit("o", "t", {}, None, 1)
    await store.claim("w", ["t"], 1, 0.01)
    await asyncio.sleep(0.05)
    await store.expire_leases()
    failed = await store.get_job(job.id)
    assert failed is not None and failed.status == Status.FAILED
    assert failed.error is not None and "attempt 1 of 1" in failed.error


async def test_item_events_say_what_changed_and_nothing_more(store: Store) -> None:
    """One item changing is the hot path (one statement on PostgreSQL): its event names
    the item and its new state, with a result or error only when the task gave one."""
    job, _ = await store.submit("o", "t", {}, None, 1)
    [claimed] = await store.claim("w", ["t"], 1, 30)
    lease = Lease(job.id, "w", claimed.attempt)
    await store.declare_items(lease, ["a", "b", "c"])
    with pytest.raises(LeaseLost):
        await store.update_items(Lease(job.id, "w", 9), [ItemUpdate("a", ItemStatus.DONE)])
    changes = [ItemUpdate("a", ItemStatus.RUNNING), ItemUpdate("a", ItemStatus.DONE, {"x": 1}),
               ItemUpdate("b", ItemStatus.FAILED, None, "bad"), ItemUpdate("c", ItemStatus.DONE)]
    written = [(await store.update_items(lease, [u])).events[0] for u in changes]
    assert [(e.seq, e.data) for e in written] == [
        (4, {"status": "running", "progress": {"total": 3, "done": 0, "failed": 0},
             "ref": "a", "item": "running"}),
        (5, {"status": "running", "progress": {"total": 3, "done": 1, "failed": 0},
             "ref": "a", "item": "done", "result": {"x": 1}}),
        (6, {"status": "running", "progress": {"total": 3, "done": 1, "failed": 1},
             "ref": "b", "item": "failed", "error": "bad"}),
        (7, {"status": "running", "progress": {"total": 3, "done": 2, "failed": 1},
             "ref": "c", "item": "done"})]
    assert await store.events(job.id, 3) == written
    with pytest.raises(IllegalTransition):
        await store.update_items(lease, [ItemUpdate("c", ItemStatus.FAILED)])
    with pytest.raises(LeaseLost):  # a stale worker hears that, not about the item
        await store.update_items(Lease(job.id, "w", 9), [ItemUpdate("c", ItemStatus.FAILED)])


async def test_jobs_finishing_together_each_end_once_in_their_own_way(store: Store) -> None:
    """Finishes that arrive at once are written together (one statement on PostgreSQL):
    each job gets its own end and event, and one caller's mistake or stale lease fails
    that caller alone."""
    jobs = [(await store.submit("o", "t", {}, None, 2))[0] for _ in range(8)]
    claimed = {j.id: j for j in await store.claim("w", ["t"], 8, 30)}
    leases = [Lease(j.id, "w", claimed[j.id].attempt) for j in jobs]
    await store.declare_items(leases[0], ["a", "b"])
    await store.update_items(leases[0], [ItemUpdate("a", ItemStatus.RUNNING)])
    stale = Lease(jobs[1].id, "w", claimed[jobs[1].id].attempt + 1)
    ends = [
        store.finish(leases[0], Status.COMPLETED, {"n": 0}),
        store.finish(stale, Status.COMPLETED, {"n": 1}),
        store.finish(leases[2], Status.COMPLETED, {"bad": object()}),  # not JSON
        store.finish(leases[3], Status.FAILED, None, "boom"),
        store.finish(leases[4], Status.CANCELLED),
        *(store.finish(lease, Status.COMPLETED, {"n": k}) for k, lease in
          enumerate(leases[5:], 5)),
    ]
    outcomes = await asyncio.gather(*ends, return_exceptions=True)
    assert isinstance(outcomes[1], LeaseLost)
    assert isinstance(outcomes[2], TypeError)
    expected = {0: ("completed", {"n": 0}, None), 3: ("failed", None, "boom"),
                4: ("cancelled", None, None),
                **{k: ("completed", {"n": k}, None) for k in range(5, 8)}}
    for k, (status, result, error) in expected.items():
        [ev] = outcomes[k].events  # type: ignore[union-attr]
        assert (ev.type, ev.data["result"], ev.data["error"]) == (status, result, error)
        assert await store.events(jobs[k].id, ev.seq - 1) == [ev], "what was sent is stored"
        snap, _ = await replay(store, jobs[k].id)
        assert (snap["status"], snap["result"], snap["seq"]) == (status, result, ev.seq)
    assert outcomes[0].events[0].data["reset"] == ["a"]  # type: ignore[union-attr]
    for k in (1, 2):  # still running, untouched, finishable by their real lease
        job = await store.get_job(jobs[k].id)
        assert job is not None and job.status == Status.RUNNING
        await store.finish(leases[k], Status.COMPLETED)


async def test_a_workers_ends_and_its_next_claim_in_one_call(store: Store) -> None:
    """finish_and_claim records each end as finish() would (a stale lease or a result
    that is not JSON fails that end alone) and claims the next jobs in the same call."""
    jobs = [(await store.submit("o", "t", {}, None, 2))[0] for _ in range(5)]
    claimed = await store.claim("w", ["t"], 3, 30)
    leases = [Lease(j.id, "w", j.attempt) for j in claimed]
    stale = Lease(leases[1].job, "w", leases[1].attempt + 1)
    outcomes, more = await store.finish_and_claim(
        [End(leases[0], Status.COMPLETED, {"n": 0}), End(stale, Status.COMPLETED),
         End(leases[2], Status.COMPLETED, {"bad": object()})], "w", ["t"], 5, 30)
    assert isinstance(outcomes[1], LeaseLost)
    assert isinstance(outcomes[2], TypeError)
    [ev] = outcomes[0].events  # type: ignore[union-attr]
    assert (ev.type, ev.data["result"]) == ("completed", {"n": 0})
    assert await store.events(leases[0].job, ev.seq - 1) == [ev], "what was sent is stored"
    # The claim took the two still queued, and only them.
    assert {j.id for j in more} == {j.id for j in jobs} - {j.id for j in claimed}
    for lease in leases[1:]:  # untouched: still running under their real lease
        job = await store.get_job(lease.job)
        assert job is not None and job.status == Status.RUNNING
    for j in more:
        started = await store.events(j.id, 0)
        assert [e.type for e in started] == ["created", "started"]


def _storm(url: str, n: int, barrier: Any, out: Any) -> None:
    async def main() -> None:
        store = open_store(url)
        await store.open()
        barrier.wait()
        results = await asyncio.gather(*(store.submit("o", "t", {"k": 1}, "same", 3)
                                         for _ in range(n)))
        out.put([(job.id, created) for job, created in results])
        await store.close()
    asyncio.run(main())


def test_dedup_storm_across_processes(db_url: str) -> None:
    """4 processes x 50 concurrent submits of one key: one job, exactly one created."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_storm, args=(db_url, 50, barrier, out)) for _ in range(4)]
    for w in workers:
        w.start()
    results = [r for _ in workers for r in out.get(timeout=60)]
    for w in workers:
        w.join(30)
    assert len(results) == 200
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_an_id_prefix_finds_the_owners_ids_that_start_with_it(store: Store) -> None:
    ids = [(await store.submit("o", "t", None, None, 1))[0].id for _ in range(40)]
    foreign = (await store.submit("p", "t", None, None, 1))[0].id
    for job_id in ids:
        for n in (1, 4, 32):
            got = [j.id for j in await store.list_jobs("o", None, 100, job_id[:n])]
            assert sorted(got) == sorted(i for i in ids if i.startswith(job_id[:n]))
    assert await store.list_jobs("o", None, 100, foreign[:8]) == []  # not the owner's
    # Matched as text, not as a pattern or case-blind: the API refuses these anyway.
    lettered = next(i for i in ids if not i[:4].isdigit())
    for prefix in ("%", "_", lettered[:4].upper(), ids[0][:3] + "_"):
        assert await store.list_jobs("o", None, 100, prefix) == [], prefix
