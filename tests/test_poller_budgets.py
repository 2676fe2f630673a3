"""Run budgets of runs living in other processes (adopted from session metadata), and which
environments a standalone poller's sub-RLMs may take from that metadata."""

from __future__ import annotations

import time
from typing import Any

import pytest

from host_poller.llm.types import Usage
from host_poller.poller import BudgetExceeded, CallContext, RequestFailed, TenantPolicy
from host_poller.rlm.budget import Budget, RunBudgets
from host_poller.rlm.sub_rlm import SubRLMRunner
from host_poller.settings import HostSettings
from rlm_wire.run_info import RunBudgetInfo


def call(run_id: str | None = "run", **fields: Any) -> CallContext:
    base: dict[str, Any] = {
        "tenant_id": "t", "session_id": "s", "run_id": run_id, "depth": 1, "max_depth": 1,
        "kind": "llm",
    }  # fmt: skip
    if isinstance(fields.get("budget"), dict):
        fields["budget"] = RunBudgetInfo(**fields["budget"])
    return CallContext(**(base | fields))


def test_an_unknown_run_is_adopted_from_its_metadata_and_shared() -> None:
    budgets = RunBudgets()
    assert budgets.for_call(call(budget=None)) is None, "nothing to enforce"
    assert budgets.for_call(call(run_id=None, budget={"max_sub_calls": 1})) is None
    first = budgets.for_call(call(budget={"max_sub_calls": 2}))
    assert first is not None
    # another session of the same run, even with other metadata, shares the count
    assert budgets.for_call(call(session_id="s2", budget={"max_sub_calls": 99})) is first
    first.admit(call())
    first.admit(call())
    with pytest.raises(BudgetExceeded, match="sub-call budget of 2 calls spent"):
        first.admit(call())
    assert (len(budgets), budgets.adopted) == (0, 1)
    # a sub-RLM of the run (same tenant) opened in this process shares the adopted tracker
    tracker, created = budgets.open("run", Budget(), tenant_id="t")
    assert (tracker, created) == (first, False)


def test_adopted_tokens_and_time_budgets() -> None:
    budgets = RunBudgets()
    tokens = budgets.for_call(call(run_id="a", budget={"max_tokens": 10}))
    assert tokens is not None
    tokens.admit(call())
    tokens.charge(call(), Usage(input_tokens=8, output_tokens=4, calls=1))
    with pytest.raises(BudgetExceeded, match="token budget of 10 tokens spent"):
        tokens.admit(call())
    late = budgets.for_call(
        call(run_id="b", budget={"max_seconds": 30}, run_started_at=time.time() - 60)
    )
    assert late is not None
    with pytest.raises(BudgetExceeded, match="time budget of 30 s spent"):
        late.admit(call())
    fresh = budgets.for_call(call(run_id="c", budget={"max_seconds": 30}))
    assert fresh is not None
    fresh.admit(call())


def test_a_batch_arriving_at_once_is_admitted_only_while_its_tokens_fit() -> None:
    """`--max-tokens 5000` spent 17,057: 16 batched prompts were all admitted before the
    first was charged. Calls in flight now hold their estimated tokens."""
    budgets = RunBudgets()
    tracker = budgets.for_call(call(run_id="batch", budget={"max_tokens": 5000}))
    assert tracker is not None
    prompts = [call(request_id=f"r{i}", estimated_tokens=1000) for i in range(16)]
    admitted, refusals = [], []
    for prompt in prompts:
        try:
            tracker.admit(prompt)
            admitted.append(prompt)
        except BudgetExceeded as exc:
            refusals.append(str(exc))
    assert (len(admitted), len(refusals)) == (5, 11)
    assert all("token budget of 5000 tokens" in refusal for refusal in refusals)
    # Charging releases a call's hold; what is left of the budget admits again.
    tracker.charge(admitted[0], Usage(input_tokens=900, output_tokens=100, calls=1))
    tracker.refused = None
    with pytest.raises(BudgetExceeded):
        tracker.admit(call(request_id="late", estimated_tokens=1000))  # 1000 spent + 4000 held
    for prompt in admitted[1:]:
        tracker.charge(prompt, Usage(input_tokens=500, output_tokens=100, calls=1))
    tracker.refused = None
    tracker.admit(call(request_id="after", estimated_tokens=1000))  # 3400 spent, none held
    assert tracker.sub_calls_in_flight == 1


def test_idle_adopted_runs_are_forgotten_but_open_runs_are_not() -> None:
    budgets = RunBudgets(adopted_idle_s=0.01)
    own, _ = budgets.open("own", Budget(max_sub_calls=1))
    adopted = budgets.for_call(call(run_id="other", budget={"max_sub_calls": 1}))
    assert adopted is not None
    time.sleep(0.05)  # longer than the idle limit; no assertion on elapsed time
    assert budgets.adopted == 0
    assert budgets.for_call(call(run_id="own")) is own
    again = budgets.for_call(call(run_id="other", budget={"max_sub_calls": 1}))
    assert again is not None and again is not adopted
    with pytest.raises(ValueError, match="adopted_idle_s"):
        RunBudgets(adopted_idle_s=0)


def runner(environment: str, allowed: tuple[str, ...] | None) -> SubRLMRunner:
    settings = HostSettings(environment=environment)
    policy = None if allowed is None else TenantPolicy.from_settings(settings, allowed)
    # environment_for needs neither a broker nor a model
    return SubRLMRunner(settings, None, None, policy=policy)  # type: ignore[arg-type]


def test_sub_rlm_environment_comes_from_metadata_only_if_allowed() -> None:
    standalone = runner("pyodide", ("pyodide", "remote"))
    assert standalone.environment_for(None) == "pyodide"
    assert standalone.environment_for("remote") == "remote"
    with pytest.raises(RequestFailed, match="'local' environment") as refused:
        standalone.environment_for("local")
    assert refused.value.code == "sub_rlm_unavailable"
    # the poller's own environment is always allowed
    assert runner("local", ()).environment_for("local") == "local"
    # no policy given: the safe default, never `local` from metadata
    with pytest.raises(RequestFailed, match="'local' environment"):
        runner("pyodide", None).environment_for("local")
    assert runner("pyodide", ("local",)).environment_for("local") == "local"  # opted in


def test_a_run_id_finds_only_its_own_tenants_budget() -> None:
    budgets = RunBudgets()
    theirs, _ = budgets.open("shared", Budget(max_sub_calls=1), tenant_id="victim")
    mine = budgets.for_call(call(run_id="shared", tenant_id="attacker",
                                 budget={"max_sub_calls": 5}))  # fmt: skip
    assert mine is not None and mine is not theirs
    mine.admit(call(run_id="shared", tenant_id="attacker"))
    assert theirs.sub_calls_admitted == 0
    # A root run opened here without a tenant is claimed by its first caller's tenant.
    root, _ = budgets.open("root-run", Budget(max_sub_calls=1))
    assert budgets.for_call(call(run_id="root-run", tenant_id="owner")) is root
    assert budgets.for_call(call(run_id="root-run", tenant_id="other")) is None
    assert budgets.open("root-run", Budget(), tenant_id="owner") == (root, False)
