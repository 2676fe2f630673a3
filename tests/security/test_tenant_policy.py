"""Probes, as a tenant of a shared stack would try them: session metadata asking for the
`local` environment (code in the key-holding process), another tenant's run id (its budget),
and the files that keep tenants' prompts (trajectories, the usage ledger)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import Usage
from host_poller.rlm.budget import RunBudgets
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.settings import HostSettings
from rlm_cli.embedded import rlm_stack_components
from rlm_cli.stack import LocalStack, StackConfig
from rlm_wire import broker_models as p
from rlm_wire.broker_client import BrokerClient

pytestmark = pytest.mark.anyio

ROOT = "You are the root of a Recursive Language Model"


@pytest.fixture(autouse=True)
def _no_rlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RLM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which a plain `open()` makes a world-readable file."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _evil_scenario(path: Path, marker: Path) -> Path:
    """A scripted model whose every RLM turn runs code that steals the process's secrets."""
    code = "\n".join(
        [
            "import os",
            f"with open({str(marker)!r}, 'w') as f:",
            "    f.write(os.environ.get('RLM_PROBE_SECRET', ''))",
            "FINAL('pwned')",
        ]
    )
    scenario = {
        "name": "evil",
        "rules": [
            {"name": "evil", "match": {"system": ROOT}, "reply": {"kind": "code", "code": code}},
            {"name": "plain", "match": {"user": "(?s).*"}, "reply": {"kind": "text", "text": "ok"}},
        ],
    }
    path.write_text(json.dumps(scenario), encoding="utf-8")
    return path


@asynccontextmanager
async def shared_stack(tmp_path: Path, scenario: str) -> AsyncIterator[LocalStack]:
    """The embedded stack of `rlm up`, its sub-RLMs on the sandbox runtime (`remote`; none is
    reached here) and its budgets of its own, as an operator would run it for tenants."""
    host = HostSettings(
        environment="remote",
        runtime_url="http://127.0.0.1:9",
        trajectory_dir=tmp_path / "trajectories",
    )
    components = rlm_stack_components(host, budgets=RunBudgets())
    async with LocalStack(StackConfig(scenario=scenario), components) as stack:
        yield stack


async def _session(stack: LocalStack, token: str, metadata: dict[str, Any]) -> BrokerClient:
    async with BrokerClient(stack.broker_url, token) as tenant:
        session = await tenant.create_session(metadata=metadata)
    return BrokerClient(stack.broker_url, session.token)


async def _ask(session: BrokerClient, prompt: str, **fields: Any) -> p.RequestResult:
    accepted = await session.enqueue(p.LLMRequest(prompt=prompt, **fields), wait_s=0)
    return await session.wait_result(accepted, wait_s=10)


async def test_metadata_asking_for_local_runs_nothing_in_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("RLM_PROBE_SECRET", "the-provider-key")
    scenario = _evil_scenario(tmp_path / "evil.json", marker)
    async with shared_stack(tmp_path, str(scenario)) as stack:
        session = await _session(
            stack,
            stack.tenant_token,
            {"run_id": "probe", "depth": 0, "max_depth": 2, "environment": "local"},
        )
        async with session:
            result = await _ask(session, "run my code", params={"kind": "rlm"})
    assert not marker.exists(), "tenant code ran inside the stack's process"
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "sub_rlm_unavailable"
    assert "'local'" in result.error.message
    assert "RLM_POLLER_SUB_RLM_ENVIRONMENTS" in result.error.message


async def test_another_tenants_run_id_spends_only_its_own_budget(tmp_path: Path) -> None:
    scenario = _evil_scenario(tmp_path / "plain.json", tmp_path / "unused")
    async with shared_stack(tmp_path, str(scenario)) as stack:
        async with BrokerClient(stack.broker_url, stack.admin_token) as admin:
            attacker = await admin.create_tenant("attacker")
        run = {"run_id": "victim-run", "depth": 0, "max_depth": 1}
        victim = await _session(stack, stack.tenant_token, run | {"budget": {"max_sub_calls": 2}})
        thief = await _session(stack, attacker.token, run | {"budget": {"max_sub_calls": 100}})
        async with victim, thief:
            first = await _ask(victim, "one")
            stolen = [await _ask(thief, f"steal {i}") for i in range(2)]
            second = await _ask(victim, "two")
    assert first.status == "done"
    assert [r.status for r in stolen] == ["done", "done"]
    # The victim's budget of 2 sub-calls is its own: the attacker's calls did not spend it.
    assert second.status == "done", second.error


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_trajectories_and_the_ledger_are_private(tmp_path: Path) -> None:
    trajectory = TrajectoryWriter(tmp_path / "trajectories" / "tenant-a" / "run.d1.r.jsonl")
    trajectory.write("iteration", reply="a tenant's prompt")
    trajectory.close()
    assert _mode(trajectory.path) == 0o600
    assert _mode(trajectory.path.parent) == 0o700
    assert _mode(trajectory.path.parent.parent) == 0o700

    ledger = UsageLedger(tmp_path / "usage" / "ledger.sqlite")
    ledger.record(usage=Usage(1, 2, 0.0, 1), model="m", depth=1, tenant_id="tenant-a")
    assert ledger.path is not None
    files = [ledger.path, *ledger.path.parent.glob("ledger.sqlite-*")]
    modes = {f.name: _mode(f) for f in files}
    ledger.close()
    assert len(files) == 3  # the database, its -wal and its -shm
    assert modes == {f.name: 0o600 for f in files}
    assert _mode(ledger.path.parent) == 0o700


def test_a_planted_link_does_not_redirect_a_trajectory(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    planted = tmp_path / "trajectories" / "run.jsonl"
    planted.parent.mkdir()
    planted.symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        TrajectoryWriter(planted)
    assert target.read_text() == ""
