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
"""

from rlm_wire.api_client import ApiClient
from rlm_wire.errors import ApiError, ServiceResponseError, ServiceUnreachable, WireError
from rlm_wire.responses import error_response, exception_handlers, json_response
from rlm_wire.serving import LoopServer, ThreadedServer, uvicorn_config

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
