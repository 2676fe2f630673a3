"""Budgets of one RLM run, enforced on the host where model code cannot reach them.

A `Budget` bounds a whole run, its sub-RLMs included: sub-calls, tokens, cost and wall time.
Depth and iterations are bounded by the run's `max_depth` / `max_iterations` (the poller
refuses calls beyond max_depth). A `RunTracker` counts one run; `RunBudgets` maps run ids to
trackers, so that the poller (`host_poller.poller.hooks.BudgetLookup`) and the sub-RLMs of
a run share the run's count within one process.

A run that lives in another process (a root run by `rlm ask` or the Python API, answered by a
standalone `rlm poller`) is *adopted*: the first call of it that this process sees opens a
tracker from the budget and start time in the session metadata, and that tracker counts what
this process sees of the run until it has been idle for a while (see docs/rlm.md, Budgets).

Run ids come from tenants (session metadata), so trackers are scoped by tenant: a call finds
only a tracker of its own tenant. A run opened without a tenant (a root run of this process,
which does not know its tenant's id) is claimed by the tenant of the first call or sub-RLM
that finds it, and is that tenant's from then on; its id is a random uuid the run's own
sessions carry, so its own first call gets there first.

What is charged where (so nothing is counted twice):
- the root's and every sub-RLM's own root-model calls: by the RLM loop (`charge_root`);
- plain sub-calls (`llm_query`): by the poller (`charge`) when it runs in this process;
- an `rlm_query` answered by a sub-RLM of this process: not again (`charge` ignores it for
  the total), its parts are already counted above;
- every answered sub-call, as the code's execution reports it (broker request id and the
  answer's usage, a sub-RLM's covering its whole subtree): by the RLM loop
  (`charge_reported`), unless this tracker already counted that request id. This is how a
  run whose sub-calls were answered by a poller in another process counts them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from host_poller.llm.types import Usage
from host_poller.poller.errors import BudgetExceeded
from host_poller.poller.hooks import CallContext
from host_poller.rlm.trajectory import TrajectoryWriter
from rlm_wire.run_info import RunBudgetInfo

if TYPE_CHECKING:
    from host_poller.rlm.tools import Toolbox

#: The model name under which sub-calls answered in another process are counted (the
#: broker's answer does not say which model gave it).
REPORTED_MODEL = "sub-calls answered elsewhere"


class ReportedSubCall(Protocol):
    """One sub-call as an execution reports it (`rlm_wire.runtime_models.SubCallUsage`)."""

    @property
    def id(self) -> str: ...

    @property
    def usage(self) -> Mapping[str, Any]: ...


#: Adopted trackers (runs of other processes) idle this long are forgotten.
DEFAULT_ADOPTED_IDLE_S = 3600.0

StopReason = Literal[
    "final",
    "max_iterations",
    "budget_sub_calls",
    "budget_tokens",
    "budget_cost",
    "budget_time",
]


@dataclass(frozen=True)
class Budget:
    """Limits of one run and all its sub-RLMs; None means unbounded."""

    max_sub_calls: int | None = None
    """llm_query / rlm_query calls (each prompt of a batch counts), all depths."""
    max_tokens: int | None = None
    """Input + output tokens of every LLM call of the run."""
    max_cost_usd: float | None = None
    max_seconds: float | None = None
    """Wall clock of the whole run."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value < 0:
                raise ValueError(f"Budget.{name} must be >= 0, got {value}")

    def to_wire(self) -> RunBudgetInfo:
        return RunBudgetInfo(**asdict(self))

    @classmethod
    def from_wire(cls, info: RunBudgetInfo | None) -> Budget:
        return cls(**info.model_dump()) if info is not None else cls()


@dataclass
class SubCallRecord:
    """One answered sub-call, as the trajectory records it."""

    depth: int
    kind: str
    model: str | None
    usage: Usage
    latency_s: float | None


