"""Posting answers in batches: one `POST /respond` carries every answer that is ready (up to
`max_items`, optionally waiting `window_s` for more), instead of one POST per answer.

A single poster task posts one batch at a time; answers finishing during a POST join the
next batch, so batches grow with load. While the broker is unreachable the answers wait and
are retried with the link's retry policy, on the next broker first when the poller has
several; `flush()` bounds how long that may last at shutdown. `on_settled` is told the ids of
each batch once it is posted (or given up): only then does the poller forget the requests
and stop renewing their leases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from host_poller.poller.link import BrokerLink, is_retryable
from rlm_wire.broker_models import Answer, ErrorInfo
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ServiceResponseError, ServiceUnreachable

logger = logging.getLogger(__name__)

_BENIGN = frozenset({"accepted", "duplicate"})


class AnswerPoster:
    """Collects answers with `submit()`; its `run()` task posts them in batches."""

    def __init__(
        self,
        link: BrokerLink,
        *,
        max_items: int = 64,
        window_s: float = 0.005,
        on_settled: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        if max_items < 1 or window_s < 0:
            raise ValueError("AnswerPoster needs max_items >= 1 and window_s >= 0")
        self._link = link
        self._max_items = max_items
        self._window_s = window_s
        self._on_settled = on_settled
        self._queue: asyncio.Queue[Answer] = asyncio.Queue()
        self._unsettled = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._give_up_at: float | None = None
        self.batches_posted = 0
        self.answers_posted = 0
        self.answers_dropped = 0

    @property
    def unsettled(self) -> int:
        """Answers submitted and neither posted nor given up yet."""
        return self._unsettled

    def submit(self, answer: Answer) -> None:
        self._unsettled += 1
        self._idle.clear()
        self._queue.put_nowait(answer)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted answer is posted; give up on the rest after `timeout_s`."""
        loop = asyncio.get_running_loop()
        self._give_up_at = loop.time() + timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s + 1.0)
        except TimeoutError:
            return False
        return self.answers_dropped == 0

    async def run(self) -> None:
        """Post batches until cancelled."""
        while True:
            batch = await self._collect()
            try:
                await self._post(batch)
            except Exception:  # a bug must not stop the poster: log it, drop the batch
                logger.exception("answer poster error")
                self._drop(batch, "poster error")
            finally:
                self._settle(batch)

    async def _collect(self) -> list[Answer]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._window_s
        while len(batch) < self._max_items:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except TimeoutError:
                break
        return batch

    def _settle(self, batch: list[Answer]) -> None:
        self._unsettled -= len(batch)
        if self._on_settled is not None:
            self._on_settled([a.id for a in batch])
        if self._unsettled == 0:
            self._idle.set()

    def _giving_up(self) -> bool:
        return (
            self._give_up_at is not None and asyncio.get_running_loop().time() >= self._give_up_at
        )

    async def _post(self, batch: list[Answer]) -> None:
        while True:
            client = self._link.client
            try:
                results = await client.respond_batch(batch)
            except (ServiceUnreachable, ServiceResponseError) as exc:
                if isinstance(exc, ServiceResponseError) and not is_retryable(exc):
                    await self._refused(batch, exc)
                    return
                # All brokers share one Redis: the next one accepts these answers as well.
                self._link.failed(exc, client)
                if self._giving_up():
                    self._drop(batch, "broker unreachable at shutdown")
                    return
                remaining = None
                if self._give_up_at is not None:
                    remaining = self._give_up_at - asyncio.get_running_loop().time()
                await self._link.pause(max_s=remaining, exc=exc)
                continue
            self._link.succeeded()
            self.batches_posted += 1
            self.answers_posted += len(batch)
            for result in results.results:
                if result.status not in _BENIGN:
                    logger.warning(
                        "answer not accepted",
                        extra={"request_id": result.id, "status": result.status,
                               "reason": result.message},
                    )  # fmt: skip
            return

    async def _refused(self, batch: list[Answer], exc: ServiceResponseError) -> None:
        if exc.status == 413 and len(batch) > 1:
            half = len(batch) // 2
            await self._post(batch[:half])
            await self._post(batch[half:])
            return
        if exc.status == 413:
            # One answer too large for the broker: the enqueuer must still hear of it.
            error = ErrorInfo(
                code=ErrorCode.ANSWER_TOO_LARGE, message=f"the answer was refused: {exc}"
            )
            await self._post([Answer(id=batch[0].id, error=error, usage=batch[0].usage)])
            return
        self._drop(batch, f"broker refused the answers: {exc}")

    def _drop(self, batch: list[Answer], reason: str) -> None:
        self.answers_dropped += len(batch)
        logger.error(
            "answers dropped",
            extra={
                "count": len(batch),
                "reason": reason,
                "request_ids": [a.id for a in batch][:20],
            },
        )
