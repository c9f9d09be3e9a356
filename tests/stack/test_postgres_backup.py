"""stackctl backup, restore and upgrade with the bundled PostgreSQL (scripts/mlflowstack/
pgstore.py), on two stacks with the postgres profile (test_postgres.PostgresStack: the session's
images and a PostgreSQL image built under each project name).

The real MLflow client writes experiments, runs, params, a metric history, tags, a registered
model with versions, an alias and artifacts on the first stack; a backup is taken while a
client keeps logging, and restored onto the second, fresh stack, which must then hold the same
data through the client (the live run's history a prefix), every table the manifest's row
count, and let the same users log in. A corrupted archive, and a SQLite archive, are refused
first and change nothing there. Last, ``stackctl upgrade`` of an unchanged tree on the restored
stack succeeds and keeps the data. The stacks are shared by the module's tests (in this order).
"""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import PROJECT, ROOT
from mlflowstack import pgstore
from test_backup_restore import client_as, compose_env, everything, host_stackctl
from test_postgres import PASSWORD_FILE, PostgresStack

USER, PASSWORD = "pgbk-carol", "pgbk-carol-Secret-8x9y"
EXPERIMENT, MODEL = "pgbk-exp", "pgbk-model"


def counts(pg: PostgresStack) -> dict[str, int]:
    """The rows of every table, as the manifest counts them."""
    return json.loads(pg.psql(pgstore.COUNTS_SQL)[0])


def manifest_of(path: Path) -> dict:
    with tarfile.open(path) as archive:
        return json.loads(archive.extractfile("manifest.json").read())


def restarted_services(pg: PostgresStack) -> dict[str, str]:
    """Each service's container start time (unchanged: nothing was stopped or restarted)."""
    return {
        service: pg.inspect(service)["State"]["StartedAt"]
        for service in ("nginx", "auth", "server", "postgres")
    }


@pytest.fixture(scope="module")
def source(stack):
    with PostgresStack("pg-src") as pg:
        yield pg


@pytest.fixture(scope="module")
def target(stack):
    with PostgresStack("pg-dst") as pg:
        yield pg


@pytest.fixture(scope="module")
def backup_made_while_writing(source, tmp_path_factory):
    """Data of every kind on the source stack, then a backup taken while a client logs a
    metric as fast as it can. Returns (archive, report, the writer's run id, steps logged)."""
    where = tmp_path_factory.mktemp("pgbackup")
    user, password = source.admin()
    subprocess.run(
        ["python3", str(ROOT / "scripts" / "stackctl"), "user", "add", USER, "--role", "editor",
         "--password-stdin"],
        input=PASSWORD + "\n", env=source.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    with client_as(source.url, user, password) as client:
        experiment = client.create_experiment(EXPERIMENT, tags={"team": "tabular"})
        run = client.create_run(experiment, run_name="pgbk-train", tags={"stage": "test"})
        run_id = run.info.run_id
        client.log_param(run_id, "depth", "3")
        client.log_param(run_id, "note", "a\\.b\nc\td'e")  # COPY's escapes, in a value
        for step in range(50):
            client.log_metric(run_id, "loss", 1 / (step + 1), step=step)
        (where / "small.txt").write_text("kept\n")
        (where / "weights.bin").write_bytes(os.urandom(2 << 20))
        client.log_artifact(run_id, str(where / "small.txt"))
        client.log_artifact(run_id, str(where / "weights.bin"), "model")
        client.set_terminated(run_id)
        client.create_registered_model(MODEL, tags={"owner": "pgbk"})
        for _ in range(2):
            client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id)
        client.set_registered_model_alias(MODEL, "champion", "2")
        client.set_model_version_tag(MODEL, "2", "validated", "true")
        writer = client.create_run(experiment, run_name="pgbk-writer").info.run_id

        steps, stop, errors = [], threading.Event(), []

        def write():
            try:
                while not stop.is_set():
                    client.log_metric(writer, "live", float(len(steps)), step=len(steps))
                    steps.append(time.monotonic())
            except Exception as error:  # reported by the test
                errors.append(error)

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(1)
        started = time.monotonic()
        result = host_stackctl(source.env, "backup", "--output", str(where / "b.tar"), "--json")
        ended = time.monotonic()
        time.sleep(1)
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert not errors, errors
    assert any(started < t < ended for t in steps), (started, ended, steps[-3:])
    report = json.loads(result.stdout)
    print(f"\npgbackup: backup {report['seconds']} s, {report['bytes']} bytes")
    return Path(report["archive"]), report, writer, len(steps)


