"""Every Redis key and channel the broker uses, built by functions, never by hand elsewhere.

Keys of one tenant share the hash tag `{<tenant_id>}`, so a Redis Cluster keeps a tenant on
one slot and each Lua script touches a single slot.

    <p>:tenants                         set    tenant ids (admin draining, /health)
    <p>:tenant:{t}                      hash   name, created_at
    <p>:token:<sha256>                  hash   kind, tenant, session; TTL = the session's
    <p>:{t}:stream                      stream one entry {id, size} per unanswered request;
                                               group GROUP
    <p>:{t}:session:<s>                 hash   status, metadata, expires_at, token_hash
    <p>:{t}:session:<s>:open            set    the session's unanswered request ids
    <p>:{t}:session:<s>:idem:<sha256>   hash   ids (JSON) accepted under an Idempotency-Key,
                                               open (of them unanswered), grace (s)
    <p>:{t}:req:<id>                    hash   status, body, session, enqueued_at, entry,
                                               attempt, size (of the body), origin (the
                                               replica that enqueued it), result, idem (its
                                               key, if any), watched (1: it has a set below),
                                               poll (the tag of the long-poll holding its
                                               lease, until extended or handed back)
    <p>:{t}:req:<id>:w                  set    other broker replicas waiting for its answer
                                               (GET /requests/{id}?wait=)
    <p>:{t}:poll:<scope>:<poll id>      set    request ids leased to one long-poll (scope
                                               `t`: the tenant's token, `a`: admin's); TTL
                                               one lease (RLM_LEASE_S)
    <p>:{t}:reap                        string rate-limits re-delivery scans (PX)
    <p>:{t}:reap:cursor                 string where the last re-delivery scan stopped
    <p>:{t}:sessions                    zset   the tenant's sessions -> expires_at (quota)
    <p>:{t}:usage                       hash   bytes: body bytes of its unanswered requests
    <p>:{t}:pollers                     zset   the tenant's poller ids -> last /pending time
    <p>:pollers                         zset   admin pollers' ids -> last /pending time
    channel <p>:work                    "<tenant id> <count> [<replica>]": new work of a tenant
    channel <p>:replies:<replica>       "<request id>\\n<result json>" for a waiting replica
                                               (not the one whose /respond recorded it)

Lifetimes: each key lives as long as what it serves. A request hash lives RLM_REQUEST_TTL_S
while unanswered, RLM_RESULT_TTL_S once answered; its watchers set lives no longer than it
(deleted on the answer; never created for an answered request); an idempotency key lives
while any of its requests is unanswered, then the results' lifetime plus
RLM_IDEMPOTENCY_GRACE_S (`finish.lua` counts it down). A session hash lives its token's TTL
plus RLM_REQUEST_TTL_S (late answers still find its metadata).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: Consumer group of every tenant stream, and the one consumer name the broker claims with:
#: leases are tracked by idle time, not by consumer, so any replica may re-deliver.
GROUP = "pollers"
CONSUMER = "broker"

# Matched whole (fullmatch): `$` would also accept a trailing newline.
_TENANT_ID = re.compile(r"t_[0-9a-f]{16}")
_SESSION_ID = re.compile(r"s_[0-9a-f]{16}")
_REQUEST_ID = re.compile(r"(t_[0-9a-f]{16})\.[0-9a-f]{20}")


def tenant_of_request(request_id: str) -> str | None:
    """The tenant a request id belongs to (ids embed it), or None for a malformed id."""
    match = _REQUEST_ID.fullmatch(request_id)
    return match.group(1) if match else None


def is_tenant_id(value: str) -> bool:
    return bool(_TENANT_ID.fullmatch(value))


def is_session_id(value: str) -> bool:
    return bool(_SESSION_ID.fullmatch(value))


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix (`RLM_KEY_PREFIX`)."""

    prefix: str = "rlm"

    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def tenant(self, tenant_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}"

    def token(self, token_hash: str) -> str:
        return f"{self.prefix}:token:{token_hash}"

    def tenant_base(self, tenant_id: str) -> str:
        """The common start of a tenant's keys; Lua scripts append `req:<id>` etc. to it."""
        return f"{self.prefix}:{{{tenant_id}}}:"

    def stream(self, tenant_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}stream"

    def session(self, tenant_id: str, session_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}session:{session_id}"

    def session_open(self, tenant_id: str, session_id: str) -> str:
        return f"{self.session(tenant_id, session_id)}:open"

    def idempotency(self, tenant_id: str, session_id: str, key: str) -> str:
        """Where an `Idempotency-Key` of a session remembers the request ids it accepted."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.session(tenant_id, session_id)}:idem:{digest}"

    def request(self, tenant_id: str, request_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}req:{request_id}"

    def watchers(self, tenant_id: str, request_id: str) -> str:
        return f"{self.request(tenant_id, request_id)}:w"

    def poll(self, tenant_id: str, tag: str) -> str:
        """The requests of a tenant leased to one long-poll, `tag` = `<scope>:<poll id>`."""
        return f"{self.tenant_base(tenant_id)}poll:{tag}"

    def reap_lock(self, tenant_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}reap"

    def reap_cursor(self, tenant_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}reap:cursor"

    def sessions(self, tenant_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}sessions"

    def usage(self, tenant_id: str) -> str:
        return f"{self.tenant_base(tenant_id)}usage"

    def pollers(self, tenant_id: str | None = None) -> str:
        """Pollers seen draining one tenant's queue (None: admin pollers, every tenant's)."""
        if tenant_id is None:
            return f"{self.prefix}:pollers"
        return f"{self.tenant_base(tenant_id)}pollers"

    def work_channel(self) -> str:
        return f"{self.prefix}:work"

    def reply_channel(self, replica_id: str) -> str:
        return f"{self.prefix}:replies:{replica_id}"
