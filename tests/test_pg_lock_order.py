"""PostgreSQL lock order: statements that lock several job rows take them in id order,
so a guest session being claimed while its jobs' worker heartbeats them and records
their ends in batches can never deadlock (PostgreSQL would abort one side)."""

from __future__ import annotations

import asyncio
import random
import uuid

import psycopg
import pytest

from jobwire.model import Status
from jobwire.store import Lease, StoreError
from jobwire.store.postgres import PostgresStore
from tests.pg import with_params

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

ROUNDS = 12
JOBS = 150  # per round, all of one guest, all held by one worker
BATCH = JOBS // 3  # jobs whose ends are recorded together


def deadlocked(exc: BaseException) -> bool:
    return isinstance(exc, StoreError) and isinstance(exc.__cause__,
                                                      psycopg.errors.DeadlockDetected)


async def race(api: PostgresStore, worker: PostgresStore, rng: random.Random) -> list[object]:
    """A guest's jobs, all running on one worker, are claimed by a user while the worker
    heartbeats them and records their ends; returns what each side returned or raised."""
    guest, user, token = f"guest:{uuid.uuid4().hex}", f"user:{uuid.uuid4().hex}", uuid.uuid4().hex
    await api.add_session(token, guest, None)
    await asyncio.gather(*(api.submit(guest, "t", {}, None, 3) for _ in range(JOBS)))
    held: list[Lease] = []
    while batch := await worker.claim("w", ["t"], JOBS, 30):
        held += [Lease(j.id, "w", j.attempt) for j in batch]
    assert len(held) == JOBS
    claim = asyncio.create_task(api.claim_session(token, user))

    async def beat(leases: list[Lease]) -> None:
        for _ in range(200):  # a worker's heartbeats, until the claim is through
            if claim.done():
                return
            await worker.heartbeat(leases, 30)

    async def finish(leases: list[Lease]) -> None:
        for k in range(0, JOBS, BATCH):
            await asyncio.sleep(0.002)
            # Calls made together form one batch: one statement ends all of them.
            await asyncio.gather(*(worker.finish(lease, Status.COMPLETED, {})
                                   for lease in leases[k:k + BATCH]))

    # Each side takes the rows in its own order: creation, reverse, shuffled.
    shuffled = rng.sample(held, len(held))
    outcomes = await asyncio.gather(claim, beat(held[::-1]), beat(held), beat(shuffled),
                                    finish(shuffled), return_exceptions=True)
    if not any(isinstance(o, BaseException) for o in outcomes):
        assert outcomes[0] == JOBS, "every job moved to the user"
        moved = await api.list_jobs(user, None, JOBS + 1)
        assert sorted(j.id for j in moved) == sorted(lease.job for lease in held)
        assert {j.status for j in moved} == {Status.COMPLETED}
    return outcomes


async def test_claim_heartbeat_and_finish_never_deadlock(pg_url: str) -> None:
    # Lock waits are checked for cycles after 10 ms instead of 1 s, so a deadlock shows
    # up quickly; it changes how soon one is found, not whether one can form.
    url = with_params(pg_url, options="-cdeadlock_timeout=10")
    # One guest holds JOBS running jobs at once: more than the default active-jobs cap.
    api, worker = PostgresStore(url, JOBS), PostgresStore(url, JOBS)
    await api.open()
    await worker.open()
    rng = random.Random(1)
    failures: list[list[BaseException]] = []
    try:
        for _ in range(ROUNDS):
            outcomes = await race(api, worker, rng)
            failures.append([o for o in outcomes if isinstance(o, BaseException)])
    finally:
        await api.close()
        await worker.close()
    deadlocks = [f for round in failures for f in round if deadlocked(f)]
    assert not deadlocks, (f"{len(deadlocks)} deadlocks, in {sum(map(bool, failures))} "
                           f"of {ROUNDS} rounds: {deadlocks[0]}")
    assert not any(failures), failures


