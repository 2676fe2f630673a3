"""Runs of `rlm serve`'s run API kept in Redis: they outlive a restart, and every replica on
that Redis reads, follows and cancels any of them.

Each replica is a real `rlm serve` process on its own local stack (scripted LLM, environment
"local"), all of them keeping their runs in one real Redis (RLM_SERVE_REDIS_URL), with a
short lease (RLM_SERVE_LEASE_*) so a killed replica's runs are seen interrupted soon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx2
import pytest
import redis
from redis.asyncio import Redis

from broker.redis_server import RedisServer, free_port
from fake_llm import load_scenario
from host_poller.llm.types import Usage
from host_poller.rlm.types import RLMResult
from host_poller.service import ServeSettings
from host_poller.service.run_store import (
    MAX_EVENTS,
    RedisRunStore,
    RunKeys,
    RunRecord,
    RunsFull,
)
from host_poller.service.runs import _encode, _outcome
from tests.support.servers import wait_until
from tests.support.sse import sse_events
from tests.test_rlm import make_text

API_KEY = "durable-runs-key-1"
OTHER_KEY = "durable-runs-key-2"
COUNT = "How many times does the word 'whale' appear?"
#: A query the scenario's root answers with code forever (each reply a little late).
ENDLESS = "Keep going forever, please."


def _scenario(directory: Path) -> Path:
    """count_words, plus a root that never ends for the ENDLESS query."""
    scenario = load_scenario("count_words").model_dump(mode="json")
    endless = {
        "name": "endless",
        "match": {
            "system": "You are the root of a Recursive Language Model",
            "any_user": "Keep going forever",
        },
        "reply": {"kind": "code", "text": "More.", "code": ["print('still going')"]},
        "faults": {"delay_s": 0.3},
    }
    scenario["rules"] = [endless, *scenario["rules"]]
    path = directory / "scenario.json"
    path.write_text(json.dumps(scenario))
    return path


class Replica:
    """One `rlm serve` process (in a process group of its own, so SIGKILL takes its whole
    stack with it) keeping runs in the Redis at `redis_url`."""

    def __init__(self, directory: Path, redis_url: str, **env: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.log = directory / "serve.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RLM_", "OPENAI_"))},
            "RLM_ENVIRONMENT": "local",
            "RLM_SERVE_ALLOW_LOCAL_ENVIRONMENT": "true",  # the test's own scenario
            "RLM_TRAJECTORY_DIR": str(directory / "trajectories"),
            "RLM_LOG_FORMAT": "json",
            "RLM_LOG_LEVEL": "INFO",
            "RLM_SERVE_API_KEYS": f"{API_KEY},{OTHER_KEY}",
            "RLM_SERVE_REDIS_URL": redis_url,
            "RLM_SERVE_LEASE_INTERVAL_S": "0.5",
            "RLM_SERVE_LEASE_TTL_S": "5.0",  # short, yet past a busy loop's stalls
            "RLM_SERVE_MAX_ITERATIONS": "1000",
            **env,
        }
        self.scenario = _scenario(directory)
        self.url = ""
        self._child: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        port = free_port()
        rlm = str(Path(sys.executable).with_name("rlm"))
        with self.log.open("ab") as out:
            self._child = subprocess.Popen(
                [rlm, "serve", "--port", str(port), "--scenario", str(self.scenario)],
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert self._child.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rlm serve did not come up"
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx2.HTTPError:
                time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM; its exit status."""
        assert self._child is not None
        self._child.send_signal(signal.SIGTERM)
        code = self._child.wait(timeout=60)
        self._child = None
        return code

    def kill(self) -> None:
        """SIGKILL to the replica and its whole stack, as a crash or an OOM kill would."""
        if self._child is not None and self._child.poll() is None:
            os.killpg(self._child.pid, signal.SIGKILL)
            self._child.wait(timeout=30)
        self._child = None

    def close(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self.kill()

    # --- the run API --------------------------------------------------------------------------

    def call(self, method: str, path: str, key: str = API_KEY, body: Any = None) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx2.request(method, f"{self.url}{path}", headers=headers, json=body, timeout=30)

    def start_run(self, query: str, context: str = "c", **extra: Any) -> str:
        answer = self.call("POST", "/v1/runs", body={"query": query, "context": context, **extra})
        assert answer.status_code == 202, answer.text
        run_id: str = answer.json()["id"]
        return run_id

    def events(self, run_id: str, key: str = API_KEY) -> list[tuple[str, dict[str, Any]]]:
        """Follows the run to its end: its events, then `end`."""
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{self.url}/v1/runs/{run_id}/events"
        with httpx2.stream("GET", url, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            return sse_events(response.iter_lines())

    def wait_for_events(self, run_id: str, name: str) -> None:
        """Follows the run until it has an event `name` (read through this replica)."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = f"{self.url}/v1/runs/{run_id}/events"
        with httpx2.stream("GET", url, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line == f"event: {name}":
                    return
        raise AssertionError(f"the run ended without a {name} event")


@contextlib.contextmanager
def running_replica(directory: Path, redis_url: str, **env: str) -> Iterator[Replica]:
    """A started replica, killed at the end if it still runs."""
    replica = Replica(directory, redis_url, **env).start()
    try:
        yield replica
    finally:
        replica.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The Redis the module's pair of replicas keeps runs in."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replica_a(tmp_path_factory: pytest.TempPathFactory, store: RedisServer) -> Iterator[Replica]:
    with running_replica(tmp_path_factory.mktemp("a"), store.url) as replica:
        yield replica


@pytest.fixture(scope="module")
def replica_b(tmp_path_factory: pytest.TempPathFactory, store: RedisServer) -> Iterator[Replica]:
    with running_replica(tmp_path_factory.mktemp("b"), store.url) as replica:
        yield replica


def wait_for_status(replica: Replica, run_id: str, status: str) -> dict[str, Any]:
    """Reads the run until it has `status`; every read must find it (never a 404)."""
    deadline = time.monotonic() + 60
    while True:
        answer = replica.call("GET", f"/v1/runs/{run_id}")
        assert answer.status_code == 200, answer.text
        run: dict[str, Any] = answer.json()
        if run["status"] == status:
            return run
        assert run["status"] == "running", run
        assert time.monotonic() < deadline, f"the run never became {status}"
        time.sleep(0.1)


# --- any replica answers for any run -------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_run_finished_on_a_is_read_and_replayed_through_b(
    replica_a: Replica, replica_b: Replica
) -> None:
    run_id = replica_a.start_run(COUNT, make_text("whale", 5))
    on_a = replica_a.events(run_id)
    assert (on_a[-1][0], on_a[-1][1]["answer"]) == ("end", "5")
    read = replica_b.call("GET", f"/v1/runs/{run_id}")
    assert read.status_code == 200, read.text
    run = read.json()
    assert (run["status"], run["answer"]) == ("succeeded", "5")
    assert run["usage"]["total_tokens"] > 0 and run["rlm"]["stop_reason"] == "final"
    assert run["events"] == len(on_a) - 1
    on_b = replica_b.events(run_id)
    assert [name for name, _ in on_b] == [name for name, _ in on_a]
    assert on_b[:-1] == on_a[:-1] and on_b[-1] == ("end", run)


@pytest.mark.timeout(240)
def test_a_run_on_a_is_cancelled_through_b(replica_a: Replica, replica_b: Replica) -> None:
    run_id = replica_a.start_run(ENDLESS, max_iterations=1000)
    replica_b.wait_for_events(run_id, "iteration")
    cancel = replica_b.call("POST", f"/v1/runs/{run_id}/cancel")
    assert cancel.status_code in (200, 202), cancel.text
    # A stopped it: A's run ended cancelled, as both replicas read it.
    run = wait_for_status(replica_a, run_id, "cancelled")
    assert wait_for_status(replica_b, run_id, "cancelled") == run
    assert replica_a.events(run_id)[-1] == ("end", run)
    health = httpx2.get(f"{replica_a.url}/health", timeout=10).json()
    assert health["runs_in_flight"] == 0


# --- crash and restart ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_run_whose_replica_is_killed_reads_interrupted_through_b(
    redis_url: str, tmp_path: Path
) -> None:
    with (
        running_replica(tmp_path / "a", redis_url) as replica_a,
        running_replica(tmp_path / "b", redis_url) as replica_b,
    ):
        run_id = replica_a.start_run(ENDLESS, max_iterations=1000)
        replica_b.wait_for_events(run_id, "iteration")
        replica_a.kill()
        run = wait_for_status(replica_b, run_id, "failed")
        assert run["error"]["code"] == "run_interrupted"
        assert "stopped" in run["error"]["message"]
        assert "answer" not in run  # nothing was re-run
        events = replica_b.events(run_id)
        assert events[0][0] == "run_start" and events[-1] == ("end", run)


@pytest.mark.timeout(300)
def test_runs_outlive_a_restart(redis_url: str, tmp_path: Path) -> None:
    with running_replica(tmp_path / "a", redis_url) as replica:
        done = replica.start_run(COUNT, make_text("whale", 3))
        before = replica.events(done)
        assert before[-1][1]["answer"] == "3"
        going = replica.start_run(ENDLESS, max_iterations=1000)
        replica.wait_for_events(going, "iteration")
        assert replica.stop() == 0  # SIGTERM: the run still going is stored cancelled
        replica.start()
        read = replica.call("GET", f"/v1/runs/{done}")
        assert read.status_code == 200, read.text
        assert (read.json()["status"], read.json()["answer"]) == ("succeeded", "3")
        assert replica.events(done) == before
        assert wait_for_status(replica, going, "cancelled")["id"] == going


@pytest.mark.timeout(240)
def test_a_run_that_ends_while_the_store_is_down_is_stored_ended_once_it_is_back(
    tmp_path: Path,
) -> None:
    """Before, the end was dropped with one log line: the run read as running until its
    record's TTL (the run timeout and more), on every replica."""
    store = RedisServer(port=free_port(), data_dir=tmp_path / "store").start()
    try:
        with running_replica(tmp_path / "a", store.url) as replica:
            run_id = replica.start_run(ENDLESS, max_iterations=12)
            replica.wait_for_events(run_id, "iteration")
            store.kill()  # SIGKILL, as a crash: its file keeps the run as running

            def ended_here() -> dict[str, Any] | None:
                answer = replica.call("GET", f"/v1/runs/{run_id}")
                if answer.status_code == 503:  # a running run is read from the store
                    return None
                assert answer.status_code == 200, answer.text
                run: dict[str, Any] = answer.json()
                return run if run["status"] != "running" else None

            deadline = time.monotonic() + 60
            while (ended := ended_here()) is None:
                assert time.monotonic() < deadline, "the run never ended"
                time.sleep(0.2)
            store.start()  # the same port and file
            # Read from the store itself, as every other replica reads it.
            key = RunKeys(ServeSettings().key_prefix).run(run_id)
            client = redis.Redis.from_url(store.url, decode_responses=True)
            try:
                deadline = time.monotonic() + 30
                while True:
                    stored = RunRecord.from_fields(cast(Any, client.hgetall(key)))
                    if stored.status != "running":
                        break
                    assert time.monotonic() < deadline, "the run's end was never stored"
                    time.sleep(0.1)
            finally:
                client.close()
            # All of it but the count of events: those of the outage were not stored.
            assert {**stored.to_json(), "events": 0} == {**ended, "events": 0}
            read = wait_for_status(replica, run_id, ended["status"])
            assert {**read, "events": 0} == {**ended, "events": 0}
    finally:
        store.stop()


# --- the stored form and its bounds (the store itself, on real Redis) ---------------------------


def _record(replica: str = "r1", **fields: Any) -> RunRecord:
    return RunRecord(id="run-1", owner="key:abc", model="rlm", created=1.5, replica=replica,
                     **fields)  # fmt: skip


def test_a_record_reads_back_what_it_wrote() -> None:
    ended = _record(events=3).ended(
        "succeeded", result={"answer": "7", "usage": {"total_tokens": 2}, "rlm": {}}
    )
    assert RunRecord.from_fields(ended.to_fields()) == ended
    failed = _record().interrupted()
    assert RunRecord.from_fields(failed.to_fields()) == failed
    assert failed.to_json()["error"]["code"] == "run_interrupted"
    with pytest.raises(ValueError, match="not a stored run"):
        RunRecord.from_fields({"status": "running"})
    with pytest.raises(ValueError, match="unknown status"):
        RunRecord.from_fields({**failed.to_fields(), "status": "exploded"})


def test_a_lease_must_outlive_its_renewal() -> None:
    with pytest.raises(ValueError, match="RLM_SERVE_LEASE_TTL_S"):
        ServeSettings(lease_interval_s=5, lease_ttl_s=5)


@pytest.mark.anyio
async def test_the_stored_run_is_bounded(redis_url: str) -> None:
    settings = ServeSettings(
        redis_url=redis_url, max_runs=2, run_ttl_s=30, run_timeout_s=100, lease_ttl_s=2,
        lease_interval_s=1,
    )  # fmt: skip
    store = RedisRunStore(settings, redis_url)
    await store.open(lambda _run_id: None)
    try:
        record = _record(replica=store.replica)
        await store.add(record)
        await store.add(replace(record, id="run-2"))
        with pytest.raises(RunsFull):  # RLM_SERVE_MAX_RUNS counts the runs in the store
            await store.add(replace(record, id="run-3"))
        # Events: the newest MAX_EVENTS kept, every one counted.
        texts = [json.dumps({"event": "e", "n": n}) for n in range(MAX_EVENTS + 5)]
        for start in range(0, len(texts), 2000):
            await store.append(record.id, texts[start : start + 2000])
        read = await store.get(record.id)
        assert read is not None and (read.events, read.dropped_events) == (MAX_EVENTS + 5, 5)
        first = await store.read_events(record.id, "0", 0)
        assert json.loads(first[0][1])["n"] == 5 and len(first) == 500
        # A running run's keys live its timeout plus a margin; a finished run's RLM_SERVE_RUN_TTL_S.
        keys = store.keys
        for key in (keys.run(record.id), keys.events(record.id)):
            assert 30_000 < await store.redis.pttl(key) <= store.running_ttl_s * 1000
        await store.finish(read.ended("cancelled"))
        for key in (keys.run(record.id), keys.events(record.id)):
            assert 0 < await store.redis.pttl(key) <= 30_000
        stored = await store.get(record.id)  # its end, and every event still counted
        assert stored is not None and (stored.status, stored.events) == ("cancelled", read.events)
    finally:
        await store.aclose()
    # A replica that stops takes its lease with it.
    probe = Redis.from_url(redis_url)
    try:
        assert not await probe.exists(store.keys.lease(store.replica))
    finally:
        await probe.aclose()


def test_an_answer_too_large_to_keep_fails_its_run() -> None:
    def result(answer: str) -> RLMResult:
        return RLMResult(answer=answer, stop_reason="final", stop_detail="", run_id="r",
                         depth=0, iterations=(), usage=Usage())  # fmt: skip

    assert _outcome(result("x" * 100), 2048)[0] == "succeeded"
    status, kept, error = _outcome(result("x" * 4096), 2048)
    assert (status, kept) == ("failed", None)
    assert error is not None and error["code"] == "answer_too_large"


@pytest.mark.anyio
async def test_a_cancel_the_running_replica_missed_still_reaches_it(redis_url: str) -> None:
    settings = ServeSettings(redis_url=redis_url, lease_interval_s=0.1, lease_ttl_s=5)
    running, asking = RedisRunStore(settings, redis_url), RedisRunStore(settings, redis_url)
    cancelled: list[str] = []
    try:
        record = _record(replica=running.replica)
        await running.add(record)
        await asking.request_cancel(record.id)  # published while no one listens: missed
        await running.open(cancelled.append)
        await wait_until(lambda: record.id in cancelled)  # read from its flag
        await running.finish(record.ended("cancelled"))
        assert not await running.redis.exists(running.keys.cancel(record.id))
        # Listening, a cancel arrives on the channel.
        other = replace(record, id="run-2")
        await running.add(other)
        await asking.request_cancel(other.id)
        await wait_until(lambda: other.id in cancelled)
    finally:
        await running.aclose()
        await asking.redis.aclose()
    # An event too large to keep is kept as its name and size.
    assert json.loads(_encode("iteration", {"n": 1}, 1024)) == {"event": "iteration", "n": 1}
    stub = json.loads(_encode("iteration", {"reply": "y" * 2000}, 1024))
    assert stub["truncated"] is True and stub["event"] == "iteration" and stub["bytes"] > 2000
