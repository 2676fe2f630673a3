"""Probes, as a hostile HTTP client would try them, against real `rlm broker` and
`rlm sandbox` processes: an endless header, a head or body trickled a byte at a time, more
connections than one client may hold, a body over the limit that keeps coming.

Each service runs with short bounds (RLM_HTTP_*) so that every probe ends in seconds; the
probes themselves give up after a bounded time and then fail, never hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from broker.redis_server import RedisServer, free_port
from tests.support.servers import BrokerProcess

_MiB = 2**20
PER_CLIENT = 16
#: Short bounds for the services under probe; the defaults are documented in configuration.md.
HOSTILE_ENV = {
    "RLM_HTTP_HEAD_TIMEOUT_S": "1",
    "RLM_HTTP_BODY_TIMEOUT_S": "1",
    "RLM_HTTP_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
}
#: How long a probe waits for the service to cut it (the bounds above are 1 s).
CUT_WITHIN_S = 10.0
#: The attacker's address: another loopback address, so that per-client limits tell it
#: from the legitimate client on 127.0.0.1.
ATTACKER = "127.0.0.2"
RUNTIME_TOKEN = "test-runtime-token"


@dataclass
class Service:
    name: str
    port: int
    pid: int
    #: A POST route that reads a JSON body, and the header lines it needs.
    post_path: str
    auth: bytes

    def connect(self, source: str = ATTACKER) -> socket.socket:
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=5, source_address=(source, 0)
        )

    def health(self) -> int:
        """The status of GET /health, as a legitimate client on 127.0.0.1 asks it."""
        headers = {"Authorization": self.auth.decode().partition(": ")[2].strip()}
        url = f"http://127.0.0.1:{self.port}/health"
        return httpx2.get(url, headers=headers if self.auth else None, timeout=5).status_code

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for {self.name}")


# The probes change nothing a later probe sees (each ends its connections), so one process
# of each service serves the module: starting `rlm sandbox` costs seconds.


@pytest.fixture(scope="module")
def broker(redis_server: RedisServer) -> Iterator[Service]:
    process = BrokerProcess(redis_server.url, None, **HOSTILE_ENV).start()
    try:
        auth = f"Authorization: Bearer {process.admin_token}\r\n".encode()
        yield Service("broker", process.port, process.pid, "/tenants", auth)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def runtime() -> Iterator[Service]:
    """`rlm sandbox` with no warm pool (no sandbox is started: only its HTTP is probed)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")}
    env.update(HOSTILE_ENV, RLM_LOG_LEVEL="WARNING", RLM_SANDBOX_TOKEN=RUNTIME_TOKEN)
    rlm = Path(sys.executable).with_name("rlm")
    child = subprocess.Popen(
        [str(rlm), "sandbox", "--port", str(port), "--pool-size", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert child.poll() is None, f"rlm sandbox exited with {child.returncode}"
            assert time.monotonic() < deadline, "rlm sandbox did not become ready"
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code < 500:
                    break
            except httpx2.TransportError:
                time.sleep(0.05)
        auth = f"Authorization: Bearer {RUNTIME_TOKEN}\r\n".encode()
        yield Service("runtime", port, child.pid, "/execute", auth)
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)


@pytest.fixture(params=["broker", "runtime"])
def service(request: pytest.FixtureRequest) -> Service:
    served: Service = request.getfixturevalue(request.param)
    return served


def answer_when_cut(sock: socket.socket, trickle: bytes, within_s: float = CUT_WITHIN_S) -> bytes:
    """Send `trickle` every 0.2 s until the server closes the connection; what it answered.

    Fails if the connection is still open after `within_s`.
    """
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            return read_to_close(sock)
        try:
            sock.sendall(trickle)
        except OSError:
            return read_to_close(sock)
    raise AssertionError(f"the connection was still open after {within_s:g} s")


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    sock.settimeout(5)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, leaving the connection open."""
    sock.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def error_code(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    if status in (408, 431):  # the guard's answers end the connection
        assert b"\r\nconnection: close" in head.lower()
    code: str = json.loads(body)["error"]["code"]
    return code


def flood(service: Service, sock: socket.socket) -> int:
    """Send 64 KiB pieces until the server cuts the connection, or it has grown by 50 MiB, or
    30 s have passed; how much it grew at most (bytes of RSS)."""
    before = peak = service.rss()
    chunk = b"a" * 65536
    deadline = time.monotonic() + 30
    with contextlib.suppress(OSError):  # the server cutting us is the expected end
        for sent in range(1, 4096):
            sock.sendall(chunk)
            if sent % 16 == 0:
                peak = max(peak, service.rss())
                if peak - before > 50 * _MiB or time.monotonic() > deadline:
                    break
    return peak - before


def endless_header(service: Service) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "


def endless_trailer(service: Service) -> bytes:
    """The same in a chunked body's trailer, after a head that is fine."""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Endless-Trailer: "
        % (service.post_path.encode(), service.auth)
    )


