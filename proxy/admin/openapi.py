"""The admin API's contract as an OpenAPI 3.1 document (``GET /admin/v1/openapi.json``).
The tests validate the document and check every answer the API gives against it."""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_MONEY = {"type": "string", "pattern": r"^-?\d+(\.\d+)?$", "description": "exact decimal amount"}


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
        "additionalProperties": False,
    }


def _list_of(item: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": item},
            "has_more": _BOOL,
            "next_offset": _null(_INT),
            **(extra or {}),
        }
    )


_LIMIT = _null({"type": "integer", "minimum": 1, "maximum": 1_000_000_000})
_PERIOD = {"enum": ["daily", "weekly", "monthly", "total"]}
_SPEND = _object({"period_start": _NUM, "period_end": _null(_NUM), "spent": _MONEY, "left": _MONEY})
_KEY_FIELDS = {
    "object": {"const": "key"},
    "id": _STR,
    "name": _STR,
    "prefix": _STR,
    "status": {"enum": ["active", "revoked", "expired"]},
    "rpm": _LIMIT,
    "tpm": _LIMIT,
    "max_parallel": _LIMIT,
    "models": {"type": "array", "items": _STR},
    "expires_at": _null(_NUM),
    "created_at": _NUM,
    "metadata": {"type": "object"},
    "budget": _null(_MONEY),
    "budget_period": _PERIOD,
    "budget_tz": _STR,
    "spend": _null(_ref("Spend")),
    "team_id": _null(_STR),
    "role": {"enum": ["admin", "viewer", "member"]},
}
_TEAM_FIELDS = {
    "object": {"const": "team"},
    **{k: _KEY_FIELDS[k] for k in ("id", "name", "rpm", "tpm", "max_parallel", "models")},
    **{k: _KEY_FIELDS[k] for k in ("created_at", "metadata", "budget", "budget_period")},
    **{k: _KEY_FIELDS[k] for k in ("budget_tz", "spend")},
}
_KEY_INPUT = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "rpm": _LIMIT,
    "tpm": _LIMIT,
    "max_parallel": _LIMIT,
    "models": {"type": "array", "items": _STR, "description": "empty: every model"},
    "expires_at": _null(_NUM),
    "metadata": {"type": "object", "additionalProperties": _STR},
    "budget": _null({"oneOf": [_MONEY, _NUM]}),
    "budget_period": _PERIOD,
    "budget_tz": _STR,
}
_TEAM_INPUT = {k: v for k, v in _KEY_INPUT.items() if k != "expires_at"}
_KEY_INPUT = {
    **_KEY_INPUT,
    "team_id": _null(_STR),
    "role": {"enum": ["admin", "viewer", "member"], "description": "default member"},
}
_HISTOGRAM = _object(
    {"bounds_ms": {"type": "array", "items": _NUM}, "counts": {"type": "array", "items": _NUM}}
)
_DEPLOYMENT = _object(
    {
        "name": _STR,
        "kind": _STR,
        "weight": _NUM,
        "inflight": _INT,
        "max_concurrent": _null(_INT),
        "rpm": _null(_INT),
        "healthy": _BOOL,
        "cooldown_remaining": _NUM,
        "throttled_remaining": {**_NUM, "description": "seconds a 429 still steers traffic away"},
        "latency_ms": _NUM,
        "consecutive_failures": _INT,
    },
    {"base_url": {"type": "string", "description": "admins only"}},
)
_USAGE_ROW = _object(
    {
        "period_start": _INT,
        "group": _STR,
        "requests": _INT,
        "prompt_tokens": _INT,
        "completion_tokens": _INT,
        "cost": _MONEY,
        "errors": _INT,
        "p50_ms": _NUM,
        "p95_ms": _NUM,
        "ttft_p50_ms": _NUM,
    }
)
_BUDGET_ROW = _object(
    {
        "key_id": _STR,
        "name": _STR,
        "budget": _MONEY,
        "budget_period": _PERIOD,
        "budget_tz": _STR,
        "period_start": _NUM,
        "period_end": _null(_NUM),
        "spent": _MONEY,
        "left": _MONEY,
    }
)

SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "message": _STR,
                    "type": _STR,
                    "param": _null(_STR),
                    "code": _null(_STR),
                }
            )
        }
    ),
    "Principal": _object(
        {
            "object": {"const": "principal"},
            "role": {"enum": ["admin", "viewer", "member"]},
            "source": {"enum": ["master", "ops_token", "key", "jwt", "session"]},
            "name": _STR,
            "key_id": _null(_STR),
            "team_id": _null(_STR),
            "user_id": _null(_STR),
        }
    ),
    "Spend": _SPEND,
    "Key": _object(_KEY_FIELDS),
    "CreatedKey": _object(
        {**_KEY_FIELDS, "secret": {"type": "string", "description": "shown this once"}}
    ),
    "KeyList": _list_of(_ref("Key")),
    "KeyCreate": {**_object({"name": _KEY_INPUT["name"]}, _KEY_INPUT)},
    "KeyUpdate": {**_object({}, _KEY_INPUT), "minProperties": 1},
    "Team": _object(_TEAM_FIELDS),
    "TeamList": _list_of(_ref("Team")),
    "TeamCreate": _object(
        {"name": _TEAM_INPUT["name"]},
        {**_TEAM_INPUT, "id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}},
    ),
    "TeamUpdate": {**_object({}, _TEAM_INPUT), "minProperties": 1},
    "Login": _object({"credential": _STR}),
    "LoginOptions": _object(
        {
            "object": {"const": "login_options"},
            "oidc": {"type": "boolean", "description": "single sign-on at /console/login"},
        }
    ),
    "Usage": _list_of(
        _USAGE_ROW,
        {
            "group_by": {"enum": ["key", "team", "model", "deployment", "outcome"]},
            "granularity": {"enum": ["hour", "day"]},
            "start": _NUM,
            "end": _NUM,
        },
    ),
    "Budgets": _list_of(_BUDGET_ROW),
    "Deployments": _object(
        {
            "object": {"const": "deployments"},
            "models": {
                "type": "array",
                "items": _object(
                    {
                        "name": _STR,
                        "fallbacks": {"type": "array", "items": _STR},
                        "panic": {
                            **_BOOL,
                            "description": "too few deployments healthy: routing across all",
                        },
                        "deployments": {"type": "array", "items": _DEPLOYMENT},
                    }
                ),
            },
        }
    ),
    "Overview": _object(
        {
            "object": {"const": "overview"},
            "at": _NUM,
            "requests": _INT,
            "errors": _INT,
            "prompt_tokens": _INT,
            "completion_tokens": _INT,
            "cost": _NUM,
            "inflight": _INT,
            "duration": _HISTOGRAM,
            "ttft": _HISTOGRAM,
            "spend_today": _null(_MONEY),
        }
    ),
}


