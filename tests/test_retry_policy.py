"""The one retry policy of every broker client, and the transport seam under the clients.

`rlm_repl.RetryPolicy` is used by `ApiClient` (so `BrokerClient`, `RuntimeClient` and the
sandbox runtime's bridge), by the exec script's `HttpTransport` and by the poller. Here it is
checked on its own, then through both transports (httpx2 and `KeepAliveLink`) and the
stdlib transport against a real server on loopback that fails on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from email.utils import formatdate

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.redis_server import free_port
from rlm_repl import (
    BrokerResponseError,
    BrokerUnavailableError,
    HttpTransport,
    RetryPolicy,
    retry_after_s,
)
from rlm_wire import (
    ApiClient,
    ApiError,
    ServiceResponseError,
    ServiceUnreachable,
    ThreadedServer,
    exception_handlers,
    json_response,
    uvicorn_config,
)
from rlm_wire.link import KeepAliveLink
from rlm_wire.transport import HttpxTransport, TransportFactory

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(deadline_s=5.0, initial_s=0.005, max_pause_s=0.02)


# --- the policy on its own -------------------------------------------------------------------


def test_pauses_grow_with_jitter_up_to_their_cap() -> None:
    policy = RetryPolicy(initial_s=0.1, max_pause_s=1.0)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (60, 1.0)]:
        pauses = [policy.pause(retry) for _ in range(200)]
        assert all(ceiling / 2 <= pause <= ceiling for pause in pauses), retry
        assert len(set(pauses)) > 1, "pauses are jittered"


def test_retry_after_lengthens_a_pause_and_the_deadline_ends_the_retries() -> None:
    policy = RetryPolicy(deadline_s=1.0, initial_s=0.01, max_pause_s=0.02)
    assert policy.pause(0, retry_after="0.5") == 0.5
    clock = policy.start()
    assert clock.next_pause(retry_after="0.5") == 0.5
    assert clock.next_pause(retry_after="5") is None, "a wait beyond the deadline gives up"
    assert clock.retries == 1
    assert RetryPolicy(deadline_s=0.0).start().next_pause() is None


def test_an_infinite_deadline_never_gives_up() -> None:
    clock = RetryPolicy(deadline_s=float("inf")).start()
    assert all(clock.next_pause() is not None for _ in range(1000))


@pytest.mark.parametrize(
    ("initial_s", "max_pause_s", "deadline_s"), [(0.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.1, 1.0, -1)]
)
def test_a_policy_that_makes_no_sense_is_refused(
    initial_s: float, max_pause_s: float, deadline_s: float
) -> None:
    with pytest.raises(ValueError, match="RetryPolicy needs"):
        RetryPolicy(initial_s=initial_s, max_pause_s=max_pause_s, deadline_s=deadline_s)


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s(" 0.25 ") == 0.25
    assert retry_after_s("-4") == 0.0
    in_a_while = retry_after_s(formatdate(usegmt=True))
    assert in_a_while is not None and in_a_while <= 1.0
    assert retry_after_s("soon") is None
    assert retry_after_s(None) is None


# --- a server that fails on purpose ---------------------------------------------------------


class Failing:
    """Counts the hits of each route; `/busy/{n}` answers 503 (Retry-After 0) n times."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> int:
        with self._lock:
            self.hits[key] = self.hits.get(key, 0) + 1
            return self.hits[key]

    def app(self) -> Starlette:
        async def busy(request: Request) -> Response:
            key = request.url.path + request.url.query
            count = self.hit(key)
            if count <= int(request.path_params["times"]):
                raise ApiError(503, "redis_unavailable", "busy", headers={"Retry-After": "0"})
            return json_response({"hits": count})

        async def status(request: Request) -> Response:
            self.hit(request.url.path)
            code = int(request.path_params["code"])
            raise ApiError(code, "failing", f"always {code}")

        return Starlette(
            routes=[
                Route("/busy/{times:int}", busy, methods=["GET", "POST"]),
                Route("/status/{code:int}", status, methods=["GET", "POST"]),
            ],
            exception_handlers=exception_handlers(logging.getLogger(__name__)),
        )


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[Failing, str]]:
    server = Failing()
    config = uvicorn_config(server.app(), "127.0.0.1", 0, loop="asyncio", graceful_shutdown_s=1)
    with ThreadedServer(config, name="test-failing") as running:
        yield server, running.url


class Client(ApiClient):
    def __init__(self, url: str, transport: TransportFactory, retry: RetryPolicy | None) -> None:
        super().__init__(
            url, "t", timeout_s=5.0, retry=retry, max_connections=4, transport=transport
        )


