"""The RLM loop of one session: ask the root model, run its code, feed the output back.

Ends when the code calls FINAL / FINAL_VAR or readies the `answer` dict, when the reply has
a FINAL(...) / FINAL_VAR(...) tag, when a budget is spent, or after `max_iterations` turns
(then the model is asked once more for its best answer). It fails (`RLMRunError`) after
`max_consecutive_errors` turns in a row whose code raised the same error: a model stuck on
one mistake only spends the budget. Session set-up (broker session, environment) is the
caller's: see `host_poller.rlm.session`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from host_poller.environments.base import Environment
from host_poller.llm.client import traced
from host_poller.llm.errors import LLMError
from host_poller.llm.ledger import UsageLedger
from host_poller.llm.types import Completion, LLMClient, Message, Usage
from host_poller.rlm import prompts
from host_poller.rlm.budget import RunTracker, StopReason, describe_stop
from host_poller.rlm.errors import RLMRunError
from host_poller.rlm.parsing import code_blocks, final_tag
from host_poller.rlm.tools import install as install_tools
from host_poller.rlm.trajectory import TrajectoryWriter
from host_poller.rlm.types import CodeRun, Iteration, Turn
from host_poller.settings import HostSettings
from rlm_wire.runtime_models import ExecutionResult

logger = logging.getLogger(__name__)

#: A FINAL / FINAL_VAR call anywhere in a reply (code blocks included).
_FINAL_CALL = re.compile(r"\bFINAL(?:_VAR)?\s*\(")

#: Progress callback: (event name, fields), the same as the trajectory's lines.
EventHook = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class LoopContext:
    """Everything one session's loop uses; built by `host_poller.rlm.session`."""

    run_id: str
    depth: int
    max_depth: int
    max_iterations: int
    settings: HostSettings
    client: LLMClient
    env: Environment
    tracker: RunTracker
    session_id: str
    tenant_id: str | None = None
    trajectory: TrajectoryWriter | None = None
    ledger: UsageLedger | None = None
    on_event: EventHook | None = None
    request_id: str | None = None
    """The rlm_query this session answers (sub-RLMs only)."""
    root_params: dict[str, Any] | None = None
    """Extra request fields of every root-model call (sampling settings; over the profile's)."""
    traceparent: str | None = None
    """The run's W3C trace context: each root-model call is a span of it."""
    system_prompt: str | None = None
    """The caller's own instructions for the root model (None: the built-in ones)."""

    def emit(self, event: str, **fields: Any) -> None:
        fields = {"run_id": self.run_id, "depth": self.depth, **fields}
        if self.request_id is not None:
            fields["request_id"] = self.request_id
        if self.trajectory is not None:
            self.trajectory.write(event, **fields)
        if self.on_event is not None:
            self.on_event(event, fields)


@dataclass(frozen=True)
class LoopOutcome:
    answer: str | None
    answer_source: str | None
    stop_reason: StopReason
    stop_detail: str
    iterations: tuple[Iteration, ...]
    root_usage: Usage