def _query(name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}


_PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size (100)"),
    _query("offset", {"type": "integer", "minimum": 0}, "items to skip"),
]
_ID = [{"name": "id", "in": "path", "required": True, "schema": _STR}]


def _answer(name: str | None, text: str) -> dict[str, Any]:
    if name is None:
        return {"description": text}
    return {"description": text, "content": {"application/json": {"schema": _ref(name)}}}


def _op(
    summary: str,
    role: str,
    ok: tuple[int, str | None],
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    responses = {str(ok[0]): _answer(ok[1], "success")}
    for status, text in (
        ("400", "bad request"),
        ("401", "no or wrong credential"),
        ("403", "role too low"),
        ("404", "no such thing"),
        ("503", "database unavailable"),
    ):
        responses[status] = _answer("Error", text)
    op: dict[str, Any] = {
        "summary": summary,
        "description": f"Role: {role} or above.",
        "responses": responses,
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if params:
        op["parameters"] = params
    return op


_USAGE_PARAMS = [
    _query(
        "group_by", {"enum": ["key", "team", "model", "deployment", "outcome"]}, "default model"
    ),
    _query("granularity", {"enum": ["hour", "day"]}, "default hour"),
    _query("start", _NUM, "Unix seconds (default: end - 1 day)"),
    _query("end", _NUM, "Unix seconds (default: now)"),
    _query("key_id", _STR, "only this key"),
    _query("team_id", _STR, "only this team's keys"),
    _query("model", _STR, "only this model"),
    _query("deployment", _STR, "only this deployment"),
    *_PAGE,
]

PATHS: dict[str, Any] = {
    "/admin/v1/session": {
        "get": {
            "summary": "How one may log in",
            "security": [],
            "responses": {"200": _answer("LoginOptions", "success")},
        },
        "post": _op(
            "Log in: a console session cookie for a credential",
            "none",
            (200, "Principal"),
            body="Login",
        ),
        "delete": {"summary": "Log out", "responses": {"204": {"description": "logged out"}}},
    },
    "/admin/v1/me": {"get": _op("Who is calling", "member", (200, "Principal"))},
    "/admin/v1/keys": {
        "get": _op(
            "List keys (a member: their own)",
            "member",
            (200, "KeyList"),
            params=[*_PAGE, _query("team_id", _STR, "only this team's keys")],
        ),
        "post": _op(
            "Create a key; the answer holds the key itself, this once",
            "admin",
            (201, "CreatedKey"),
            body="KeyCreate",
        ),
    },
    "/admin/v1/keys/{id}": {
        "get": _op("One key, with its spend", "member", (200, "Key"), params=_ID),
        "patch": _op(
            "Change a key's limits, models or budget",
            "admin",
            (200, "Key"),
            body="KeyUpdate",
            params=_ID,
        ),
        "delete": _op("Revoke a key", "admin", (200, "Key"), params=_ID),
    },
    "/admin/v1/teams": {
        "get": _op("List teams (a member: their own)", "member", (200, "TeamList"), params=_PAGE),
        "post": _op("Create a team", "admin", (201, "Team"), body="TeamCreate"),
    },
    "/admin/v1/teams/{id}": {
        "get": _op("One team, with its spend", "member", (200, "Team"), params=_ID),
        "patch": _op(
            "Change a team's limits, models or budget",
            "admin",
            (200, "Team"),
            body="TeamUpdate",
            params=_ID,
        ),
        "delete": _op("Delete a team that has no keys", "admin", (204, None), params=_ID),
    },
    "/admin/v1/usage": {
        "get": _op(
            "Usage and spend per hour or day, by key, model, deployment or outcome",
            "member (own key only)",
            (200, "Usage"),
            params=_USAGE_PARAMS,
        )
    },
    "/admin/v1/budgets": {
        "get": _op("Budgeted keys: period, spent, left", "member", (200, "Budgets"), params=_PAGE)
    },
    "/admin/v1/deployments": {
        "get": _op(
            "Deployments: health, in flight, latency, cooldown", "viewer", (200, "Deployments")
        )
    },
    "/admin/v1/overview": {
        "get": _op(
            "Live counters across all workers, and today's spend", "viewer", (200, "Overview")
        )
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document of the admin API."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "mornGPT proxy admin API", "version": "1"},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "morngpt_console"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": PATHS,
    }
