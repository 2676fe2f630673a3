"""rlm-broker's ground floor: what crosses the wire, and nothing that holds a secret.

Every service (`broker`, `sandbox_runtime`, `host_poller`, `fake_llm`) imports this package
and none imports another service.

- `rlm_wire.errors`: the one exception tree (`ApiError(status, code, message)` for servers,
  `ServiceUnreachable` / `ServiceResponseError` for clients).
- `rlm_wire.broker_models`, `rlm_wire.runtime_models`: the wire models of the broker and of
  the sandbox runtime.
- `rlm_wire.bodies`, `rlm_wire.responses`, `rlm_wire.serving`, `rlm_wire.asgi`: server
  plumbing (bounded request bodies, JSON answers and the error table, uvicorn, hot routes
  served as raw ASGI).
- `rlm_wire.api_client`, `rlm_wire.broker_client`, `rlm_wire.runtime_client`,
  `rlm_wire.link`: the clients.

The names below load on first use (PEP 562): importing one leaf (`rlm_wire.codes`, the
models) must not import httpx2, uvicorn and Starlette, which only clients and servers need
(~0.1 s of `rlm ask`'s start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlm_wire.lazy import lazy_names

if TYPE_CHECKING:
    from rlm_wire.api_client import ApiClient
    from rlm_wire.errors import ApiError, ServiceResponseError, ServiceUnreachable, WireError
    from rlm_wire.responses import error_response, exception_handlers, json_response
    from rlm_wire.serving import LoopServer, ThreadedServer, uvicorn_config

# Public name -> the submodule that defines it.
_HOMES = {
    "ApiClient": "api_client",
    "ApiError": "errors",
    "ServiceResponseError": "errors",
    "ServiceUnreachable": "errors",
    "WireError": "errors",
    "error_response": "responses",
    "exception_handlers": "responses",
    "json_response": "responses",
    "LoopServer": "serving",
    "ThreadedServer": "serving",
    "uvicorn_config": "serving",
}

__all__ = [
    "ApiClient",
    "ApiError",
    "LoopServer",
    "ServiceResponseError",
    "ServiceUnreachable",
    "ThreadedServer",
    "WireError",
    "error_response",
    "exception_handlers",
    "json_response",
    "uvicorn_config",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
