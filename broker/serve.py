"""Serving the broker: an embedded Redis when none is configured, then uvicorn.

uvicorn runs with uvloop + httptools (`rlm_wire.serving.uvicorn_config`), one worker per
process: scale with replicas over one Redis.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType

import uvicorn

from broker.app import create_app
from broker.redis_server import RedisServer
from broker.settings import BrokerSettings
from rlm_wire.serving import listen_socket, uvicorn_config

logger = logging.getLogger(__name__)

#: In-flight long-polls are cut after this on shutdown; clients re-wait (their work is in Redis).
GRACEFUL_SHUTDOWN_S = 5


@contextlib.contextmanager
def redis_for(settings: BrokerSettings) -> Iterator[BrokerSettings]:
    """`settings` with a Redis URL: the configured one, or for the block an embedded
    server's, durable in `RLM_REDIS_DIR`."""
    if settings.redis_url is not None:
        yield settings
        return
    server = RedisServer(data_dir=settings.redis_dir, appendfsync=settings.redis_appendfsync)
    with server:
        logger.info(
            "embedded redis started",
            extra={"redis_url": server.url, "redis_dir": str(settings.redis_dir)},
        )
        yield settings.model_copy(update={"redis_url": server.url})


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: BrokerSettings, host: str, port: int) -> None:
    """Run the broker until SIGINT/SIGTERM.

    The port is bound first: a port in use raises `rlm_wire.serving.PortInUseError` before
    an embedded Redis is started.
    """
    sock = listen_socket(host, port, name="broker")
    if settings.admin_token is None:
        logger.warning("RLM_ADMIN_TOKEN is unset: POST /tenants and admin draining are disabled")
    # uvicorn shuts down gracefully on these signals, then raises the signal again once its
    # own handlers are gone: with the default handlers that would end the process before
    # the embedded Redis below is stopped. Ours make it a normal exit that unwinds.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_cleanly)
    with redis_for(settings) as ready:
        config = uvicorn_config(
            create_app(ready), host, port, graceful_shutdown_s=GRACEFUL_SHUTDOWN_S
        )
        uvicorn.Server(config).run(sockets=[sock])
