"""What the poller reads of a broker's `/pending` and `/respond` answers, and what it refuses.

A broken or hostile broker answer (not JSON, a missing or mistyped field, a number JSON cannot
carry, more requests than were asked for) is `ServiceResponseError` with code
`unexpected_body`, on the poller's own transport (`KeepAliveLink`): never a KeyError or
TypeError out of the poll loop, which logs it, pauses and polls again. A scripted broker on
loopback (real HTTP) answers what each test gives it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import pytest
from pydantic import SecretStr

from host_poller.llm.types import Completion, Message, Usage
from host_poller.poller import ModelRouter, Poller, PollerSettings, RequestHandler
from rlm_wire import broker_models as p
from rlm_wire.api_client import query_string
from rlm_wire.broker_client import BrokerClient
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError
from rlm_wire.link import KeepAliveLink
from rlm_wire.run_info import RunInfo
from tests.support.servers import BrokerServer, loopback_server, wait_until
from tests.test_poller import open_tenant_session

pytestmark = pytest.mark.anyio

#: One request as the broker delivers it (`broker.routes_queue._pending_body`).
GOOD: dict[str, Any] = {
    "prompt": "2+2?", "depth": 1, "id": "t_abc.r_0001", "session_id": "s_1",
    "tenant_id": "t_abc", "attempt": 1, "enqueued_at": 1764486000.5, "lease_s": 30.0,
    "lease_expires_at": 1764486030.5, "metadata": None,
}  # fmt: skip


def with_fields(**changes: Any) -> dict[str, Any]:
    """`GOOD` with some fields changed (a value of `...`: the field left out)."""
    request = {**GOOD, **changes}
    return {key: value for key, value in request.items() if value is not ...}


def pending_body(*requests: dict[str, Any]) -> bytes:
    return json.dumps({"requests": list(requests)}).encode()


class ScriptedBroker:
    """An HTTP/1.1 server on loopback answering each `(method, path)` with what `answer`
    gives for it (status, body); every request body it receives is kept in `received`."""

    def __init__(self, answer: Callable[[str, str], tuple[int, bytes]]) -> None:
        self.answer = answer
        self.received: list[tuple[str, str, bytes]] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                method, target, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                path = target.split("?", 1)[0]
                self.received.append((method, path, body))
                status, answer = self.answer(method, path)
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedBroker]:
        async with loopback_server(self._serve) as self.url:
            yield self

    def answers(self) -> list[dict[str, Any]]:
        """The answers posted to `/respond`, in order."""
        posted = [json.loads(body) for method, path, body in self.received if path == "/respond"]
        return [answer for batch in posted for answer in batch["responses"]]


def client_of(broker: ScriptedBroker) -> BrokerClient:
    return BrokerClient(broker.url, "t", transport=KeepAliveLink)


# --- /pending ------------------------------------------------------------------------------

HOSTILE_PENDING: dict[str, bytes] = {
    "not JSON": b"<html>502</html>",
    "empty": b"",
    "a list": b"[]",
    "no requests": b"{}",
    "requests not a list": b'{"requests": {"id": "x"}}',
    "a request not an object": b'{"requests": ["t_abc.r_0001"]}',
    "no id": pending_body(with_fields(id=...)),
    "no tenant": pending_body(with_fields(tenant_id=...)),
    "no lease": pending_body(with_fields(lease_s=...)),
    "id a number": pending_body(with_fields(id=7)),
    "tenant null": pending_body(with_fields(tenant_id=None)),
    "lease a word": pending_body(with_fields(lease_s="long")),
    "lease infinite": pending_body(GOOD).replace(b'"lease_s": 30.0', b'"lease_s": 1e400'),
    "lease NaN": pending_body(GOOD).replace(b'"lease_s": 30.0', b'"lease_s": NaN'),
    "prompt a number": pending_body(with_fields(prompt=5)),
    "messages not a list": pending_body(with_fields(prompt=None, messages="hi")),
    "a role no model has": pending_body(
        with_fields(prompt=None, messages=[{"role": "root", "content": "x"}])
    ),
    "params not an object": pending_body(with_fields(params=[1])),
    "metadata a string": pending_body(with_fields(metadata="run")),
    "a run id that names a path": pending_body(with_fields(metadata={"run_id": "../../etc"})),
    "a depth beyond any run": pending_body(with_fields(metadata={"depth": 10**6})),
    "an unknown field": pending_body(with_fields(priority=1)),
    "more requests than asked": pending_body(*(with_fields(id=f"t_abc.r_{i}") for i in range(5))),
}


@pytest.mark.parametrize("body", HOSTILE_PENDING.values(), ids=HOSTILE_PENDING.keys())
async def test_a_hostile_pending_answer_is_the_documented_error(body: bytes) -> None:
    async with ScriptedBroker(lambda method, path: (200, body)).running() as broker:
        async with client_of(broker) as client:
            with pytest.raises(ServiceResponseError) as caught:
                await client.pending(max_items=4, wait_s=0)
    assert (caught.value.status, caught.value.code) == (200, ErrorCode.UNEXPECTED_BODY)
    assert caught.value.message.startswith("GET /pending")


async def test_a_pending_answer_gives_the_poller_every_field_the_wire_model_has() -> None:
    full = with_fields(
        prompt=None, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "2+2?"}],
        model="small", params={"temperature": 0, "kind": "llm"}, state={"n": [1, 2]},
        metadata={"run_id": "run-1", "depth": 0, "max_depth": 1,
                  "budget": {"max_sub_calls": 5}, "traceparent": None},
    )  # fmt: skip
    body = pending_body(GOOD, full)
    async with ScriptedBroker(lambda method, path: (200, body)).running() as broker:
        async with client_of(broker) as client:
            batch = await client.pending(max_items=2, wait_s=0)
    assert batch == p.PendingBatch.model_validate_json(body)
    assert batch.requests[1].metadata is not None
    assert batch.requests[1].metadata.budget is not None
    assert batch.requests[1].metadata.budget.max_sub_calls == 5


async def test_a_huge_id_is_carried_whole_and_answered_under_itself() -> None:
    # The broker's ids are short; one of 100 kB is odd but harmless: the answer names it.
    huge = "t_abc.r_" + "9" * 100_000
    body = pending_body(with_fields(id=huge))
    async with ScriptedBroker(lambda method, path: (200, body)).running() as broker:
        async with client_of(broker) as client:
            batch = await client.pending(max_items=1, wait_s=0)
    assert [r.id for r in batch.requests] == [huge]


# --- the long-poll's query string -----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"max": 32, "wait": 20.0},
        {"max": 1, "wait": 0, "poll": "a1B2-c3_d4.e5~f6"},
        {"wait": 1e-05, "tiny": 5e-324, "big": 1e300, "inf": float("inf"), "neg": -3},
        {"abandoned": "p1,p2", "poll": "a b&c=d", "tenant_id": "t/ü?#%"},
        {"flag": True, "none": None, "empty": "", "n a+me": 1},
    ],
)
def test_the_query_string_is_what_urlencode_writes(params: dict[str, Any]) -> None:
    assert query_string(params) == urlencode(params)


# --- /respond ------------------------------------------------------------------------------

HOSTILE_RESPOND: dict[str, bytes] = {
    "not JSON": b"ok",
    "no results": b"{}",
    "results not a list": b'{"results": "accepted"}',
    "a result without status": b'{"results": [{"id": "t_abc.r_0001"}]}',
    "a status no broker sends": b'{"results": [{"id": "t_abc.r_0001", "status": "maybe"}]}',
    "an id a number": b'{"results": [{"id": 1, "status": "accepted"}]}',
}


@pytest.mark.parametrize("body", HOSTILE_RESPOND.values(), ids=HOSTILE_RESPOND.keys())
async def test_a_hostile_respond_answer_is_the_documented_error(body: bytes) -> None:
    async with ScriptedBroker(lambda method, path: (200, body)).running() as broker:
        async with client_of(broker) as client:
            with pytest.raises(ServiceResponseError) as caught:
                await client.respond_batch([p.Answer(id="t_abc.r_0001", response="4")])
    assert (caught.value.status, caught.value.code) == (200, ErrorCode.UNEXPECTED_BODY)
    assert caught.value.message.startswith("POST /respond")


async def test_answers_go_out_as_the_wire_model_writes_them() -> None:
    answers = [
        p.Answer(id="t_abc.r_1", response="4", usage=p.Usage(input_tokens=3, calls=1)),
        p.Answer(id="t_abc.r_2", error=p.ErrorInfo(code="llm_timeout", message="slow")),
        p.Answer(id="t_abc.r_3", response="", state={"k": [1, None, "x"]}),
    ]
    results = {"results": [{"id": a.id, "status": "accepted"} for a in answers]}
    reply = json.dumps(results).encode()
    async with ScriptedBroker(lambda method, path: (200, reply)).running() as broker:
        async with client_of(broker) as client:
            got = await client.respond_batch(answers)
        (_, _, body), = broker.received  # fmt: skip
    assert p.AnswerBatch.model_validate_json(body) == p.AnswerBatch(responses=answers)
    assert got == p.RespondResults.model_validate(results)


# --- the poll loop -------------------------------------------------------------------------


class Instant:
    """An LLM client answering "4" at once."""

    model = "instant"

    async def complete(
        self, messages: Sequence[Message], *, params: Mapping[str, Any] | None = None
    ) -> Completion:
        return Completion(text="4", model=self.model, usage=Usage(), latency_s=0.0, attempts=1)

    async def aclose(self) -> None:
        return None


def scripted_poller(url: str) -> Poller:
    settings = PollerSettings(
        broker_url=url, tenant_token=SecretStr("t"), admin_token=None, poller_wait_s=0.0,
        poller_backoff_initial_s=0.01, poller_backoff_max_s=0.05, poller_concurrency=4,
    )  # fmt: skip
    return Poller(settings, RequestHandler(ModelRouter.single(Instant())))


async def test_the_poll_loop_outlives_hostile_answers_and_serves_the_next_good_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every hostile `/pending` answer in turn, then a good one: each is logged as refused
    (no traceback), and the good request is answered."""
    script = [*HOSTILE_PENDING.values(), pending_body(GOOD)]
    served: list[bytes] = []

    def answer(method: str, path: str) -> tuple[int, bytes]:
        if path == "/pending":
            body = script[len(served)] if len(served) < len(script) else pending_body()
            served.append(body)
            return 200, body
        if path == "/respond":
            return 200, json.dumps({"results": [{"id": GOOD["id"], "status": "accepted"}]}).encode()
        return 404, b'{"error": {"code": "not_found", "message": "no"}}'

    caplog.set_level(logging.INFO, logger="host_poller.poller")
    async with ScriptedBroker(answer).running() as broker:
        poller = scripted_poller(broker.url)
        task = asyncio.create_task(poller.run())
        try:
            await wait_until(lambda: bool(broker.answers()), timeout_s=30)
        finally:
            await poller.stop()
            await task
    assert [(a["id"], a["response"]) for a in broker.answers()] == [(GOOD["id"], "4")]
    assert len(served) > len(HOSTILE_PENDING)
    refused = [r for r in caplog.records if r.getMessage() == "pending refused"]
    assert len(refused) == len(HOSTILE_PENDING)
    assert not [r for r in caplog.records if r.exc_info], "a traceback left the poll loop"


async def test_the_real_brokers_pending_answer_decodes_to_what_was_enqueued(
    broker_server: BrokerServer,
) -> None:
    meta = {"run_id": "run-7", "depth": 1, "max_depth": 2, "sub_model": "small"}
    _, session = await open_tenant_session(broker_server.url, broker_server.admin_token, meta)
    request = p.LLMRequest(
        messages=[p.ChatMessage(role="user", content="2+2?")], model="big", depth=2,
        params={"temperature": 0.5}, state={"seen": ["a"]},
    )  # fmt: skip
    async with session:
        await session.enqueue(request, wait_s=0)
    async with BrokerClient(broker_server.url, broker_server.admin_token,
                            transport=KeepAliveLink) as admin:  # fmt: skip
        (got,) = (await admin.pending(max_items=1, wait_s=5)).requests
    assert got.model_dump(include=set(p.LLMRequest.model_fields)) == request.model_dump()
    assert got.metadata == RunInfo.model_validate(meta)
    assert got.lease_s == broker_server.settings.lease_s
