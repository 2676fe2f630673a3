"""The hot routes (`POST /enqueue`, `GET /pending`, `POST /respond`) served as raw ASGI keep
the Starlette routes' wire: JSON errors with the same statuses, codes and headers, the body
limit, metrics; a held call whose client hangs up leaves no waiter behind; every other
request still goes to Starlette."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import httpx2
import pytest

from broker.app import create_app
from broker.settings import BrokerSettings
from rlm_wire.asgi import AsgiRequest, Hold
from tests.support.arrivals import receive_stamped, stamp_arrivals
from tests.support.brokers import Session, Tenant, tenant_and_session
from tests.support.servers import BrokerServer, InspectableBroker, wait_until

pytestmark = pytest.mark.anyio

MAX_BODY = 4096


@pytest.fixture
async def parties(
    broker_factory: Callable[..., BrokerServer],
) -> AsyncIterator[tuple[InspectableBroker, Tenant, Session]]:
    broker = cast(InspectableBroker, broker_factory(InspectableBroker, max_body_bytes=MAX_BODY))
    async with tenant_and_session(broker.url, broker.admin_token) as (tenant, session):
        yield broker, tenant, session


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_error(response: httpx2.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    error = response.json()["error"]
    assert (error["code"], bool(error["message"])) == (code, True)


async def test_bad_input_is_answered_with_the_error_body(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        s, t = _auth(session.token), _auth(tenant.token)
        _assert_error(
            await raw.post("/enqueue", content=b"{not json", headers=s), 400, "bad_request"
        )
        _assert_error(await raw.post("/respond", content=b"", headers=t), 400, "bad_request")
        _assert_error(
            await raw.post("/enqueue", json={"prompt": 1}, headers=s), 422, "invalid_body"
        )
        _assert_error(await raw.get("/pending?max=0", headers=t), 400, "bad_request")
        _assert_error(await raw.get("/pending?wait=soon", headers=t), 400, "bad_request")
        big = {"prompt": "x" * MAX_BODY}
        _assert_error(await raw.post("/enqueue", json=big, headers=s), 413, "payload_too_large")

        async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            yield b'{"prompt": "'
            for _ in range(MAX_BODY // 512 + 1):
                yield b"y" * 512
            yield b'"}'

        _assert_error(
            await raw.post("/enqueue", content=streamed(), headers=s), 413, "payload_too_large"
        )


async def test_tokens_and_scopes_are_checked(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        for method, path in (("POST", "/enqueue"), ("GET", "/pending"), ("POST", "/respond")):
            body = {"json": {"prompt": "x"}} if method == "POST" else {}
            missing = await raw.request(method, path, **cast(Any, body))
            _assert_error(missing, 401, "unauthorized")
            wrong = await raw.request(method, path, headers=_auth("rlm_t_nope"), **cast(Any, body))
            _assert_error(wrong, 401, "unauthorized")
            basic = await raw.request(method, path, headers={"Authorization": "Basic eA=="})
            _assert_error(basic, 401, "unauthorized")
        scoped = await raw.get("/pending", headers=_auth(session.token))
        _assert_error(scoped, 403, "forbidden")
        scoped = await raw.post("/enqueue", json={"prompt": "x"}, headers=_auth(tenant.token))
        _assert_error(scoped, 403, "forbidden")


async def test_a_wrong_method_is_a_405_with_allow(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, _ = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        for method, path, allow in (
            ("GET", "/enqueue", "POST"),
            ("PUT", "/respond", "POST"),
            ("POST", "/pending", "GET"),
            # HEAD of a long-poll would lease work and drop it with the body it never sends.
            ("HEAD", "/pending", "GET"),
        ):
            response = await raw.request(method, path, headers=_auth(tenant.token))
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == allow
            if method != "HEAD":
                _assert_error(response, 405, "method_not_allowed")


async def test_answers_are_counted_by_endpoint_and_status(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        await raw.post("/enqueue", content=b"nope", headers=_auth(session.token))
        await raw.get("/pending?wait=0", headers=_auth(tenant.token))
        metrics = (await raw.get("/metrics")).text
    assert 'rlm_broker_http_requests_total{endpoint="enqueue",status="400"} 1.0' in metrics
    assert 'rlm_broker_http_requests_total{endpoint="pending",status="200"} 1.0' in metrics


async def test_other_requests_still_go_to_starlette(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        head = await raw.head("/health/live")
        assert (head.status_code, head.content) == (200, b"")
        _assert_error(await raw.get("/nowhere"), 404, "not_found")
        _assert_error(
            await raw.delete("/tenants/self", headers=_auth(tenant.token)),
            405,
            "method_not_allowed",
        )
        queued = await raw.post(
            "/enqueue?wait=0", json={"prompt": "q"}, headers=_auth(session.token)
        )
        assert queued.status_code == 202
        request_id = queued.json()["id"]
        read = await raw.get(f"/requests/{request_id}?wait=0", headers=_auth(session.token))
        assert read.json() == {"id": request_id, "status": "pending"}


def test_the_route_table_lists_the_hot_routes() -> None:
    app = create_app(BrokerSettings(redis_url="redis://127.0.0.1:1", admin_token="unused"))
    paths = {getattr(route, "path", "") for route in app.routes}
    assert {"/enqueue", "/pending", "/respond", "/health"} <= paths


async def _raw_call(url: str, head: str, body: bytes = b"") -> asyncio.StreamWriter:
    """Sends one request on a fresh connection and leaves it open, unanswered."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    return writer


