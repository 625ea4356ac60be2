"""Prices and the exact cost of a request.

Units: prices are per million tokens, in one currency-neutral decimal unit (config
``Price``). Costs are integers of **nano-units** (10**-9 of that unit): what Redis
counts budgets in and what the ledger stores (as the exact decimal ``nano / 10**9``).

Invariants:
- Arithmetic is integer only, so exact: each price is held as an integer numerator
  over ``10**scale`` (the most decimals among the model's three prices), and a
  request's cost is rounded **up** to a whole nano-unit, once, at the end, so the
  ledger never under-bills. Prices with at most 3 decimals per million (every price
  list seen so far) need no rounding at all: a token then costs whole nano-units.
- Cached prompt tokens are part of ``prompt_tokens`` (OpenAI's usage) and are billed
  at ``cached_prompt`` instead of ``prompt``; reasoning tokens are part of
  ``completion_tokens``.
- A request is priced by the deployment that served it (its own price, else its
  model's); the worst case reserved before forwarding uses the highest price, per
  kind of token, over every deployment that may serve the model (fallbacks too).
- A deployment without a price costs 0. Everything here is decided at config load;
  per request it is a dict lookup and a few integer operations.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from ..config.base import WILDCARD
from ..config.schema import Config
from ..config.upstreams import Deployment, Model, Price
from ..exchange import Exchange
from ..usage.row import consumed

NANO = 10**9  # nano-units per unit
_PER = 10**6  # prices are per million tokens
_ZERO = Decimal(0)


class Rate(NamedTuple):
    """A price as integers: each field is the per-million price times ``divisor`` (a
    power of ten: enough for every decimal of the three prices)."""

    prompt: int
    cached: int
    completion: int
    divisor: int

    def cost(self, prompt: int, cached: int, completion: int) -> int:
        """Nano-units for these token counts (cached ones are among ``prompt``),
        rounded up."""
        cached = min(max(cached, 0), prompt)
        total = (prompt - cached) * self.prompt + cached * self.cached
        total += completion * self.completion
        # nano = total / divisor / 10**6 * 10**9, rounded up
        return -(-total * (NANO // _PER) // self.divisor)


FREE = Rate(0, 0, 0, 1)


def rate_of(price: Price) -> Rate:
    """The exact integer form of ``price``."""
    values = (price.prompt, price.cached_prompt or price.prompt, price.completion)
    scale = max(max(0, -int(v.as_tuple().exponent)) for v in values)
    prompt, cached, completion = (int(v.scaleb(scale)) for v in values)
    return Rate(prompt, cached, completion, int(10**scale))


def units(nano: int) -> Decimal:
    """Nano-units as the exact decimal amount of the price unit."""
    return Decimal(nano).scaleb(-9) if nano else _ZERO


def show(amount: Decimal) -> str:
    """An amount for people: fixed point, 2 to 9 decimals (``12.50``, ``0.0000015``)."""
    text = f"{amount.quantize(Decimal('1e-9')):f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


class Prices:
    """Every price of a config, ready for the request path."""

    __slots__ = ("by_deployment", "ceilings", "default_ceiling")

    def __init__(self, config: Config) -> None:
        models = {m.name: m for m in config.models}
        self.by_deployment: dict[str, Rate] = {}
        for model in config.models:
            for deployment in model.deployments:
                price = _price(model, deployment)
                if price is not None:
                    self.by_deployment[deployment.name] = rate_of(price)
        # Model name → the highest price it may be served at (its fallbacks included).
        self.ceilings = {
            m.name: _ceiling([m, *(models[f] for f in m.fallbacks)]) for m in config.models
        }
        # Names that are not configured go to the wildcard model, if there is one.
        self.default_ceiling = self.ceilings.get(WILDCARD, FREE)

    @property
    def is_priced(self) -> bool:
        return bool(self.by_deployment)

    def cost(self, exchange: Exchange) -> int:
        """What a finished exchange cost, in nano-units: the usage the ledger records
        (reported or estimated) at the price of the deployment that served it."""
        rate = self.by_deployment.get(exchange.deployment) if self.by_deployment else None
        if rate is None:
            return 0
        usage = consumed(exchange)[0]
        return rate.cost(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)

    def worst_case(self, model: str, prompt: int, answer: int) -> int:
        """The most a request for ``model`` with these token counts may cost (nano)."""
        rate = self.ceilings.get(model, self.default_ceiling)
        return rate.cost(prompt, 0, answer)


def _price(model: Model, deployment: Deployment) -> Price | None:
    return deployment.price or model.price


def _ceiling(models: list[Model]) -> Rate:
    prices = [p for m in models for d in m.deployments if (p := _price(m, d)) is not None]
    if not prices:
        return FREE
    # A worst case counts every prompt token at the dearer of the two prompt prices.
    prompt = max(max(p.prompt, p.cached_prompt or p.prompt) for p in prices)
    return rate_of(Price(prompt=prompt, completion=max(p.completion for p in prices)))
