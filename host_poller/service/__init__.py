"""`rlm serve`: RLMs as an OpenAI-compatible HTTP service for applications.

    service = RLMService(ServeSettings(), host_settings, llm_settings, budgets=budgets)
    app = create_app(service)   # POST /v1/chat/completions, GET /v1/models, GET /health

It belongs to the host side: it holds the provider keys and runs the RLM loop
(`host_poller.rlm`); applications authenticate with keys of their own (RLM_SERVE_API_KEYS).
"""

from host_poller.service.app import create_app
from host_poller.service.runner import MODEL, RLMService, RunPlan
from host_poller.service.settings import ServeSettings

__all__ = ["MODEL", "RLMService", "RunPlan", "ServeSettings", "create_app"]
