"""The rlm-broker broker: Redis-backed queues between sandboxed `llm_query` calls and pollers.

Public surface: `create_app` (the Starlette application), `BrokerSettings`, `BrokerClient`
(the typed async client every other component uses), the wire models in `broker.protocol`,
and the exception tree in `broker.errors`.
"""

from broker.client import BrokerClient
from broker.errors import BrokerError, BrokerResponseError, BrokerUnreachable, ClientError

__version__ = "0.1.0"

__all__ = [
    "BrokerClient",
    "BrokerError",
    "BrokerResponseError",
    "BrokerUnreachable",
    "ClientError",
    "__version__",
]
