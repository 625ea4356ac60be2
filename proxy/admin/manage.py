"""The admin API's changes and reads of keys and teams (``/admin/v1/keys``,
``/admin/v1/teams``): the request bodies and their handlers, routed by api.py."""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..errors import BadRequest, NotFound
from ..governance.identity import Principal
from ..governance.keys.store import KeyStore
from ..governance.keys.teams import TEAM_ID, TeamInUse, TeamStore
from . import views
from .common import (
    UNSET,
    Admin,
    Role,
    check_budget_amount,
    check_team,
    key_or_404,
    listing,
    paginate,
    path_id,
    read_json,
    team_or_404,
    visible_keys,
)

log = logging.getLogger("proxy.admin")

Limit = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Models = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]], msgspec.Meta(max_length=1000)
]


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


async def list_keys(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    now = time.time()
    keys = await visible_keys(admin, principal)
    if team := request.query.get("team_id"):
        keys = [k for k in keys if k.team_id == team]
    page, more, following = paginate(request, keys)
    return listing([await views.key_view(admin.db, k, now) for k in page], more, following)


async def get_key(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    key = await KeyStore(admin.db).get(path_id(request))
    if key is None or not (principal.has("viewer") or principal.owns(key)):
        raise NotFound("No such key.")  # a member learns nothing of other keys
    return await views.key_view(admin.db, key, time.time())


async def create_key(admin: Admin, request: web.Request) -> dict[str, Any]:
    given = await read_json(request, KeyCreate, admin.config.server)
    check_budget_amount(given.budget, given.budget_period, given.budget_tz)
    await check_team(admin, given.team_id)
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
    key_id = path_id(request)
    changes = _changes(await read_json(request, KeyUpdate, admin.config.server))
    current = await key_or_404(admin, key_id)
    if {"budget", "budget_period", "budget_tz"} & changes.keys():
        check_budget_amount(
            changes.get("budget", current.budget),
            changes.get("budget_period", current.budget_period),
            changes.get("budget_tz", current.budget_tz),
        )
    if "team_id" in changes:
        await check_team(admin, changes["team_id"])
    key = await KeyStore(admin.db).update(key_id, changes)
    if key is None:
        raise NotFound("No such key.")
    log.info("admin: updated key %s (%s)", key.id, ", ".join(sorted(changes)))
    return await views.key_view(admin.db, key, time.time())


async def revoke_key(admin: Admin, request: web.Request) -> dict[str, Any]:
    key_id = path_id(request)
    store = KeyStore(admin.db)
    if not await store.revoke(key_id):
        raise NotFound("No such key.")
    log.info("admin: revoked key %s", key_id)
    return await views.key_view(admin.db, await key_or_404(admin, key_id), time.time())


async def list_teams(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    teams = await TeamStore(admin.db).all_teams()
    if not principal.has("viewer"):
        teams = [t for t in teams if t.id == principal.team_id]
    page, more, following = paginate(request, teams)
    now = time.time()
    return listing([await views.team_view(admin.db, t, now) for t in page], more, following)


async def get_team(admin: Admin, request: web.Request, principal: Principal) -> dict[str, Any]:
    team_id = path_id(request)
    if not (principal.has("viewer") or principal.team_id == team_id):
        raise NotFound("No such team.")
    return await views.team_view(admin.db, await team_or_404(admin, team_id), time.time())


async def create_team(admin: Admin, request: web.Request) -> dict[str, Any]:
    given = await read_json(request, TeamCreate, admin.config.server)
    check_budget_amount(given.budget, given.budget_period, given.budget_tz)
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
    team_id = path_id(request)
    changes = _changes(await read_json(request, TeamUpdate, admin.config.server))
    current = await team_or_404(admin, team_id)
    if {"budget", "budget_period", "budget_tz"} & changes.keys():
        check_budget_amount(
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
    team_id = path_id(request)
    try:
        deleted = await TeamStore(admin.db).delete(team_id)
    except TeamInUse as exc:
        raise BadRequest(f"{exc}: move or revoke them first.", code="team_in_use") from None
    if not deleted:
        raise NotFound("No such team.")
    log.info("admin: deleted team %s", team_id)
    return web.Response(status=204)