@pytest.mark.parametrize("opening", [endless_header, endless_trailer], ids=["header", "trailer"])
def test_an_endless_header_is_refused_and_memory_stays_bounded(
    service: Service, opening: Callable[[Service], bytes]
) -> None:
    before = service.rss()
    sock = service.connect()
    sock.sendall(opening(service))
    grown = flood(service, sock)
    assert grown < 50 * _MiB, f"{service.name} grew by {grown / _MiB:.0f} MiB"
    assert error_code(read_to_close(sock), 431) == "headers_too_large"
    sock.close()
    assert service.rss() - before < 50 * _MiB
    assert service.health() == 200


def test_a_trickled_head_is_cut_after_the_head_timeout(service: Service) -> None:
    sock = service.connect()
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    answer = answer_when_cut(sock, b"X-Slow: 1\r\n")
    assert error_code(answer, 408) == "request_timeout"
    sock.close()


def test_a_connection_that_never_speaks_is_closed(service: Service) -> None:
    sock = service.connect()
    readable, _, _ = select.select([sock], [], [], CUT_WITHIN_S)
    assert readable, "the silent connection was still open"
    assert read_to_close(sock) == b""
    sock.close()


def test_one_client_cannot_hold_more_than_its_connections(service: Service) -> None:
    """A client opening far more connections than its cap, each trickling a head: those over
    the cap are closed at once, without an answer; another client is served meanwhile."""
    attack = [service.connect() for _ in range(PER_CLIENT * 8)]
    try:
        for sock in attack:
            with contextlib.suppress(OSError):  # one over the cap may be reset already
                sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert service.health() == 200  # the legitimate client, from 127.0.0.1
        # Those over the cap are reset with no answer; a held one stays open or, past the
        # 1 s head timeout, is answered 408.
        open_ = set(attack)
        refused = 0
        deadline = time.monotonic() + CUT_WITHIN_S
        while refused < len(attack) - PER_CLIENT and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_), [], [], 0.2)
            for sock in readable:
                open_.discard(sock)
                refused += read_to_close(sock) == b""
        assert refused == len(attack) - PER_CLIENT
        # ...and none of the held ones was refused: each is open, or was answered.
        readable, _, _ = select.select(list(open_), [], [], 0.2)
        assert all(read_to_close(sock).startswith(b"HTTP/1.1 408 ") for sock in readable)
        assert service.health() == 200
    finally:
        for sock in attack:
            sock.close()


def test_a_trickled_body_is_cut_after_the_body_timeout(service: Service) -> None:
    sock = service.connect()
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{" % (service.post_path.encode(), service.auth)
    )
    answer = answer_when_cut(sock, b" ")
    assert error_code(answer, 408) == "request_timeout"
    sock.close()
    assert service.health() == 200


def test_an_oversized_body_is_refused_and_not_read_forever(broker: Service) -> None:
    """413 at once from the declared length; a client that keeps sending anyway is cut."""
    sock = broker.connect()
    sock.sendall(
        b"POST /tenants HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: 10000000000\r\n\r\n{" % broker.auth
    )
    assert error_code(read_answer(sock), 413) == "payload_too_large"
    assert answer_when_cut(sock, b"x" * 1024) == b""
    sock.close()
