"""Who may see the viewer: a pure ASGI middleware in front of every route.

The pages show tenants' prompts and outputs, so:
- without a token (loopback only, `ViewerSettings.check`), a request must name a loopback
  host in its `Host` header: a web page whose name was rebound to 127.0.0.1 (DNS rebinding)
  gets 400 `host_not_allowed`, never a run;
- with a token, every request carries it: `Authorization: Bearer <token>`, or the cookie a
  first visit to `/?token=<token>` sets (HttpOnly, SameSite=Strict) before it redirects to
  the same page without the token in its address; anything else is 401 `unauthorized`;
- only GET and HEAD reach the routes (the viewer is read-only), and every answer carries a
  Content-Security-Policy that runs only the viewer's own script, so text from a model can
  never run even if a page printed it as markup.
"""

from __future__ import annotations

import hmac
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from host_poller.viewer.settings import is_loopback
from rlm_wire.codes import ErrorCode
from rlm_wire.responses import error_response

COOKIE = "rlm_view_token"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class ViewerGuard:
    """The checks above, then the app; `token` None means loopback-only without a token."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        response = self._refusal(scope)
        if response is not None:
            await response(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> Response | None:
        if scope["method"] not in ("GET", "HEAD"):
            return error_response(
                405, ErrorCode.METHOD_NOT_ALLOWED, "the viewer is read-only: GET only"
            )
        if self.token is None:
            host = _host_name(Headers(scope=scope).get("host", ""))
            if not is_loopback(host):
                return error_response(
                    400,
                    ErrorCode.HOST_NOT_ALLOWED,
                    f"this viewer answers only to a loopback host, not {host[:200]!r} "
                    "(set RLM_VIEW_TOKEN to serve it elsewhere)",
                )
            return None
        return _check_token(HTTPConnection(scope), self.token)


def _check_token(conn: HTTPConnection, token: str) -> Response | None:
    given = conn.query_params.get("token")
    if given is not None:
        if not _same(given, token):
            return _unauthorized()
        # Trade the token in the address for a cookie, and drop it from the address
        # (history, logs, a Referer).
        rest = [(k, v) for k, v in parse_qsl(conn.url.query) if k != "token"]
        # One leading slash: "//host/..." would send the browser to another site.
        target = "/" + conn.url.path.lstrip("/") + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response
    header = conn.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "bearer" and _same(credential.strip(), token):
        return None
    cookie = conn.cookies.get(COOKIE)
    if cookie is not None and _same(cookie, token):
        return None
    return _unauthorized()


def _unauthorized() -> Response:
    return error_response(
        401,
        ErrorCode.UNAUTHORIZED,
        "this viewer needs its token: open the address `rlm view` printed (…/?token=…), or "
        "send Authorization: Bearer <RLM_VIEW_TOKEN>",
    )


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _host_name(host: str) -> str:
    """The name of a `Host` header, without its port ("[::1]:8300" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