def test_backup_archive_holds_dump_counts_and_version_not_the_password(
    backup_made_while_writing, source
):
    path, report, _, _ = backup_made_while_writing
    assert path.stat().st_mode & 0o777 == 0o600
    manifest = manifest_of(path)
    database = manifest["database"]
    assert (database["kind"], database["member"], database["format"]) == (
        "postgresql", "db/mlflow.sql", "plain")  # fmt: skip
    assert database["postgres_major"] == 17 and report["database"] == "postgresql"
    # Tables nobody wrote since hold as many rows now; the live run's metrics grew after.
    now = counts(source)
    assert set(database["row_counts"]) == set(now)
    for table in ("experiments", "registered_models", "model_versions", "params"):
        assert database["row_counts"][table] == now[table], table
    assert 0 < database["row_counts"]["metrics"] < now["metrics"]
    rows = database["row_counts"]
    print(f"\npgbackup: dump {database['size']} bytes, {sum(rows.values())} rows in {len(rows)} "
          f"tables, {rows['metrics']} metric rows")  # fmt: skip
    with tarfile.open(path) as archive:
        names = archive.getnames()
        data = b"".join(archive.extractfile(m).read() for m in archive.getmembers())
    assert "db/mlflow.db" not in names and not any("postgres" in name for name in names)
    password = source.compose("exec", "-T", "postgres", "cat", PASSWORD_FILE).strip()
    assert password.encode() not in data


def test_restore_corrupted_archive_refused_target_unchanged(
    backup_made_while_writing, target, tmp_path
):
    path, _, _, _ = backup_made_while_writing
    data = bytearray(path.read_bytes())
    where = data.find(b"pgbk-train")  # a run's name, inside the dump's COPY data
    data[where] ^= 0x20
    corrupted = tmp_path / "corrupted.tar"
    corrupted.write_bytes(bytes(data))
    before = (restarted_services(target), counts(target))
    result = host_stackctl(target.env, "restore", str(corrupted))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "checksum differs" in result.stderr, result.stderr
    assert (restarted_services(target), counts(target)) == before


