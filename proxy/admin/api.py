"""The admin API, ``/admin/v1`` on the ops listener: keys, usage and spend, deployments,
budgets, the live overview and console sessions. Roles (access.py): admin changes
things, viewer reads everything, member reads their own key, budget and usage.

Every answer is JSON; every refusal is an OpenAI-shaped error body. Lists are pages:
``limit`` (1-1000, default 100) and ``offset``, answered with ``has_more`` and
``next_offset``. The contract is ``GET /admin/v1/openapi.json`` (openapi.py), which
the tests check every answer against.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from aiohttp import web

from .. import metrics
from ..config import Config, check_budget
from ..db import Db
from ..errors import BadRequest, DatabaseUnavailable, NotFound, ProxyError, render
from ..identity import Authenticator, Principal, require
from ..keys.lookup import STORE_FAILURES
from ..keys.record import Key
from ..keys.store import KeyStore
from ..keys.teams import TEAM_ID, Team, TeamInUse, TeamStore
from ..oidc import OidcLogin
from ..periods import PERIODS
from ..pricing import show
from . import views
from .access import COOKIE, SESSION_SECONDS, Access
from .openapi import document

log = logging.getLogger("proxy.admin")
PREFIX = "/admin/v1"
_MAX_PAGE = 1000
_T = TypeVar("_T")
# What key and team ids are made of (secret.new_id, config ids, keys/teams.TEAM_ID).
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_MAX_USAGE_SPAN = 400 * 86400  # seconds one usage query may cover

Limit = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Models = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]], msgspec.Meta(max_length=1000)
]
UNSET: Any = msgspec.UNSET
Role = Literal["admin", "viewer", "member"]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_parallel: Limit | None = None
    models: Models = []
    expires_at: float | None = None
    metadata: dict[str, str] = {}
    budget: Decimal | None = None
    budget_period: str = "monthly"
    budget_tz: str = "UTC"
    team_id: str | None = None
    role: Role = "member"


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change; null removes a limit."""

    name: Name | msgspec.UnsetType = UNSET
    rpm: Limit | msgspec.UnsetType | None = UNSET
    tpm: Limit | msgspec.UnsetType | None = UNSET
    max_parallel: Limit | msgspec.UnsetType | None = UNSET
    models: Models | msgspec.UnsetType = UNSET
    expires_at: float | msgspec.UnsetType | None = UNSET
    metadata: dict[str, str] | msgspec.UnsetType = UNSET
    budget: Decimal | msgspec.UnsetType | None = UNSET
    budget_period: str | msgspec.UnsetType = UNSET
    budget_tz: str | msgspec.UnsetType = UNSET
    team_id: str | msgspec.UnsetType | None = UNSET
    role: Role | msgspec.UnsetType = UNSET


class TeamCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    id: str | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_parallel: Limit | None = None
    models: Models = []
    metadata: dict[str, str] = {}
    budget: Decimal | None = None
    budget_period: str = "monthly"
    budget_tz: str = "UTC"


class TeamUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields given change; null removes a limit."""

    name: Name | msgspec.UnsetType = UNSET
    rpm: Limit | msgspec.UnsetType | None = UNSET
    tpm: Limit | msgspec.UnsetType | None = UNSET
    max_parallel: Limit | msgspec.UnsetType | None = UNSET
    models: Models | msgspec.UnsetType = UNSET
    metadata: dict[str, str] | msgspec.UnsetType = UNSET
    budget: Decimal | msgspec.UnsetType | None = UNSET
    budget_period: str | msgspec.UnsetType = UNSET
    budget_tz: str | msgspec.UnsetType = UNSET


class Login(msgspec.Struct, forbid_unknown_fields=True):
    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


Handler = Callable[[web.Request, Principal], Awaitable[Any]]
Served = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admin:
    """The admin API's shared parts: config, access, and the worker's database."""

    def __init__(
        self,
        config: Config,
        db: Callable[[], Db | None],
        inflight: Callable[[], int],
        authenticator: Callable[[], Authenticator],
        login: OidcLogin | None = None,
    ) -> None:
        self.config = config
        self.access = Access(config, authenticator, login)
        self._db = db
        self.inflight = inflight
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
                # body read by the proxy's body limits (_body).
                principal = await self.access.principal(request, self.store())
                require(principal, role)
                result = await handler(request, principal)
            except ProxyError as err:
                return _error(err)
            except (*STORE_FAILURES, ConnectionError) as exc:
                log.warning("admin %s: database unavailable (%s)", request.path, type(exc).__name__)
                return _error(DatabaseUnavailable("The database is unavailable; retry shortly."))
            if isinstance(result, web.StreamResponse):
                return result
            return _json(result, status)

        return serve


def add_routes(app: web.Application, admin: Admin) -> None:
    """The admin API and its OpenAPI document under ``/admin/v1``."""
    r = app.router
    r.add_get(f"{PREFIX}/openapi.json", admin_openapi(admin))
    r.add_get(f"{PREFIX}/session", login_options(admin))
    r.add_post(f"{PREFIX}/session", login(admin))
    r.add_delete(f"{PREFIX}/session", logout)
    r.add_get(f"{PREFIX}/me", admin.route("member", me))
    r.add_get(f"{PREFIX}/keys", admin.route("member", lambda q, p: list_keys(admin, q, p)))
    r.add_post(f"{PREFIX}/keys", admin.route("admin", lambda q, p: create_key(admin, q), 201))
    r.add_get(f"{PREFIX}/keys/{{id}}", admin.route("member", lambda q, p: get_key(admin, q, p)))
    r.add_patch(f"{PREFIX}/keys/{{id}}", admin.route("admin", lambda q, p: update_key(admin, q)))
    r.add_delete(f"{PREFIX}/keys/{{id}}", admin.route("admin", lambda q, p: revoke_key(admin, q)))
    r.add_get(f"{PREFIX}/teams", admin.route("member", lambda q, p: list_teams(admin, q, p)))
    r.add_post(f"{PREFIX}/teams", admin.route("admin", lambda q, p: create_team(admin, q), 201))
    r.add_get(f"{PREFIX}/teams/{{id}}", admin.route("member", lambda q, p: get_team(admin, q, p)))
    r.add_patch(f"{PREFIX}/teams/{{id}}", admin.route("admin", lambda q, p: update_team(admin, q)))
    r.add_delete(f"{PREFIX}/teams/{{id}}", admin.route("admin", lambda q, p: delete_team(admin, q)))
    r.add_get(f"{PREFIX}/usage", admin.route("member", lambda q, p: get_usage(admin, q, p)))
    r.add_get(f"{PREFIX}/budgets", admin.route("member", lambda q, p: budgets(admin, q, p)))
    r.add_get(f"{PREFIX}/deployments", admin.route("viewer", deployments))
    r.add_get(f"{PREFIX}/overview", admin.route("viewer", lambda q, p: overview(admin)))
    r.add_route("*", PREFIX + "/{tail:.*}", _unknown)


def admin_openapi(admin: Admin) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=admin.openapi, content_type="application/json")

    return serve


def login_options(admin: Admin) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /session: how one may log in (the console's login page asks)."""
    body = {"object": "login_options", "oidc": admin.access.login is not None}

    async def serve(request: web.Request) -> web.Response:
        return _json(body, 200)

    return serve


def login(admin: Admin) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /session {"credential": …}: a console session cookie for that credential."""

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            given = await _body(request, Login)
            principal = await admin.access.from_credential(given.credential)
            cookie = admin.access.cookie(principal)
        except ProxyError as err:
            return _error(err)
        except (*STORE_FAILURES, ConnectionError):
            return _error(DatabaseUnavailable("The database is unavailable; retry shortly."))
        response = _json(_principal(principal), 200)
        response.set_cookie(
            COOKIE, cookie, max_age=SESSION_SECONDS, httponly=True, samesite="Strict",
            path="/", secure=admin.access.secure,
        )  # fmt: skip
        return response

    return serve


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    return response


async def me(request: web.Request, principal: Principal) -> dict[str, Any]:
    return _principal(principal)


def _principal(principal: Principal) -> dict[str, Any]:
    return {"object": "principal", **msgspec.to_builtins(principal)}


async def _visible_keys(admin: Admin, principal: Principal) -> list[Key]:
    """Every key for a viewer or admin; a member's own keys only."""
    keys = await KeyStore(admin.db).all_keys()
    return keys if principal.has("viewer") else [k for k in keys if principal.owns(k)]