class RunTracker:
    """Counts one run's sub-calls, tokens, cost and time; thread-safe.

    Implements the poller's `RunBudget` protocol (`admit`, `charge`).
    """

    def __init__(self, run_id: str, budget: Budget, *, started: float | None = None) -> None:
        self.run_id = run_id
        self.budget = budget
        self.started = started if started is not None else time.monotonic()
        self.started_at = time.time() - (time.monotonic() - self.started)
        """Unix time of `started`; sessions carry it so other processes share the clock."""
        self._lock = threading.Lock()
        self._usage = Usage()
        self._by_key: dict[tuple[str, int], Usage] = {}
        self._by_session: dict[str, Usage] = {}
        self._counted_requests: set[str] = set()
        self._held: dict[str | int, int] = {}
        """Token estimates of the admitted calls not charged yet, by request id (or by
        admission number for a call without one)."""
        self._held_total = 0
        self.sub_calls_admitted = 0
        self.sub_calls_done = 0
        self.on_sub_call: Callable[[SubCallRecord], None] | None = None
        """Called after each charged sub-call (the run's trajectory writes it)."""
        self.trajectory: TrajectoryWriter | None = None
        """The run's `TrajectoryWriter`, for sub-RLMs of this process to write into."""
        self.refused: StopReason | None = None
        """Set once a sub-call was refused: the run stops after the current execution."""
        self.tenant_id: str | None = None
        """The tenant whose run this is (None: not known yet; see `RunBudgets`)."""
        self.tools: Toolbox | None = None
        """The run's host-side tools (`RLM(tools=...)`), set by the RLM that opened the run;
        None on a tracker adopted from another process's run (its tools are not here)."""

    # the poller's side ---------------------------------------------------------------------

    def admit(self, call: CallContext) -> None:
        """Count one sub-call, or raise `BudgetExceeded` when the run has nothing left.

        Calls in flight hold their estimated tokens against the token budget until they are
        charged: 16 prompts of a batch arriving at once are admitted only while the spent and
        held tokens leave room, not all 16 before the first is charged."""
        with self._lock:
            reason = self._exhausted_locked()
            limit = self.budget.max_sub_calls
            if reason is None and limit is not None and self.sub_calls_admitted >= limit:
                reason = "budget_sub_calls"
            max_tokens = self.budget.max_tokens
            held = self._held_total
            over = max_tokens is not None and self._usage.total_tokens + held >= max_tokens
            if reason is None and held > 0 and over:
                reason = "budget_tokens"
            if reason is not None:
                self.refused = reason
                raise BudgetExceeded(f"{_describe(reason, self.budget)} (run {self.run_id})")
            self.sub_calls_admitted += 1
            key = call.request_id if call.request_id is not None else self.sub_calls_admitted
            self._held[key] = call.estimated_tokens
            self._held_total += call.estimated_tokens

    def charge(
        self,
        call: CallContext,
        usage: Usage,
        *,
        model: str | None = None,
        latency_s: float | None = None,
    ) -> None:
        """Count a finished sub-call; an rlm_query answered by a sub-RLM is already counted."""
        record = SubCallRecord(call.depth, call.kind, model, usage, latency_s)
        with self._lock:
            self.sub_calls_done += 1
            self._release_held_locked(call)
            if call.request_id is not None:
                if call.request_id in self._counted_requests:
                    usage = Usage()  # its execution already reported it
                self._counted_requests.add(call.request_id)
            # A sub-RLM's answer covers its subtree: part of what its caller's session used,
            # but already in the run's total through the sub-RLM's own charges.
            previous = self._by_session.get(call.session_id, Usage())
            self._by_session[call.session_id] = previous + usage
            if not call.wants_sub_rlm:
                self._add_locked(model or "sub-call", call.depth, usage)
        if self.on_sub_call is not None:
            self.on_sub_call(record)

    # the loop's side -----------------------------------------------------------------------

    def charge_root(self, model: str, depth: int, usage: Usage) -> None:
        """Count a call of an RLM's own (root) model at `depth`."""
        with self._lock:
            self._add_locked(model, depth, usage)

    def charge_reported(
        self, session_id: str, depth: int, calls: Iterable[ReportedSubCall]
    ) -> None:
        """Count the sub-calls an execution reports, each broker request id once.

        Those this tracker already counted (a poller or sub-RLM of this process) are skipped;
        the rest were answered elsewhere and are counted here with the answer's usage.
        """
        with self._lock:
            for call in calls:
                if call.id in self._counted_requests:
                    continue
                self._counted_requests.add(call.id)
                usage = Usage.from_wire(call.usage)
                self._add_locked(REPORTED_MODEL, depth, usage)
                previous = self._by_session.get(session_id, Usage())
                self._by_session[session_id] = previous + usage

    def exhausted(self) -> StopReason | None:
        """The budget that is spent, or None; a refused sub-call counts as spent."""
        with self._lock:
            return self._exhausted_locked() or self.refused

    @property
    def usage(self) -> Usage:
        with self._lock:
            return self._usage

    def usage_by(self) -> dict[tuple[str, int], Usage]:
        """Usage per (model, depth)."""
        with self._lock:
            return dict(self._by_key)

    def sub_call_usage(self, session_id: str) -> Usage:
        """Usage of the plain sub-calls made by one broker session (one RLM's code)."""
        with self._lock:
            return self._by_session.get(session_id, Usage())

    @property
    def sub_calls_in_flight(self) -> int:
        return max(0, self.sub_calls_admitted - self.sub_calls_done)

    # plumbing ------------------------------------------------------------------------------

    def _release_held_locked(self, call: CallContext) -> None:
        if call.request_id is not None:
            self._held_total -= self._held.pop(call.request_id, 0)
        elif self._held:  # a call admitted without a request id: the oldest hold
            self._held_total -= self._held.pop(next(iter(self._held)))

    def _add_locked(self, model: str, depth: int, usage: Usage) -> None:
        self._usage = self._usage + usage
        key = (model, depth)
        self._by_key[key] = self._by_key.get(key, Usage()) + usage

    def _exhausted_locked(self) -> StopReason | None:
        b = self.budget
        if b.max_tokens is not None and self._usage.total_tokens >= b.max_tokens:
            return "budget_tokens"
        if b.max_cost_usd is not None and self._usage.cost_usd >= b.max_cost_usd:
            return "budget_cost"
        if b.max_seconds is not None and time.monotonic() - self.started >= b.max_seconds:
            return "budget_time"
        return None