async def _held_enqueue(url: str, token: str, body: bytes) -> asyncio.StreamWriter:
    """A `POST /enqueue?wait=60` sent and left waiting for its answer."""
    head = (
        f"POST /enqueue?wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
    )
    return await _raw_call(url, head, body)


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_a_held_enqueue_whose_client_hangs_up_leaves_no_waiter(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    """The old broker kept the waiter for the whole `wait` (60 s here)."""
    broker, tenant, session = parties
    waiters = broker.context.waiters
    writer = await _held_enqueue(broker.url, session.token, b'{"prompt": "left"}')
    await wait_until(lambda: len(waiters) == 1)
    await _hang_up(writer)
    await wait_until(lambda: len(waiters) == 0)
    # Its request is still queued: a poller gets it, and answering it is not an error.
    async with httpx2.AsyncClient(base_url=broker.url, headers=_auth(tenant.token)) as raw:
        (request,) = (await raw.get("/pending?wait=5")).json()["requests"]
        assert request["prompt"] == "left"
        answered = await raw.post("/respond", json={"id": request["id"], "response": "late"})
        assert answered.json() == {"id": request["id"], "status": "accepted"}


async def test_a_held_batch_whose_client_hangs_up_leaves_no_waiter(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    """A batch waits for all of its results; its client's hang-up ends the wait of them all,
    and the one already answered does not end it early."""
    broker, tenant, session = parties
    waiters = broker.context.waiters
    batch = b'{"batch": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]}'
    writer = await _held_enqueue(broker.url, session.token, batch)
    await wait_until(lambda: len(waiters) == 3)
    async with httpx2.AsyncClient(base_url=broker.url, headers=_auth(tenant.token)) as raw:
        first, *_ = (await raw.get("/pending?wait=5&max=1")).json()["requests"]
        await raw.post("/respond", json={"id": first["id"], "response": "one"})
        await wait_until(lambda: len(waiters) == 2)  # still held for the other two
        await _hang_up(writer)
        await wait_until(lambda: len(waiters) == 0)


async def test_a_held_batch_answers_when_its_last_result_arrives(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    async with httpx2.AsyncClient(base_url=broker.url, timeout=30) as raw:
        held = asyncio.create_task(
            raw.post(
                "/enqueue?wait=30",
                json={"batch": [{"prompt": "x"}, {"prompt": "y"}]},
                headers=_auth(session.token),
            )
        )
        answered = 0
        while answered < 2:
            polled = await raw.get("/pending?wait=5", headers=_auth(tenant.token))
            for request in polled.json()["requests"]:
                await raw.post(
                    "/respond",
                    json={"id": request["id"], "response": request["prompt"] * 2},
                    headers=_auth(tenant.token),
                )
                answered += 1
        reply = await held
    assert reply.status_code == 200
    assert [r["response"] for r in reply.json()["results"]] == ["xx", "yy"]


class _Receive:
    """An ASGI `receive` after the body was read: blocks until `leave()` (a hang-up)."""

    def __init__(self, fail: bool = False) -> None:
        self.left = asyncio.Event()
        self.fail = fail

    def leave(self) -> None:
        self.left.set()

    async def __call__(self) -> dict[str, Any]:
        await self.left.wait()
        if self.fail:
            raise OSError("the connection broke")
        return {"type": "http.disconnect"}


async def test_a_hold_ends_when_every_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    receive = _Receive()
    hold = Hold(receive)
    futures = [loop.create_future() for _ in range(3)]
    for i, future in enumerate(futures):
        loop.call_later(0.01 * (i + 1), future.set_result, i)
    await hold.wait(futures, 60)
    assert all(f.done() for f in futures) and not hold.hung_up
    await hold.wait(futures, 60)  # every one is done already: at once
    hold.close()


async def test_a_hold_ends_at_its_timeout_and_at_a_hang_up() -> None:
    loop = asyncio.get_running_loop()
    receive = _Receive()
    hold = Hold(receive)
    never = loop.create_future()
    await hold.wait([never], 0.01)
    assert not never.done() and not hold.hung_up
    loop.call_later(0.01, receive.leave)
    await hold.wait([never], 60)
    assert hold.hung_up
    await hold.wait([never], 60)  # hung up: every later wait returns at once
    hold.close()


async def test_a_hold_on_one_future_it_owns_resumes_in_one_pass_and_settles_it() -> None:
    loop = asyncio.get_running_loop()
    receive = _Receive()
    hold = Hold(receive)
    order: list[str] = []

    async def held(future: asyncio.Future[bytes | None]) -> None:
        await hold.wait_one(future, 60)
        order.append("resumed")

    answered: asyncio.Future[bytes | None] = loop.create_future()
    waiting = asyncio.create_task(held(answered))
    await asyncio.sleep(0)
    answered.set_result(b"{}")
    loop.call_soon(order.append, "next pass")  # what the result's own pass is ahead of
    await waiting
    # A done-callback settling a wake (`wait`) would resume it a pass later, after this.
    assert order == ["resumed", "next pass"]

    # Its timeout and its client's hang-up settle the future with None ("nothing yet").
    late: asyncio.Future[bytes | None] = loop.create_future()
    await hold.wait_one(late, 0.01)
    assert late.result() is None and not hold.hung_up
    gone: asyncio.Future[bytes | None] = loop.create_future()
    loop.call_later(0.01, receive.leave)
    await hold.wait_one(gone, 60)
    assert gone.result() is None and hold.hung_up
    hold.close()


def _raw_post(port: int, path: str, token: str, body: bytes) -> socket.socket:
    """A POST sent on a plain socket that stamps each segment's arrival."""
    sock = socket.create_connection(("127.0.0.1", port))
    stamp_arrivals(sock)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    sock.settimeout(30)
    return sock


async def test_a_held_enqueue_is_answered_before_the_respond_that_answered_it(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    """Its caller waits on that answer; the poller waits on nothing (it already has its next
    long-poll out), so the broker writes the caller's first."""
    broker, tenant, session = parties
    port = int(broker.url.rsplit(":", 1)[1])
    with _raw_post(port, "/enqueue?wait=30", session.token, b'{"prompt": "first"}') as held:
        async with httpx2.AsyncClient(base_url=broker.url, headers=_auth(tenant.token)) as raw:
            leased = (await raw.get("/pending?wait=10")).json()["requests"]
        assert len(leased) == 1
        body = json.dumps({"id": leased[0]["id"], "response": "ok"}).encode()
        with _raw_post(port, "/respond", tenant.token, body) as respond:
            answered, answered_at = await asyncio.to_thread(receive_stamped, held)
            confirmed, confirmed_at = await asyncio.to_thread(receive_stamped, respond)
    assert answered.startswith(b"HTTP/1.1 200") and b'"ok"' in answered
    assert confirmed.startswith(b"HTTP/1.1 200") and b"accepted" in confirmed
    assert answered_at < confirmed_at


async def test_a_receive_that_fails_counts_as_a_hang_up() -> None:
    receive = _Receive(fail=True)
    hold = Hold(receive)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, receive.leave)
    await hold.wait([loop.create_future()], 60)
    assert hold.hung_up


async def test_a_closed_hold_leaves_no_task_reading_receive() -> None:
    receive = _Receive()
    hold = Hold(receive)
    hold.watch()
    await asyncio.sleep(0)
    readers = [t for t in asyncio.all_tasks() if "until_disconnect" in repr(t.get_coro())]
    assert len(readers) == 1
    hold.close()
    await asyncio.sleep(0)
    assert readers[0].cancelled()


async def test_a_waiting_result_read_whose_client_hangs_up_leaves_no_waiter(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    """`GET /requests/{id}?wait=` (a Starlette route) ends its wait as the hot routes do."""
    broker, tenant, session = parties
    waiters = broker.context.waiters
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        queued = await raw.post(
            "/enqueue?wait=0", json={"prompt": "read"}, headers=_auth(session.token)
        )
    request_id = queued.json()["id"]
    writer = await _raw_call(
        broker.url,
        f"GET /requests/{request_id}?wait=60 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {session.token}\r\n",
    )
    await wait_until(lambda: len(waiters) == 1)
    await _hang_up(writer)
    await wait_until(lambda: len(waiters) == 0)
    async with httpx2.AsyncClient(base_url=broker.url, headers=_auth(tenant.token)) as raw:
        (request,) = (await raw.get("/pending?wait=5")).json()["requests"]
        await raw.post("/respond", json={"id": request["id"], "response": "kept"})
        read = await raw.get(f"/requests/{request_id}?wait=5")
    assert read.json()["response"] == "kept"


async def test_a_long_poll_whose_client_hangs_up_leaves_no_waiter(
    parties: tuple[InspectableBroker, Tenant, Session],
) -> None:
    broker, tenant, session = parties
    parking = broker.context.parking
    writer = await _raw_call(
        broker.url,
        f"GET /pending?wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant.token}\r\n",
    )
    await wait_until(lambda: parking.waiting(tenant.tenant_id) == 1)
    await _hang_up(writer)
    await wait_until(lambda: parking.waiting(tenant.tenant_id) == 0)
    # Work enqueued after it left is not taken by it: the next long-poll gets it.
    async with httpx2.AsyncClient(base_url=broker.url) as raw:
        queued = await raw.post(
            "/enqueue?wait=0", json={"prompt": "p"}, headers=_auth(session.token)
        )
        polled = await raw.get("/pending?wait=5", headers=_auth(tenant.token))
    assert [r["id"] for r in polled.json()["requests"]] == [queued.json()["id"]]


async def test_a_bug_is_a_logged_500_without_its_traceback_on_the_wire(
    parties: tuple[InspectableBroker, Tenant, Session], caplog: pytest.LogCaptureFixture
) -> None:
    broker, tenant, _ = parties
    store = broker.context.store

    async def broken_claim(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail")

    caplog.set_level(logging.ERROR, logger="broker")
    original = store.claim
    store.claim = broken_claim  # type: ignore[method-assign,assignment]
    try:
        async with httpx2.AsyncClient(base_url=broker.url) as raw:
            response = await raw.get("/pending?wait=0", headers=_auth(tenant.token))
            metrics = (await raw.get("/metrics")).text
    finally:
        store.claim = original  # type: ignore[method-assign]
    _assert_error(response, 500, "internal_error")
    assert "secret detail" not in response.text
    assert 'rlm_broker_http_requests_total{endpoint="pending",status="500"} 1.0' in metrics
    (record,) = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


async def test_a_redis_outage_is_a_503_on_a_hot_route() -> None:
    with BrokerServer("redis://127.0.0.1:1/0", redis_timeout_s=0.5) as broker:
        async with httpx2.AsyncClient(base_url=broker.url) as raw:
            response = await raw.get("/pending?wait=0", headers=_auth(broker.admin_token))
    _assert_error(response, 503, "redis_unavailable")


def test_a_request_reads_its_headers_and_query_as_starlette_does() -> None:
    scope = {
        "headers": [(b"x-a", b"1"), (b"x-a", b"2"), (b"authorization", b"Bearer t")],
        "query_string": b"wait=1&wait=2&max=",
    }

    async def receive() -> dict[str, Any]:
        raise AssertionError("not read")

    request = AsgiRequest(scope, receive)
    assert request.headers.get("x-a") == "1"
    assert request.headers.get("authorization") == "Bearer t"
    assert dict(request.query_params) == {"wait": "2", "max": ""}
    for raw in ("", "a", "a=", "=b", "&&a=1&", "a=1=2", "a=%31&b=x+y", "w=1;x=2", "a=1&a"):
        request = AsgiRequest({"headers": [], "query_string": raw.encode()}, receive)
        assert request.query_params == dict(parse_qsl(raw, keep_blank_values=True)), raw
