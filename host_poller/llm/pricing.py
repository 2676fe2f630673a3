"""The cost of a call: the profile's prices when set, else genai-prices' offline table, else 0."""

from __future__ import annotations

import logging
import threading

from host_poller.llm.profiles import Profile

logger = logging.getLogger(__name__)

_unpriced_lock = threading.Lock()
_unpriced: set[tuple[str, str | None]] = set()


def _genai_price(model: str, input_tokens: int, output_tokens: int, base_url: str | None) -> float:
    import genai_prices  # heavy price table: loaded on first use only

    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    if base_url is not None:
        try:
            return float(
                genai_prices.calc_price(usage, model, provider_api_url=base_url).total_price
            )
        except LookupError:
            pass  # not a known provider URL (a local server, a gateway): match the model alone
    try:
        return float(genai_prices.calc_price(usage, model).total_price)
    except LookupError:
        provider, _, name = model.rpartition("/")
        if not provider or not name:
            raise
    # A gateway's name (OpenRouter, LiteLLM: `openai/gpt-4o-mini`) is the provider's model.
    try:
        return float(
            genai_prices.calc_price(
                usage, name, provider_id=provider.rsplit("/", 1)[-1]
            ).total_price
        )
    except LookupError:
        return float(genai_prices.calc_price(usage, name).total_price)


def cost_usd(
    model: str, input_tokens: int, output_tokens: int, profile: Profile | None = None
) -> float:
    """USD cost of one call of `model` with these token counts."""
    if profile is not None and profile.has_prices:
        return (
            input_tokens * (profile.input_price_per_mtok or 0.0)
            + output_tokens * (profile.output_price_per_mtok or 0.0)
        ) / 1_000_000
    base_url = profile.base_url if profile is not None else None
    key = (model, base_url)
    if key in _unpriced:
        return 0.0
    try:
        return _genai_price(model, input_tokens, output_tokens, base_url)
    except LookupError:
        with _unpriced_lock:
            first = key not in _unpriced
            _unpriced.add(key)
        if first:
            logger.debug("no price known for model, counting 0 USD", extra={"model": model})
        return 0.0
