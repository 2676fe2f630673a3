"""Conversations of `rlm serve`: several questions on one REPL, kept between requests.

A conversation is an `host_poller.rlm.Conversation` held by the service: one environment
(its variables and contexts) and one broker session, opened on the first question and
closed on DELETE, after `RLM_SERVE_CONVERSATION_IDLE_S` without a question, or when the
service stops. It belongs to the key that created it (any other key gets 404), holds at
most `RLM_SERVE_MAX_TURNS` questions, and at most `RLM_SERVE_MAX_CONVERSATIONS` are open
at once (429 past it). One question at a time: a second one while the first runs is 409.
Each question holds one of the service's run slots while it runs, like a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from host_poller.rlm.conversation import Conversation
from host_poller.rlm.loop import EventHook
from host_poller.rlm.types import Context, RLMResult
from host_poller.service.auth import Caller
from host_poller.service.models import run_summary, wire_usage
from host_poller.service.runner import RLMService, RunPlan
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

logger = logging.getLogger(__name__)


def _cancelled(task: asyncio.Task[Any] | None) -> bool:
    """Whether `task` itself is being cancelled (not merely awaiting a cancelled one)."""
    return task is not None and task.cancelling() > 0


class EventRelay:
    """A conversation's progress hook: passes events to the question running now (a
    stream's listener), if any; the conversation's RLM is built with it once."""

    def __init__(self) -> None:
        self.listener: EventHook | None = None

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        listener = self.listener
        if listener is not None:
            listener(event, fields)


@dataclass
class ServedConversation:
    """One conversation of the service, its questions' records, and who may use it."""

    id: str
    owner: str
    plan: RunPlan
    chat: Conversation
    created: float
    last_used: float
    relay: EventRelay
    turns: list[dict[str, Any]] = field(default_factory=list)
    running: asyncio.Task[RLMResult] | None = None
    """The question running now, if any (closing the conversation cancels it)."""

    @property
    def busy(self) -> bool:
        return self.running is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "rlm.conversation",
            "model": self.plan.model,
            "created": int(self.created),
            "run_id": self.chat.run_id,
            "turns": self.turns,
        }


def turn_record(query: str, result: RLMResult) -> dict[str, Any]:
    """What GET /v1/conversations/{id} lists of one question."""
    return {
        "query": query,
        "answer": result.answer,
        "usage": wire_usage(result.usage),
        "rlm": run_summary(result),
    }


class ConversationRegistry:
    """The open conversations; a reaper closes the idle ones."""

    def __init__(self, service: RLMService, *, clock: Any = time.monotonic) -> None:
        self.service = service
        self._open: dict[str, ServedConversation] = {}
        self._clock = clock
        self._reaper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._open)

    def start(self, plan: RunPlan, caller: Caller) -> ServedConversation:
        """A new conversation for `caller` (its REPL opens with its first question)."""
        settings = self.service.settings
        if len(self._open) >= settings.max_conversations:
            raise ApiError(
                429,
                ErrorCode.TOO_MANY_REQUESTS,
                f"{settings.max_conversations} conversations are open "
                "(RLM_SERVE_MAX_CONVERSATIONS): close one (DELETE) or retry later",
                headers={"Retry-After": "5"},
            )
        conversation_id = f"conv_{uuid.uuid4().hex}"
        relay = EventRelay()
        rlm = self.service.rlm_for(plan, relay)
        served = ServedConversation(
            id=conversation_id,
            owner=caller.owner,
            plan=plan,
            chat=rlm.conversation(traceparent=plan.traceparent),
            created=time.time(),
            last_used=self._clock(),
            relay=relay,
        )
        self._open[conversation_id] = served
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="rlm-serve-conversations")
        logger.info("conversation opened", extra={"conversation_id": conversation_id})
        return served

    def get(self, conversation_id: str, caller: Caller) -> ServedConversation:
        """The conversation, if `caller` opened it (404 for every other caller)."""
        served = self._open.get(conversation_id)
        if served is None or served.owner != caller.owner:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no open conversation {conversation_id!r}")
        return served

    def question_context(
        self, served: ServedConversation, query: str, context: Context | None
    ) -> Context | None:
        """What a question is asked over: its own context, else (the first question) the one
        given at the conversation's creation; 413 past RLM_SERVE_MAX_CONTEXT_CHARS. Checked
        before the question runs (a streamed one included)."""
        if context is None and not served.turns:
            context = served.plan.context
        self.service.check_question(query, context)
        return context

    async def ask(
        self,
        served: ServedConversation,
        query: str,
        context: Any = None,
        on_event: EventHook | None = None,
    ) -> RLMResult:
        """One question on the conversation's REPL, within the service's bounds (the caller
        holds a run slot for it, as for a run)."""
        settings = self.service.settings
        if served.busy:
            raise ApiError(
                409,
                ErrorCode.CONVERSATION_BUSY,
                "a question of this conversation is still running: wait for its answer",
            )
        if len(served.turns) >= settings.max_turns:
            raise ApiError(
                409,
                ErrorCode.CONVERSATION_FULL,
                f"this conversation has had its {settings.max_turns} questions "
                "(RLM_SERVE_MAX_TURNS): start a new one",
            )
        served.relay.listener = on_event
        served.running = running = asyncio.create_task(
            served.chat.aask(query, context=context), name=f"rlm-serve-{served.id}"
        )
        try:
            async with self.service.bounded():
                try:
                    result = await asyncio.shield(running)
                except asyncio.CancelledError:
                    if not running.cancelled() or _cancelled(asyncio.current_task()):
                        running.cancel()  # the caller went away: the question goes too
                        raise
                    raise ApiError(
                        409,
                        ErrorCode.CONVERSATION_CLOSED,
                        "the conversation was closed while this question ran",
                    ) from None
        finally:
            served.running, served.relay.listener = None, None
            served.last_used = self._clock()
        served.turns.append(turn_record(query, result))
        return result

    async def close(self, served: ServedConversation) -> None:
        """End its REPL and broker session; it is gone for every caller."""
        if self._open.pop(served.id, None) is None:
            return
        if served.running is not None:
            served.running.cancel()  # its asker answers 409 conversation_closed
        try:
            await served.chat.aclose()
        except Exception:
            logger.exception("conversation not closed cleanly", extra={"id": served.id})
        logger.info("conversation closed", extra={"conversation_id": served.id})

    async def _reap(self) -> None:
        idle_s = self.service.settings.conversation_idle_s
        while self._open:
            await asyncio.sleep(min(idle_s / 4, 30.0))
            now = self._clock()
            for served in list(self._open.values()):
                if not served.busy and now - served.last_used >= idle_s:
                    logger.info("conversation idle: closing", extra={"id": served.id})
                    await self.close(served)

    async def aclose(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        for served in list(self._open.values()):
            await self.close(served)
