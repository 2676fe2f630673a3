"""The queue: `/enqueue`, `/requests/{id}`, `/pending`, `/respond`, `/leases/extend`.

Waiting never holds a Redis connection: a waiting call parks on a future (answers) or an
event (new work) that the replica's one subscription resolves. A held `/enqueue` or
`/pending` also watches its client: one that hangs up leaves no waiter behind.

`enqueue`, `pending` and `respond` (one llm_query round trip) are served as raw ASGI
(`broker.hot_routes`): they take the replica's context and an `AsgiRequest` and return an
`Answer`; the other two are Starlette endpoints.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from broker.auth import Principal
from broker.context import BrokerContext, context_of, principal_of
from broker.handling import endpoint, lean_endpoint
from broker.keys import tenant_of_request
from broker.parking import LongPoll
from broker.poll_ids import polls_of, reported_tags
from broker.store import Claimed, PollerSeen
from rlm_wire import broker_models as p
from rlm_wire.asgi import Answer, AsgiRequest, Hold, json_answer
from rlm_wire.bodies import query_float, query_int, read_json, validate
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.responses import json_response

BatchT = TypeVar("BatchT", p.EnqueueBatch, p.AnswerBatch)
LeaseBody = TypeVar("LeaseBody", bound=p.LeaseIds)


def _batch_of(data: Any, key: str, model: type[BatchT], limit: int) -> BatchT | None:
    """`data` as a batch when it has `key` (None: a single item), at most `limit` long."""
    if not (isinstance(data, dict) and key in data):
        return None
    batch = validate(model, data)
    setting = "RLM_MAX_ENQUEUE_BATCH" if key == "batch" else "RLM_MAX_RESPOND_BATCH"
    _check_batch(len(getattr(batch, key)), limit, setting)
    return batch


def _check_batch(size: int, limit: int, setting: str) -> None:
    if size > limit:
        raise ApiError(
            413, ErrorCode.PAYLOAD_TOO_LARGE, f"batch of {size} exceeds {limit} ({setting})"
        )


# --- the sandbox side --------------------------------------------------------------------


@lean_endpoint("enqueue")
async def enqueue(ctx: BrokerContext, request: AsgiRequest) -> Answer:
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    principal.require("session")
    wait_s = query_float(request, "wait", ctx.settings.default_wait_s, ctx.settings.max_wait_s)
    data = await read_json(request, ctx.settings.max_body_bytes)
    batch = _batch_of(data, "batch", p.EnqueueBatch, ctx.settings.max_enqueue_batch)
    is_batch = batch is not None
    items = batch.batch if batch is not None else [validate(p.LLMRequest, data)]
    tenant_id = principal.tenant
    idempotency_key = _idempotency_key(request)
    ids = [f"{tenant_id}.{secrets.token_hex(10)}" for _ in items]
    # Register before publishing, so that an instant answer finds its waiter.
    futures = [ctx.waiters.register(request_id) for request_id in ids]
    # A caller that hangs up stops the wait: its waiters go at once, not after `wait` (its
    # requests stay queued; a retry with its Idempotency-Key finds them).
    hold = Hold(request.receive)
    try:
        earlier = await ctx.store.enqueue(
            tenant_id,
            principal.session,
            [
                (rid, item.model_dump_json(exclude_none=True))
                for rid, item in zip(ids, items, strict=True)
            ],
            idempotency_key,
        )
        # Accepted now (None): the store handed the requests to long-polls parked here or
        # woke them (`WorkSignals.notify`); other replicas hear of them via Redis.
        if earlier is not None:
            ids, futures = await _rewait(ctx, tenant_id, ids, futures, earlier)
        results = await _await_results(ctx, ids, futures, wait_s, hold)
    finally:
        hold.close()
        for request_id, future in zip(ids, futures, strict=True):
            ctx.waiters.discard(request_id, future)
    all_done = all(r is not None for r in results)
    bodies = [r if r is not None else _pending(rid) for rid, r in zip(ids, results, strict=True)]
    status = 200 if all_done else 202
    if is_batch:
        return Answer(status, b'{"results":[' + b",".join(bodies) + b"]}")
    return Answer(status, bodies[0])


def _idempotency_key(request: AsgiRequest) -> str | None:
    """The `Idempotency-Key` header: a retried POST with it enqueues nothing twice."""
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 200 and key.isascii() and key.isprintable()):
        raise ApiError(
            400,
            ErrorCode.BAD_REQUEST,
            "Idempotency-Key must be 1 to 200 printable ASCII characters",
        )
    return key


async def _rewait(
    ctx: BrokerContext,
    tenant_id: str,
    ids: list[str],
    futures: list[asyncio.Future[bytes | None]],
    earlier: list[str],
) -> tuple[list[str], list[asyncio.Future[bytes | None]]]:
    """A repeated `Idempotency-Key`: wait on the requests it enqueued the first time."""
    for request_id, future in zip(ids, futures, strict=True):
        ctx.waiters.discard(request_id, future)
    if len(earlier) != len(ids):
        raise ApiError(
            422,
            "invalid_body",
            f"this Idempotency-Key enqueued {len(earlier)} request(s) before, not {len(ids)}",
        )
    futures = [ctx.waiters.register(request_id) for request_id in earlier]
    for request_id in earlier:
        stored = await ctx.store.watch(tenant_id, request_id)
        if stored is None:
            for rid, future in zip(earlier, futures, strict=True):
                ctx.waiters.discard(rid, future)
            raise ApiError(
                410,
                ErrorCode.RESULT_EXPIRED,
                f"this Idempotency-Key enqueued {request_id}, whose result has expired "
                "(RLM_RESULT_TTL_S); use a new key to ask again",
            )
        if stored.status != "pending" and stored.result is not None:
            ctx.waiters.resolve(request_id, stored.result)
    return earlier, futures


@endpoint("get_request")
async def get_request(request: Request) -> Response:
    ctx = context_of(request)
    principal = await principal_of(request)
    principal.require("session", "tenant", "admin")
    request_id = request.path_params["request_id"]
    tenant_id = tenant_of_request(request_id)
    if tenant_id is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no request {request_id}")
    if principal.scope != "admin" and principal.tenant_id != tenant_id:
        raise ApiError(403, ErrorCode.FORBIDDEN, "this request belongs to another tenant")
    wait_s = query_float(request, "wait", ctx.settings.default_wait_s, ctx.settings.max_wait_s)
    future = ctx.waiters.register(request_id) if wait_s > 0 else None
    hold = Hold(request.receive)
    try:
        if future is not None:
            stored = await ctx.store.watch(tenant_id, request_id)
        else:
            stored = await ctx.store.read(tenant_id, request_id)
        if stored is None:
            raise ApiError(
                404,
                ErrorCode.NOT_FOUND,
                f"no request {request_id} (unknown, or its result expired)",
            )
        if principal.scope == "session" and stored.session_id != principal.session_id:
            raise ApiError(403, ErrorCode.FORBIDDEN, "this request belongs to another session")
        if stored.status != "pending" and stored.result is not None:
            return json_response(stored.result)
        if future is not None:
            # As a held /enqueue: a reader that hangs up ends the wait and its waiter.
            (result,) = await _await_results(ctx, [request_id], [future], wait_s, hold)
            if result is not None:
                return json_response(result)
        return json_response(_pending(request_id), 202)
    finally:
        hold.close()
        if future is not None:
            ctx.waiters.discard(request_id, future)


async def _await_results(
    ctx: BrokerContext,
    ids: Sequence[str],
    futures: Sequence[asyncio.Future[bytes | None]],
    wait_s: float,
    hold: Hold,
) -> list[bytes | None]:
    """The results that arrive within `wait_s` (None: still pending); the wait ends early
    when every one has, or when the client hangs up."""
    if len(futures) == 1:
        await hold.wait_one(futures[0], wait_s)
    else:
        await hold.wait(futures, wait_s)
    results = [f.result() if f.done() else None for f in futures]
    if wait_s > 0 and any(r is None for r in results) and not ctx.listener.connected:
        # The subscription is down: an answer may have landed without a notification.
        missing = [(i, rid) for i, rid in enumerate(ids) if results[i] is None]
        refs = [(tenant_of_request(rid) or "", rid) for _, rid in missing]
        for (i, _), stored in zip(missing, await ctx.store.read_many(refs), strict=True):
            results[i] = stored
    return results


def _pending(request_id: str) -> bytes:
    return json.dumps({"id": request_id, "status": "pending"}).encode()


# --- the host side -----------------------------------------------------------------------


@lean_endpoint("pending")
async def pending(ctx: BrokerContext, request: AsgiRequest) -> Answer:
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    principal.require("tenant", "admin")
    settings = ctx.settings
    max_items = query_int(request, "max", settings.default_pending_max, settings.max_pending_batch)
    wait_s = query_float(request, "wait", settings.default_pending_wait_s, settings.max_wait_s)
    poll, abandoned = polls_of(request, principal.scope == "admin", settings.max_abandoned_polls)
    poller = PollerSeen(principal.tenant_id, _poller_name(request, principal))
    deadline = time.monotonic() + wait_s
    # Watched from the start: a poller that leaves during a claim has its work handed back.
    hold = Hold(request.receive)
    hold.watch()
    tenant_id = principal.tenant_id  # None for admin: any tenant's work wakes it
    long_poll: LongPoll | None = None
    try:
        # Handed back first, so that this long-poll's own claim may re-deliver them at once.
        released = await _release_abandoned(ctx, tenant_id, abandoned) if abandoned else 0
        if released:
            ctx.metrics.lost_answer_leases.inc(released)
        full_scan = True
        due = ctx.poller_due(f"{poller.tenant_id}/{poller.name}", time.monotonic())
        seen = poller if due else None
        # Nothing announced since a claim drained the queue: start by waiting, no claim. But
        # every call claims at least once before it answers (a request enqueued on another
        # replica whose announcement is still on its way is found), and claims at once while
        # the subscription is down (announcements may be lost) or it has just handed work back.
        quiet_until = ctx.signals.quiet_until(tenant_id, time.monotonic())
        if quiet_until is not None and (
            quiet_until >= deadline or not ctx.listener.connected or released
        ):
            quiet_until = None
        while True:
            # Joined before the claim: work announced while it runs wakes this long-poll.
            long_poll = ctx.parking.join(tenant_id, max_items, poll)
            started = time.monotonic()
            skipped = quiet_until is not None
            if quiet_until is not None:
                claimed: list[Claimed] = []
                next_claim = quiet_until
                quiet_until = None
                if seen is not None:
                    await ctx.store.claim([], seen)  # only records the poller as seen
            else:
                mark = ctx.signals.mark()
                claimed = await _claim(ctx, principal, max_items, full_scan, seen, poll)
                next_claim = time.monotonic() + settings.work_recheck_s
                if len(claimed) < max_items:
                    ctx.signals.drained(tenant_id, mark, started)
            seen = None  # recorded once per call
            remaining = deadline - time.monotonic()
            if claimed or (remaining <= 0 and not skipped) or hold.hung_up:
                break  # it leaves in `finally`
            sleep = max(0.0, min(remaining, next_claim - time.monotonic()))
            if tenant_id is not None and sleep > 0 and settings.enqueue_handoff:
                handed = await _wait_parked(ctx, long_poll, sleep, hold)
                if handed:
                    claimed = handed
                    break
            else:  # at once when a claim is due now
                await hold.wait_one(long_poll.new_doorbell(), sleep)
            full_scan = not long_poll.woken  # a periodic re-check looks at every tenant
            # A wake-up is used by the claim at the top of the loop, unless the poller left.
            ctx.parking.leave(long_poll, used=not hold.hung_up)
            if hold.hung_up:
                break  # nobody is left to take what a claim would lease
        if claimed and hold.hung_up:
            # The poller left while we waited: hand its requests straight back.
            await _release(ctx, claimed)
            claimed = []
    finally:
        if long_poll is not None:
            # The last turn's long-poll, however the call ends (answered, timed out, a claim
            # failed, the handler cancelled): none is left behind, and a wake-up it got but
            # did not use goes on. A no-op if it left at the end of its turn.
            ctx.parking.leave(long_poll, used=False)
        hold.close()
    return Answer(200, _pending_body(ctx, claimed))


async def _wait_parked(
    ctx: BrokerContext, long_poll: LongPoll, sleep: float, hold: Hold
) -> list[Claimed]:
    """Wait for a wake-up as any long-poll does, parked so that an enqueue on this
    replica may hand new work straight to this long-poll (`broker.parking`); what it was
    handed."""
    parking, handed_future = ctx.parking, long_poll.handed
    parking.park(long_poll, ctx.signals.mark(), time.monotonic())
    try:
        await hold.wait_one(long_poll.new_doorbell(), sleep)
        if parking.unpark(long_poll, hung_up=hold.hung_up):
            # Reserved by an enqueue whose script runs now: its batch settles the future
            # when it ends (within a Redis command's timeout), unless the client leaves.
            await hold.wait([handed_future], ctx.settings.redis_timeout_s)
        if handed_future.cancelled() or not handed_future.done():
            return []
        handed = handed_future.result()
    finally:
        # Unreservable from now on; a hand-off still unsettled (the client left, or the
        # batch outlived the wait) is cancelled, so the batch hands its requests back.
        parking.unpark(long_poll, hung_up=True)
    if handed and len(handed) < long_poll.max_items:
        # The hand-off drained the queue as of the moment this long-poll parked.
        ctx.signals.drained(long_poll.tenant_id, long_poll.mark, long_poll.since)
    return handed


async def _release_abandoned(ctx: BrokerContext, tenant_id: str | None, tags: list[str]) -> int:
    """Hand back what the caller's polls `tags` still hold (their answers were lost). A
    tenant token's polls lease only its own tenant's requests; an admin token's may have
    leased any tenant's, so every tenant is looked at (this runs only after a failure)."""
    tenants = [tenant_id] if tenant_id is not None else await ctx.store.tenant_ids()
    return await ctx.store.release_polls(tenants, tags)