class _Loop:
    def __init__(self, ctx: LoopContext, query: str) -> None:
        self.ctx = ctx
        self.query = query
        """This turn's query."""
        self.iterations: list[Iteration] = []
        self.root_usage = Usage()
        self._last_error: tuple[str, str] | None = None
        self._same_errors = 0

    def check_repeated_error(self, runs: list[CodeRun]) -> None:
        """Count turns in a row whose code raised one same error; fail past the limit."""
        errors = [(r.result.error.type, r.result.error.message) for r in runs if r.result.error]
        error = errors[0] if errors else None
        if error is None or error != self._last_error:
            self._last_error, self._same_errors = error, 1 if error is not None else 0
            return
        self._same_errors += 1
        limit = self.ctx.settings.max_consecutive_errors
        if self._same_errors >= limit:
            ctx = self.ctx
            message = f"{error[0]}: {error[1]}"
            ctx.emit("error", where="repeated_error", error=message, count=self._same_errors)
            raise RLMRunError(
                f"stopped after {self._same_errors} turns in a row whose code raised the same "
                f"error ({message[:300]}); RLM_MAX_CONSECUTIVE_ERRORS={limit}",
                run_id=ctx.run_id,
                trajectory_path=ctx.trajectory.path if ctx.trajectory else None,
            )

    async def complete(self, messages: list[Message]) -> Completion:
        ctx = self.ctx
        try:
            completion = await ctx.client.complete(
                messages, params=traced(ctx.root_params, ctx.traceparent)
            )
        except LLMError as exc:
            path = ctx.trajectory.path if ctx.trajectory else None
            ctx.emit("error", where="root_llm", error=str(exc))
            raise RLMRunError(
                f"root model failed: {exc}", run_id=ctx.run_id, trajectory_path=path
            ) from exc
        self.root_usage = self.root_usage + completion.usage
        ctx.tracker.charge_root(completion.model, ctx.depth, completion.usage)
        if ctx.ledger is not None:
            ctx.ledger.record(
                usage=completion.usage,
                model=completion.model,
                depth=ctx.depth,
                tenant_id=ctx.tenant_id,
                session_id=ctx.session_id,
                run_id=ctx.run_id,
            )
        return completion

    async def execute(self, code: str) -> ExecutionResult:
        ctx = self.ctx
        result = await ctx.env.execute(code, timeout_s=ctx.settings.execution_timeout_s)
        # Sub-calls answered by a poller in another process are counted here, once each.
        ctx.tracker.charge_reported(ctx.session_id, ctx.depth + 1, result.sub_calls)
        if result.state_lost and ctx.tracker.tools:
            # The sandbox restarted empty (its environment loads the context again): the
            # tool functions are defined again too.
            await install_tools(ctx.env, ctx.tracker.tools, ctx.settings.execution_timeout_s)
        return result

    async def final_from_tag(self, reply: str) -> tuple[dict[str, Any] | None, CodeRun | None]:
        tag = final_tag(reply)
        if tag is None:
            return None, None
        if tag.kind == "FINAL":
            return {"value": tag.argument, "source": "FINAL"}, None
        # FINAL_VAR names a variable of the REPL: read it there.
        code = f"FINAL_VAR({tag.argument!r})"
        result = await self.execute(code)
        return result.final, CodeRun(code, result)

    def outcome(
        self, answer: dict[str, Any] | None, reason: StopReason, detail: str | None = None
    ) -> LoopOutcome:
        return LoopOutcome(
            answer=None if answer is None else str(answer.get("value")),
            answer_source=None if answer is None else str(answer.get("source")),
            stop_reason=reason,
            stop_detail=detail or describe_stop(reason, self.ctx.tracker.budget),
            iterations=tuple(self.iterations),
            root_usage=self.root_usage,
        )

    def first_messages(self, turn: Turn) -> list[Message]:
        """The system prompt, a conversation's earlier turns, and this turn's query."""
        ctx = self.ctx
        limit = ctx.settings.output_max_chars
        system = prompts.system_prompt(
            turn.contexts[0],
            depth=ctx.depth,
            max_depth=ctx.max_depth,
            output_chars=limit,
            custom=ctx.system_prompt,
            more_contexts=turn.contexts[1:],
            tools=ctx.tracker.tools.listing() if ctx.tracker.tools else None,
        )
        if not turn.history:
            first = prompts.first_prompt(self.query)
        else:
            first = prompts.follow_up_prompt(self.query, len(turn.history) + 1, turn.new_contexts)
        return [
            {"role": "system", "content": system},
            *prompts.earlier_turn_messages(turn.history, limit),
            {"role": "user", "content": first},
        ]

    async def run(self, turn: Turn) -> LoopOutcome:
        ctx = self.ctx
        limit = ctx.settings.output_max_chars
        messages = self.first_messages(turn)
        for index in range(ctx.max_iterations):
            spent = ctx.tracker.exhausted()
            if spent is not None:
                return self.outcome(None, spent)
            ctx.emit("iteration_start", index=index)
            completion = await self.complete(messages)
            runs: list[CodeRun] = []
            final: dict[str, Any] | None = None
            for code in code_blocks(completion.text):
                result = await self.execute(code)
                runs.append(CodeRun(code, result))
                if result.final is not None:
                    final = result.final
                    break
            if final is None:
                final, tag_run = await self.final_from_tag(completion.text)
                if tag_run is not None:
                    runs.append(tag_run)
            iteration = Iteration(
                index=index,
                response=completion.text,
                code_runs=tuple(runs),
                usage=completion.usage,
                latency_s=completion.latency_s,
                final=final,
            )
            self.iterations.append(iteration)
            ctx.emit("iteration", **_iteration_fields(iteration, ctx.tracker))
            if final is not None:
                return self.outcome(final, "final")
            self.check_repeated_error(runs)
            spent = ctx.tracker.exhausted()
            if spent is not None:
                return self.outcome(None, spent)
            messages += prompts.feedback_messages(
                completion.text, [(r.code, r.result) for r in runs], self.query, limit
            )
        return await self.last_call(messages)

    async def last_call(self, messages: list[Message]) -> LoopOutcome:
        """After max_iterations: one more root call for the best answer, code not run."""
        messages = [*messages, {"role": "user", "content": prompts.last_call_prompt(self.query)}]
        self.ctx.emit("last_call")
        completion = await self.complete(messages)
        final, tag_run = await self.final_from_tag(completion.text)
        self.ctx.emit("last_call_reply", response=completion.text, usage=completion.usage.to_wire())
        if final is not None and final.get("value") is not None:
            final = {**final, "source": f"forced:{final.get('source')}"}
            return self.outcome(final, "max_iterations")
        if tag_run is not None:
            # A FINAL_VAR naming nothing: its text is not an answer, whatever it looks like.
            error = tag_run.result.error
            why = f"{error.type}: {error.message}" if error else "it gave no value"
            detail = f"no answer after {len(self.iterations)} turns; the forced answer was "
            return self.outcome(None, "max_iterations", f"{detail}{tag_run.code} ({why})")
        if _FINAL_CALL.search(completion.text):
            # A FINAL/FINAL_VAR call inside code (not run at the last call) is no answer either.
            detail = f"no answer after {len(self.iterations)} turns; the forced reply was code"
            return self.outcome(None, "max_iterations", detail)
        forced = {"value": completion.text.strip(), "source": "forced"}
        return self.outcome(forced, "max_iterations")


