"""The poller: answers the broker's queue with LLM completions and sub-RLMs (`rlm poller`).

The names load on first use (PEP 562): a run imports the leaves it needs (`errors`,
`hooks`, `policy`) without the poller, its handler and its broker link, which only a
running poller needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlm_wire.lazy import lazy_names

if TYPE_CHECKING:
    from host_poller.poller.answers import error_answer, error_code
    from host_poller.poller.errors import (
        BrokerRejected,
        BudgetExceeded,
        PollerConfigError,
        PollerError,
        RequestFailed,
        SubRLMFailed,
    )
    from host_poller.poller.handler import RequestHandler, call_context
    from host_poller.poller.hooks import (
        BudgetLookup,
        CallContext,
        RunBudget,
        SubRLMResult,
        SubRLMRunner,
    )
    from host_poller.poller.link import BrokerLink
    from host_poller.poller.policy import TenantPolicy
    from host_poller.poller.poller import Poller, PollerStats
    from host_poller.poller.router import ModelRouter
    from host_poller.poller.settings import PollerSettings

# Public name -> the submodule that defines it.
_HOMES = {
    "error_answer": "answers",
    "error_code": "answers",
    "BrokerRejected": "errors",
    "BudgetExceeded": "errors",
    "PollerConfigError": "errors",
    "PollerError": "errors",
    "RequestFailed": "errors",
    "SubRLMFailed": "errors",
    "RequestHandler": "handler",
    "call_context": "handler",
    "BudgetLookup": "hooks",
    "CallContext": "hooks",
    "RunBudget": "hooks",
    "SubRLMResult": "hooks",
    "SubRLMRunner": "hooks",
    "BrokerLink": "link",
    "TenantPolicy": "policy",
    "Poller": "poller",
    "PollerStats": "poller",
    "ModelRouter": "router",
    "PollerSettings": "settings",
}

__all__ = [
    "BrokerLink",
    "BrokerRejected",
    "BudgetExceeded",
    "BudgetLookup",
    "CallContext",
    "ModelRouter",
    "Poller",
    "PollerConfigError",
    "PollerError",
    "PollerSettings",
    "PollerStats",
    "RequestFailed",
    "RequestHandler",
    "RunBudget",
    "SubRLMFailed",
    "SubRLMResult",
    "SubRLMRunner",
    "TenantPolicy",
    "call_context",
    "error_answer",
    "error_code",
]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