def test_restore_sqlite_archive_onto_postgres_refused(stack, target, tmp_path):
    result = host_stackctl(compose_env(PROJECT), "backup", "--output", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    archive = json.loads(result.stdout)["archive"]
    before = counts(target)
    refused = host_stackctl(target.env, "restore", archive)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "holds a SQLite database" in refused.stderr
    assert "stackctl migrate-to-postgres" in refused.stderr
    assert counts(target) == before


MARKER = "/var/lib/postgresql/data/stackctl-restore-ran-a-shell"


# What two attacker reviews hid from the dump's reader in a dollar-quoted string it took for a
# COPY block: ``\\unrestrict`` with the dump's own key, then ``\\!``; and a backtick in
# ``\\unrestrict``'s argument, which psql runs before it compares the key.
PAYLOADS = {
    "dump's key": (
        b"SELECT $x$\nCOPY public.t (a) FROM stdin;\n$x$; \\unrestrict KEY\n"
        b"\\! id > MARKER\n\\restrict KEY\nSELECT $y$\n\\.\n$y$;\n"
    ),
    "backtick": (
        b"SELECT $x$\nCOPY public.t (a) FROM stdin;\n$x$;\nSELECT 1 \\unrestrict `id > MARKER`\n"
        b"SELECT $y$\n\\.\n$y$;\n"
    ),
}


def _crafted(path: Path, out: Path, payload: bytes) -> Path:
    """``path`` with ``payload`` in its dump (KEY: the dump's own), the manifest's size, sha256
    and row counts made to match, as an attacker would."""
    with tarfile.open(path) as source:
        members = {m.name: source.extractfile(m).read() for m in source if m.isreg()}
    manifest = json.loads(members["manifest.json"])
    dump = members[pgstore.DUMP_MEMBER]
    key = dump.split(b"\\restrict ", 1)[1].split(b"\n", 1)[0]
    payload = payload.replace(b"KEY", key).replace(b"MARKER", MARKER.encode())
    end = dump.index(b"--\n-- PostgreSQL database dump complete")
    dump = dump[:end] + payload + dump[end:]
    members[pgstore.DUMP_MEMBER] = dump
    database = manifest["database"]
    database["size"], database["sha256"] = len(dump), hashlib.sha256(dump).hexdigest()
    database["row_counts"]["t"] = 4
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(out, "w") as crafted:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            crafted.addfile(info, io.BytesIO(data))
    out.chmod(0o600)
    return out


def _marker_written(target: PostgresStack) -> bool:
    listing = target.compose("exec", "-T", "postgres", "ls", "/var/lib/postgresql/data")
    return Path(MARKER).name in listing.split()


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_restore_crafted_dump_refused_no_shell_target_unchanged(
    backup_made_while_writing, target, tmp_path, payload
):
    """From the far side: whatever an archive holds, psql in the postgres container runs no
    command of it (a shell there is the cluster's superuser, over the local socket)."""
    path, _, _, _ = backup_made_while_writing
    crafted = _crafted(path, tmp_path / "crafted.tar", payload)
    before = counts(target)
    result = host_stackctl(target.env, "restore", "--force", str(crafted))
    assert result.returncode == 1 and "does not write" in result.stderr, result.stderr
    assert not _marker_written(target)
    assert counts(target) == before


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_load_psql_runs_no_command_of_a_dump_past_the_reader(
    backup_made_while_writing, target, payload
):
    """The layer under the reader, should a dump ever get past it: the restore's psql itself
    (restricted under stackctl's own key, and unable to start a process), fed what load()
    sends with the payload in the dump, runs no command and commits nothing."""
    path, _, _, _ = backup_made_while_writing
    with tarfile.open(path) as archive:
        dump = archive.extractfile(pgstore.DUMP_MEMBER).read()
    key = dump.split(b"\\restrict ", 1)[1].split(b"\n", 1)[0]
    end = dump.index(b"--\n-- PostgreSQL database dump complete")
    dump = (
        dump[:end] + payload.replace(b"KEY", key).replace(b"MARKER", MARKER.encode()) + dump[end:]
    )
    lines = pgstore._WithoutBrackets()
    sent = (
        pgstore.own_restrict_line() + pgstore.RESTORE_BEGIN + lines.feed(dump) + lines.end()
        + pgstore.RESET_SETTINGS + b"COMMIT;\n"
    )  # fmt: skip
    before = counts(target)
    psql = [
        *target.command,
        "exec",
        "-T",
        "postgres",
        *pgstore.PSQL_NO_PROCESSES,
        "-o",
        "/dev/null",
    ]
    result = subprocess.run(psql, input=sent, env=target.env, capture_output=True, check=False)
    assert result.returncode != 0, result.stderr[-500:]
    assert not _marker_written(target), result.stderr[-500:]
    assert counts(target) == before


def test_restore_onto_fresh_postgres_stack_same_data_same_logins(
    backup_made_while_writing, source, target, tmp_path
):
    path, _, writer, logged = backup_made_while_writing
    result = host_stackctl(target.env, "restore", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    print(f"\npgbackup: restore {report['seconds']} s")
    assert report["database"] == "postgresql"
    assert counts(target) == manifest_of(path)["database"]["row_counts"]

    admin = source.admin()
    with client_as(source.url, *admin) as client:
        kept = everything(client, tmp_path / "source", EXPERIMENT)
    with client_as(target.url, *admin) as client:
        restored = everything(client, tmp_path / "restored", EXPERIMENT)
    live_source = kept["runs"][writer].pop("metrics")["live"]
    live_restored = restored["runs"][writer].pop("metrics")["live"]
    assert 0 < len(live_restored) < logged and live_restored == live_source[: len(live_restored)]
    assert restored == kept
    assert restored["models"][MODEL]["aliases"] == {"champion": "2"}
    assert any(run["artifacts"] for run in restored["runs"].values())
    assert {run["params"].get("note") for run in restored["runs"].values()} >= {"a\\.b\nc\td'e"}

    url = target.url + "/api/2.0/mlflow/experiments/search"
    for user, password in ((USER, PASSWORD), admin):
        answer = requests.get(url, auth=(user, password), params={"max_results": 1})
        assert answer.status_code == 200, user
    # The target keeps its own database password: its server reconnected with it.
    assert target.psql("SELECT count(*) > 0 FROM pg_stat_activity WHERE usename = 'mlflow' "
                       "AND client_addr IS NOT NULL") == ["t"]  # fmt: skip


def test_upgrade_unchanged_tree_postgres_succeeds_data_kept(target, tmp_path):
    revision = target.psql("SELECT version_num FROM alembic_version")
    before = counts(target)
    result = host_stackctl(
        target.env, "upgrade", "--backup-dir", str(tmp_path), "--timeout", "300", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["revision_before"] == report["revision_after"] == revision[0]
    manifest = manifest_of(Path(report["backup"]))
    assert manifest["database"]["kind"] == "postgresql"
    assert manifest["database"]["row_counts"] == before
    assert counts(target) == before
    # The restored users: the archive's admin (its password file came along).
    with client_as(target.url, *target.admin()) as client:
        assert client.get_experiment_by_name(EXPERIMENT) is not None
        assert client.get_model_version_by_alias(MODEL, "champion").version == "2"


def test_load_psql_starts_no_process_even_unrestricted(target):
    """The process limit alone, shown on a backtick psql runs when nothing restricts it: the
    same line through plain psql writes MARKER (so the check can fail), through the restore's
    psql it cannot."""
    line = b"\\set x `id > " + MARKER.encode() + b"`\nSELECT 1;\n"
    base = [*target.command, "exec", "-T", "postgres"]
    plain = subprocess.run([*base, *pgstore.PSQL], input=line, env=target.env,
                           capture_output=True, check=False)  # fmt: skip
    assert _marker_written(target), plain.stderr[-300:]
    target.compose("exec", "-T", "postgres", "rm", MARKER)
    limited = subprocess.run([*base, *pgstore.PSQL_NO_PROCESSES], input=line, env=target.env,
                             capture_output=True, check=False)  # fmt: skip
    assert not _marker_written(target), limited.stderr[-300:]
