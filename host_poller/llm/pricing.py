"""The cost of a call: the profile's prices when set, else genai-prices' offline table, else 0.

genai-prices computes a price in ~1 ms of CPU (its unit registry, tiers, time conditions):
as much as the rest of a poller's work on a call. A model whose price there is flat (one
price for all time, per input and per output token, no tiers) has its two rates kept after
its first call, checked against genai-prices' own total; any other model asks every time.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from host_poller.llm.profiles import Profile

logger = logging.getLogger(__name__)

_unpriced_lock = threading.Lock()
_unpriced: set[tuple[str, str | None]] = set()
#: (model, base URL) -> USD per (input, output) token for a model of flat price, None for one
#: found not to be (it asks genai-prices every call, without checking again).
_flat_rates: dict[tuple[str, str | None], tuple[float, float] | None] = {}
#: Token counts at which a flat price is checked against genai-prices (past any tier).
_PROBE = (3_000_000, 2_000_000)


def _genai_calc(model: str, input_tokens: int, output_tokens: int, base_url: str | None) -> Any:
    """genai-prices' `PriceCalculation` for one call; `LookupError` if it knows no price."""
    import genai_prices  # heavy price table: loaded on first use only

    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    if base_url is not None:
        try:
            return genai_prices.calc_price(usage, model, provider_api_url=base_url)
        except LookupError:
            pass  # not a known provider URL (a local server, a gateway): match the model alone
    try:
        return genai_prices.calc_price(usage, model)
    except LookupError:
        provider, _, name = model.rpartition("/")
        if not provider or not name:
            raise
    # A gateway's name (OpenRouter, LiteLLM: `openai/gpt-4o-mini`) is the provider's model.
    try:
        return genai_prices.calc_price(usage, name, provider_id=provider.rsplit("/", 1)[-1])
    except LookupError:
        return genai_prices.calc_price(usage, name)


def _flat(calc: Any) -> tuple[float, float] | None:
    """USD per (input, output) token if `calc`'s model has one plain price for each and no
    other that a call of input and output tokens could pay; else None."""
    from decimal import Decimal

    from genai_prices.types import ModelPrice

    if not isinstance(getattr(calc.model, "prices", None), ModelPrice):
        return None  # prices that change with time (a list of conditional prices)
    price = calc.model_price
    rates = [getattr(price, "input_mtok", None), getattr(price, "output_mtok", None)]
    if getattr(price, "requests_kusd", None) is not None:
        return None  # a price per request
    if not all(rate is None or isinstance(rate, Decimal) for rate in rates):
        return None  # tiered
    return (float(rates[0] or 0) / 1_000_000, float(rates[1] or 0) / 1_000_000)


def _genai_price(model: str, input_tokens: int, output_tokens: int, base_url: str | None) -> float:
    key = (model, base_url)
    known = key in _flat_rates
    rates = _flat_rates.get(key)
    if rates is not None:
        return input_tokens * rates[0] + output_tokens * rates[1]
    calc = _genai_calc(model, input_tokens, output_tokens, base_url)
    total = float(calc.total_price)
    if known:
        return total
    rates = _flat(calc)
    if rates is not None:
        # Kept only if it gives genai-prices' own totals, here and far past any tier.
        probe = float(_genai_calc(model, *_PROBE, base_url).total_price)
        if not (
            math.isclose(input_tokens * rates[0] + output_tokens * rates[1], total, rel_tol=1e-9)
            and math.isclose(_PROBE[0] * rates[0] + _PROBE[1] * rates[1], probe, rel_tol=1e-9)
        ):
            rates = None
    _flat_rates[key] = rates
    return total


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
