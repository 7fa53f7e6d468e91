"""Apps with periodic jobs for tests/test_periodic.py (`--app tests.periodic_tasks:NAME`)."""

from __future__ import annotations

from jobwire import Context, Jobwire


def app(every: int, catch_up: bool) -> Jobwire:
    jw = Jobwire()

    @jw.periodic(every=every, catch_up=catch_up)
    @jw.task()
    async def tick(ctx: Context, input: dict[str, int]) -> None:
        """Does nothing: the test counts the jobs."""

    return jw


every_second = app(1, catch_up=True)
daily = app(86400, catch_up=True)
daily_no_catch_up = app(86400, catch_up=False)
