"""Prices, exact cost arithmetic and budget periods: pure functions, time passed in."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import load, resolve
from proxy.config.upstreams import Deployment, Model, Price
from proxy.errors import UpstreamError
from proxy.exchange import Exchange
from proxy.governance.periods import TOTAL, Period, period_of, zone
from proxy.governance.pricing import Prices, rate_of, show, units
from proxy.http.wire import Usage

D = Decimal


def price(prompt: str, completion: str, cached: str | None = None) -> Price:
    return Price(D(prompt), D(completion), None if cached is None else D(cached))


def exact(prompt: int, cached: int, completion: int, p: Price) -> Decimal:
    """The cost by the definition, in Decimal with ample precision (the reference)."""
    cached_price = p.cached_prompt if p.cached_prompt is not None else p.prompt
    total = (prompt - cached) * p.prompt + cached * cached_price + completion * p.completion
    return total / D(1_000_000)


@pytest.mark.parametrize(
    ("p", "tokens", "expected"),
    [
        # gpt-4o-like: 2.50 / 10.00 per million, cached prompt 1.25.
        (price("2.50", "10.00", "1.25"), (1000, 0, 500), "0.0075"),
        (price("2.50", "10.00", "1.25"), (1000, 400, 500), "0.007"),
        # Cheap embeddings: 0.02 per million, one token: exact, no rounding (20 nano).
        (price("0.02", "0"), (1, 0, 0), "0.00000002"),
        # A price with 4 decimals per million: 0.1 nano-units a token, rounded up.
        (price("0.0001", "0"), (1, 0, 0), "0.000000001"),
        (price("0.0001", "0"), (10_001, 0, 0), "0.000001001"),
        # Large counts stay exact (no float drift).
        (price("0.15", "0.60"), (123_456_789, 0, 98_765_432), "77.77777755"),
        # Free tokens.
        (price("0", "0"), (500, 0, 500), "0"),
    ],
)
def test_cost_is_exact_and_rounds_up_per_request(
    p: Price, tokens: tuple[int, int, int], expected: str
) -> None:
    nano = rate_of(p).cost(*tokens)
    assert units(nano) == D(expected)
    # Never under the exact value, and less than one nano-unit over it.
    assert D(0) <= units(nano) - exact(*tokens, p) < D("1e-9")


def test_cached_tokens_are_part_of_the_prompt_and_never_more_than_it() -> None:
    rate = rate_of(price("3", "15", "0.30"))
    assert units(rate.cost(1000, 1000, 0)) == D("0.0003")  # all from the cache
    assert rate.cost(1000, 5000, 0) == rate.cost(1000, 1000, 0)  # a bogus count is capped
    assert rate.cost(1000, -5, 0) == rate.cost(1000, 0, 0)


def test_amounts_are_shown_in_fixed_point() -> None:
    assert [show(units(n)) for n in (0, 150, 1_500_000_000, 12_340_000_000)] == [
        "0.00",
        "0.00000015",
        "1.50",
        "12.34",
    ]


def _config(models: list[Model]) -> cfg.Config:
    return resolve(cfg.Config(models=models))


def _model(name: str, *deployments: Deployment, **fields: object) -> Model:
    return Model(name=name, deployments=list(deployments), **fields)  # type: ignore[arg-type]


def _served(prices: Prices, deployment: str, usage: Usage | None) -> int:
    exchange = Exchange("req", "chat/completions")
    exchange.deployment = deployment
    exchange.status = 200
    exchange.usage = usage
    return prices.cost(exchange)


def test_a_request_is_priced_by_the_deployment_that_served_it() -> None:
    config = _config(
        [
            _model(
                "gpt",
                Deployment(base_url="http://a", name="cheap"),
                Deployment(base_url="http://b", name="dear", price=price("5", "20")),
                price=price("1", "2"),
                fallbacks=["mini"],
            ),
            _model(
                "mini", Deployment(base_url="http://c", name="mini-d"), price=price("0.1", "30")
            ),
            _model("free", Deployment(base_url="http://d", name="free-d")),
        ]
    )
    prices = Prices(config)
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, total_tokens=2_000_000)
    assert [units(_served(prices, name, usage)) for name in ("cheap", "dear", "mini-d")] == [
        D(3),
        D(25),
        D("30.1"),
    ]
    assert _served(prices, "free-d", usage) == 0
    assert _served(prices, "", None) == 0  # never reached a deployment: nothing
    # Cut before usage came: the ledger's estimate is priced (body bytes / 4, events).
    exchange = Exchange("req", "chat/completions")
    exchange.deployment, exchange.status, exchange.error = "cheap", 200, UpstreamError
    exchange.body_bytes, exchange.events = 4_000_000, 500_000
    assert units(prices.cost(exchange)) == D(1 + 1)
    # The worst case of "gpt" takes the dearest price of each kind over its deployments
    # and its fallback's: prompt 5 (dear), completion 30 (mini).
    assert units(prices.worst_case("gpt", 1_000_000, 1_000_000)) == D(35)
    assert units(prices.worst_case("mini", 1_000_000, 0)) == D("0.1")
    assert prices.worst_case("unknown", 10, 10) == 0  # no wildcard: it will 404


def test_the_worst_case_counts_prompt_tokens_at_the_dearer_prompt_price() -> None:
    odd = _model("m", Deployment(base_url="http://a"), price=price("1", "1", "4"))
    assert units(Prices(_config([odd])).worst_case("m", 1_000_000, 0)) == D(4)


def test_yaml_prices_are_decoded_exactly(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "models:\n"
        "  - name: m\n"
        "    price: {prompt: 0.1, completion: '0.30', cached_prompt: '0.05'}\n"
        "    deployments: [{base_url: 'http://x', price: {prompt: '0.7', completion: 0.9}}]\n"
    )
    model = load(path).models[0]
    assert model.price == price("0.1", "0.30", "0.05")
    assert model.deployments[0].price == price("0.7", "0.9")


ONE = "deployments: [{base_url: 'http://x'}]"
NAMED_D = "deployments: [{base_url: 'http://x', name: d"


@pytest.mark.parametrize(
    ("models", "error"),
    [
        (f"[{{name: m, price: {{prompt: '-1', completion: 1}}, {ONE}}}]", "must be a number >= 0"),
        (f"[{{name: m, price: {{prompt: NaN, completion: 1}}, {ONE}}}]", "price.prompt"),
        (
            f"[{{name: a, {NAMED_D}, price: {{prompt: 1, completion: 1}}}}]}},"
            f" {{name: b, {NAMED_D}}}]}}]",
            "deployments named 'd' have different prices",
        ),
    ],
)
def test_bad_prices_fail_the_config(tmp_path: Path, models: str, error: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(f"models: {models}\n")
    with pytest.raises(ConfigError, match=error):
        load(path)


@pytest.mark.parametrize(
    ("budget", "error"),
    [
        ({"budget": "0"}, "above 0"),
        ({"budget": "1000001"}, "at most 1000000"),
        ({"budget": "1.0000000001"}, "more than 9 decimals"),
        ({"budget": "5", "budget_tz": "Mars/Olympus"}, "unknown time zone"),
    ],
)
def test_bad_budgets_of_declared_keys_fail_the_config(budget: dict[str, str], error: str) -> None:
    key = msgspec.convert({"id": "k", "sha256": "a" * 64, **budget}, cfg.DeclaredKey)
    config = cfg.Config(models=[_model("m", Deployment(base_url="http://x"))], keys=[key])
    with pytest.raises(ConfigError, match=error):
        resolve(config)


# --- Periods ---------------------------------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, tz: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def local(period: Period, tz: ZoneInfo = BERLIN) -> tuple[str, str]:
    assert period.end is not None
    return (
        datetime.fromtimestamp(period.start, tz).isoformat(),
        datetime.fromtimestamp(period.end, tz).isoformat(),
    )


@pytest.mark.parametrize(
    ("kind", "when", "start", "end", "hours"),
    [
        # Clocks go forward at 02:00 on 30 March 2025: that day has 23 hours.
        ("daily", "2025-03-30T12:00", "2025-03-30T00:00:00+01:00", "2025-03-31T00:00:00+02:00", 23),
        # ...and back at 03:00 on 26 October 2025: 25 hours.
        (
            "daily",
            "2025-10-26T23:59:59",
            "2025-10-26T00:00:00+02:00",
            "2025-10-27T00:00:00+01:00",
            25,
        ),
        ("daily", "2025-10-27T00:00", "2025-10-27T00:00:00+01:00", "2025-10-28T00:00:00+01:00", 24),
        # The ISO week of the spring change: Monday to Monday, one hour short.
        (
            "weekly",
            "2025-03-30T23:30",
            "2025-03-24T00:00:00+01:00",
            "2025-03-31T00:00:00+02:00",
            167,
        ),
        (
            "weekly",
            "2025-03-31T00:00",
            "2025-03-31T00:00:00+02:00",
            "2025-04-07T00:00:00+02:00",
            168,
        ),
        (
            "monthly",
            "2025-03-31T23:59",
            "2025-03-01T00:00:00+01:00",
            "2025-04-01T00:00:00+02:00",
            743,
        ),
        (
            "monthly",
            "2025-12-15T08:00",
            "2025-12-01T00:00:00+01:00",
            "2026-01-01T00:00:00+01:00",
            744,
        ),
    ],
)
def test_periods_start_at_local_midnight_across_dst(
    kind: str, when: str, start: str, end: str, hours: int
) -> None:
    period = period_of(kind, BERLIN, at(when))
    assert local(period) == (start, end)
    assert period.end is not None
    assert period.end - period.start == hours * 3600
    assert period.contains(at(when))
    assert period.id == int(period.start)


def test_rollover_is_exact_to_the_second() -> None:
    before, after = at("2025-10-26T23:59:59.999"), at("2025-10-27T00:00:00")
    today, tomorrow = period_of("daily", BERLIN, before), period_of("daily", BERLIN, after)
    assert today.end == tomorrow.start == after
    assert today.id != tomorrow.id
    assert not today.contains(after)
    # Zones differ: the same instant is in different days (and periods) east and west.
    tokyo = period_of("daily", zone("Asia/Tokyo"), after)
    assert tokyo.start != tomorrow.start


def test_a_midnight_that_does_not_exist_starts_the_day_at_its_first_instant() -> None:
    # Chile moved its clocks from 00:00 to 01:00 on 8 September 2024.
    santiago = zone("America/Santiago")
    day = period_of("daily", santiago, at("2024-09-08T12:00", santiago))
    assert datetime.fromtimestamp(day.start, santiago).isoformat() == "2024-09-08T01:00:00-03:00"
    previous = period_of("daily", santiago, day.start - 1)
    assert previous.end == day.start


def test_a_total_budget_has_one_period_for_ever() -> None:
    assert period_of("total", BERLIN, 0) == period_of("total", BERLIN, 4e9) == TOTAL
    assert TOTAL.end is None
    assert TOTAL.contains(1e12)
    with pytest.raises(ValueError, match="unknown time zone"):
        zone("Nowhere/Special")