TRANSPORTS = [pytest.param(HttpxTransport, id="httpx"), pytest.param(KeepAliveLink, id="link")]


# --- ApiClient over either transport --------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_503_is_retried_until_it_passes(
    failing: tuple[Failing, str], transport: TransportFactory
) -> None:
    server, url = failing
    async with Client(url, transport, FAST) as client:
        reply = await client._send("GET", "/busy/3", params={"t": str(id(transport))})
    assert reply.status == 200
    assert server.hits[f"/busy/3t={id(transport)}"] == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_what_is_not_safe_to_repeat_is_retried_only_when_refused(
    failing: tuple[Failing, str], transport: TransportFactory
) -> None:
    server, url = failing
    name = str(id(transport))
    async with Client(url, transport, FAST) as client:
        # A 502 from a proxy may hide a request that was carried out: not repeated.
        with pytest.raises(ServiceResponseError) as caught:
            await client._send("POST", f"/status/502?{name}", idempotent=False)
        assert caught.value.status == 502
        assert server.hits["/status/502"] >= 1
        before = server.hits["/status/502"]
        with pytest.raises(ServiceResponseError):
            await client._send("POST", f"/status/502?{name}", idempotent=False)
        assert server.hits["/status/502"] == before + 1
        # A 503 is a refusal: nothing was done, so it is tried again.
        reply = await client._send("POST", "/busy/2", params={"n": name}, idempotent=False)
        assert reply.status == 200
        assert server.hits[f"/busy/2n={name}"] == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_past_the_deadline_the_last_answer_is_the_error(
    failing: tuple[Failing, str], transport: TransportFactory
) -> None:
    server, url = failing
    short = RetryPolicy(deadline_s=0.2, initial_s=0.01, max_pause_s=0.02)
    async with Client(url, transport, short) as client:
        with pytest.raises(ServiceResponseError) as caught:
            await client._send("GET", "/status/429")
    assert (caught.value.status, caught.value.code) == (429, "failing")
    assert server.hits["/status/429"] > 2, "retried until the deadline"
    async with Client(url, transport, None) as client:
        before = server.hits["/status/429"]
        with pytest.raises(ServiceResponseError):
            await client._send("GET", "/status/429")
        assert server.hits["/status/429"] == before + 1, "no policy: one try"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_service_that_comes_back_within_the_deadline_is_reached(
    transport: TransportFactory,
) -> None:
    server = Failing()
    port = free_port()
    config = uvicorn_config(server.app(), "127.0.0.1", port, loop="asyncio", graceful_shutdown_s=1)
    stop = threading.Event()

    def later() -> None:
        stop.wait(0.5)
        with ThreadedServer(config, name="test-late"):
            stop.wait(30)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    try:
        async with Client(f"http://127.0.0.1:{port}", transport, FAST) as client:
            reply = await client._send("GET", "/busy/0")
        assert reply.status == 200
        assert server.hits == {"/busy/0": 1}, "the service came up after the first tries"
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_service_that_stays_away_is_unreachable_after_the_deadline(
    transport: TransportFactory,
) -> None:
    short = RetryPolicy(deadline_s=0.2, initial_s=0.01, max_pause_s=0.05)
    async with Client(f"http://127.0.0.1:{free_port()}", transport, short) as client:
        with pytest.raises(ServiceUnreachable, match=r"GET /x: .*gave up after \d+ retries"):
            await client._send("GET", "/x")


# --- the exec script's stdlib transport -------------------------------------------------------


async def test_the_exec_script_retries_a_503_and_gives_up_on_a_429_past_its_deadline(
    failing: tuple[Failing, str],
) -> None:
    server, url = failing

    def calls() -> None:
        transport = HttpTransport(url, "t", retry=FAST)
        short = HttpTransport(url, "t", retry=RetryPolicy(deadline_s=0.2, initial_s=0.01))
        try:
            reply = transport._request("GET", "/busy/2?exec", None)
            assert reply.status == 200
            with pytest.raises(BrokerResponseError) as caught:
                short._request("GET", "/status/504", None)
            assert caught.value.status == 504
        finally:
            transport.close()
            short.close()

    await asyncio.to_thread(calls)
    assert server.hits["/busy/2exec"] == 3
    assert server.hits["/status/504"] > 2


async def test_the_exec_script_reports_an_unreachable_broker_after_its_deadline() -> None:
    short = RetryPolicy(deadline_s=0.2, initial_s=0.01, max_pause_s=0.05)
    transport = HttpTransport(f"http://127.0.0.1:{free_port()}", "t", retry=short)
    try:
        with pytest.raises(BrokerUnavailableError, match="retries"):
            await asyncio.to_thread(transport._request, "GET", "/x", None)
    finally:
        transport.close()
