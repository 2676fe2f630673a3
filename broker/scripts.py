"""The broker's Lua scripts (in `broker/lua/`), registered once per Redis client.

Each script touches one tenant's keys only (one cluster slot). `finish.lua` is a shared
function, prepended to the scripts that record results so that "first answer wins,
acknowledge, notify waiters" is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text()


def _with_finish(name: str) -> str:
    return _source("finish") + "\n" + _source(name)


@dataclass(frozen=True)
class Scripts:
    enqueue: AsyncScript
    claim: AsyncScript
    answer: AsyncScript
    release: AsyncScript
    extend: AsyncScript
    close: AsyncScript
    watch: AsyncScript
    open_session: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(
            enqueue=redis.register_script(_source("enqueue")),
            claim=redis.register_script(_with_finish("claim")),
            answer=redis.register_script(_with_finish("answer")),
            release=redis.register_script(_source("release")),
            extend=redis.register_script(_with_finish("extend")),
            close=redis.register_script(_with_finish("close")),
            watch=redis.register_script(_source("watch")),
            open_session=redis.register_script(_source("open_session")),
        )
