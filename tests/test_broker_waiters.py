"""`WorkSignals`' announcement clock: when a long-poll may start without a claim."""

from __future__ import annotations

import pytest

from broker.waiters import WorkSignals

pytestmark = pytest.mark.anyio

RECHECK_S = 1.0


async def test_a_drained_queue_stays_quiet_until_work_is_announced() -> None:
    signals = WorkSignals(RECHECK_S)
    assert signals.quiet_until("t1", 10.0) is None  # never claimed: claim
    signals.drained("t1", signals.mark(), 10.0)
    assert signals.quiet_until("t1", 10.5) == 10.0 + RECHECK_S
    signals.notify("t2")  # another tenant's work
    assert signals.quiet_until("t1", 10.5) is not None
    signals.notify("t1")
    assert signals.quiet_until("t1", 10.5) is None


async def test_the_periodic_claim_comes_due_whatever_was_announced() -> None:
    signals = WorkSignals(RECHECK_S)
    signals.drained("t1", signals.mark(), 10.0)
    assert signals.quiet_until("t1", 10.0 + RECHECK_S) is None


async def test_work_announced_while_the_claim_ran_is_not_missed() -> None:
    signals = WorkSignals(RECHECK_S)
    mark = signals.mark()  # the claim starts...
    signals.notify("t1")  # ...work is announced while it runs...
    signals.drained("t1", mark, 10.0)  # ...and it came back empty
    assert signals.quiet_until("t1", 10.1) is None


async def test_admin_long_polls_hear_every_tenant() -> None:
    signals = WorkSignals(RECHECK_S)
    signals.drained(None, signals.mark(), 10.0)
    assert signals.quiet_until(None, 10.1) is not None
    signals.notify("t9")
    assert signals.quiet_until(None, 10.1) is None


async def test_a_lost_subscription_voids_every_mark() -> None:
    signals = WorkSignals(RECHECK_S)
    signals.drained("t1", signals.mark(), 10.0)
    mark = signals.mark()
    signals.notify_all()  # re-subscribed: announcements may have been lost
    assert signals.quiet_until("t1", 10.1) is None
    signals.drained("t1", mark, 10.2)  # a claim that began before the re-subscribe
    assert signals.quiet_until("t1", 10.3) is None
    signals.drained("t1", signals.mark(), 10.4)  # one that began after it
    assert signals.quiet_until("t1", 10.5) is not None
