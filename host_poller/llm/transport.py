"""The openai SDK's requests over the project's keep-alive link (`rlm_wire.link`).

The SDK sends through an httpx2 client. httpx2's own transport (httpcore2, h11: a general
HTTP state machine, two socket writes per request) was ~55 % of the CPU of a call; over
`KeepAliveLink` (one write, a lean answer parser) the poller spends about half the CPU per
round trip (docs/performance.md). The SDK above it is unchanged: its auth, retries,
timeouts and error mapping.

What the link does not do, and why a profile's `http_transport="auto"` keeps httpx2 for
https endpoints and for any endpoint a proxy variable covers: proxies; of an answer's
headers it passes on only `Retry-After` and `Content-Type` (the SDK then does without
`retry-after-ms` and `x-should-retry`, which hosted providers send); it bounds a connect
by the attempt's whole timeout, not by a separate cap.
"""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx2

from rlm_wire.errors import ServiceUnreachable
from rlm_wire.link import KeepAliveLink

if TYPE_CHECKING:
    from host_poller.llm.profiles import Profile

#: Request headers the link writes itself (or, for compression, must not ask for: it reads
#: bodies as they come).
_LINK_HEADERS = frozenset(
    {"host", "accept", "accept-encoding", "content-length", "content-type", "connection"}
)
#: A request's timeout when the SDK gives none (its own default).
_DEFAULT_TIMEOUT_S = 600.0


def uses_link(profile: Profile) -> bool:
    """Whether `profile`'s calls go over the link: `link`, or `auto` for a plain-http
    endpoint (a local server) that no proxy variable covers."""
    if profile.http_transport != "auto":
        return profile.http_transport == "link"
    parts = urlsplit(profile.base_url)
    if parts.scheme != "http":
        return False
    proxies = urllib.request.getproxies_environment()
    if not ({"http", "all"} & proxies.keys()):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname or ""))  # NO_PROXY


def _origin(url: httpx2.URL) -> tuple[str, str, int]:
    default = 443 if url.scheme == "https" else 80
    return url.scheme, url.host, url.port or default


class LinkTransport(httpx2.AsyncBaseTransport):
    """Carries the requests of one endpoint (`base_url`'s origin) over one `KeepAliveLink`
    of at most `max_connections` connections."""

    def __init__(self, base_url: str, *, max_connections: int) -> None:
        self._origin = _origin(httpx2.URL(base_url))
        scheme, host, port = self._origin
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        self._link = KeepAliveLink(
            f"{scheme}://{host}:{port}", None, max_connections=max_connections
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if _origin(request.url) != self._origin:  # a redirect elsewhere, say
            raise httpx2.UnsupportedProtocol(f"this transport only reaches {self._origin}")
        body = await request.aread()
        headers = {
            name.lower(): value
            for name, value in request.headers.items()
            if name.lower() not in _LINK_HEADERS
        }
        timeouts = request.extensions.get("timeout") or {}
        given = [t for t in timeouts.values() if t is not None]
        timeout_s = timeouts.get("read") or (max(given) if given else _DEFAULT_TIMEOUT_S)
        try:
            reply = await self._link.request(
                request.method,
                request.url.raw_path.decode("ascii"),
                body or None,
                timeout_s=timeout_s,
                headers=headers,
            )
        except ServiceUnreachable as exc:
            # The SDK retries both, and maps them to its timeout / connection errors.
            if isinstance(exc.__cause__, TimeoutError):
                raise httpx2.ReadTimeout(str(exc), request=request) from exc
            raise httpx2.ConnectError(str(exc), request=request) from exc
        return httpx2.Response(
            reply.status, headers=dict(reply.headers), content=reply.body, request=request
        )

    async def aclose(self) -> None:
        await self._link.aclose()
