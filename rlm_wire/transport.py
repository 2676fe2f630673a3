"""The transport seam under the project's API clients, in the manner of httpx's transports.

A transport carries one HTTP exchange to one service and says nothing about what it means:
`request(method, target, body) -> Reply`. Everything above it (JSON, error bodies, retries,
long-poll timeouts) is `rlm_wire.api_client.ApiClient`'s, so `BrokerClient` and
`RuntimeClient` behave the same over either transport:

- `HttpxTransport` (the default): httpx2, with what a general client brings (proxies from
  the environment, HTTP/2-ready TLS, pooled connections);
- `rlm_wire.link.KeepAliveLink`: a lean HTTP/1.1 keep-alive link, ~10x less CPU per request,
  for hot paths (the sandbox runtime's bridge, the poller, the benchmarks).

A transport that cannot deliver a request or read its answer raises `ServiceUnreachable`;
an HTTP status, error or not, is a `Reply`.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rlm_wire.errors import ServiceUnreachable

if TYPE_CHECKING:
    import httpx2

#: The answer headers a client acts on (lower-case); transports keep only these.
KEPT_HEADERS = frozenset({"retry-after", "content-type"})


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer: its status, its body, and the headers of `KEPT_HEADERS`."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Transport(Protocol):
    """Carries requests to one service (its base URL and bearer token are the transport's)."""

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request (`target`: path and query under the base URL); its answer."""
        ...

    async def aclose(self) -> None: ...


class TransportFactory(Protocol):
    """How a client builds its transport: `HttpxTransport` and `KeepAliveLink` both fit."""

    def __call__(
        self,
        url: str,
        token: str | None,
        *,
        max_connections: int,
        headers: Mapping[str, str] | None = None,
    ) -> Transport: ...


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context (httpx's default: verified, its CA bundle) for every client of the
    process: each client loading the CA bundle again cost ~50 ms of start-up."""
    import httpx2  # on first use: the loopback clients (`KeepAliveLink`) need neither

    return httpx2.create_ssl_context()


class HttpxTransport:
    """A `Transport` over one `httpx2.AsyncClient` (base URL, token, connection pool)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        max_connections: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Imported here: `rlm ask`'s embedded stack talks over `KeepAliveLink` only, and
        # httpx2 (~80 ms to import) stays off its start-up until a client of this kind is made.
        import httpx2

        all_headers = {"Authorization": f"Bearer {token}"} if token else {}
        all_headers.update(headers or {})
        self._transport_error: type[httpx2.TransportError] = httpx2.TransportError
        self._connect_error: type[httpx2.ConnectError] = httpx2.ConnectError
        self._http: httpx2.AsyncClient = httpx2.AsyncClient(
            base_url=url.rstrip("/"),
            headers=all_headers,
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            verify=tls_context(),
        )

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent_headers = dict(headers or {})
        if body is not None:
            sent_headers.setdefault("Content-Type", "application/json")
        try:
            response = await self._http.request(
                method, target, content=body, headers=sent_headers, timeout=timeout_s
            )
        except self._transport_error as exc:
            raise ServiceUnreachable(
                f"{method} {_path(target)}: {type(exc).__name__}: {exc}",
                sent=not isinstance(exc, self._connect_error),
            ) from exc
        kept = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
        return Reply(response.status_code, response.content, kept)

    async def aclose(self) -> None:
        await self._http.aclose()


def _path(target: str) -> str:
    """The path of a target, without its query (which may be long)."""
    return target.split("?", 1)[0]
