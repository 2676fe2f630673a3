"""The poller: answers the broker's queue with LLM completions and sub-RLMs (`rlm poller`)."""

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
