"""The broker's Lua scripts (in `broker/lua/`), each bound to the pool it runs on.

Each script touches one tenant's keys only (one cluster slot). `finish.lua` is a shared
function, prepended to the scripts that record results so that "first answer wins,
acknowledge, notify waiters" is written once; `lease.lua` likewise leases work for
`claim.lua` and for `enqueue.lua`'s hand-off to a parked long-poll.

A call is one `EVALSHA` sent straight on a pooled connection (`broker.redis_calls`), not
redis-py's `AsyncScript` (a pipeline check, a client's retry wrapper and pool bookkeeping
per call). Redis forgets its scripts when it restarts (or on `SCRIPT FLUSH`): a `NOSCRIPT`
answer, which ran nothing, loads the script and sends the call once more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

from broker.redis_calls import execute, execute_many


def _source(name: str) -> str:
    return resources.files("broker").joinpath("lua", f"{name}.lua").read_text()


def _with_finish(name: str) -> str:
    return _source("finish") + "\n" + _source(name)


def _with_lease(name: str) -> str:
    """`name` after `finish.lua` and `lease.lua` (the leasing of claim.lua, which an enqueue
    that hands its work off to a parked long-poll runs too)."""
    return _with_finish("lease") + "\n" + _source(name)


@dataclass(frozen=True)
class Script:
    """One Lua script: `await script(keys, args)` runs it on `pool`."""

    source: str
    pool: ConnectionPool
    #: the SHA-1 hex digest Redis names it by
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        )

    def command(self, keys: Sequence[str], args: Sequence[EncodableT]) -> list[EncodableT]:
        """The `EVALSHA` of one call, for `run_many`."""
        return ["EVALSHA", self.sha, len(keys), *keys, *args]

    async def __call__(self, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        command = self.command(keys, args)
        try:
            return await execute(self.pool, *command)
        except NoScriptError:
            await self.load()
            return await execute(self.pool, *command)

    async def load(self) -> None:
        await execute(self.pool, "SCRIPT", "LOAD", self.source)

    async def run_many(self, commands: Sequence[Sequence[EncodableT]]) -> list[Any]:
        """`commands` in one write (those of this script made by `command`, and any other):
        each reply in order, an error reply as its exception. The calls of this script that
        met `NOSCRIPT` (and ran nothing) are sent again once the script is loaded."""
        replies = await execute_many(self.pool, commands)
        missed = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missed:
            await self.load()
            again = await execute_many(self.pool, [commands[i] for i in missed])
            for i, reply in zip(missed, again, strict=True):
                replies[i] = reply
        return replies


@dataclass(frozen=True)
class Scripts:
    enqueue: Script
    claim: Script
    answer: Script
    release: Script
    extend: Script
    close: Script
    watch: Script
    open_session: Script

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        pool = redis.connection_pool
        return cls(
            enqueue=Script(_with_lease("enqueue"), pool),
            claim=Script(_with_lease("claim"), pool),
            answer=Script(_with_finish("answer"), pool),
            release=Script(_source("release"), pool),
            extend=Script(_with_finish("extend"), pool),
            close=Script(_with_finish("close"), pool),
            watch=Script(_source("watch"), pool),
            open_session=Script(_source("open_session"), pool),
        )