async def test_limit_slots_taken_and_freed_together_never_deadlock(pg_url: str) -> None:
    """Jobs of many limit keys claimed by two workers while both record ends of other
    keys' jobs in batches, each in its own order: the claims take the keys' rows of
    job_limits in key order, and so does the trigger that frees the slots of a batch.
    Afterwards every key's count of running jobs is back to 0."""
    from jobwire.store import Placement

    url = with_params(pg_url, options="-cdeadlock_timeout=10")
    stores = [PostgresStore(url, 1000) for _ in range(3)]
    for s in stores:
        await s.open()
    rng = random.Random(2)
    keys = [f"t\x1fk{i}" for i in range(8)]
    failures: list[BaseException] = []
    try:
        held: list[Lease] = []
        for _ in range(6):
            await asyncio.gather(*(stores[2].submit("user:x", "t", {}, None, 3, place=Placement(
                limit_key=key, limit_max=4)) for key in keys for _ in range(6)))

            async def claim(i: int) -> list[Lease]:
                jobs = await stores[i].claim(f"w{i}", ["t"], 40, 30)
                return [Lease(j.id, f"w{i}", j.attempt) for j in jobs]

            async def finish(i: int, leases: list[Lease]) -> None:
                await asyncio.gather(*(stores[i].finish(lease, Status.COMPLETED, {})
                                       for lease in rng.sample(leases, len(leases))))

            half = len(held) // 2
            outcomes = await asyncio.gather(claim(0), claim(1), finish(0, held[:half]),
                                            finish(1, held[half:]), return_exceptions=True)
            failures += [o for o in outcomes if isinstance(o, BaseException)]
            held = [lease for o in outcomes[:2] if isinstance(o, list) for lease in o]
        await asyncio.gather(*(stores[0].finish(lease, Status.COMPLETED, {})
                               for lease in held))
        running = await stores[0]._query("SELECT key, running FROM job_limits WHERE running <> 0")
    finally:
        for s in stores:
            await s.close()
    deadlocks = [f for f in failures if deadlocked(f)]
    assert not deadlocks, f"{len(deadlocks)} deadlocks: {deadlocks[0]}"
    assert not failures, failures
    assert running == [], running


async def test_ends_free_their_keys_before_the_claim_with_them_waits(pg_url: str) -> None:
    """A worker's ends and its next claim go in one trip. Ends of limited jobs are
    committed before the claim takes its keys' rows: else two workers crossing keys (one's
    end frees A and its claim wants B, the other's the reverse) would each hold a key the
    other waits for. Here a transaction holds B's row as the other worker's end would,
    and then takes A's without waiting."""
    from jobwire.store import End, Placement

    store = PostgresStore(pg_url)
    await store.open()
    try:
        a, b = (Placement(limit_key=key, limit_max=5) for key in ("t\x1fA", "t\x1fB"))
        a_job, _ = await store.submit("user:x", "t", {}, None, 1, place=a)
        b_job, _ = await store.submit("user:x", "t", {}, None, 1, place=b)
        held = {j.id: Lease(j.id, "w", j.attempt) for j in await store.claim("w", ["t"], 2, 30)}
        await store.finish(held[b_job.id], Status.COMPLETED)  # B's row stays, 0 running
        next_b, _ = await store.submit("user:x", "t", {}, None, 1, place=b)
        async with await psycopg.AsyncConnection.connect(pg_url) as other:
            await other.execute("SELECT FROM job_limits WHERE key = %s FOR NO KEY UPDATE",
                                (b.limit_key,))
            trip = asyncio.create_task(store.finish_and_claim(
                [End(held[a_job.id], Status.COMPLETED, limited=True)], "w", ["t"], 1, 30))
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watch:
                while not trip.done() and not await (await watch.execute(
                        "SELECT FROM pg_locks WHERE NOT granted AND locktype = 'transactionid' "
                        "AND pid = ANY(SELECT pid FROM pg_stat_activity "
                        "WHERE application_name = current_setting('application_name'))"
                )).fetchall():
                    await asyncio.sleep(0.01)  # until the claim waits for B's row
            await other.execute("SELECT FROM job_limits WHERE key = %s "
                                "FOR NO KEY UPDATE NOWAIT", (a.limit_key,))
            await other.commit()
        [written], jobs = await trip
    finally:
        await store.close()
    assert not isinstance(written, Exception)
    assert [j.id for j in jobs] == [next_b.id]
