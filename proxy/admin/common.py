"""What every admin API handler shares: ``Admin`` (config, access, the worker's
database, the route wrapper that authenticates and renders) and the request and
answer helpers (JSON bodies under the proxy's body limits, pages, ids, errors)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import web

from ..config.load import check_budget
from ..config.schema import Config, Server
from ..db import Db
from ..errors import BadRequest, DatabaseUnavailable, NotFound, ProxyError, render
from ..governance.identity import Authenticator, Principal, require
from ..governance.keys.lookup import STORE_FAILURES
from ..governance.keys.record import Key
from ..governance.keys.store import KeyStore
from ..governance.keys.teams import Team, TeamStore
from ..governance.periods import PERIODS
from ..http.ingress import read_request_body
from .access import Access
from .oidc import OidcLogin
from .openapi import document

log = logging.getLogger("proxy.admin")
_MAX_PAGE = 1000
_T = TypeVar("_T")
# What key and team ids are made of (secret.new_id, config ids, keys/teams.TEAM_ID).
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
UNSET: Any = msgspec.UNSET
Role = Literal["admin", "viewer", "member"]


Handler = Callable[[web.Request, Principal], Awaitable[Any]]
Served = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admin:
    """The admin API's shared parts: config, access, and the worker's database."""

    def __init__(
        self,
        config: Config,
        db: Callable[[], Db | None],
        inflight: Callable[[], int],
        fold: Callable[[], None],
        authenticator: Callable[[], Authenticator],
        deployments: Callable[[], dict[str, Any]],
        login: OidcLogin | None = None,
    ) -> None:
        self.config = config
        self.access = Access(config, authenticator, login)
        self._db = db
        self.inflight = inflight
        self.fold = fold  # the worker's finished requests into its metrics (metrics_sink.py)
        self.deployments = deployments  # every deployment's routing state (routes.py)
        self.openapi = msgspec.json.encode(document())

    @property
    def db(self) -> Db:
        db = self._db()
        if db is None:
            raise DatabaseUnavailable("The database is not open.")
        return db

    def store(self) -> KeyStore | None:
        db = self._db()
        return None if db is None else KeyStore(db)

    def route(
        self, role: Role, handler: Handler, status: int = 200
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``handler`` behind authentication and ``role``, its result as JSON, every
        refusal as an OpenAI-shaped error."""

        async def serve(request: web.Request) -> web.StreamResponse:
            try:
                # No deadline of its own: each database call is bounded (db.bounded), the
                # body read by the proxy's body limits (read_json).
                principal = await self.access.principal(request, self.store())
                require(principal, role)
                result = await handler(request, principal)
            except ProxyError as err:
                return error_response(err)
            except (*STORE_FAILURES, ConnectionError) as exc:
                log.warning("admin %s: database unavailable (%s)", request.path, type(exc).__name__)
                return error_response(
                    DatabaseUnavailable("The database is unavailable; retry shortly.")
                )
            if isinstance(result, web.StreamResponse):
                return result
            return json_response(result, status)

        return serve


async def visible_keys(admin: Admin, principal: Principal) -> list[Key]:
    """Every key for a viewer or admin; a member's own keys only."""
    keys = await KeyStore(admin.db).all_keys()
    return keys if principal.has("viewer") else [k for k in keys if principal.owns(k)]


def path_id(request: web.Request) -> str:
    """The ``{id}`` of the path: one a key or team can have, else a 404 at once (the
    database is never asked about bytes it might refuse, such as a NUL)."""
    given = request.match_info["id"]
    if not _ID.fullmatch(given):
        raise NotFound("No such key or team.")
    return given


async def team_or_404(admin: Admin, team_id: str) -> Team:
    team = await TeamStore(admin.db).get(team_id)
    if team is None:
        raise NotFound("No such team.")
    return team


async def check_team(admin: Admin, team_id: str | None) -> None:
    if team_id is not None and await TeamStore(admin.db).get(team_id) is None:
        raise BadRequest(f"No team {team_id}.", param="team_id", code="team_not_found")


async def key_or_404(admin: Admin, key_id: str) -> Key:
    key = await KeyStore(admin.db).get(key_id)
    if key is None:
        raise NotFound("No such key.")
    return key


def check_budget_amount(budget: Decimal | None, period: str, tz: str) -> None:
    if period not in PERIODS:
        raise BadRequest(
            f"budget_period must be one of {', '.join(PERIODS)}.", param="budget_period"
        )
    if budget is not None and budget < 0:
        raise BadRequest("budget must not be negative.", param="budget")
    wrong = check_budget(budget or Decimal(1), period, tz)
    if wrong:
        raise BadRequest(wrong, param="budget")


async def read_json(request: web.Request, kind: type[_T], server: Server) -> _T:
    """A JSON body of type ``kind``, read under the proxy's own body limits
    (ingress.read_request_body: its refusals are OpenAI-shaped 413s, 408s…)."""
    return decode(await read_request_body(request, server), kind)


def decode(body: bytes, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc}.") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


def paginate(request: web.Request, items: list[Any]) -> tuple[list[Any], bool, int | None]:
    limit = int(number(request.query, "limit", 100))
    offset = int(number(request.query, "offset", 0))
    if not 1 <= limit <= _MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {_MAX_PAGE}.", param="limit")
    if offset < 0:
        raise BadRequest("offset must not be negative.", param="offset")
    page = items[offset : offset + limit]
    more = offset + limit < len(items)
    return page, more, offset + limit if more else None


def listing(data: list[Any], more: bool, following: int | None) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more, "next_offset": following}


def choice(query: Any, name: str, choices: dict[str, Any], default: str) -> str:
    value = query.get(name, default)
    if value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}.", param=name)
    return str(value)


def number(query: Any, name: str, default: float) -> float:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number.", param=name) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be a finite number.", param=name)
    return value


def json_response(result: Any, status: int) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(result), status=status, content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )  # fmt: skip


def error_response(err: ProxyError) -> web.Response:
    headers = dict(err.headers)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="morngpt-admin"'
    return web.Response(
        body=render(err), status=err.status, content_type="application/json", headers=headers
    )
