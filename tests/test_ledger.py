"""UsageLedger: exact sums under concurrency, grouping, a file shared by processes, `rlm usage`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from click.testing import CliRunner

from host_poller.llm import Usage, UsageLedger
from rlm_cli.host_commands import usage as usage_command


def one_call(i: int) -> Usage:
    # Costs are multiples of 1/1024: binary-exact, so any summing order gives the same float.
    return Usage(input_tokens=i, output_tokens=2 * i, cost_usd=i / 1024, calls=1)


@pytest.mark.anyio
async def test_concurrent_records_from_many_tasks_sum_exactly() -> None:
    ledger = UsageLedger()

    async def worker(i: int) -> None:
        await anyio.lowlevel.checkpoint()
        ledger.record(usage=one_call(i), model="m", depth=i % 3, tenant_id="t")

    async with anyio.create_task_group() as tg:
        for i in range(1, 501):
            tg.start_soon(worker, i)
    expected = sum((one_call(i) for i in range(1, 501)), Usage())
    assert ledger.total() == expected
    assert ledger.total(tenant_id="t").calls == 500


def test_concurrent_records_from_threads_on_one_file(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")

    def worker(start: int) -> None:
        for i in range(start, start + 100):
            ledger.record(usage=one_call(i), model="m", depth=0)

    threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.total() == sum((one_call(i) for i in range(800)), Usage())
    ledger.close()


def test_grouping_and_filters() -> None:
    ledger = UsageLedger()
    rows = [
        ("a", "s1", "root", 0), ("a", "s1", "sub", 1), ("a", "s2", "sub", 1),
        ("b", "s3", "sub", 1), ("b", "s3", "sub", 2),
    ]  # fmt: skip
    for n, (tenant, session, model, depth) in enumerate(rows, start=1):
        ledger.record(usage=one_call(n), model=model, depth=depth, tenant_id=tenant,
                      session_id=session, run_id="run")  # fmt: skip
    by_tenant = ledger.totals(group_by=["tenant_id"])
    assert [k for k, _ in by_tenant] == [{"tenant_id": "a"}, {"tenant_id": "b"}]
    assert by_tenant[0][1] == one_call(1) + one_call(2) + one_call(3)
    by_model_depth = dict(
        ((k["model"], k["depth"]), u) for k, u in ledger.totals(group_by=["model", "depth"])
    )
    assert by_model_depth[("sub", 1)].calls == 3
    assert by_model_depth[("root", 0)] == one_call(1)
    assert ledger.total(tenant_id="b", depth=2) == one_call(5)
    assert ledger.total(tenant_id="nobody") == Usage()
    assert ledger.totals(group_by=["session_id"], tenant_id="a")[1][0] == {"session_id": "s2"}


def test_unknown_columns_are_refused() -> None:
    ledger = UsageLedger()
    with pytest.raises(ValueError, match="group_by"):
        ledger.totals(group_by=["cost_usd; DROP TABLE llm_usage"])
    with pytest.raises(ValueError, match="filters"):
        ledger.total(prompt="x")


def test_file_is_shared_between_two_ledgers(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "usage.db"
    with UsageLedger(path) as first, UsageLedger(path) as second:
        first.record(usage=one_call(1), model="m", depth=0, run_id="r")
        second.record(usage=one_call(2), model="m", depth=1, run_id="r")
        assert first.total(run_id="r") == second.total(run_id="r") == one_call(1) + one_call(2)
    with UsageLedger(path) as reopened:
        assert reopened.total().calls == 2


def test_usage_wire_round_trip() -> None:
    usage = one_call(3) + one_call(4)
    assert usage.to_wire() == {"input_tokens": 7, "output_tokens": 14,
                               "cost_usd": 7 / 1024, "calls": 2}  # fmt: skip
    assert Usage.from_wire(usage.to_wire()) == usage
    assert usage.total_tokens == 21


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "usage.db"
    with UsageLedger(path) as ledger:
        ledger.record(usage=one_call(1), model="fake-root", depth=0, tenant_id="acme", run_id="r1")
        ledger.record(usage=one_call(2), model="fake-sub", depth=1, tenant_id="acme", run_id="r1")
        ledger.record(usage=one_call(4), model="fake-sub", depth=1, tenant_id="zeta", run_id="r2")
    return path


def test_usage_cli_json(ledger_file: Path) -> None:
    result = CliRunner().invoke(
        usage_command,
        ["--ledger", str(ledger_file), "--by", "tenant_id", "--by", "model", "--json"],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows == [
        {"tenant_id": "acme", "model": "fake-root", **one_call(1).to_wire()},
        {"tenant_id": "acme", "model": "fake-sub", **one_call(2).to_wire()},
        {"tenant_id": "zeta", "model": "fake-sub", **one_call(4).to_wire()},
    ]


def test_usage_cli_filters_and_total(ledger_file: Path) -> None:
    result = CliRunner().invoke(
        usage_command, ["--ledger", str(ledger_file), "--run", "r1", "--depth", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [one_call(2).to_wire()]


def test_usage_cli_table(ledger_file: Path) -> None:
    result = CliRunner().invoke(usage_command, ["--ledger", str(ledger_file), "--by", "tenant_id"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    acme = next(line for line in lines if "acme" in line)
    assert "3" in acme.split()  # 1 + 2 input tokens
    total = next(line for line in lines if "total" in line.split())
    assert "7" in total.split()  # all input tokens
    assert "0.006836" in total  # 7/1024 USD


def test_usage_cli_missing_ledger(tmp_path: Path) -> None:
    result = CliRunner().invoke(usage_command, ["--ledger", str(tmp_path / "none.db")])
    assert result.exit_code == 2
    assert "no ledger" in result.output


def test_two_processes_write_one_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "usage.db"
    UsageLedger(path).close()  # create the schema and WAL mode first
    script = (
        "import sys; from pathlib import Path; from host_poller.llm import Usage, UsageLedger\n"
        "ledger = UsageLedger(Path(sys.argv[1]))\n"
        "for i in range(200):\n"
        "    ledger.record(usage=Usage(1, 2, 0.5, 1), model='m', depth=0, tenant_id=sys.argv[2])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), tenant])
        for tenant in ("p1", "p2")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with UsageLedger(path) as ledger:
        assert ledger.total() == Usage(400, 800, 200.0, 400)
        assert [k["tenant_id"] for k, _ in ledger.totals(group_by=["tenant_id"])] == ["p1", "p2"]


DAY = 86400.0


def _record_mix(ledger: UsageLedger, start: int) -> None:
    """Calls of two tenants (and one of none), sessions, runs, models and depths."""
    rows = [
        ("a", "s1", "r1", "root", 0), ("a", "s1", "r1", "sub", 1), ("a", "s1", "r1", "sub", 1),
        ("a", "s2", "r2", "sub", 1), ("b", "s3", "r3", "sub", 2), (None, None, None, "m", 0),
    ]  # fmt: skip
    for n, (tenant, session, run, model, depth) in enumerate(rows, start=start):
        ledger.record(usage=one_call(n), model=model, depth=depth, tenant_id=tenant,
                      session_id=session, run_id=run)  # fmt: skip


def _every_view(ledger: UsageLedger) -> list[object]:
    views: list[object] = [ledger.total()]
    for group in (
        ["tenant_id"],
        ["session_id"],
        ["run_id"],
        ["model", "depth"],
        ["tenant_id", "run_id"],
    ):
        views.append(ledger.totals(group_by=group))
    views += [ledger.total(tenant_id="a", depth=1), ledger.total(run_id="r3")]
    return views


def _rows(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        calls = db.execute("SELECT COUNT(*) FROM llm_usage").fetchone()[0]
        daily = db.execute("SELECT COUNT(*) FROM llm_usage_daily").fetchone()[0]
    return calls, daily


def test_old_calls_are_folded_per_day_and_every_total_stays_exact(tmp_path: Path) -> None:
    # Without folding the ledger grew by a row per call, forever. Calls older than
    # detail_days become one row per day and dimensions; no total or grouping changes.
    path = tmp_path / "usage.db"
    with UsageLedger(path, detail_days=30) as ledger:
        _record_mix(ledger, 1)
        _record_mix(ledger, 10)
        before = _every_view(ledger)
        assert ledger.fold() == 0  # nothing is 30 days old yet
        assert _rows(path) == (12, 0)
        assert ledger.fold(now=time.time() + 31 * DAY) == 1
        assert _rows(path) == (0, 5)  # one row per (tenant, session, run, model, depth)
        assert _every_view(ledger) == before
        assert ledger.totals(group_by=["tenant_id"])[0][0] == {"tenant_id": None}
        _record_mix(ledger, 20)  # the same day again: added to its rows
        ledger.fold(now=time.time() + 31 * DAY)
        assert _rows(path) == (0, 5)
        assert ledger.total().calls == 18
        assert ledger.total(tenant_id="a").input_tokens == sum(
            n for start in (1, 10, 20) for n in range(start, start + 4)
        )
    result = CliRunner().invoke(
        usage_command, ["--ledger", str(path), "--by", "tenant_id", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert sum(row["calls"] for row in json.loads(result.output)) == 18


def test_calls_recorded_while_folding_are_all_counted(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    with UsageLedger(path, detail_days=1) as ledger:

        def worker(start: int) -> None:
            for i in range(start, start + 100):
                ledger.record(usage=one_call(i), model="m", depth=0, tenant_id="t")

        threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(4)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            ledger.fold(now=time.time() + 2 * DAY)
        for thread in threads:
            thread.join()
        ledger.fold(now=time.time() + 2 * DAY)
        assert _rows(path) == (0, 1)
        assert ledger.total(tenant_id="t") == sum((one_call(i) for i in range(400)), Usage())


def test_a_ledger_without_detail_days_never_folds(tmp_path: Path) -> None:
    with UsageLedger(tmp_path / "usage.db") as ledger:
        _record_mix(ledger, 1)
        assert ledger.fold(now=time.time() + 3650 * DAY) == 0
    assert _rows(tmp_path / "usage.db") == (6, 0)
