"""Teams (store and command line, on SQLite and PostgreSQL) and roles (identity.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from proxy.cli import main
from proxy.config import schema as cfg
from proxy.db import Db
from proxy.errors import Forbidden, Unauthorized
from proxy.governance.identity import Authenticator, Principal, of_key, require
from proxy.governance.keys.lookup import KeyLookup
from proxy.governance.keys.record import MASTER, Key
from proxy.governance.keys.store import KeyStore
from proxy.governance.keys.teams import TeamInUse, TeamStore
from tests.support.keys import config_file_for, declare
from tests.support.leaks import SECRETS


async def test_team_store_and_keys_of_a_team(db: Db) -> None:
    teams, keys = TeamStore(db), KeyStore(db)
    team = await teams.create(
        "search", team_id="search", rpm=60, tpm=1000, max_parallel=2, models=["a"],
        budget=Decimal("12.5"), budget_period="daily", metadata={"cost_centre": "7"},
    )  # fmt: skip
    got = await teams.get("search")
    assert got is not None
    assert got.created_at == pytest.approx(team.created_at, abs=0.001)
    assert (got.rpm, got.tpm, got.max_parallel, got.models) == (60, 1000, 2, frozenset("a"))
    assert (got.budget, got.budget_period) == (Decimal("12.5"), "daily")
    assert got.metadata == team.metadata
    assert [got.allows("a"), got.allows("b")] == [True, False]
    key, value = await keys.create("app", team_id="search", role="viewer")
    SECRETS.add(value)
    assert [k.id for k in await keys.keys_of("search")] == [key.id]
    found = await keys.get(key.id)
    assert found is not None
    assert (found.team_id, found.role) == ("search", "viewer")
    updated = await teams.update("search", {"rpm": None, "models": []})
    assert updated is not None
    assert (updated.rpm, updated.models) == (None, frozenset())
    with pytest.raises(TeamInUse):
        await teams.delete("search")
    await keys.update(key.id, {"team_id": None})
    assert await teams.delete("search")
    assert not await teams.delete("search")
    assert await teams.get("search") is None
    made = await teams.create("no id given")
    assert made.id.startswith("team_")
    assert [t.id for t in await teams.all_teams()] == [made.id]
    with pytest.raises(ValueError, match="team id"):
        await teams.create("bad", team_id="has {braces}")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_teams_command_line(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        database = f"{{url: '{request.getfixturevalue('migrated_pg')}'}}"
    else:
        database = f"{{sqlite_path: '{tmp_path / 'k.db'}'}}"
    conf = ["--config", config_file_for(tmp_path, database)]

    assert main(["teams", "create", "--name", "Search", "--id", "search", "--rpm", "100",
                 "--models", "a,b", "--budget", "5", *conf]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == "search"
    assert main(["teams", "create", "--name", "again", "--id", "search", *conf]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "k", "--team", "nope", *conf]) == 1
    assert "no team nope" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "k", "--team", "search", "--role", "viewer",
                 *conf]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    SECRETS.add(out.strip())
    key_id = err.split()[1]
    assert main(["keys", "show", key_id, *conf]) == 0
    shown = capsys.readouterr().out
    assert "search" in shown
    assert "viewer" in shown

    assert main(["teams", "list", *conf]) == 0
    listing = capsys.readouterr().out
    for shown_cell in ("Search", "a,b", "5.00/monthly"):
        assert shown_cell in listing
    assert main(["teams", "show", "search", "--json", *conf]) == 0
    shown_json = orjson.loads(capsys.readouterr().out)
    assert shown_json["keys"] == [key_id]
    assert shown_json["rpm"] == 100
    assert Decimal(str(shown_json["spent"])) == 0
    assert main(["teams", "update", "search", "--rpm", "0", "--tpm", "500", *conf]) == 0
    capsys.readouterr()
    assert main(["teams", "list", "--json", *conf]) == 0
    [row] = orjson.loads(capsys.readouterr().out)
    assert (row["rpm"], row["tpm"]) == (None, 500)

    assert main(["teams", "delete", "search", *conf]) == 1
    assert "still has 1 key" in capsys.readouterr().err
    assert main(["keys", "update", key_id, "--team", "", *conf]) == 0
    assert main(["teams", "delete", "search", *conf]) == 0
    assert main(["teams", "show", "search", *conf]) == 1
    assert "no team search" in capsys.readouterr().err


# --- Roles ----------------------------------------------------------------------------


def test_principals_of_keys_and_roles() -> None:
    assert of_key(MASTER) == Principal(role="admin", source="master", name="master key")
    member = of_key(Key(id="key_1", name="k", team_id="t", metadata={"user": "ann"}))
    assert (member.role, member.source, member.key_id, member.team_id, member.user_id) == (
        "member", "key", "key_1", "t", "ann",
    )  # fmt: skip
    assert member.owns(Key(id="key_1", name="k"))
    assert member.owns(Key(id="key_2", name="k", metadata={"owner": "ann"}))
    assert not member.owns(Key(id="key_3", name="k", metadata={"owner": "bob"}))
    viewer = Principal(role="viewer", source="jwt", user_id="v")
    assert [viewer.has(r) for r in ("member", "viewer", "admin")] == [True, True, False]
    require(viewer, "viewer")
    with pytest.raises(Forbidden) as refused:
        require(member, "viewer")
    assert refused.value.code == "insufficient_role"
    assert refused.value.status == 403


async def test_authenticator_turns_credentials_into_principals() -> None:
    value, declared = declare(role="viewer", team_id="t1")
    lookup = KeyLookup(None, cfg.Auth(), [declared])
    auth = Authenticator(lookup, ops_token="ops-" + "x" * 40)
    ops = await auth.authenticate({"Authorization": "Bearer ops-" + "x" * 40})
    assert (ops.role, ops.source) == ("admin", "ops_token")
    by_key = await auth.authenticate({"Authorization": f"Bearer {value}"})
    assert (by_key.role, by_key.source, by_key.team_id) == ("viewer", "key", "t1")
    assert (await auth.authenticate({"api-key": value})).key_id == declared.id
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        with pytest.raises(Unauthorized):
            await auth.authenticate(headers)
    with pytest.raises(Unauthorized):
        await Authenticator(None).authenticate({"Authorization": "Bearer anything"})