def _poller_name(request: AsgiRequest, principal: Principal) -> str:
    """The `X-RLM-Poller` name (printable ASCII, at most 100 characters), else the token's."""
    name = request.headers.get("x-rlm-poller", "")
    if 0 < len(name) <= 100 and name.isascii() and name.isprintable():
        return name
    return principal.token_hash[:16]


async def _claim(
    ctx: BrokerContext,
    principal: Principal,
    max_items: int,
    full_scan: bool,
    poller: PollerSeen | None,
    poll: str,
) -> list[Claimed]:
    if principal.scope == "tenant":
        claimed = await ctx.store.claim([(principal.tenant, max_items)], poller, poll)
        return claimed.get(principal.tenant, [])
    return await _claim_fairly(ctx, max_items, full_scan, poller, poll)


async def _claim_fairly(
    ctx: BrokerContext, max_items: int, full_scan: bool, poller: PollerSeen | None, poll: str
) -> list[Claimed]:
    """Admin draining: an equal share per tenant with work, rotating who goes first."""
    ready = ctx.signals.ready
    tenants = await ctx.store.tenant_ids() if full_scan or not ready else sorted(ready)
    if not tenants:
        if poller is not None:
            await ctx.store.claim([], poller)
        return []
    offset = ctx.drain_offset % len(tenants)
    ctx.drain_offset += 1
    active = tenants[offset:] + tenants[:offset]
    result: list[Claimed] = []
    remaining = max_items
    while remaining > 0 and active:
        share = max(1, remaining // len(active))
        batch = active if share > 1 else active[:remaining]
        got = await ctx.store.claim([(t, share) for t in batch], poller, poll)
        poller = None  # recorded with the first round
        still_busy = []
        for tenant_id in batch:
            items = got.get(tenant_id, [])
            result.extend(items)
            remaining -= len(items)
            if len(items) < share:
                ready.discard(tenant_id)
            else:
                still_busy.append(tenant_id)
        active = still_busy
    return result


async def _release(ctx: BrokerContext, claimed: Sequence[Claimed]) -> None:
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for item in claimed:
        by_tenant[tenant_of_request(item.id) or ""].append(item.id)
    for tenant_id, ids in by_tenant.items():
        await ctx.store.release(tenant_id, ids)


def _pending_body(ctx: BrokerContext, claimed: Sequence[Claimed]) -> bytes:
    """The `/pending` answer, spliced from the stored JSON: a request's body (which may
    hold a large prompt) and its session's metadata are never parsed again here."""
    if not claimed:
        return b'{"requests":[]}'
    lease_expires_at = time.time() + ctx.settings.lease_s
    entries = []
    for item in claimed:
        fields = json.dumps(
            {
                "id": item.id,
                "session_id": item.session_id,
                "tenant_id": tenant_of_request(item.id),
                "attempt": item.attempt,
                "enqueued_at": item.enqueued_at,
                "lease_s": ctx.settings.lease_s,
                "lease_expires_at": lease_expires_at,
            },
            separators=(",", ":"),
        )
        # The stored body is a non-empty JSON object (a prompt or messages is required).
        entries.append(
            item.body[:-1] + b"," + fields[1:-1].encode() + b',"metadata":' + item.metadata + b"}"
        )
    return b'{"requests":[' + b",".join(entries) + b"]}"


@lean_endpoint("respond")
async def respond(ctx: BrokerContext, request: AsgiRequest) -> Answer:
    principal = await ctx.auth.authenticate(request.headers.get("authorization"))
    principal.require("tenant", "admin")
    data = await read_json(request, ctx.settings.max_body_bytes)
    batch = _batch_of(data, "responses", p.AnswerBatch, ctx.settings.max_respond_batch)
    is_batch = batch is not None
    answers = batch.responses if batch is not None else [validate(p.Answer, data)]
    statuses = await _record_answers(ctx, principal, answers)
    if is_batch:
        results = [{"id": a.id, "status": s} for a, s in zip(answers, statuses, strict=True)]
        return json_answer({"results": results})
    status = statuses[0]
    if status == "not_found":
        raise ApiError(
            404, ErrorCode.NOT_FOUND, f"no request {answers[0].id} (unknown, or expired)"
        )
    if status == "forbidden":
        raise ApiError(403, ErrorCode.FORBIDDEN, "this request belongs to another tenant")
    return json_answer({"id": answers[0].id, "status": status})


async def _record_answers(
    ctx: BrokerContext, principal: Principal, answers: Sequence[p.Answer]
) -> list[str]:
    statuses, by_tenant = _by_tenant(principal, [answer.id for answer in answers])
    now = time.time()
    unresolved: list[tuple[str, str]] = []
    resolved = 0
    for tenant_id, indexes in by_tenant.items():
        records = [_result_record(answers[i]) for i in indexes]
        outcomes = await ctx.store.answer(tenant_id, records)
        for index, record, outcome in zip(indexes, records, outcomes, strict=True):
            statuses[index] = outcome.status
            if outcome.enqueued_at is not None:
                ctx.metrics.enqueue_to_respond.observe(max(0.0, now - outcome.enqueued_at))
                # Waiters on this replica get the answer here: `answer.lua` publishes it
                # only to the other replicas waiting for it.
                resolved += ctx.waiters.resolve(record[0], record[2].encode())
            elif outcome.status == "duplicate" and record[0] in ctx.waiters:
                # A retried answer whose first try was recorded but never confirmed here
                # (its reply lost): its local waiters were not resolved then.
                unresolved.append((tenant_id, record[0]))
    if unresolved:
        for (_, request_id), result in zip(
            unresolved, await ctx.store.read_many(unresolved), strict=True
        ):
            if result is not None:
                resolved += ctx.waiters.resolve(request_id, result)
    if resolved:
        # One loop pass, so that the held `/enqueue` calls just resolved answer their
        # callers before this `/respond` answers its poller, which waits on nothing.
        await asyncio.sleep(0)
    return statuses


def _by_tenant(
    principal: Principal, request_ids: Sequence[str]
) -> tuple[list[str], dict[str, list[int]]]:
    """Each id's index grouped under its tenant, when the caller may act for that tenant.

    The statuses start as `not_found` (a malformed id) or `forbidden` (another tenant's) for
    the ids left out; the caller fills in the rest from Redis.
    """
    statuses = ["not_found"] * len(request_ids)
    by_tenant: dict[str, list[int]] = defaultdict(list)
    for index, request_id in enumerate(request_ids):
        tenant_id = tenant_of_request(request_id)
        if tenant_id is None:
            continue
        if not principal.may_act_for_tenant(tenant_id):
            statuses[index] = "forbidden"
            continue
        by_tenant[tenant_id].append(index)
    return statuses, by_tenant


def _result_record(answer: p.Answer) -> tuple[str, str, str]:
    status = "done" if answer.error is None else "error"
    result = p.RequestResult(
        id=answer.id,
        status=status,
        response=answer.response,
        error=answer.error,
        usage=answer.usage,
        state=answer.state,
    )
    return answer.id, status, result.model_dump_json(exclude_none=True)


@endpoint("extend_leases")
async def extend_leases(request: Request) -> Response:
    ctx, principal, body = await _lease_call(request, p.ExtendLeases)
    results = await _per_tenant(principal, body.ids, ctx.store.extend)
    return json_response(
        {
            "results": results,
            "lease_s": ctx.settings.lease_s,
            "lease_expires_at": time.time() + ctx.settings.lease_s,
        }
    )


@endpoint("release_leases")
async def release_leases(request: Request) -> Response:
    """Hand back leased requests their poller will not answer: each is delivered again at
    once (its delivery counted), instead of after its lease. `polls`: as `/pending`'s
    `abandoned=`, for a poller that makes no next long-poll (it stops)."""
    ctx, principal, body = await _lease_call(request, p.ReleaseLeases)
    # Checked before anything is handed back: a refused call changes nothing.
    admin = principal.scope == "admin"
    tags = reported_tags(body.polls, admin, ctx.settings.max_abandoned_polls, "'polls'")
    release = functools.partial(ctx.store.release, delivered=True)
    results = await _per_tenant(principal, body.ids, release)
    released = sum(result["status"] == "released" for result in results)
    if released:
        ctx.metrics.released_leases.inc(released)
    from_polls = await _release_abandoned(ctx, principal.tenant_id, tags) if tags else 0
    if from_polls:
        ctx.metrics.lost_answer_leases.inc(from_polls)
    return json_response({"results": results, "from_polls": from_polls})


async def _lease_call(
    request: Request, model: type[LeaseBody]
) -> tuple[BrokerContext, Principal, LeaseBody]:
    """The context, the caller (a tenant or the admin) and the body of a call on leases."""
    ctx = context_of(request)
    principal = await principal_of(request)
    principal.require("tenant", "admin")
    body = validate(model, await read_json(request, ctx.settings.max_body_bytes))
    # A poller's leases are its answers to come: bounded as their batches are (one script
    # runs a call's ids on the tenant's Redis at once).
    _check_batch(len(body.ids), ctx.settings.max_respond_batch, "RLM_MAX_RESPOND_BATCH")
    return ctx, principal, body


async def _per_tenant(
    principal: Principal,
    request_ids: list[str],
    run: Callable[[str, list[str]], Awaitable[list[str]]],
) -> list[dict[str, str]]:
    """`run` per tenant of the ids the caller may act for; each id's outcome, in order
    (`forbidden` or `not_found` for the others)."""
    statuses, by_tenant = _by_tenant(principal, request_ids)
    for tenant_id, indexes in by_tenant.items():
        outcomes = await run(tenant_id, [request_ids[i] for i in indexes])
        for index, outcome in zip(indexes, outcomes, strict=True):
            statuses[index] = outcome
    return [{"id": rid, "status": s} for rid, s in zip(request_ids, statuses, strict=True)]


__all__ = ["enqueue", "extend_leases", "get_request", "pending", "release_leases", "respond"]
