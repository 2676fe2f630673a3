"""`WorkSignals`' announcement clock (when a long-poll may start without a claim), and the
parked long-polls it wakes (`broker.parking`): one per announced request, a wake-up passed
on when unused, and a hand-off given only to long-polls that wait and still want it."""

from __future__ import annotations

import pytest

from broker.parking import Parking
from broker.store import Claimed
from broker.waiters import WorkSignals

pytestmark = pytest.mark.anyio

RECHECK_S = 1.0


async def test_a_drained_queue_stays_quiet_until_work_is_announced() -> None:
    signals = WorkSignals(RECHECK_S, Parking())
    assert signals.quiet_until("t1", 10.0) is None  # never claimed: claim
    signals.drained("t1", signals.mark(), 10.0)
    assert signals.quiet_until("t1", 10.5) == 10.0 + RECHECK_S
    signals.notify("t2")  # another tenant's work
    assert signals.quiet_until("t1", 10.5) is not None
    signals.notify("t1")
    assert signals.quiet_until("t1", 10.5) is None


async def test_the_periodic_claim_comes_due_whatever_was_announced() -> None:
    signals = WorkSignals(RECHECK_S, Parking())
    signals.drained("t1", signals.mark(), 10.0)
    assert signals.quiet_until("t1", 10.0 + RECHECK_S) is None


async def test_work_announced_while_the_claim_ran_is_not_missed() -> None:
    signals = WorkSignals(RECHECK_S, Parking())
    mark = signals.mark()  # the claim starts...
    signals.notify("t1")  # ...work is announced while it runs...
    signals.drained("t1", mark, 10.0)  # ...and it came back empty
    assert signals.quiet_until("t1", 10.1) is None


async def test_admin_long_polls_hear_every_tenant() -> None:
    signals = WorkSignals(RECHECK_S, Parking())
    signals.drained(None, signals.mark(), 10.0)
    assert signals.quiet_until(None, 10.1) is not None
    signals.notify("t9")
    assert signals.quiet_until(None, 10.1) is None


async def test_a_lost_subscription_voids_every_mark() -> None:
    signals = WorkSignals(RECHECK_S, Parking())
    signals.drained("t1", signals.mark(), 10.0)
    mark = signals.mark()
    signals.notify_all()  # re-subscribed: announcements may have been lost
    assert signals.quiet_until("t1", 10.1) is None
    signals.drained("t1", mark, 10.2)  # a claim that began before the re-subscribe
    assert signals.quiet_until("t1", 10.3) is None
    signals.drained("t1", signals.mark(), 10.4)  # one that began after it
    assert signals.quiet_until("t1", 10.5) is not None


def leased(*ids: str) -> list[Claimed]:
    return [Claimed(i, 1, b"{}", "s1", 0.0, b"{}") for i in ids]


async def test_an_announcement_wakes_one_long_poll_per_request_and_every_admin_one() -> None:
    parking = Parking()
    signals = WorkSignals(RECHECK_S, parking)
    polls = [parking.join("t1", 1) for _ in range(3)]
    admins = [parking.join(None, 1) for _ in range(2)]
    signals.notify("t1", 2)
    assert [poll.woken for poll in polls] == [True, True, False]  # oldest first
    assert all(admin.woken for admin in admins)
    assert parking.waiting("t1") == 1
    signals.notify_all()  # re-subscribed: everyone
    assert polls[2].woken


async def test_a_wake_up_left_unused_goes_to_the_next_long_poll_once() -> None:
    parking = Parking()
    first, second = parking.join("t1", 1), parking.join("t1", 1)
    parking.wake("t1", 1)
    parking.leave(first, used=False)  # woken, but it claims nothing (its poller left)
    assert second.woken
    third = parking.join("t1", 1)
    parking.leave(first, used=False)  # leaving again passes nothing on
    parking.leave(second, used=True)  # its claim used it
    assert not third.woken
    assert parking.waiting("t1") == 1


async def test_only_parked_long_polls_are_reserved_and_each_only_once() -> None:
    parking = Parking()
    claiming = parking.join("t1", 2)  # joined, its claim still runs: not reservable
    first, second, third = (parking.join("t1", 2) for _ in range(3))
    for poll in (first, second, third):
        parking.park(poll, 0, 0.0)
    assert parking.reserve("t1", 3) == [first, second]  # oldest first, up to capacity
    assert parking.reserve("t1", 3) == [third]  # a batch in flight at once: the others
    assert parking.reserve("t1", 3) == []
    assert parking.parked("t1") == 0 and not claiming.reserved


async def test_a_hand_off_goes_to_the_reserved_long_polls_that_still_want_it() -> None:
    parking = Parking()
    gone, stays, stopped, idle = (parking.join("t1", 2) for _ in range(4))
    for poll in (gone, stays, stopped, idle):
        parking.park(poll, 0, 0.0)
    reserved = parking.reserve("t1", 8)
    parking.leave(gone, used=False)  # hung up while its script runs
    assert parking.unpark(stopped, hung_up=False)  # timed out: waits for its hand-off
    back = parking.settle(reserved, leased("a", "b", "c", "d", "e"))
    assert [c.id for c in back] == ["a", "b"]  # the share of the one gone: handed back
    assert [c.id for c in stays.handed.result()] == ["c", "d"]
    assert [c.id for c in stopped.handed.result()] == ["e"]
    assert not idle.handed.done() and parking.parked("t1") == 1  # got nothing: parked again
    assert parking.reserve("t1", 1) == [idle]
    assert parking.unpark(idle, hung_up=False)
    assert parking.settle([idle], []) == [] and idle.handed.result() == []


async def test_a_long_polls_doorbell_rings_when_it_is_woken_or_handed_work() -> None:
    """What its handler awaits itself (`Hold.wait_one`): rung by the same step that wakes it
    or hands it work, so that it resumes in that pass; rung at once if it already was."""
    parking = Parking()
    woken, handed, admin = parking.join("t1", 1), parking.join("t1", 1), parking.join(None, 1)
    bells = [poll.new_doorbell() for poll in (woken, handed, admin)]
    parking.park(handed, 0, 0.0)
    [reserved] = parking.reserve("t1", 1)  # the oldest parked: `handed`
    assert reserved is handed
    assert not any(bell.done() for bell in bells)
    parking.wake("t1", 1)  # the oldest: `woken`; and every admin long-poll
    assert bells[0].done() and bells[2].done() and not bells[1].done()
    parking.settle([handed], leased("a"))
    assert bells[1].done()
    assert woken.new_doorbell().done()  # already woken: rung at once
