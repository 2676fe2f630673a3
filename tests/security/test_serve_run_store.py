"""Probes of the run store `rlm serve` replicas share, as another application (or whoever
can read that Redis) would try it: reach a run started on one replica through another with
its own key; read the keys themselves out of Redis. Real `rlm serve` processes, real Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.test_rlm import make_text
from tests.test_serve_runs_durable import API_KEY, COUNT, ENDLESS, OTHER_KEY, running_replica


def _not_found(answer_status: int, body: dict[str, object], run_id: str) -> None:
    assert answer_status == 404
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "not_found"
    assert error["message"] == f"no run {run_id!r}"  # the same as for a run that never was


@pytest.mark.timeout(240)
def test_another_key_finds_no_run_on_any_replica_and_redis_holds_no_key(
    redis_url: str, tmp_path: Path
) -> None:
    with (
        running_replica(tmp_path / "a", redis_url) as replica_a,
        running_replica(tmp_path / "b", redis_url) as replica_b,
    ):
        done = replica_a.start_run(COUNT, make_text("whale", 2))
        assert replica_a.events(done)[-1][1]["answer"] == "2"
        going = replica_a.start_run(ENDLESS, max_iterations=1000)
        replica_b.wait_for_events(going, "iteration")
        # Its owner reads it through B; the other application's key gets the same 404 as
        # for a run that never was, through either replica, for every verb.
        assert replica_b.call("GET", f"/v1/runs/{done}").json()["answer"] == "2"
        for replica in (replica_a, replica_b):
            for run_id in (done, going):
                for method, path in [
                    ("GET", f"/v1/runs/{run_id}"),
                    ("GET", f"/v1/runs/{run_id}/events"),
                    ("POST", f"/v1/runs/{run_id}/cancel"),
                ]:
                    answer = replica.call(method, path, key=OTHER_KEY)
                    _not_found(answer.status_code, answer.json(), run_id)
        never = "run-" + "0" * 32
        answer = replica_b.call("GET", f"/v1/runs/{never}", key=OTHER_KEY)
        _not_found(answer.status_code, answer.json(), never)
        # The other key's cancel did not reach the run.
        assert replica_b.call("GET", f"/v1/runs/{going}").json()["status"] == "running"

        # Whoever reads the store's Redis finds runs there, and no key in any of them.
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        texts: list[str] = []
        try:
            for key in client.scan_iter(count=1000):
                texts.append(key)
                kind = client.type(key)
                if kind == "hash":
                    texts.extend(f"{k!s}={v!s}" for k, v in client.hgetall(key).items())
                elif kind == "stream":
                    for _, entry in client.xrange(key) or []:
                        texts.extend(f"{k!s}={v!s}" for k, v in (entry or {}).items())
                elif kind == "zset":
                    texts.extend(str(member) for member in client.zrange(key, 0, -1))
                elif kind == "string":
                    texts.append(str(client.get(key) or ""))
                else:
                    raise AssertionError(f"a key of an unexpected type: {key!r} {kind!r}")
        finally:
            client.close()
        blob = "\n".join(texts)
        assert done in blob and "whale" in blob  # the runs and their events are here
        for secret in (API_KEY, OTHER_KEY):
            assert secret not in blob
