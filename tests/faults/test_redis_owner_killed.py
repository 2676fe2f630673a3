"""An embedded Redis ends with the process that started it, however that process ends.

Before, the server ran in a session of its own and outlived an owner killed with SIGKILL
(or by the OOM killer): it kept its port and, when durable, its directory's lock, so the
next `rlm broker` on that directory refused to start ("in use by another process") until
someone found and killed the orphan. A clean test run left ~7 such servers behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from rlm_wire.broker_client import BrokerClient
from sandbox_runtime.service.memory import descendants
from tests.support.servers import BrokerProcess, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _redis_child(owner_pid: int) -> int:
    children = descendants(owner_pid, max_depth=1)
    (redis_pid,) = [c for c in children if "server" in Path(f"/proc/{c}/cmdline").read_text()]
    return redis_pid


async def test_a_broker_killed_with_sigkill_takes_its_redis_along_and_restarts_on_its_data(
    tmp_path: Path,
) -> None:
    redis_dir = str(tmp_path / "redis")
    broker = BrokerProcess(None, RLM_REDIS_DIR=redis_dir).start()
    redis_pid = _redis_child(broker.pid)
    try:
        async with BrokerClient(broker.url, broker.admin_token) as admin:
            tenant = await admin.create_tenant("accepted-before-the-kill")
    finally:
        broker.kill()

    await wait_until(lambda: not _running(redis_pid), timeout_s=20)

    # The directory's lock went with the server: a broker starts again on it, with the
    # tenant accepted before the kill (SIGTERM let the server flush its file).
    again = BrokerProcess(None, RLM_REDIS_DIR=redis_dir).start()
    try:
        async with BrokerClient(again.url, tenant.token) as tenant_client:
            session = await tenant_client.create_session()
        assert session.session_id
    finally:
        again.stop()


_OWNER = textwrap.dedent(
    """
    import asyncio, sys, threading, time
    from broker.redis_server import RedisServer

    async def main() -> RedisServer:
        # as `rlm up` does: started from the event loop's executor, whose thread ends
        # with this asyncio.run, long before the server is meant to stop
        return await asyncio.to_thread(RedisServer().start)

    server = asyncio.run(main())
    thread = threading.Thread(target=lambda: None)  # and one more short-lived thread
    thread.start()
    thread.join()
    print(server.pid, server.port, flush=True)
    time.sleep(600)
    """
)


def test_a_server_started_from_a_thread_that_ended_lives_until_its_owner_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert owner.stdout is not None
        redis_pid, port = (int(field) for field in owner.stdout.readline().split())
        # The threads that started it are gone; the server is not.
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            assert client.ping()
        finally:
            client.close()
        assert _running(redis_pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.communicate(timeout=10)
    deadline = time.monotonic() + 20
    while _running(redis_pid):
        assert time.monotonic() < deadline, "the server outlived its owner"
        time.sleep(0.05)