def _iteration_fields(iteration: Iteration, tracker: RunTracker) -> dict[str, Any]:
    return {
        "index": iteration.index,
        "response": iteration.response,
        "code": [
            {
                "code": run.code,
                "stdout": run.result.stdout,
                "stderr": run.result.stderr,
                "error": run.result.error.model_dump() if run.result.error else None,
                "final": run.result.final,
                "duration_ms": round(run.result.duration_ms, 3),
            }
            for run in iteration.code_runs
        ],
        "usage": iteration.usage.to_wire(),
        "latency_s": round(iteration.latency_s, 4),
        "final": iteration.final,
        "run_usage": tracker.usage.to_wire(),
        "sub_calls": tracker.sub_calls_done,
    }


async def run_loop(ctx: LoopContext, turn: Turn) -> LoopOutcome:
    """Drive one turn's loop to its end; the environment must hold the turn's contexts."""
    started = time.perf_counter()
    outcome = await _Loop(ctx, turn.query).run(turn)
    logger.info(
        "rlm loop ended",
        extra={
            "run_id": ctx.run_id,
            "depth": ctx.depth,
            "stop_reason": outcome.stop_reason,
            "iterations": len(outcome.iterations),
            "wall_s": round(time.perf_counter() - started, 3),
        },
    )
    return outcome
