"""A conversation: several questions answered on one REPL that keeps its variables.

Each question is a turn of the RLM loop on the same environment and broker session. A
question may bring contexts of its own: they are bound next to the earlier ones (`context_1`,
`context_2`, ...; the first stays `context`). The root model sees the earlier questions and
their answers; the budget, the trajectory and the run id span the whole conversation.

    with RLM(model="gpt-4o-mini").conversation() as chat:
        first = chat.ask("Who is the captain?", context=book)
        second = chat.ask("And his ship's name?")            # same REPL, same variables
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Self

from host_poller.rlm.errors import RLMConfigError
from host_poller.rlm.loop import LoopOutcome
from host_poller.rlm.run import RunScope
from host_poller.rlm.session import OpenSession, validate_contexts
from host_poller.rlm.types import RLMResult, Turn, context_chars
from rlm_wire.tracing import child_of

if TYPE_CHECKING:
    from host_poller.rlm.api import RLM


class Conversation:
    """Turns on one REPL; open with `with` (sync) or `async with`, then `ask` / `aask`."""

    def __init__(self, rlm: RLM, *, traceparent: str | None = None) -> None:
        self.rlm = rlm
        self._traceparent = child_of(traceparent)
        self._exit = contextlib.AsyncExitStack()
        self._run: RunScope | None = None
        self._session: OpenSession | None = None
        self._history: list[tuple[str, str | None]] = []
        self._last: LoopOutcome | None = None
        self._lock = asyncio.Lock()
        self._runner: asyncio.Runner | None = None
        self._closed = False

    @property
    def run_id(self) -> str | None:
        """The conversation's run id (None before the first question)."""
        return self._run.run_id if self._run is not None else None

    @property
    def turns(self) -> int:
        return len(self._history)

    # async ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aask(self, query: str, *, context: Any = None) -> RLMResult:
        """Answer `query` on the REPL as the earlier turns left it; `context` (one, or
        `Contexts(...)`) is added first. The first question needs a context. The result's
        usage is this turn's; its `iterations` are this turn's."""
        contexts = validate_contexts(context) if context is not None else ()
        async with self._lock:
            if self._closed:
                raise RLMConfigError("this conversation is closed")
            if self._session is None and not contexts:
                raise RLMConfigError("the first question of a conversation needs a context")
            run, session = await self._open(query, contexts)
            started = time.perf_counter()
            usage_before, by_key_before = run.tracker.usage, run.tracker.usage_by()
            number = len(self._history) + 1
            added = await session.add_contexts(contexts)
            run.emit(
                "turn_start",
                turn=number,
                query=query,
                contexts_added=list(added),
                context_chars=context_chars(*contexts),
            )
            turn = Turn(
                query=query,
                contexts=tuple(session.contexts),
                history=tuple(self._history),
                new_contexts=added if self._history else (),
            )
            outcome = await session.run_turn(
                client=run.client,
                tracker=run.tracker,
                turn=turn,
                ledger=self.rlm.hooks.ledger,
                on_event=self.rlm.hooks.on_event,
            )
            self._history.append((query, outcome.answer))
            self._last = outcome
            result = run.result(
                outcome,
                dict(await session.final_state()),
                usage_since=usage_before,
                by_key_since=by_key_before,
                started=started,
            )
            run.emit("turn_end", turn=number, **result.to_json())
            return result

    async def _open(self, query: str, contexts: tuple[Any, ...]) -> tuple[RunScope, OpenSession]:
        if self._run is not None and self._session is not None:
            return self._run, self._session
        rlm = self.rlm
        try:
            settings = await self._exit.enter_async_context(rlm.stack_settings())
            run = await RunScope.open(rlm, settings, self._traceparent)
            self._exit.push_async_callback(run.close)
            run.emit_start(query, contexts, conversation=True)
            session = await OpenSession.open(
                settings=settings,
                broker=run.broker,
                tracker=run.tracker,
                plan=run.plan(),
                trajectory=run.trajectory,
            )
            self._exit.push_async_callback(session.aclose)
        except BaseException:
            await self._exit.aclose()
            raise
        self._run, self._session = run, session
        return run, session

    async def aclose(self) -> None:
        """End the REPL and the broker session; the run ends with its whole usage."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            run, last = self._run, self._last
            try:
                if run is not None and last is not None:
                    whole = run.result(last, {}, started=run.started)
                    run.emit("run_end", **whole.to_json(), turns=len(self._history))
            finally:
                await self._exit.aclose()

    # sync ----------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._runner = asyncio.Runner()
        return self

    def __exit__(self, *exc_info: object) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self.aclose())
        finally:
            runner.close()

    def ask(self, query: str, *, context: Any = None) -> RLMResult:
        """`aask` for synchronous code; the conversation must be open with `with`."""
        if self._runner is None:
            raise RLMConfigError(
                "use `with rlm.conversation() as chat:` for chat.ask (or `async with` and "
                "`await chat.aask(...)`)"
            )
        return self._runner.run(self.aask(query, context=context))
