"""The rlm-broker broker: Redis-backed queues between sandboxed `llm_query` calls and pollers.

Public surface: `create_app` (the ASGI application) and `BrokerSettings`. Its wire
models, errors and client live in `rlm_wire` (`broker_models`, `errors`, `broker_client`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
