"""OpenAIChatClient against a raw OpenAI-compatible server on loopback, over both of its
HTTP transports (httpx2, the keep-alive link): what it sends, retries, timeouts, and every
malformed answer a clear `llm_bad_response` error, never a crash of the poller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from broker.redis_server import free_port
from host_poller.llm import (
    LLMConnectionError,
    LLMResponseError,
    LLMStatusError,
    LLMTimeoutError,
    Profile,
    build_client,
)
from host_poller.llm.completion import read_answer
from host_poller.llm.transport import uses_link
from host_poller.poller.answers import error_code
from rlm_wire.codes import ErrorCode

USER = [{"role": "user", "content": "hello"}]
OK = {
    "id": "chatcmpl-1",
    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


@dataclass
class RawServer:
    """An HTTP/1.1 server answering every request with `status`, `content_type`, `body`;
    it keeps each request (head, body) it read."""

    transport: str = "httpx"
    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""
    fail_first: int = 0
    """The first requests answered 500 (the SDK retries them)."""
    delay_s: float = 0.0
    truncate: bool = False
    """Announce the whole body, send half of it, close the connection."""
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                self.seen.append((head, await reader.readexactly(length)))
                await asyncio.sleep(self.delay_s)
                status = 500 if len(self.seen) <= self.fail_first else self.status
                body = self.body[: len(self.body) // 2] if self.truncate else self.body
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: {self.content_type}\r\n"
                    f"Retry-After: 0\r\nContent-Length: {len(self.body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                if self.truncate:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def profile(self, **overrides: object) -> Profile:
        fields: dict[str, object] = {
            "name": "raw", "base_url": f"http://127.0.0.1:{self.port}/v1", "model": "m",
            "max_retries": 0, "timeout_s": 10.0, "http_transport": self.transport,
            "input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0,
        }  # fmt: skip
        fields.update(overrides)
        return Profile.model_validate(fields)


@pytest.fixture(params=["httpx", "link"])
async def raw(request: pytest.FixtureRequest) -> AsyncIterator[RawServer]:
    server = RawServer(transport=request.param)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:  # a connection the client left (a timed-out call's)
            writer.close()
        await asyncio.sleep(0)


async def complete(server: RawServer, **overrides: object) -> object:
    client = build_client(server.profile(**overrides))
    try:
        return await client.complete(USER)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_good_answer_gives_text_usage_and_cost(raw: RawServer) -> None:
    raw.body = json.dumps(OK).encode()
    client = build_client(raw.profile())
    try:
        done = await client.complete(USER)
    finally:
        await client.aclose()
    assert (done.text, done.attempts) == ("hi", 1)
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.calls) == (7, 2, 1)
    assert done.usage.cost_usd == pytest.approx((7 + 2 * 2) / 1e6)


MALFORMED = {
    "html from a proxy": ("text/html", b"<html>502</html>", "not JSON"),
    "broken JSON": ("application/json", b"{not json", "not JSON"),
    "empty body": ("application/json", b"", "not JSON"),
    "a JSON array": ("application/json", b"[]", "no choices"),
    "no choices": ("application/json", b"{}", "no choices"),
    "empty choices": ("application/json", b'{"choices": []}', "no choices"),
    "choices not a list": ("application/json", b'{"choices": "x"}', "no choices"),
    "a choice not an object": ("application/json", b'{"choices": ["x"]}', "no message"),
    "no message": ("application/json", b'{"choices": [{"index": 0}]}', "no message"),
    "a message not an object": (
        "application/json",
        b'{"choices": [{"message": "hi"}]}',
        "no message",
    ),
    "a tool call, no text": (
        "application/json",
        b'{"choices": [{"message": {"content": null}, "finish_reason": "tool_calls"}]}',
        "empty completion (finish_reason=tool_calls)",
    ),
    "blank text": ("application/json", b'{"choices": [{"message": {"content": " "}}]}', "empty"),
    "content parts": (
        "application/json",
        b'{"choices": [{"message": {"content": [{"type": "text", "text": "hi"}]}}]}',
        "empty",
    ),
    "usage not an object": (
        "application/json",
        b'{"choices": [{"message": {"content": "hi"}}], "usage": []}',
        "malformed usage",
    ),
    "usage without completion tokens": (
        "application/json",
        b'{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3}}',
        "malformed usage: completion_tokens=None",
    ),
    "usage not a number": (
        "application/json",
        b'{"choices": [{"message": {"content": "hi"}}], '
        b'"usage": {"prompt_tokens": "abc", "completion_tokens": 1}}',
        "malformed usage: prompt_tokens='abc'",
    ),
    "negative usage": (
        "application/json",
        b'{"choices": [{"message": {"content": "hi"}}], '
        b'"usage": {"prompt_tokens": -5, "completion_tokens": 1}}',
        "malformed usage",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_answer_is_a_bad_response(raw: RawServer, case: str) -> None:
    raw.content_type, raw.body, message = MALFORMED[case]
    with pytest.raises(LLMResponseError) as info:
        await complete(raw)
    assert message in str(info.value)
    assert info.value.model == "m"
    # What the enqueuer sees: the bad-response code, not the poller's internal error.
    assert error_code(info.value) == ErrorCode.LLM_BAD_RESPONSE


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("usage", "expected"),
    [(None, (2, 1)), ({"prompt_tokens": "7", "completion_tokens": 2.0}, (7, 2))],
)
async def test_usage_absent_is_estimated_and_numeric_strings_count(
    raw: RawServer, usage: object, expected: tuple[int, int]
) -> None:
    raw.body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": usage}).encode()
    done = await complete(raw)
    assert (done.usage.input_tokens, done.usage.output_tokens) == expected  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 404, 500])
async def test_an_error_status_is_a_status_error_with_the_server_message(
    raw: RawServer, status: int
) -> None:
    raw.status, raw.body = status, b'{"error": {"message": "no such model", "type": "x"}}'
    with pytest.raises(LLMStatusError) as info:
        await complete(raw)
    assert info.value.status_code == status
    assert "no such model" in str(info.value)
    assert len(raw.seen) == 1  # max_retries=0: the SDK's retries are the only ones


@pytest.mark.anyio
async def test_the_request_carries_the_fields_and_the_sdk_options(raw: RawServer) -> None:
    raw.body = json.dumps(OK).encode()
    profile_params = {
        "temperature": 0.5,
        "extra_headers": {"x-profile": "p"},
        "extra_body": {"provider_field": 1},
    }
    client = build_client(raw.profile(params=profile_params))
    try:
        await client.complete(
            USER,
            params={
                "max_tokens": 9,
                "extra_headers": {"traceparent": "t"},
                "extra_query": {"q": "1"},
            },
        )
    finally:
        await client.aclose()
    head, body = raw.seen[0]
    assert head.startswith("POST /v1/chat/completions?q=1 HTTP/1.1")
    headers = head.lower()
    assert "x-profile: p" in headers  # the call's headers join the profile's
    assert "traceparent: t" in headers
    assert json.loads(body) == {
        "model": "m",
        "messages": USER,
        "temperature": 0.5,
        "max_tokens": 9,
        "provider_field": 1,
    }


def test_read_answer_keeps_the_finish_reason() -> None:
    answer = read_answer(json.dumps(OK).encode(), model="m")
    assert (answer.text, answer.finish_reason, answer.usage) == ("hi", "stop", (7, 2))


@pytest.mark.anyio
async def test_failures_are_retried_by_the_sdk_and_counted(raw: RawServer) -> None:
    raw.body, raw.fail_first = json.dumps(OK).encode(), 2
    done = await complete(raw, max_retries=2)
    assert (done.text, done.attempts) == ("hi", 3)  # type: ignore[attr-defined]
    assert len(raw.seen) == 3


@pytest.mark.anyio
async def test_a_slow_server_is_a_timeout(raw: RawServer) -> None:
    raw.body, raw.delay_s = json.dumps(OK).encode(), 5.0
    with pytest.raises(LLMTimeoutError, match="timed out"):
        await complete(raw, timeout_s=0.2, max_retries=1)
    assert len(raw.seen) == 2  # the SDK retried the timeout once


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["httpx", "link"])
async def test_nobody_listening_is_a_connection_error(transport: str) -> None:
    server = RawServer(transport=transport, port=free_port())
    with pytest.raises(LLMConnectionError):
        await complete(server)


@pytest.mark.parametrize(
    ("transport", "base_url", "environ", "link"),
    [
        ("auto", "http://127.0.0.1:8000/v1", {}, True),  # a local server
        ("auto", "https://api.openai.com/v1", {}, False),  # a hosted provider
        ("auto", "http://10.0.0.5:8000/v1", {"HTTP_PROXY": "http://proxy:3128"}, False),
        ("auto", "http://10.0.0.5:8000/v1", {"ALL_PROXY": "http://proxy:3128"}, False),
        (
            "auto",
            "http://10.0.0.5:8000/v1",
            {"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.5"},
            True,
        ),
        ("auto", "http://127.0.0.1:8000/v1", {"HTTPS_PROXY": "http://proxy:3128"}, True),
        ("link", "https://api.openai.com/v1", {"HTTPS_PROXY": "http://proxy:3128"}, True),
        ("httpx", "http://127.0.0.1:8000/v1", {}, False),
    ],
)
def test_which_transport_a_profile_uses(
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    base_url: str,
    environ: dict[str, str],
    link: bool,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    profile = Profile.model_validate(
        {"name": "p", "base_url": base_url, "model": "m", "http_transport": transport}
    )
    assert uses_link(profile) is link


@pytest.mark.anyio
async def test_an_answer_cut_short_is_a_connection_error_after_retries(raw: RawServer) -> None:
    raw.body, raw.truncate = json.dumps(OK).encode(), True
    with pytest.raises(LLMConnectionError):
        await complete(raw, max_retries=1)
    assert len(raw.seen) == 2  # the SDK retried it once


@pytest.mark.anyio
async def test_a_header_with_a_line_break_is_never_sent(raw: RawServer) -> None:
    raw.body = json.dumps(OK).encode()
    headers = {"extra_headers": {"x-note": "1\r\nX-Injected: 1"}}
    with pytest.raises(LLMConnectionError):
        await complete(raw, params=headers, max_retries=1)
    assert raw.seen == []  # the link once wrote it as two headers


@pytest.mark.anyio
async def test_the_link_sends_what_httpx2_sends() -> None:
    """The SDK's request, as the server reads it, is the same over both transports, but
    for what each transport manages itself (the link asks for no compression)."""
    heads: dict[str, dict[str, str]] = {}
    bodies: dict[str, bytes] = {}
    for transport in ("httpx", "link"):
        server = RawServer(transport=transport, body=json.dumps(OK).encode())
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        client = build_client(server.profile(params={"extra_headers": {"x-profile": "p"}}))
        try:
            await client.complete(USER, params={"extra_headers": {"traceparent": "t"}})
        finally:
            await client.aclose()
            listener.close()
            for writer in server.writers:
                writer.close()
        head, bodies[transport] = server.seen[0]
        request_line, *lines = head.strip().split("\r\n")
        assert request_line == "POST /v1/chat/completions HTTP/1.1"
        fields = [line.split(":", 1) for line in lines]
        heads[transport] = {name.lower(): value.strip() for name, value in fields}
        assert len(heads[transport]) == len(lines)  # no header twice
    managed = {"host", "accept-encoding", "connection"}
    httpx_head = {k: v for k, v in heads["httpx"].items() if k not in managed}
    assert {k: v for k, v in heads["link"].items() if k not in managed} == httpx_head
    assert {"authorization", "user-agent", "x-profile", "traceparent"} <= httpx_head.keys()
    assert bodies["link"] == bodies["httpx"]
