"""Where models go: deployments, their timeouts and prices, models and their routing
(package docstring: __init__.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from .base import NonNegativeFloat, PositiveFloat, PositiveInt, Share


class Timeouts(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-deployment timeouts in seconds. There is deliberately no total cap: a
    healthy long stream must never be cut."""

    connect: PositiveFloat = 5.0
    # Time until the response headers arrive. A non-streaming request waits for the
    # whole generation before its first byte, so this is generous by default.
    first_byte: PositiveFloat = 600.0
    # Longest silence allowed between two chunks of a response body.
    idle: PositiveFloat = 120.0


class Price(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a million tokens cost, in one currency-neutral decimal unit (write them as
    strings, "2.50"; plain YAML numbers work too). Cost is computed exactly
    (pricing.py), rounded up to 10**-9 of the unit per request."""

    prompt: Decimal
    completion: Decimal
    # Prompt tokens the upstream served from its cache; default: the prompt price.
    cached_prompt: Decimal | None = None


# Budgets are counted in Redis in integer nano-units (10**-9) with Lua's doubles, which
# are exact below 2**53: a budget of at most a million units leaves ample headroom.
MAX_BUDGET = Decimal(1_000_000)
BUDGET_DECIMALS = 9
BudgetPeriod = Literal["daily", "weekly", "monthly", "total"]


class Deployment(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One upstream that can serve a model."""

    base_url: str
    name: str = ""
    # Name of the environment variable that holds the upstream key (never the key).
    api_key_env: str | None = None
    # Model name sent upstream; empty means "the name the client asked for".
    model: str = ""
    timeouts: Timeouts = Timeouts()
    # PEM file of CAs to trust for this upstream, in addition to nothing else:
    # when set it replaces the system trust store for this deployment.
    ca_file: str | None = None
    weight: PositiveFloat = 1.0
    max_concurrent: PositiveInt | None = None
    # "openai": any OpenAI-compatible /v1 server. "azure": Azure OpenAI; base_url is
    # the resource endpoint, ``model`` the Azure deployment name, api_version required.
    kind: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    # Outbound requests per minute to this deployment, shared out over the worker
    # processes, to stay under the provider's own limit (None: no cap).
    rpm: PositiveInt | None = None
    # GET target of the recovery probe (never a completion); default {base_url}/models.
    health_url: str | None = None
    # Overrides the model's price for requests this deployment serves.
    price: Price | None = None
    # Filled by ``resolve`` from api_key_env; a literal key here works but belongs in
    # an environment variable (a Kubernetes Secret), not in a config file.
    api_key: str = ""


class Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A model name clients ask for, served by one or more deployments."""

    name: str
    deployments: Annotated[list[Deployment], msgspec.Meta(min_length=1)]
    # Models to try, in order, when no deployment of this one is available.
    fallbacks: list[str] = []
    # Without a price (here or on the deployment) a model's requests cost nothing.
    price: Price | None = None
    # Overrides routing.panic_threshold for this model.
    panic_threshold: Share | None = None


class Routing(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Retries, failover and passive health checks (seconds), for every model."""

    # Upstream requests one client request may cost, first try included.
    max_attempts: PositiveInt = 3
    # Wait before retry n: uniform(0, min(backoff_max, backoff_base * 2**(n-1))).
    backoff_base: NonNegativeFloat = 0.1
    backoff_max: NonNegativeFloat = 2.0
    # Longest upstream Retry-After the proxy waits out itself before sending to the
    # same deployment again; beyond it the client gets the 429/503 and its Retry-After.
    retry_after_max: NonNegativeFloat = 5.0
    # Retries in flight per model (and worker) at most this share of the model's
    # requests in flight, or min_retries, whichever is more (Envoy's retry budget).
    retry_budget: Share = 0.2
    min_retries: Annotated[int, msgspec.Meta(ge=0)] = 3
    # Consecutive failures (connection failures, timeouts, 502/503/504, broken streams)
    # that take a deployment out of rotation, and for how long (then a probe of its
    # health_url decides whether it comes back).
    failure_threshold: PositiveInt = 3
    cooldown: PositiveFloat = 5.0
    # 500s take a deployment out only as a rate: at least error_rate of its answers
    # over the last error_window seconds, once it gave error_min_answers answers.
    error_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    error_window: PositiveFloat = 30.0
    error_min_answers: PositiveInt = 10
    # Panic mode: when fewer than this share of a model's deployments are in rotation
    # (and always when none is), route across all of them as if healthy.
    panic_threshold: Share = 0.5
    # Longest wait for a deployment's rpm cap when no other deployment can take the
    # request; beyond it the deployment is skipped, never queued for.
    rate_wait: NonNegativeFloat = 0.25
