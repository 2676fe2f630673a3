"""A `/pending` answer that never reaches its poller strands nothing for a whole lease.

A real TCP proxy on loopback sits between a real poller and real `rlm broker` processes. It
relays each HTTP exchange whole, except a `/pending` answer that carries requests: the broker
wrote it all (its leases are granted), the proxy forwards half of it and cuts the connection.
The broker's lease is 600 s, far past each test's bound, so only the poller's report of its
lost long-poll (`abandoned=` on its next `/pending`) can get the request answered in time.
Nothing is asserted on wall time: the bound only stops a test that would wait for the lease.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from pydantic import SecretStr

from fake_llm import FakeLLMServer
from host_poller.poller import Poller, PollerSettings
from rlm_wire.broker_client import BrokerClient
from rlm_wire.broker_models import LLMRequest, RequestResult
from tests.support.servers import BrokerProcess, loopback_server
from tests.test_poller import echo_scenario, poller_of, running

pytestmark = pytest.mark.anyio

#: Far longer than any test here may take: waiting for a lease to lapse would fail it.
LEASE_S = "600"

#: Most seconds to wait for an answer (a bound on the test, not a claim about speed).
_RESULT_BOUND_S = 30.0


@dataclass
class CuttingProxy:
    """Relays HTTP/1.1 exchanges to `upstream` one at a time per connection; the first
    `cuts` answers of `/pending` that carry requests are cut half-way. `on_cut`, if given,
    runs before a cut connection closes (e.g. to kill the broker that answered)."""

    upstream: str
    cuts: int = 1
    on_cut: Callable[[], None] | None = None
    url: str = ""
    #: the query of every `/pending` relayed (or cut), in order
    polls: list[dict[str, list[str]]] = field(default_factory=list)
    #: the poll ids of the `/pending` answers cut
    cut_polls: list[str] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parts = urlsplit(self.upstream)
        try:
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
        except OSError:
            writer.close()
            return
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the poller closed its connection
                body = await reader.readexactly(_content_length(head))
                up_writer.write(head + body)
                await up_writer.drain()
                target = head.split(b" ", 2)[1].decode()
                answer_head = await _unless_hung_up(up_reader.readuntil(b"\r\n\r\n"), reader)
                if answer_head is None:
                    return  # as a reverse proxy does: the broker sees its client leave
                answer = await up_reader.readexactly(_content_length(answer_head))
                if target.startswith("/pending"):
                    query = parse_qs(urlsplit(target).query)
                    self.polls.append(query)
                    if self.cuts > 0 and b'"requests":[{' in answer:
                        self.cuts -= 1
                        self.cut_polls.extend(query.get("poll", ["(none)"]))
                        writer.write(answer_head + answer[: len(answer) // 2])
                        await writer.drain()
                        if self.on_cut is not None:
                            self.on_cut()
                        return  # closes both sides: the poller reads a truncated body
                writer.write(answer_head + answer)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            return  # the broker went away: so does the poller's connection
        finally:
            up_writer.close()
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[CuttingProxy]:
        async with loopback_server(self._serve) as self.url:
            yield self


async def _unless_hung_up(
    answer: Coroutine[Any, Any, bytes], client: asyncio.StreamReader
) -> bytes | None:
    """`answer`, or None if the client hangs up first (it sends nothing while it waits)."""
    answered = asyncio.ensure_future(answer)
    hung_up = asyncio.ensure_future(client.read(1))
    try:
        await asyncio.wait({answered, hung_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answered, hung_up):
            task.cancel()
        await asyncio.wait({answered, hung_up})  # the reader is free again for the next read
    return answered.result() if answered.done() and not answered.cancelled() else None


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            raise AssertionError("the proxy relays Content-Length bodies only")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def brokers(redis_url: str) -> Iterator[Callable[..., BrokerProcess]]:
    """Starts `rlm broker` processes on the test's Redis with 600 s leases (and any other
    `RLM_*` variables given)."""
    started: list[BrokerProcess] = []

    def start(**env: str) -> BrokerProcess:
        broker = BrokerProcess(redis_url, None, RLM_LEASE_S=LEASE_S, **env).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(echo_scenario()) as server:
        yield server


async def _tenant(broker: BrokerProcess) -> tuple[str, BrokerClient]:
    """A new tenant's token, and a client holding a new session of it."""
    async with BrokerClient(broker.url, broker.admin_token) as admin:
        tenant = await admin.create_tenant("t")
    async with BrokerClient(broker.url, tenant.token) as tenant_client:
        session = await tenant_client.create_session()
    return tenant.token, BrokerClient(broker.url, session.token)


def _settings(broker_urls: list[str], token: str) -> PollerSettings:
    return PollerSettings(
        broker_url=",".join(broker_urls),
        admin_token=SecretStr(token),
        tenant_token=None,
        poller_wait_s=2.0,
        poller_grace_s=5.0,
        poller_backoff_initial_s=0.02,
        poller_backoff_max_s=0.2,
    )


