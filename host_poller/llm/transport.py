"""The openai SDK's requests over the project's keep-alive link (`rlm_wire.link`).

The SDK sends through an httpx2 client. httpx2's own transport (httpcore2, h11: a general
HTTP state machine, two socket writes per request) was ~55 % of the CPU of a call; over
`KeepAliveLink` (one write, a lean answer parser) the poller spends about half the CPU per
round trip (docs/performance.md). The SDK above it is unchanged: its auth, retries,
timeouts and error mapping.

The SDK builds each request with its httpx2 client's `build_request`, which parses the URL
it was just given again and merges the client's default headers into a new `Headers`:
~40 % of the SDK's request building (`_build_request`). `LinkClient` builds the same
`Request` for the SDK's calls from a URL parsed once (see its docstring).

What the link does not do, and why a profile's `http_transport="auto"` keeps httpx2 for
https endpoints and for any endpoint a proxy variable covers: proxies; of an answer's
headers it passes on only `Retry-After` and `Content-Type` (the SDK then does without
`retry-after-ms` and `x-should-retry`, which hosted providers send); it bounds a connect
by the attempt's whole timeout, not by a separate cap.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import httpx2

from rlm_wire.errors import ServiceUnreachable
from rlm_wire.link import KeepAliveLink

if TYPE_CHECKING:
    from host_poller.llm.profiles import Profile

#: Request headers the link writes itself (or, for compression, must not ask for: it reads
#: bodies as they come).
_LINK_HEADERS = frozenset(
    {b"host", b"accept", b"accept-encoding", b"content-length", b"content-type", b"connection"}
)
#: A request's timeout when the SDK gives none (its own default).
_DEFAULT_TIMEOUT_S = 600.0
#: Most URLs a `UrlCache` keeps (the SDK sends one per endpoint path and query).
_MAX_URLS = 64


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


class UrlCache:
    """URLs made from strings once, kept while the base URL they were joined to stays the
    same object (httpx2 URLs are immutable; a client's base URL is replaced, not changed)."""

    def __init__(self) -> None:
        self._urls: dict[str, httpx2.URL] = {}
        self._base: httpx2.URL | None = None

    def __contains__(self, url: str) -> bool:
        return url in self._urls

    def get(self, url: str, base: httpx2.URL, make: Callable[[str], httpx2.URL]) -> httpx2.URL:
        """`make(url)`, made once while `base` is the base URL."""
        if self._base is not base or len(self._urls) >= _MAX_URLS:
            self._urls, self._base = {}, base
        made = self._urls.get(url)
        if made is None:
            made = self._urls[url] = make(url)
        return made


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
        # The head lines as they are, without decoding the ~15 headers the SDK sends.
        kept = [
            b"%s: %s\r\n" % (name, value)
            for name, value in request.headers.raw
            if name.lower() not in _LINK_HEADERS
        ]
        lines = b"".join(kept)
        if lines.count(b"\n") != len(kept) or lines.count(b"\r") != len(kept):
            # A line break inside a header would start a header of its own (httpx2's h11
            # refuses such a request too).
            raise httpx2.LocalProtocolError("a request header holds a line break")
        timeouts = request.extensions.get("timeout") or {}
        given = [t for t in timeouts.values() if t is not None]
        timeout_s = timeouts.get("read") or (max(given) if given else _DEFAULT_TIMEOUT_S)
        try:
            reply = await self._link.request(
                request.method,
                request.url.raw_path.decode("ascii"),
                body or None,
                timeout_s=timeout_s,
                head_lines=lines,
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


class LinkClient(httpx2.AsyncClient):
    """The httpx2 client of an SDK whose requests go over a `LinkTransport`.

    The SDK hands `build_request` a complete absolute URL string, its headers as a list and
    its body as bytes. httpx2 would parse that URL again, copy its own default headers into
    a `Headers` and update it with the SDK's (two more header tables), then build the
    `Request`. For such a call this client takes the URL parsed the last time and gives
    `Request` the merged list at once: the same `Request` (the client's defaults the SDK did
    not set, then the SDK's headers). Any other call is httpx2's own.
    """

    def __init__(self, transport: LinkTransport) -> None:
        # The SDK's own client defaults (`openai.DefaultAsyncHttpxClient`) but its pool
        # limits (the link has its own): its timeout (the SDK gives one with every
        # request), and redirects followed (the link passes no `Location`, so none is).
        super().__init__(
            transport=transport,
            trust_env=False,
            follow_redirects=True,
            timeout=httpx2.Timeout(_DEFAULT_TIMEOUT_S),
        )
        self.urls = UrlCache()

    def build_request(
        self,
        method: str,
        url: httpx2.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx2.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx2.Request:
        lean = (
            isinstance(content, (bytes, type(None)))
            and isinstance(headers, list)
            and all(isinstance(name, str) for name, _ in headers)
            and all(v is None for v in (data, files, json, params, cookies, extensions))
            and not self.params
            and not self.cookies
        )
        if not isinstance(url, str) or not lean:
            return super().build_request(
                method, url, content=content, data=data, files=files, json=json,
                params=params, headers=headers, cookies=cookies, timeout=timeout,
                extensions=extensions,
            )  # fmt: skip
        parsed = self.urls.get(url, self.base_url, self._merge_url)
        body = content or b""
        # httpx2's merge: the client's headers the call does not set, then the call's; then
        # what `Request` adds itself (Host, Content-Length) when they are missing.
        given = {name.lower() for name, _ in headers}
        defaults = [(k, v) for k, v in self.headers.raw if k.lower().decode("latin-1") not in given]
        merged: list[tuple[str | bytes, str | bytes]] = [*defaults, *headers]
        names = given.union(k.lower().decode("latin-1") for k, _ in defaults)
        before: list[tuple[str | bytes, str | bytes]] = []
        after: list[tuple[str | bytes, str | bytes]] = []
        if "host" not in names and parsed.host:
            before.append(("Host", parsed.netloc))
        if "content-length" not in names and "transfer-encoding" not in names:
            if body:
                after.append(("Content-Length", str(len(body))))
            elif method.upper() in ("POST", "PUT", "PATCH", "QUERY"):
                before.append(("Content-Length", b"0"))
        limits = self.timeout if timeout is httpx2.USE_CLIENT_DEFAULT else timeout
        request = httpx2.Request(
            method,
            parsed,
            # `Headers` encodes each name and value, str or bytes alike.
            headers=cast("list[tuple[bytes, bytes]]", before + merged + after),
            stream=httpx2.ByteStream(body),
            extensions={"timeout": httpx2.Timeout(limits).as_dict()},
        )
        request.read()  # as `Request(content=...)` does: `request.content` is there
        return request
