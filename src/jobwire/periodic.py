"""The scheduler of periodic jobs (`@jw.periodic`): a loop in every worker, no leader.

Every worker computes the same ticks and tries to fire each; the store's `submit_tick`
records a tick with a compare-and-set in the database in the job's own transaction, so
one tick is one job however many workers and hosts try, and a tick whose job already
ended is never fired again.
"""

from __future__ import annotations

import asyncio
import logging

from jobwire.app import Jobwire, PeriodicSpec
from jobwire.cron import tick_key
from jobwire.model import now
from jobwire.store import Store, StoreError

log = logging.getLogger("jobwire.periodic")

# The owner of every periodic job. Every session's owner is `user:…` or `guest:…`
# (api.identity.valid_owner), so none can be this one or see its jobs; the service key
# reads them.
OWNER = "system:periodic"
# The clock is read again at least this often (suspended hosts, clock changes), and a
# tick that failed to fire (database away) is retried this often.
MAX_SLEEP = 60.0
RETRY_SECONDS = 1.0


async def run(jobwire: Jobwire, store: Store) -> None:
    """Fire the ticks of `jobwire.periodics` as they come, until cancelled. On start, a
    periodic with `catch_up` first fires the latest tick due (if it was missed: the
    store fires it only when an earlier tick was fired and this one was not)."""
    periodics = list(jobwire.periodics.values())
    if not periodics:
        return
    start = now()
    # Per periodic: when its next tick is due, and whether that firing is a catch-up.
    due = {p.task: (p.schedule.latest(start), True) if p.catch_up
           else (p.schedule.after(start), False) for p in periodics}
    while True:
        failed = False
        at = now()
        for p in periodics:
            when, catch_up = due[p.task]
            if when > at:
                continue
            # Late (a stalled loop, a catch-up): only the latest tick due fires.
            if await _fire(jobwire, store, p, p.schedule.latest(at), catch_up):
                due[p.task] = (p.schedule.after(at), False)
            else:
                failed = True
        wait = min(when for when, _ in due.values()) - now()
        await asyncio.sleep(min(MAX_SLEEP, max(wait, RETRY_SECONDS if failed else 0.0)))


async def _fire(jobwire: Jobwire, store: Store, p: PeriodicSpec, tick: float,
                catch_up: bool) -> bool:
    """Fire one tick; False if the store failed (it is tried again)."""
    spec, _, _, place = jobwire.prepare(p.task, p.input, None, OWNER)
    try:
        fired = await store.submit_tick(OWNER, p.task, p.input, spec.max_attempts, tick,
                                        catch_up, place)
    except StoreError as exc:
        log.warning("periodic %s: could not fire %s: %s", p.task, tick_key(tick), exc)
        return False
    if fired is None:
        return True  # fired by another worker (or, for a catch-up, nothing was missed)
    job, created = fired
    if created:
        log.info("periodic %s: %s is job %s", p.task, tick_key(tick), job.id)
    else:
        log.warning("periodic %s: skipped %s: job %s of an earlier tick is still %s",
                    p.task, tick_key(tick), job.id, job.status)
    return True
