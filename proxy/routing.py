"""Model name → the deployments that serve it, resolved once from config.

A model named ``*`` catches every name not configured explicitly (the quick-start
``--upstream`` mode); the client's model name then goes upstream unchanged.
"""

from __future__ import annotations

from .config import WILDCARD, Config, Model
from .errors import ModelNotFound
from .upstream import Upstream


class Route:
    """A model's deployments, in config order."""

    __slots__ = ("model", "upstreams")

    def __init__(self, model: Model) -> None:
        self.model = model
        self.upstreams = [Upstream(d) for d in model.deployments]

    def pick(self) -> Upstream:
        """The deployment to send the next request to."""
        return self.upstreams[0]


class Router:
    __slots__ = ("routes", "wildcard")

    def __init__(self, config: Config) -> None:
        self.routes = {m.name: Route(m) for m in config.models if m.name != WILDCARD}
        wildcard = [m for m in config.models if m.name == WILDCARD]
        self.wildcard = Route(wildcard[0]) if wildcard else None

    def route(self, model: str) -> Route:
        route = self.routes.get(model) or self.wildcard
        if route is None:
            raise ModelNotFound(
                f"The model `{model[:200]}` does not exist or you do not have access to it.",
                param="model",
            )
        return route

    def names(self) -> list[str]:
        """Model names clients can ask for (without the wildcard)."""
        return list(self.routes)
