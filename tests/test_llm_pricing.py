"""Costs from genai-prices: the flat rates kept per model give genai-prices' own totals."""

from __future__ import annotations

import genai_prices
import pytest

from host_poller.llm import pricing
from host_poller.llm.pricing import cost_usd
from host_poller.llm.profiles import Profile

LOCAL = "http://127.0.0.1:9/v1"
TOKENS = [(0, 0), (1, 1), (1000, 100), (150_000, 4_000), (250_000, 30_000), (1_200_000, 64_000)]


def genai(model: str, input_tokens: int, output_tokens: int, **where: str) -> float:
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(genai_prices.calc_price(usage, model, **where).total_price)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("model", "base_url", "where", "flat"),
    [
        (
            "gpt-4o-mini",
            "https://api.openai.com/v1",
            {"provider_api_url": "https://api.openai.com/v1"},
            True,
        ),
        ("gpt-4o-mini", LOCAL, {}, True),  # a local server or gateway: the model alone
        ("openai/gpt-4o-mini", LOCAL, {"provider_id": "openai"}, True),  # a gateway's name
        ("gemini-2.5-pro", LOCAL, {}, False),  # tiered: its price steps at 200k input tokens
        ("deepseek-chat", LOCAL, {}, False),  # prices that change with the time of day
    ],
)
def test_each_call_costs_what_genai_prices_says(
    model: str, base_url: str, where: dict[str, str], flat: bool
) -> None:
    profile = Profile(name="p", base_url=base_url, model=model)
    pricing._flat_rates.pop((model, base_url), None)
    name = model.rpartition("/")[2]
    for input_tokens, output_tokens in TOKENS:
        got = cost_usd(model, input_tokens, output_tokens, profile)
        assert got == pytest.approx(genai(name, input_tokens, output_tokens, **where), rel=1e-9)
    # A flat price is kept after the first call; any other is asked of genai-prices each time.
    assert (pricing._flat_rates[model, base_url] is not None) is flat


def test_a_profile_price_wins_and_an_unknown_model_is_free() -> None:
    priced = Profile(
        name="p", base_url=LOCAL, model="gpt-4o-mini",
        input_price_per_mtok=1.0, output_price_per_mtok=3.0,
    )  # fmt: skip
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, priced) == pytest.approx(4.0)
    unknown = Profile(name="u", base_url=LOCAL, model="no-such-model-anywhere")
    assert cost_usd("no-such-model-anywhere", 1000, 1000, unknown) == 0.0