def _number(value: float | None) -> str:
    """30.0 reads as 30: a budget read back from the wire is a float."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(reason: StopReason, budget: Budget) -> str:
    return {
        "budget_sub_calls": f"sub-call budget of {budget.max_sub_calls} calls spent",
        "budget_tokens": f"token budget of {budget.max_tokens} tokens spent",
        "budget_cost": f"cost budget of ${_number(budget.max_cost_usd)} spent",
        "budget_time": f"time budget of {_number(budget.max_seconds)} s spent",
    }.get(reason, reason)


def describe_stop(reason: StopReason, budget: Budget) -> str:
    """A sentence saying why a run stopped."""
    if reason == "final":
        return "the model gave its final answer"
    if reason == "max_iterations":
        return "max_iterations reached; the model was asked once more for its best answer"
    return _describe(reason, budget)


def tracker_from_wire(
    run_id: str, budget: RunBudgetInfo | None, run_started_at: float | None
) -> RunTracker:
    """A tracker of a run that started elsewhere, from its session metadata.

    The time budget counts from `run_started_at` (Unix time, so clocks of different hosts
    must roughly agree); without it, from now.
    """
    return RunTracker(run_id, Budget.from_wire(budget), started=_monotonic_of(run_started_at))


def _monotonic_of(unix_time: float | None) -> float | None:
    """The monotonic clock's reading at `unix_time` (never later than now)."""
    if unix_time is None:
        return None
    return time.monotonic() - max(0.0, time.time() - unix_time)