async def list_keys(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    now = time.time()
    keys = await _visible_keys(admin, principal)
    if team := request.query.get("team_id"):
        keys = [k for k in keys if k.team_id == team]
    page, more, following = _page(request, keys)
    return _list([await views.key_view(admin.db, k, now) for k in page], more, following)


async def get_key(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    key = await KeyStore(admin.db).get(_id(request))
    if key is None or not (principal.has("viewer") or principal.owns(key)):
        raise NotFound("No such key.")  # a member learns nothing of other keys
    return await views.key_view(admin.db, key, time.time())


async def create_key(admin: Admin, request: web.Request) -> dict[str, Any]:
    given = await _body(request, KeyCreate)
    _check_budget(given.budget, given.budget_period, given.budget_tz)
    await _check_team(admin, given.team_id)
    key, value = await KeyStore(admin.db).create(
        given.name,
        rpm=given.rpm,
        tpm=given.tpm,
        max_parallel=given.max_parallel,
        models=given.models,
        expires_at=given.expires_at,
        metadata=dict(given.metadata),
        budget=given.budget or None,
        budget_period=given.budget_period,
        budget_tz=given.budget_tz,
        team_id=given.team_id,
        role=given.role,
    )
    log.info("admin: created key %s (%s)", key.id, key.name)
    return {**await views.key_view(admin.db, key, time.time()), "secret": value}


def _changes(given: msgspec.Struct) -> dict[str, Any]:
    """The fields of an update body that were given, ready for a store's ``update``."""
    changes = {
        name: getattr(given, name)
        for name in given.__struct_fields__
        if getattr(given, name) is not msgspec.UNSET
    }
    if not changes:
        raise BadRequest("Nothing to change: give at least one field.")
    if "models" in changes:
        changes["models"] = frozenset(changes["models"])
    if "budget" in changes:
        changes["budget"] = changes["budget"] or None
    return changes


async def update_key(admin: Admin, request: web.Request) -> dict[str, Any]:
    key_id = _id(request)
    changes = _changes(await _body(request, KeyUpdate))
    current = await _key(admin, key_id)
    if {"budget", "budget_period", "budget_tz"} & changes.keys():
        _check_budget(
            changes.get("budget", current.budget),
            changes.get("budget_period", current.budget_period),
            changes.get("budget_tz", current.budget_tz),
        )
    if "team_id" in changes:
        await _check_team(admin, changes["team_id"])
    key = await KeyStore(admin.db).update(key_id, changes)
    if key is None:
        raise NotFound("No such key.")
    log.info("admin: updated key %s (%s)", key.id, ", ".join(sorted(changes)))
    return await views.key_view(admin.db, key, time.time())


async def revoke_key(admin: Admin, request: web.Request) -> dict[str, Any]:
    key_id = _id(request)
    store = KeyStore(admin.db)
    if not await store.revoke(key_id):
        raise NotFound("No such key.")
    log.info("admin: revoked key %s", key_id)
    return await views.key_view(admin.db, await _key(admin, key_id), time.time())


async def list_teams(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    teams = await TeamStore(admin.db).all_teams()
    if not principal.has("viewer"):
        teams = [t for t in teams if t.id == principal.team_id]
    page, more, following = _page(request, teams)
    now = time.time()
    return _list([await views.team_view(admin.db, t, now) for t in page], more, following)


async def get_team(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    team_id = _id(request)
    if not (principal.has("viewer") or principal.team_id == team_id):
        raise NotFound("No such team.")
    return await views.team_view(admin.db, await _team(admin, team_id), time.time())


async def create_team(admin: Admin, request: web.Request) -> dict[str, Any]:
    given = await _body(request, TeamCreate)
    _check_budget(given.budget, given.budget_period, given.budget_tz)
    if given.id is not None and not TEAM_ID.fullmatch(given.id):
        raise BadRequest("A team id is 1 to 64 of A-Z a-z 0-9 _ . -", param="id")
    store = TeamStore(admin.db)
    if given.id is not None and await store.get(given.id) is not None:
        raise BadRequest(f"Team {given.id} exists already.", param="id", code="team_exists")
    if any(t.name == given.name for t in await store.all_teams()):
        raise BadRequest("A team of that name exists already.", param="name", code="team_exists")
    team = await store.create(
        given.name,
        team_id=given.id,
        rpm=given.rpm,
        tpm=given.tpm,
        max_parallel=given.max_parallel,
        models=given.models,
        budget=given.budget or None,
        budget_period=given.budget_period,
        budget_tz=given.budget_tz,
        metadata=dict(given.metadata),
    )
    log.info("admin: created team %s (%s)", team.id, team.name)
    return await views.team_view(admin.db, team, time.time())


async def update_team(admin: Admin, request: web.Request) -> dict[str, Any]:
    team_id = _id(request)
    changes = _changes(await _body(request, TeamUpdate))
    current = await _team(admin, team_id)
    if {"budget", "budget_period", "budget_tz"} & changes.keys():
        _check_budget(
            changes.get("budget", current.budget),
            changes.get("budget_period", current.budget_period),
            changes.get("budget_tz", current.budget_tz),
        )
    store = TeamStore(admin.db)
    name = changes.get("name")
    if name and any(t.name == name and t.id != team_id for t in await store.all_teams()):
        raise BadRequest("A team of that name exists already.", param="name", code="team_exists")
    team = await store.update(team_id, changes)
    if team is None:
        raise NotFound("No such team.")
    log.info("admin: updated team %s (%s)", team_id, ", ".join(sorted(changes)))
    return await views.team_view(admin.db, team, time.time())


async def delete_team(admin: Admin, request: web.Request) -> web.Response:
    team_id = _id(request)
    try:
        deleted = await TeamStore(admin.db).delete(team_id)
    except TeamInUse as exc:
        raise BadRequest(f"{exc}: move or revoke them first.", code="team_in_use") from None
    if not deleted:
        raise NotFound("No such team.")
    log.info("admin: deleted team %s", team_id)
    return web.Response(status=204)


async def get_usage(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    """GET /usage?group_by=&granularity=&start=&end=&key_id=&team_id=&model=&deployment="""
    query = request.query
    by = _choice(query, "group_by", views.GROUPS, "model")
    granularity = _choice(query, "granularity", views.GRANULARITIES, "hour")
    now = time.time()
    end = _number(query, "end", now)
    start = _number(query, "start", end - 86400)
    if not 0 <= end - start <= _MAX_USAGE_SPAN:
        raise BadRequest("start must be before end, at most 400 days apart.", param="start")
    where = {name: query[name] for name in views.FILTERS if query.get(name)}
    for name, value in where.items():
        if len(value) > 256 or "\x00" in value:
            raise BadRequest(f"{name} is not a name the ledger can hold.", param=name)
    if not principal.has("viewer"):
        # A member sees only their own usage (any key_id asked for is replaced); a JWT
        # user's requests are recorded under jwt:<user id> (identity.py).
        own = principal.key_id or (f"jwt:{principal.user_id}" if principal.user_id else "")
        where["key_id"] = own
    rows = await views.usage(admin.db, by, views.GRANULARITIES[granularity], start, end, where)
    page, more, following = _page(request, rows)
    return {
        **_list(page, more, following),
        "group_by": by,
        "granularity": granularity,
        "start": start,
        "end": end,
    }


async def budgets(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    """Keys with a budget: the current period, spent and left."""
    now = time.time()
    rows = []
    for key in await _visible_keys(admin, principal):
        if key.budget is None or key.revoked:
            continue
        rows.append(
            {
                "key_id": key.id,
                "name": key.name,
                "budget": show(key.budget),
                "budget_period": key.budget_period,
                "budget_tz": key.budget_tz,
                **await views.budget_view(admin.db, key, now),
            }
        )
    page, more, following = _page(request, rows)
    return _list(page, more, following)


async def deployments(request: web.Request, principal: Principal) -> dict[str, Any]:
    """Every deployment's routing state; upstream URLs to admins only."""
    from ..app import STATE

    snapshot = request.app[STATE].router.snapshot()
    for model in snapshot["models"]:
        for deployment in model["deployments"]:
            if not principal.is_admin:
                deployment.pop("base_url", None)
    return {"object": "deployments", **snapshot}


async def overview(admin: Admin) -> dict[str, Any]:
    """The live numbers across all workers, and what today cost so far."""
    families = await asyncio.get_running_loop().run_in_executor(None, metrics.families)
    result = views.live(families, admin.inflight())
    try:
        result["spend_today"] = await views.spend_today(admin.db, result["at"])
    except (*STORE_FAILURES, ConnectionError, DatabaseUnavailable):
        result["spend_today"] = None  # the live numbers still stand without the ledger
    return {"object": "overview", **result}


async def _unknown(request: web.Request) -> web.Response:
    return _error(NotFound("Unknown admin API path; see /admin/v1/openapi.json."))


def _id(request: web.Request) -> str:
    """The ``{id}`` of the path: one a key or team can have, else a 404 at once (the
    database is never asked about bytes it might refuse, such as a NUL)."""
    given = request.match_info["id"]
    if not _ID.fullmatch(given):
        raise NotFound("No such key or team.")
    return given


async def _team(admin: Admin, team_id: str) -> Team:
    team = await TeamStore(admin.db).get(team_id)
    if team is None:
        raise NotFound("No such team.")
    return team


async def _check_team(admin: Admin, team_id: str | None) -> None:
    if team_id is not None and await TeamStore(admin.db).get(team_id) is None:
        raise BadRequest(f"No team {team_id}.", param="team_id", code="team_not_found")


async def _key(admin: Admin, key_id: str) -> Key:
    key = await KeyStore(admin.db).get(key_id)
    if key is None:
        raise NotFound("No such key.")
    return key


def _check_budget(budget: Decimal | None, period: str, tz: str) -> None:
    if period not in PERIODS:
        raise BadRequest(
            f"budget_period must be one of {', '.join(PERIODS)}.", param="budget_period"
        )
    if budget is not None and budget < 0:
        raise BadRequest("budget must not be negative.", param="budget")
    wrong = check_budget(budget or Decimal(1), period, tz)
    if wrong:
        raise BadRequest(wrong, param="budget")


async def _body(request: web.Request, kind: type[_T]) -> _T:
    """The request's JSON body as ``kind``, read within the proxy's body size and time
    limits (app.read_body: its refusals are OpenAI-shaped 413s, 408s…)."""
    from ..app import STATE, read_body

    return _decode(await read_body(request, request.app[STATE]), kind)


def _decode(body: bytes, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc}.") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


def _page(request: web.Request, items: list[Any]) -> tuple[list[Any], bool, int | None]:
    limit = int(_number(request.query, "limit", 100))
    offset = int(_number(request.query, "offset", 0))
    if not 1 <= limit <= _MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {_MAX_PAGE}.", param="limit")
    if offset < 0:
        raise BadRequest("offset must not be negative.", param="offset")
    page = items[offset : offset + limit]
    more = offset + limit < len(items)
    return page, more, offset + limit if more else None


def _list(data: list[Any], more: bool, following: int | None) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more, "next_offset": following}


def _choice(query: Any, name: str, choices: dict[str, Any], default: str) -> str:
    value = query.get(name, default)
    if value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}.", param=name)
    return str(value)


def _number(query: Any, name: str, default: float) -> float:
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


def _json(result: Any, status: int) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(result), status=status, content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )  # fmt: skip


def _error(err: ProxyError) -> web.Response:
    headers = dict(err.headers)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="morngpt-admin"'
    return web.Response(
        body=render(err), status=err.status, content_type="application/json", headers=headers
    )
