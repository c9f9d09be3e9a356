"""stackctl upgrade (scripts/mlflowstack/upgrade.py) without Docker: every command goes to a
fake that records it and answers as a stack would (healthy or not, builds and starts that work
or fail). The in-stack sides are in test_upgradeagent.py."""

import argparse
import json
from pathlib import Path

import pytest
from mlflowstack import cli, upgrade
from mlflowstack.files import BundleError
from mlflowstack.upgrade import Context, Result

SERVICES = upgrade.SERVICES
GOOD = {"revision": "aaa111", "db_bytes": 1000, "artifact_bytes": 5000, "db_free": 10**9,
        "copies": []}  # fmt: skip


class FakeDocker:
    """``docker`` and ``docker compose`` as a healthy stack answers them; ``fail`` maps a
    compose or docker word ("build", "up", "tag", ...) to the Results it gives, one per call
    (the last one repeats); ``health`` and ``healthz`` say how healthy it looks."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.events: list[str] = []
        self.fail: dict[str, list[Result]] = {}
        self.health = dict.fromkeys(SERVICES, "healthy")
        self.healthz = [200]
        self.volumes = dict(GOOD)
        self.stopped_volumes = None  # what inspect sees with the server stopped
        self.put_back_revision = GOOD["revision"]

    def __call__(self, command: list[str]) -> Result:
        if command[0] == "env":  # commands.one_off_command: the server's image never built
            assert command[1] == "SERVER_PULL_POLICY=never"
            assert command[4] == "--project-directory" and command[6] == "run"
            command = command[2:]
        self.calls.append(command)
        compose = command[:2] == ["docker", "compose"]
        words = command[4:] if compose else command[1:]
        self.events.append(" ".join(words[:2]) if words[0] in ("tag", "ps") else words[0])
        if words[0] in self.fail:
            results = self.fail[words[0]]
            return results.pop(0) if len(results) > 1 else results[0]
        return self.answer(words) if compose else self.docker(words)

    def answer(self, words: list[str]) -> Result:
        if words[0] == "config":
            services = {s: {"image": f"proj-{s}"} for s in (*SERVICES, "init")}
            return Result(0, json.dumps({"name": "proj", "services": services}))
        if words[:2] == ["ps", "-q"]:
            return Result(0, f"cid-{words[2]}\n")
        if words[:2] == ["ps", "--format"]:
            lines = [
                json.dumps({"Service": s, "State": "running", "Health": h})
                for s, h in self.health.items()
            ]
            return Result(0, "\n".join(lines) + "\n")
        if words[0] == "port":
            return Result(0, "0.0.0.0:8080\n")
        if words[0] in ("exec", "run") and "-c" in words:
            if words[-2] == "put-back":
                self.events.append(f"put-back {words[-1]}")
                return Result(0, json.dumps({"revision": self.put_back_revision}) + "\n")
            stopped = words[0] == "run" and self.stopped_volumes is not None
            return Result(0, json.dumps(self.stopped_volumes if stopped else self.volumes))
        return Result(0)

    def docker(self, words: list[str]) -> Result:
        if words[0] == "inspect":
            return Result(0, f"sha256:old-{words[-1].removeprefix('cid-')}\n")
        return Result(0)

    def http_status(self, url: str) -> int:
        return self.healthz.pop(0) if len(self.healthz) > 1 else self.healthz[0]

    def compose_words(self, first: str) -> list[list[str]]:
        return [c[4:] for c in self.calls if c[:2] == ["docker", "compose"] and c[4] == first]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make_args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(project_dir=str(tmp_path), users_dir=None, output=None, backup_dir=None,
                  timeout=30, dry_run=False, quiet=True, json=False)  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def docker():
    return FakeDocker()


@pytest.fixture
def ctx(tmp_path, docker):
    clock = Clock()

    def take_backup(args, path: Path) -> None:
        docker.events.append("backup")
        path.write_bytes(b"archive")

    def load_database(args, path: Path) -> None:
        docker.events.append(f"load-database {path.name}")

    return Context(
        make_args(tmp_path),
        run=docker,
        http_status=docker.http_status,
        take_backup=take_backup,
        load_database=load_database,
        sleep=clock.sleep,
        clock=clock,
    )


def before(revision="aaa111", copies=()) -> upgrade.Before:
    return upgrade.Before(
        project="proj",
        images={s: f"proj-{s}" for s in SERVICES},
        image_ids={s: f"sha256:old-{s}" for s in SERVICES},
        healthz="http://127.0.0.1:8080/healthz",
        volumes={**GOOD, "revision": revision, "copies": list(copies)},
    )


# The steps


def test_stack_images_compose_config_names_each_service(ctx):
    assert upgrade.stack_images(ctx) == ("proj", {s: f"proj-{s}" for s in SERVICES})


def test_running_images_container_missing_refused(ctx, docker):
    docker.fail["ps"] = [Result(0, "")]
    with pytest.raises(BundleError, match="auth is not running"):
        upgrade.running_images(ctx)


def test_running_images_each_service_its_image_id(ctx):
    assert upgrade.running_images(ctx) == {s: f"sha256:old-{s}" for s in SERVICES}


@pytest.mark.parametrize(
    ("published", "url"),
    [("0.0.0.0:80", "http://127.0.0.1:80/healthz"),
     ("10.0.0.5:8080", "http://10.0.0.5:8080/healthz"),
     ("[::]:80", "http://127.0.0.1:80/healthz"),
     ("[::1]:80", "http://[::1]:80/healthz")],
)  # fmt: skip
def test_healthz_url_published_address_loopback_for_any(ctx, docker, published, url):
    docker.fail["port"] = [Result(0, published + "\n")]
    assert upgrade.healthz_url(ctx) == url


def test_unhealthy_all_healthy_none(ctx):
    assert upgrade.unhealthy(ctx, "http://x/healthz") is None


def test_unhealthy_service_starting_named(ctx, docker):
    docker.health["server"] = "starting"
    assert upgrade.unhealthy(ctx, "http://x/healthz") == "server is running, starting"


def test_unhealthy_healthz_not_200_named(ctx, docker):
    docker.healthz = [502]
    assert upgrade.unhealthy(ctx, "http://x/healthz") == "http://x/healthz answered 502"


def test_unhealthy_compose_array_output_parsed(ctx, docker):
    items = [{"Service": s, "State": "running", "Health": "healthy"} for s in SERVICES]
    docker.fail["ps"] = [Result(0, json.dumps(items) + "\n")]
    assert upgrade.unhealthy(ctx, "http://x/healthz") is None


def test_wait_healthy_healthy_later_returns(ctx, docker):
    docker.healthz = [0, 0, 200]
    upgrade.wait_healthy(ctx, "http://x/healthz", 30)
    assert ctx.clock() == 4


def test_wait_healthy_deadline_passed_raises_last_reason(ctx, docker):
    docker.health["nginx"] = "unhealthy"
    with pytest.raises(BundleError, match="not healthy after 10 s: nginx is running, unhealthy"):
        upgrade.wait_healthy(ctx, "http://x/healthz", 10)


def test_disk_problem_room_enough_none():
    assert upgrade.disk_problem(10**9, GOOD, 0) is None


def test_disk_problem_backup_dir_small_named():
    volumes = {**GOOD, "artifact_bytes": 2 << 30}
    assert "the backup needs about 2.1 GiB" in upgrade.disk_problem(1 << 30, volumes, 0)


def test_disk_problem_artifacts_in_earlier_archive_not_counted():
    volumes = {**GOOD, "artifact_bytes": 2 << 30}
    assert upgrade.disk_problem(1 << 30, volumes, previous_bytes=2 << 30) is None


def test_disk_problem_db_volume_small_named():
    volumes = {**GOOD, "db_bytes": 100 << 20, "db_free": 150 << 20}
    assert "database volume has 150.0 MiB free" in upgrade.disk_problem(10**12, volumes, 0)


def test_preflight_healthy_returns_way_back(ctx, tmp_path):
    found = upgrade.preflight(ctx, tmp_path / "backups" / "a.tar")
    assert found == before()


def test_preflight_unhealthy_refused_nothing_changed(ctx, docker, tmp_path):
    docker.health["auth"] = "unhealthy"
    with pytest.raises(BundleError, match=r"not healthy \(auth is running, unhealthy\)"):
        upgrade.preflight(ctx, tmp_path / "a.tar")
    assert not {"tag", "build", "up", "stop"} & {c[1] for c in docker.calls}


def test_preflight_no_room_refused(ctx, docker, tmp_path):
    docker.volumes["db_free"] = 10
    with pytest.raises(BundleError, match="not enough disk space: the database volume"):
        upgrade.preflight(ctx, tmp_path / "a.tar")


def test_keep_images_running_ids_tagged_pre_upgrade(ctx, docker):
    upgrade.keep_images(ctx, before())
    assert docker.calls == [
        ["docker", "tag", f"sha256:old-{s}", f"proj-{s}:pre-upgrade"] for s in SERVICES
    ]


def test_restore_images_pre_upgrade_names_back(ctx, docker):
    upgrade.restore_images(ctx, before())
    assert docker.calls == [
        ["docker", "tag", f"proj-{s}:pre-upgrade", f"proj-{s}"] for s in SERVICES
    ]


def test_restore_images_tag_fails_raises(ctx, docker):
    docker.fail["tag"] = [Result(1, stderr="Error: No such image: proj-auth:pre-upgrade\n")]
    with pytest.raises(BundleError, match="docker tag proj-auth failed: Error: No such image"):
        upgrade.restore_images(ctx, before())


def test_build_three_services_never_pulls(ctx, docker):
    upgrade.build(ctx)
    assert docker.compose_words("build") == [["build", *SERVICES]]


def test_build_fails_raises_last_line(ctx, docker):
    docker.fail["build"] = [Result(1, stderr="step 1\nERROR: pip failed\n")]
    with pytest.raises(BundleError, match="docker compose build failed: ERROR: pip failed"):
        upgrade.build(ctx)


def test_start_waits_without_building(ctx, docker):
    upgrade.start(ctx, 45)
    assert docker.compose_words("up") == [
        ["up", "-d", "--wait", "--wait-timeout", "45", "--no-build"]
    ]


def test_restore_database_revision_unchanged_kept(ctx, docker):
    assert upgrade.restore_database(ctx, before(), Path("b.tar")) == "database kept (not migrated)"
    assert "put-back" not in " ".join(docker.events) and "load-database" not in docker.events


def test_restore_database_migrated_newest_copy_of_this_upgrade_put_back(ctx, docker):
    old = "pre-upgrade-aaa111-20260101T000000Z.db"
    docker.stopped_volumes = {**GOOD, "revision": "bbb222", "copies": [
        old, "pre-upgrade-aaa111-20261128T120000Z.db", "pre-upgrade-aaa111-20261128T120500Z.db",
        "pre-upgrade-999999-20261128T120600Z.db"]}  # fmt: skip
    note = upgrade.restore_database(ctx, before(copies=[old]), Path("b.tar"))
    assert note == "database put back from pre-upgrade/pre-upgrade-aaa111-20261128T120500Z.db"
    assert docker.events[-1] == "put-back pre-upgrade-aaa111-20261128T120500Z.db"


def test_restore_database_migration_failed_revision_unchanged_copy_put_back(ctx, docker):
    copy = "pre-upgrade-aaa111-20261128T120000Z.db"
    docker.stopped_volumes = {**GOOD, "copies": [copy]}
    note = upgrade.restore_database(ctx, before(), Path("b.tar"))
    assert note == f"database put back from pre-upgrade/{copy}"


def test_restore_database_put_back_wrong_revision_raises(ctx, docker):
    docker.stopped_volumes = {**GOOD, "revision": "bbb222",
                              "copies": ["pre-upgrade-aaa111-20261128T120000Z.db"]}  # fmt: skip
    docker.put_back_revision = "bbb222"
    with pytest.raises(BundleError, match="put back is at bbb222, not aaa111"):
        upgrade.restore_database(ctx, before(), Path("b.tar"))


def test_restore_database_migrated_no_copy_archive_loaded(ctx, docker):
    docker.stopped_volumes = {**GOOD, "revision": "bbb222"}
    note = upgrade.restore_database(ctx, before(), Path("/x/b.tar"))
    assert note == "database restored from /x/b.tar" and docker.events[-1] == "load-database b.tar"


def test_backup_path_for_default_backups_of_bundle(tmp_path):
    now = upgrade.datetime.datetime(2026, 11, 28, 12, 0, 0)
    path = upgrade.backup_path_for(make_args(tmp_path), now)
    assert path == tmp_path / "backups" / "pre-upgrade-20261128T120000Z.tar"


def test_backup_path_for_output_directory_new_name_in_it(tmp_path):
    now = upgrade.datetime.datetime(2026, 11, 28, 12, 0, 0)
    path = upgrade.backup_path_for(make_args(tmp_path, output=str(tmp_path)), now)
    assert path == tmp_path / "pre-upgrade-20261128T120000Z.tar"
    assert upgrade.backup_path_for(make_args(tmp_path, output="/a/b.tar"), now) == Path("/a/b.tar")


# The whole command


def test_upgrade_healthy_order_preflight_tag_backup_build_start(ctx, docker, tmp_path, capsys):
    ctx.args.json = True
    assert upgrade.upgrade(ctx.args, ctx) == 0
    changes = [e for e in docker.events if e.split()[0] in ("tag", "backup", "build", "up")]
    assert changes == ["tag sha256:old-auth", "tag sha256:old-server", "tag sha256:old-nginx",
                       "backup", "build", "up"]  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["backup"].startswith(str(tmp_path / "backups" / "pre-upgrade-"))
    assert report["revision_before"] == report["revision_after"] == "aaa111"


def test_upgrade_dry_run_plan_printed_nothing_changed(ctx, docker, tmp_path, capsys):
    ctx.args.dry_run = True
    assert upgrade.upgrade(ctx.args, ctx) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. preflight") and "docker compose build auth server nginx" in out
    assert not {"tag", "build", "up", "stop"} & {c[1] for c in docker.calls}
    assert "backup" not in docker.events and not (tmp_path / "backups").exists()


def test_upgrade_existing_output_refused_before_anything(ctx, docker, tmp_path):
    (tmp_path / "b.tar").write_bytes(b"old")
    ctx.args.output = str(tmp_path / "b.tar")
    with pytest.raises(BundleError, match="exists, not replaced"):
        upgrade.upgrade(ctx.args, ctx)
    assert docker.calls == []


def test_upgrade_backup_fails_nothing_built(ctx, docker):
    def failing(args, path):
        raise BundleError("dump-server in the stack failed: disk full")

    ctx.take_backup = failing
    with pytest.raises(BundleError, match="backup failed, nothing changed: dump-server"):
        upgrade.upgrade(ctx.args, ctx)
    assert not {"build", "up"} & set(docker.events)


def test_upgrade_build_fails_images_back_server_left_running(ctx, docker):
    docker.fail["build"] = [Result(1, stderr="ERROR: failed to solve\n")]
    with pytest.raises(BundleError) as raised:
        upgrade.upgrade(ctx.args, ctx)
    assert str(raised.value).startswith(
        "upgrade failed at build (docker compose build failed: ERROR: failed to solve); "
        "rolled back: previous images restored; the stack is healthy (backup: "
    )
    assert "stop" not in docker.events and docker.events[-1] != "build"
    assert [c[2:] for c in docker.calls if c[1] == "tag"][-3:] == [
        [f"proj-{s}:pre-upgrade", f"proj-{s}"] for s in SERVICES
    ]


def test_upgrade_start_fails_rolled_back_database_kept(ctx, docker):
    docker.fail["up"] = [Result(1, stderr="container proj-server-1 is unhealthy\n"), Result(0)]
    with pytest.raises(BundleError, match=r"failed at start \(docker compose up failed: container "
                       r"proj-server-1 is unhealthy\); rolled back: previous images restored; "
                       r"database kept \(not migrated\); the stack is healthy"):  # fmt: skip
        upgrade.upgrade(ctx.args, ctx)
    tail = docker.events[docker.events.index("build") + 1 :]
    assert tail[:5] == ["up", "tag proj-auth:pre-upgrade", "tag proj-server:pre-upgrade",
                        "tag proj-nginx:pre-upgrade", "stop"]  # fmt: skip
    assert tail[5:7] == ["run", "up"]


def test_upgrade_health_fails_after_migration_copy_put_back(ctx, docker):
    # Healthy at the preflight, never after the start until the rollback's own start.
    docker.healthz = [200, *[502] * 17, 200]
    copy = "pre-upgrade-aaa111-20261128T120000Z.db"
    docker.stopped_volumes = {**GOOD, "revision": "bbb222", "copies": [copy]}
    with pytest.raises(
        BundleError, match=f"failed at health check .*put back from pre-upgrade/{copy}"
    ):
        upgrade.upgrade(ctx.args, ctx)
    assert f"put-back {copy}" in docker.events


def test_upgrade_rollback_fails_message_names_backup_and_tag(ctx, docker):
    docker.fail["up"] = [Result(1, stderr="unhealthy\n")]
    with pytest.raises(BundleError) as raised:
        upgrade.upgrade(ctx.args, ctx)
    message = str(raised.value)
    assert "and so did the rollback (docker compose up failed: unhealthy)" in message
    assert "tagged IMAGE:pre-upgrade, the backup is " in message and "pre-upgrade-" in message


def test_upgrade_interrupted_during_build_rolled_back(ctx, docker):
    def interrupted(command):
        if command[4:5] == ["build"]:
            raise KeyboardInterrupt
        return FakeDocker.__call__(docker, command)

    ctx.run = interrupted
    with pytest.raises(BundleError, match=r"failed at build \(interrupted\); rolled back"):
        upgrade.upgrade(ctx.args, ctx)


def test_cli_upgrade_failure_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        upgrade, "default_context", lambda args: Context(args, run=lambda c: Result(1, stderr="no"))
    )
    assert cli.main(["--project-dir", str(tmp_path), "upgrade"]) == 1
    err = capsys.readouterr().err
    assert err == "stackctl: docker compose config failed: no\n"


def test_server_healthcheck_start_period_outlasts_upgrade_timeout_slow_migration_stays_healthy():
    """A SQLite migration runs before the server's port opens; if the start period ended first,
    three failed checks would mark it unhealthy and `up --wait` would abort a working
    migration (and upgrade would roll it back). Upgrade's --timeout must be what decides."""
    import re

    dockerfile = (Path(__file__).resolve().parents[2] / "server" / "Dockerfile").read_text()
    start_period = int(re.search(r"HEALTHCHECK .*--start-period=(\d+)s", dockerfile)[1])
    default_timeout = cli.build_parser().parse_args(["upgrade"]).timeout
    assert start_period >= 2 * default_timeout


def test_plan_postgres_names_migrate_service_not_server_copy(tmp_path):
    """Newcomer review: the dry run promised a server-side copy that PostgreSQL never gets."""
    sqlite_plan = "\n".join(upgrade.plan(before(), tmp_path / "b.tar"))
    assert "the server migrates an older schema, after a copy" in sqlite_plan
    postgres = before()
    postgres.volumes["store"] = upgrade.pgstore.POSTGRES
    postgres_plan = "\n".join(upgrade.plan(postgres, tmp_path / "b.tar"))
    assert "the migrate service upgrades an older schema" in postgres_plan
    assert "after a copy" not in postgres_plan
