"""The RLM loop: a root model answers over a large context by writing code in a REPL.

    rlm = RLM(model="gpt-5", environment="local", max_depth=2, budget=Budget(max_tokens=10**6))
    result = rlm.completion(context, "How many times is the word 'whale' used?")
    result.answer, result.stop_reason, result.usage, result.trajectory_path

    rlm.completion(Contexts(report, notes), "Compare them")      # context_0, context_1
    with rlm.conversation() as chat:                              # one REPL, several questions
        chat.ask("Who is the captain?", context=book)
        chat.ask("And his ship?")

`SubRLMRunner` and `default_run_budgets` plug into the poller (sub-RLMs and run budgets).
"""

from host_poller.rlm.api import RLM, RunHooks
from host_poller.rlm.budget import (
    Budget,
    RunBudgets,
    RunTracker,
    StopReason,
    default_run_budgets,
    describe_stop,
)
from host_poller.rlm.conversation import Conversation
from host_poller.rlm.errors import RLMConfigError, RLMError, RLMRunError
from host_poller.rlm.parsing import FinalTag, code_blocks, final_tag
from host_poller.rlm.sub_rlm import SubRLMRunner
from host_poller.rlm.trajectory import TrajectoryWriter, read_trajectory
from host_poller.rlm.types import CodeRun, Contexts, Iteration, RLMResult

__all__ = [
    "RLM",
    "Budget",
    "CodeRun",
    "Contexts",
    "Conversation",
    "FinalTag",
    "Iteration",
    "RLMConfigError",
    "RLMError",
    "RLMResult",
    "RLMRunError",
    "RunBudgets",
    "RunHooks",
    "RunTracker",
    "StopReason",
    "SubRLMRunner",
    "TrajectoryWriter",
    "code_blocks",
    "default_run_budgets",
    "describe_stop",
    "final_tag",
    "read_trajectory",
]
