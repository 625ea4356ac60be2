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
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..errors import BadRequest, DatabaseUnavailable, NotFound, ProxyError
from ..governance.identity import Principal
from ..governance.keys.lookup import STORE_FAILURES
from ..governance.pricing import show
from ..ops import metrics
from . import views
from .access import COOKIE, SESSION_SECONDS
from .common import (
    Admin,
    choice,
    error_response,
    json_response,
    listing,
    number,
    paginate,
    read_json,
    visible_keys,
)
from .manage import (
    create_key,
    create_team,
    delete_team,
    get_key,
    get_team,
    list_keys,
    list_teams,
    revoke_key,
    update_key,
    update_team,
)

PREFIX = "/admin/v1"
_MAX_USAGE_SPAN = 400 * 86400  # seconds one usage query may cover


class Login(msgspec.Struct, forbid_unknown_fields=True):
    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


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
    r.add_get(f"{PREFIX}/deployments", admin.route("viewer", lambda q, p: deployments(admin, p)))
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
        return json_response(body, 200)

    return serve


def login(admin: Admin) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /session {"credential": …}: a console session cookie for that credential."""

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            given = await read_json(request, Login, admin.config.server)
            principal = await admin.access.from_credential(given.credential)
            cookie = admin.access.cookie(principal)
        except ProxyError as err:
            return error_response(err)
        except (*STORE_FAILURES, ConnectionError):
            return error_response(
                DatabaseUnavailable("The database is unavailable; retry shortly.")
            )
        response = json_response(_principal(principal), 200)
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


async def get_usage(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    """GET /usage?group_by=&granularity=&start=&end=&key_id=&team_id=&model=&deployment="""
    query = request.query
    by = choice(query, "group_by", views.GROUPS, "model")
    granularity = choice(query, "granularity", views.GRANULARITIES, "hour")
    now = time.time()
    end = number(query, "end", now)
    start = number(query, "start", end - 86400)
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
    page, more, following = paginate(request, rows)
    return {
        **listing(page, more, following),
        "group_by": by,
        "granularity": granularity,
        "start": start,
        "end": end,
    }


async def budgets(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    """Keys with a budget: the current period, spent and left."""
    now = time.time()
    rows = []
    for key in await visible_keys(admin, principal):
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
    page, more, following = paginate(request, rows)
    return listing(page, more, following)


async def deployments(admin: Admin, principal: Principal) -> dict[str, Any]:
    """Every deployment's routing state; upstream URLs to admins only."""
    snapshot = admin.deployments()
    for model in snapshot["models"]:
        for deployment in model["deployments"]:
            if not principal.is_admin:
                deployment.pop("base_url", None)
    return {"object": "deployments", **snapshot}


async def overview(admin: Admin) -> dict[str, Any]:
    """The live numbers across all workers, and what today cost so far."""
    admin.fold()
    families = await asyncio.get_running_loop().run_in_executor(None, metrics.families)
    result = views.live(families, admin.inflight())
    try:
        result["spend_today"] = await views.spend_today(admin.db, result["at"])
    except (*STORE_FAILURES, ConnectionError, DatabaseUnavailable):
        result["spend_today"] = None  # the live numbers still stand without the ledger
    return {"object": "overview", **result}


async def _unknown(request: web.Request) -> web.Response:
    return error_response(NotFound("Unknown admin API path; see /admin/v1/openapi.json."))