async def _handed_back(broker: BrokerProcess) -> float:
    """The broker's count of leases handed back on a poller's report."""
    async with httpx2.AsyncClient() as http:
        text = (await http.get(f"{broker.url}/metrics", timeout=10)).text
    (line,) = [x for x in text.splitlines() if x.startswith("rlm_broker_lost_answer_leases_total")]
    return float(line.split()[1])


async def _answer(session: BrokerClient, prompt: str) -> RequestResult:
    result = await session.enqueue(LLMRequest(prompt=prompt), wait_s=0)
    return await asyncio.wait_for(session.wait_result(result, wait_s=5), _RESULT_BOUND_S)


async def _answered_through(
    proxy: CuttingProxy,
    session: BrokerClient,
    token: str,
    llm: FakeLLMServer,
    prompt: str,
    *,
    next_brokers: tuple[str, ...] = (),
) -> tuple[RequestResult, Poller]:
    """Enqueue `prompt` and wait for its answer, with a poller running throughout whose
    brokers are the proxy (its URL is known once it runs) and then `next_brokers`; the
    result, and the poller."""
    async with (
        session,
        proxy.running(),
        poller_of(_settings([proxy.url, *next_brokers], token), llm.base_url) as poller,
        running(poller),
    ):
        result = await _answer(session, prompt)
    return result, poller


@pytest.mark.parametrize("scope", ["tenant", "admin"])
async def test_a_cut_pending_answer_is_delivered_again_by_the_next_long_poll(
    brokers: Callable[..., BrokerProcess], llm: FakeLLMServer, scope: str
) -> None:
    broker = brokers()
    tenant_token, session = await _tenant(broker)
    token = tenant_token if scope == "tenant" else broker.admin_token
    proxy = CuttingProxy(broker.url)
    result, poller = await _answered_through(proxy, session, token, llm, "cut once")
    assert (result.status, result.response) == ("done", "echo: cut once")
    assert len(proxy.cut_polls) == 1
    (lost,) = proxy.cut_polls
    # The poller named the lost long-poll on a later one, which got the request again.
    assert any(lost in ",".join(q.get("abandoned", [])) for q in proxy.polls)
    assert poller.stats.lost_polls >= 1
    assert poller.stats.answered == 1
    assert llm.stats()["requests"] == 1  # the LLM was paid once
    assert await _handed_back(broker) == 1


async def test_a_broker_killed_as_it_answers_strands_nothing_on_the_next_broker(
    brokers: Callable[..., BrokerProcess], llm: FakeLLMServer
) -> None:
    """The replica that leased the request dies with its answer unsent (SIGKILL); the poller
    fails over to another replica, which hands the lease back at once on its report."""
    first, second = brokers(), brokers()
    tenant_token, session = await _tenant(second)  # the sandbox side outlives the first
    proxy = CuttingProxy(first.url, on_cut=first.kill)
    result, poller = await _answered_through(
        proxy, session, tenant_token, llm, "failover", next_brokers=(second.url,)
    )
    assert (result.status, result.response) == ("done", "echo: failover")
    assert first.returncode is not None  # killed: the second replica delivered it again
    assert len(proxy.cut_polls) == 1
    assert poller.link.failovers >= 1
    assert llm.stats()["requests"] == 1
    assert await _handed_back(second) == 1


async def test_a_report_refused_as_too_long_is_sent_again_with_the_newest_poll(
    brokers: Callable[..., BrokerProcess], llm: FakeLLMServer
) -> None:
    """Two answers in a row are cut, and the broker takes one poll id per report: the poller
    reports its two lost polls, is refused (`bad_poll_id`), and reports the newest alone,
    which still holds the request (the first report handed it to the second long-poll)."""
    broker = brokers(RLM_MAX_ABANDONED_POLLS="1")
    tenant_token, session = await _tenant(broker)
    proxy = CuttingProxy(broker.url, cuts=2)
    result, _ = await _answered_through(proxy, session, tenant_token, llm, "cut twice")
    assert (result.status, result.response) == ("done", "echo: cut twice")
    first, second = proxy.cut_polls
    reports = [q["abandoned"][0] for q in proxy.polls if "abandoned" in q]
    assert reports[:3] == [first, f"{first},{second}", second]
    assert await _handed_back(broker) == 2
    assert llm.stats()["requests"] == 1


async def test_a_long_poll_that_never_connected_is_not_reported(llm: FakeLLMServer) -> None:
    """Connection refused: the request never reached a broker, so nothing can have been
    leased to it, and no report (an admin's would look in every tenant) is sent for it."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = _settings([f"http://127.0.0.1:{port}"], "admin-token-of-nobody")
    async with poller_of(settings, llm.base_url) as poller, running(poller):
        while True:  # bounded by the test's timeout
            if poller.link.failed_tries >= 3:
                break
            await asyncio.sleep(0.05)
    assert poller.stats.lost_polls == 0
