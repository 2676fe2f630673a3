"""Poll ids: a poller's name for each of its `/pending` long-polls (`poll=`), and its report
of the earlier ones whose answer it never got whole (`abandoned=`; docs/protocol.md).

The broker records a long-poll's tag with each lease it grants to it (`lease.lua`) and, on a
report, hands back what the tagged polls still hold (`release.lua`). A tag is the poll id
scoped by the caller's token, so a tenant's report never names an admin's long-polls, nor
another tenant's (those live in that tenant's keys).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rlm_wire.asgi import AsgiRequest
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError

#: URL-safe, and long enough to be random (the host poller's carry 128 random bits).
POLL_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
_POLL_ID = re.compile(POLL_ID_PATTERN)


def poll_tag(poll_id: str, admin: bool) -> str:
    """`poll_id` scoped by who polled: an admin token's (`a:`) or a tenant token's (`t:`)."""
    return f"{'a' if admin else 't'}:{poll_id}"


def polls_of(request: AsgiRequest, admin: bool, limit: int) -> tuple[str, list[str]]:
    """The tag of this long-poll (`poll=`; "" when it names none) and the tags of the polls
    it reports (`abandoned=`: comma-separated, at most `limit`, repeats dropped). 400
    `bad_poll_id` for anything else."""
    raw_poll = request.query_params.get("poll")
    poll = ""
    if raw_poll is not None:
        poll = poll_tag(_checked("query parameter 'poll'", raw_poll), admin)
    raw = request.query_params.get("abandoned")
    if not raw:
        return poll, []
    poll_ids = raw.split(",", limit)  # at most one more than allowed: never an unbounded list
    return poll, reported_tags(poll_ids, admin, limit, "query parameter 'abandoned'")


def reported_tags(poll_ids: Sequence[str], admin: bool, limit: int, where: str) -> list[str]:
    """The tags of the abandoned polls a caller reports (at most `limit`, repeats dropped);
    `where` names them in the 400 `bad_poll_id` for anything else."""
    if len(poll_ids) > limit:
        raise ApiError(
            400,
            ErrorCode.BAD_POLL_ID,
            f"{where} names more than {limit} polls (RLM_MAX_ABANDONED_POLLS)",
        )
    unique = dict.fromkeys(_checked(where, poll_id) for poll_id in poll_ids)
    return [poll_tag(poll_id, admin) for poll_id in unique]


def _checked(where: str, value: str) -> str:
    if not _POLL_ID.fullmatch(value):
        raise ApiError(
            400,
            ErrorCode.BAD_POLL_ID,
            f"{where}: a poll id is 8 to 64 characters of A-Z, a-z, 0-9, '_' and '-', not "
            f"{value[:80]!r}",
        )
    return value
