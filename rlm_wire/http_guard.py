"""uvicorn's httptools protocol, bounded against hostile clients (`rlm_wire.http_limits`).

uvicorn with httptools puts no limit on a request head (an endless header grows the process
by hundreds of MiB) nor on the time a head or body takes to arrive (slowloris), and takes
every connection it can accept. `GuardedHttpProtocol` adds, per connection:
- a gate at `connection_made`: over the per-client or total count, the connection is reset
  at once (it never reaches the parser);
- a head budget: the parser is fed at most `max_head_bytes` before the head must have ended,
  so the parser never holds more; past it, 431 and close. A chunked body's framing (chunk
  sizes, extensions, trailers) gets the same budget across reads that bring no body bytes;
- one timer, armed only while a head or a body is incomplete after a read: a head within
  `head_timeout_s` (from the connection's start, or from the first byte of a later request),
  a body within `body_timeout_s` of its head; past it, 408 and close. A request whose head
  and body arrive in one read (nearly all) arms no timer at all.
The state is a phase per connection, set in the parser's callbacks: the hot path costs four
thin overrides and a few comparisons per request (about 3 us, against uvicorn's 32 us for a
request to a trivial app on a loaded 2-core machine; a broker request costs far more).
uvicorn's h11 protocol is not used: httptools is 3.5x faster, and h11 bounds only the head's
size, not its time.

And one write per answer (`_HeadWithBody`): uvicorn writes a response's head and its body
separately, two sends and two segments, which often wake the reader twice; the head now
goes out with the body.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from rlm_wire.codes import ErrorCode
from rlm_wire.http_limits import ConnectionGate, HttpLimits, connection_budget

#: Phases of a connection: between requests, reading a head, reading a body.
_IDLE, _HEAD, _BODY = 0, 1, 2


def _answer(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer in the services' JSON error shape, closing."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


#: Bodies up to this size are joined to their head (a copy); larger ones follow it.
_JOIN_AT_MOST = 64 * 1024


class _HeadWithBody:
    """The connection's transport as uvicorn's request cycles see it: a response's head
    (the write that starts with the status line) is held and sent in one write with what
    follows it, its body, or at the end of this pass of the loop, when nothing follows at
    once (a stream whose first chunk comes later). Order is kept; every other call goes to
    the transport."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) > _JOIN_AT_MOST:  # a large body is not copied to save one send
                self._transport.write(held)
                self._transport.write(data)
            else:
                self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 "):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """One connection: uvicorn's protocol with the gate, the head budget and the timer."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
        gate: ConnectionGate,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._max_head = limits.max_head_bytes
        self._gate = gate
        self._peer = ""
        self._admitted = False
        self._phase = _IDLE
        self._head_bytes = 0
        self._body_bytes = 0
        self._framing_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._one_write: _HeadWithBody | None = None

    # --- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self._gate.admit(self._peer):
            # A reset frees the descriptor now; uvicorn never sees the connection.
            cast(asyncio.Transport, transport).abort()
            return
        self._admitted = True
        super().connection_made(cast(asyncio.Transport, transport))
        self._one_write = _HeadWithBody(self.transport, self.loop)
        # A connection that never sends a byte is cut like a slow head.
        self._timer = self.loop.call_later(self._limits.head_timeout_s, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._gate.release(self._peer)
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Rare path: this read could carry the head past its budget. Feed only what the head
        # may still take; if the head has not ended within that, refuse. (Our clients do not
        # pipeline; a client that does may see an earlier request's bytes in the same read
        # counted toward the next head.)
        while self._phase != _BODY and len(data) > self._max_head - self._head_bytes:
            room = max(self._max_head - self._head_bytes, 0)
            if room:
                super().data_received(data[:room])
                if self.transport.is_closing():  # the parser refused it (400)
                    return
            if self._phase == _HEAD:
                self._refuse(
                    431,
                    ErrorCode.HEADERS_TOO_LARGE,
                    f"the request head exceeds {self._max_head} bytes",
                )
                return
            data = data[room:]
        in_body, body_before = self._phase == _BODY, self._body_bytes
        super().data_received(data)
        phase = self._phase
        if phase == _HEAD:
            self._head_bytes += len(data)
            if self._timer is None:
                self._timer = self.loop.call_later(self._limits.head_timeout_s, self._timed_out)
        elif phase == _BODY:
            if in_body:
                self._count_framing(len(data), self._body_bytes - body_before)
            if self._timer is None:
                self._timer = self.loop.call_later(self._limits.body_timeout_s, self._timed_out)

    def _count_framing(self, read: int, delivered: int) -> None:
        """Bound what a body carries besides body bytes: chunk sizes, extensions, trailers.

        httptools keeps a trailer's partial value as it grows, so an endless trailer is an
        endless header. Counted like the head across reads that bring no body bytes (a trailer
        comes after the last one); a read with body bytes starts the count again, so a stream
        of many small chunks is never refused, and at most one read's worth is held more."""
        self._framing_bytes = 0 if delivered else self._framing_bytes + read
        if self._framing_bytes > self._max_head:
            self._refuse(
                431,
                ErrorCode.HEADERS_TOO_LARGE,
                f"the request's chunk framing or trailers exceed {self._max_head} bytes",
            )

    # --- parser callbacks (uvicorn's, plus the phase) ----------------------------------

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._head_bytes = 0
        self._framing_bytes = 0
        if self._timer is not None:
            self._cancel_timer()
        super().on_headers_complete()
        if self.cycle is not None and self._one_write is not None:
            self.cycle.transport = cast(asyncio.Transport, self._one_write)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if self._timer is not None:
            self._cancel_timer()
        super().on_message_complete()

    # --- refusing ----------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == _HEAD:
            limit = self._limits.head_timeout_s
            self._refuse(408, ErrorCode.REQUEST_TIMEOUT, f"the request head took over {limit:g} s")
        elif self._phase == _BODY:
            limit = self._limits.body_timeout_s
            self._refuse(408, ErrorCode.REQUEST_TIMEOUT, f"the request body took over {limit:g} s")
        else:  # a connection that sent nothing: close it as the keep-alive timeout would
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` where no response is under way or sent for this request; close."""
        if self.transport.is_closing():  # already refused (by the parser, or by us)
            return
        if self._one_write is not None:
            self._one_write.flush()  # an earlier response's head goes first
        cycle = self.cycle
        if self._phase == _HEAD:
            # No cycle yet for this head: answer unless an earlier response is still going.
            if cycle is None or cycle.response_complete:
                self.transport.write(_answer(status, code, message))
        elif self._phase == _BODY and not cycle.response_started:
            # The app is waiting for the body: it sees a disconnect, and its answer is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(_answer(status, code, message))
        self._phase = _IDLE
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    """The protocol factory for one server's `uvicorn.Config(http=...)`, with its own gate."""
    gate = ConnectionGate(limits.max_connections_per_client, connection_budget(limits))
    # uvicorn calls `http` like a class with keywords (config, server_state, app_state, _loop).
    factory = functools.partial(GuardedHttpProtocol, limits=limits, gate=gate)
    return cast(type[asyncio.Protocol], factory)
