"""The pure state model: legal transitions and how events fold into snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobwire.model import (
    IllegalTransition,
    ItemStatus,
    Status,
    check_item_transition,
    check_job_transition,
    counts_delta,
    counts_of,
)


def test_terminal_jobs_never_change() -> None:
    for old in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
        for new in Status:
            with pytest.raises(IllegalTransition):
                check_job_transition(old, new)


def test_queued_job_cannot_complete_without_running() -> None:
    with pytest.raises(IllegalTransition):
        check_job_transition(Status.QUEUED, Status.COMPLETED)
    check_job_transition(Status.QUEUED, Status.RUNNING)
    check_job_transition(Status.RUNNING, Status.QUEUED)  # retry after a lost lease


def test_finished_item_is_never_counted_again() -> None:
    for new in ItemStatus:
        with pytest.raises(IllegalTransition):
            check_item_transition(ItemStatus.DONE, new)


@given(st.lists(st.sampled_from(list(ItemStatus)), max_size=30))
def test_counts_follow_item_states(path: list[ItemStatus]) -> None:
    """Summing counts_delta over the legal steps of any path equals counting final states."""
    state, done, failed = ItemStatus.PENDING, 0, 0
    for new in path:
        try:
            check_item_transition(state, new)
        except IllegalTransition:
            continue
        d, f = counts_delta(state, new)
        done, failed, state = done + d, failed + f, new
    expected = counts_of([{"status": state}])
    assert (done, failed) == (expected["done"], expected["failed"])
