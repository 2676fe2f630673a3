"""The scripted LLM (`rlm fake-llm`): an OpenAI-compatible server answering from a scenario."""

from fake_llm.app import FakeLLMState, count_tokens, create_app
from fake_llm.scenario import ROOT_MODEL, SUB_MODEL, Scenario, load_scenario, shipped_scenarios
from fake_llm.server import FakeLLMServer, serve_forever

__all__ = [
    "ROOT_MODEL",
    "SUB_MODEL",
    "FakeLLMServer",
    "FakeLLMState",
    "Scenario",
    "count_tokens",
    "create_app",
    "load_scenario",
    "serve_forever",
    "shipped_scenarios",
]
