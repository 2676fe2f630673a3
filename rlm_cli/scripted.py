"""LLM profiles pointing at a running scripted LLM (used when no provider is configured)."""

from __future__ import annotations

from fake_llm import ROOT_MODEL, SUB_MODEL
from host_poller.llm.profiles import Profile


def scripted_profiles(
    base_url: str, *, timeout_s: float = 30.0, max_retries: int = 2, concurrency: int = 16
) -> tuple[Profile, Profile]:
    """(root, sub) profiles for the scripted LLM at `base_url`; free of charge."""

    def profile(name: str, model: str) -> Profile:
        return Profile(
            name=name,
            base_url=base_url,
            model=model,
            input_price_per_mtok=0.0,
            output_price_per_mtok=0.0,
            timeout_s=timeout_s,
            max_retries=max_retries,
            concurrency=concurrency,
        )

    return profile("scripted-root", ROOT_MODEL), profile("scripted-sub", SUB_MODEL)
