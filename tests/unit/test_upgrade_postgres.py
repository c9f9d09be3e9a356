"""stackctl upgrade with the bundled PostgreSQL (scripts/mlflowstack/upgrade.py), without Docker:
test_upgrade_command.py's fake stack, whose server agent reports the postgres store and whose
psql (in the postgres container) answers with the database's revision and size."""

import json
from pathlib import Path

import pytest
import test_upgrade_command
from mlflowstack import pgstore, upgrade
from mlflowstack.files import BundleError
from mlflowstack.upgrade import Result
from test_upgrade_command import GOOD, before

# test_upgrade_command.py's fake stack and context (fixtures), shared.
ctx, docker = test_upgrade_command.ctx, test_upgrade_command.docker
PG_VOLUMES = {**GOOD, "store": "postgresql", "revision": None, "db_bytes": 0}


@pytest.fixture
def pg(docker):
    """The fake stack with the postgres profile: ``pg["revision"]`` is what psql answers."""
    docker.volumes = dict(PG_VOLUMES)
    docker.stopped_volumes = dict(PG_VOLUMES)
    state = {"revision": "aaa111", "database_bytes": 300 << 20}
    answer = docker.answer

    def psql_or_agent(words):
        if words[:3] == ["exec", "-T", "postgres"]:
            assert words[3:] == [*pgstore.PSQL, "-At", "-c", pgstore.INSPECT_SQL]
            docker.events.append("psql")
            return Result(0, json.dumps(state) + "\n")
        return answer(words)

    docker.answer = psql_or_agent
    return state


def test_disk_problem_postgres_dump_twice_on_host_no_volume_copy():
    volumes = {**PG_VOLUMES, "db_bytes": 100 << 20, "db_free": 0, "artifact_bytes": 0}
    assert upgrade.disk_problem(300 << 20, volumes, 0) is None
    assert "needs about 264.0 MiB" in upgrade.disk_problem(250 << 20, volumes, 0)


def test_preflight_postgres_revision_and_size_from_psql(ctx, pg, tmp_path):
    found = upgrade.preflight(ctx, tmp_path / "a.tar")
    assert (found.volumes["revision"], found.volumes["db_bytes"]) == ("aaa111", 300 << 20)
    assert found.volumes["store"] == "postgresql"


def test_preflight_external_database_refused_nothing_changed(ctx, docker, tmp_path):
    docker.volumes["store"] = "external"
    with pytest.raises(BundleError, match="external database"):
        upgrade.preflight(ctx, tmp_path / "a.tar")
    assert not {"tag", "build", "up", "stop"} & {c[4] for c in docker.calls if len(c) > 4}


def test_restore_database_postgres_revision_unchanged_kept(ctx, docker, pg):
    was = before()
    was.volumes = {**PG_VOLUMES, "revision": "aaa111"}
    assert upgrade.restore_database(ctx, was, Path("b.tar")) == "database kept (not migrated)"
    assert "load-database b.tar" not in docker.events


def test_restore_database_postgres_migrated_archive_dump_loaded(ctx, docker, pg):
    # A SQLite copy of this revision from before the switch to PostgreSQL is not the database.
    docker.stopped_volumes["copies"] = ["pre-upgrade-aaa111-20261128T120000Z.db"]
    pg["revision"] = "bbb222"
    was = before()
    was.volumes = {**PG_VOLUMES, "revision": "aaa111"}
    note = upgrade.restore_database(ctx, was, Path("/x/b.tar"))
    assert note == "database restored from /x/b.tar" and docker.events[-1] == "load-database b.tar"
    assert not any(event.startswith("put-back") for event in docker.events)


def test_upgrade_postgres_health_fails_after_migration_dump_loaded(ctx, docker, pg):
    docker.healthz = [200, *[502] * 17, 200]
    revisions = iter(["aaa111", "bbb222", "aaa111"])
    docker.answer = _answers_revisions(docker.answer, pg, revisions)
    with pytest.raises(BundleError, match="failed at health check .*database restored from"):
        upgrade.upgrade(ctx.args, ctx)
    assert any(event.startswith("load-database pre-upgrade-") for event in docker.events)


def _answers_revisions(answer, state, revisions):
    def psql(words):
        if words[:3] == ["exec", "-T", "postgres"]:
            state["revision"] = next(revisions, state["revision"])
        return answer(words)

    return psql
