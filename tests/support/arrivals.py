"""When bytes reached a socket, as the kernel stamped them (Linux `SO_TIMESTAMPNS`): the order
of writes made microseconds apart on different connections, which no reader's clock can
tell. `ArrivalRelay` is a TCP relay in front of a server that records each HTTP request
line with its stamp."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

#: Linux's SO_TIMESTAMPNS (the socket module names it from Python 3.14 on).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ")


def stamp_arrivals(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def receive_stamped(sock: socket.socket, size: int = 65536) -> tuple[bytes, int]:
    """What `sock` has (at least one segment), and when the kernel queued its first segment
    (ns since the epoch, `time.time_ns`'s clock). `b""` and 0 at the end of the stream."""
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(16))
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
            seconds, nanoseconds = struct.unpack("qq", payload[:16])
            return data, seconds * 10**9 + nanoseconds
    if data:
        raise AssertionError("no arrival stamp: was stamp_arrivals() called on this socket?")
    return data, 0


class ArrivalRelay:
    """Listens on loopback and relays each connection to `port`, both ways, recording the
    request line of every HTTP request it forwards with its arrival stamp (`arrivals`).
    A request is taken to start a segment, as a client writing each request whole does."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        # On the listener, so that accepted connections stamp from their first segment on
        # (one stamped after accept() would miss what arrived before).
        stamp_arrivals(self._listener)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._arrivals: list[tuple[int, str]] = []
        self._sockets: list[socket.socket] = [self._listener]
        self._threads: list[threading.Thread] = []

    @property
    def arrivals(self) -> list[tuple[int, str]]:
        """(stamp, request line) of every request so far, in order of arrival."""
        with self._lock:
            return sorted(self._arrivals)

    def __enter__(self) -> ArrivalRelay:
        self._start(self._accept)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sock in self._sockets:
            _shut(sock)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            self._start(self._forward_requests, client, upstream)
            self._start(self._forward_answers, upstream, client)

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data, stamp = receive_stamped(client)
                if not data:
                    break
                if data.startswith(_METHODS):
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    with self._lock:
                        self._arrivals.append((stamp, line))
                upstream.sendall(data)
        except OSError:
            pass  # either side closed: the relay of this connection ends
        finally:
            _close_both(client, upstream)

    def _forward_answers(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass  # either side closed
        finally:
            _close_both(client, upstream)


def _close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut both ways (a thread blocked reading it returns); already closed is fine."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
