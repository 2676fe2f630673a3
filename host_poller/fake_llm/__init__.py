"""The scripted LLM (`rlm fake-llm`): an OpenAI-compatible server answering from a scenario."""

from host_poller.fake_llm.app import FakeLLMState, count_tokens, create_app
from host_poller.fake_llm.profiles import ROOT_MODEL, SUB_MODEL, scripted_profiles
from host_poller.fake_llm.scenario import Scenario, load_scenario, shipped_scenarios
from host_poller.fake_llm.server import FakeLLMServer, serve_forever

__all__ = [
    "ROOT_MODEL",
    "SUB_MODEL",
    "FakeLLMServer",
    "FakeLLMState",
    "Scenario",
    "count_tokens",
    "create_app",
    "load_scenario",
    "scripted_profiles",
    "serve_forever",
    "shipped_scenarios",
]