class RunBudgets:
    """Trackers of the runs this process knows, by run id (the poller's `BudgetLookup`).

    Runs are *opened* by whoever runs them here (`open` / `release`); runs of other
    processes are *adopted* by `for_call` from their session metadata and forgotten after
    `adopted_idle_s` without a call. Trackers are keyed by (tenant id, run id); see the
    module's docstring for runs opened without a tenant.
    """

    def __init__(self, *, adopted_idle_s: float = DEFAULT_ADOPTED_IDLE_S) -> None:
        if adopted_idle_s <= 0:
            raise ValueError("adopted_idle_s must be > 0")
        self.adopted_idle_s = adopted_idle_s
        self._lock = threading.Lock()
        self._runs: dict[tuple[str | None, str], RunTracker] = {}
        self._adopted: dict[tuple[str, str], tuple[RunTracker, float]] = {}
        self._next_prune = 0.0

    def __call__(self, run_id: str, tenant_id: str | None = None) -> RunTracker | None:
        """The tracker of a run opened here (or adopted for `tenant_id`), if any."""
        with self._lock:
            tracker = self._open_locked(tenant_id, run_id, claim=False)
            if tracker is None and tenant_id is not None:
                entry = self._adopted.get((tenant_id, run_id))
                tracker = entry[0] if entry is not None else None
            return tracker

    def for_call(self, call: CallContext) -> RunTracker | None:
        """The call's run tracker: the open run's, else one adopted from the call's metadata."""
        if call.run_id is None:
            return None
        now = time.monotonic()
        key = (call.tenant_id, call.run_id)
        with self._lock:
            tracker = self._open_locked(call.tenant_id, call.run_id, claim=True)
            if tracker is not None:
                return tracker
            self._prune_locked(now)
            entry = self._adopted.get(key)
            if entry is not None:
                tracker = entry[0]
            elif call.budget is not None:
                tracker = tracker_from_wire(call.run_id, call.budget, call.run_started_at)
                tracker.tenant_id = call.tenant_id
            else:
                return None
            self._adopted[key] = (tracker, now)
            return tracker

    def open(
        self,
        run_id: str,
        budget: Budget,
        *,
        started_at: float | None = None,
        tenant_id: str | None = None,
    ) -> tuple[RunTracker, bool]:
        """The run's tracker, created if absent; True when this call created it.

        An adopted tracker of the run is returned (not created) so that a sub-RLM run here
        shares the count of the calls this process already answered for its run. With a
        `tenant_id`, only that tenant's trackers (or an unclaimed one) are found.
        """
        with self._lock:
            tracker = self._open_locked(tenant_id, run_id, claim=tenant_id is not None)
            if tracker is not None:
                return tracker, False
            if tenant_id is not None:
                entry = self._adopted.get((tenant_id, run_id))
                if entry is not None:
                    self._adopted[(tenant_id, run_id)] = (entry[0], time.monotonic())
                    return entry[0], False
            tracker = RunTracker(run_id, budget, started=_monotonic_of(started_at))
            tracker.tenant_id = tenant_id
            self._runs[(tenant_id, run_id)] = tracker
            return tracker, True

    def release(self, run_id: str, tenant_id: str | None = None) -> None:
        with self._lock:
            self._runs.pop((tenant_id, run_id), None)

    def _open_locked(self, tenant_id: str | None, run_id: str, *, claim: bool) -> RunTracker | None:
        """The open run `run_id` of `tenant_id`, or the unscoped one if it is (or, with
        `claim`, becomes) that tenant's."""
        tracker = self._runs.get((tenant_id, run_id))
        if tracker is not None or tenant_id is None:
            return tracker
        tracker = self._runs.get((None, run_id))
        if tracker is None or tracker.tenant_id not in (None, tenant_id):
            return None
        if claim:
            tracker.tenant_id = tenant_id
        return tracker

    def __len__(self) -> int:
        """Runs opened in this process and not released (adopted runs not included)."""
        with self._lock:
            return len(self._runs)

    @property
    def adopted(self) -> int:
        """Runs of other processes tracked here now."""
        with self._lock:
            self._prune_locked(time.monotonic())
            return len(self._adopted)

    def _prune_locked(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + min(60.0, self.adopted_idle_s / 2)
        cutoff = now - self.adopted_idle_s
        for run_id in [r for r, (_, seen) in self._adopted.items() if seen < cutoff]:
            del self._adopted[run_id]


#: The registry shared by the RLM loop and the poller within one process.
default_run_budgets = RunBudgets()
