"""Which LLM answers a request: the profile its `model` names, else the sub-call profile."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from host_poller.llm.profiles import LLMSettings, Profile
from host_poller.llm.types import LLMClient

logger = logging.getLogger(__name__)


class ModelRouter:
    """Maps a request's `model` to a client; clients are built on first use and cached.

    A request's `model` matches a profile by profile name or by the profile's model name.
    No `model`, or one no profile matches: the default (sub-call) profile answers.
    """

    def __init__(
        self,
        profiles: Mapping[str, Profile],
        default: str,
        factory: Callable[[Profile], LLMClient],
        *,
        clients: Mapping[str, LLMClient] | None = None,
    ) -> None:
        self._clients: dict[str, LLMClient] = dict(clients or {})
        if default not in profiles and default not in self._clients:
            raise ValueError(f"default profile {default!r} is not among {sorted(profiles)}")
        self._profiles = dict(profiles)
        self._default = default
        self._factory = factory
        self._by_model = {p.model: name for name, p in self._profiles.items()}
        self._by_model.update({c.model: name for name, c in self._clients.items()})

    @classmethod
    def from_settings(
        cls, settings: LLMSettings, factory: Callable[[Profile], LLMClient]
    ) -> ModelRouter:
        """Route among the configured profiles; unmatched models go to the sub profile."""
        return cls(settings.profiles, settings.sub().name, factory)

    @classmethod
    def single(cls, client: LLMClient) -> ModelRouter:
        """Every request to one client (tests, embedded use)."""
        return cls({}, "default", lambda _profile: client, clients={"default": client})

    def profile_name(self, model: str | None) -> str:
        if model is None:
            return self._default
        if model in self._profiles or model in self._clients:
            return model
        return self._by_model.get(model, self._default)

    def client(self, model: str | None) -> LLMClient:
        name = self.profile_name(model)
        client = self._clients.get(name)
        if client is None:
            client = self._factory(self._profiles[name])
            self._clients[name] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
