"""postgres/pg_hba.conf, read as PostgreSQL reads it (no Docker): the first line whose type,
database and user match a connection decides it. Over the network the superuser postgres is
rejected whatever it tries, and the role mlflow is admitted by SCRAM only (issue 12, README
"PostgreSQL")."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NETWORK_TYPES = {"host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc"}


def _lines() -> list[list[str]]:
    text = (ROOT / "postgres" / "pg_hba.conf").read_text()
    return [line.split("#", 1)[0].split() for line in text.splitlines() if line.split("#", 1)[0]]


def _matches(field: str, value: str) -> bool:
    """Whether a DATABASE or USER field (a comma list; all; +group counts as a match, the
    strict reading for a refusal test) names ``value``."""
    return any(item in ("all", value) or item.startswith("+") for item in field.split(","))


def _network_method(user: str, database: str) -> str | None:
    """The METHOD of the first network line matching ``user`` and ``database``; None: no line
    matches, PostgreSQL refuses."""
    for fields in _lines():
        network = fields[0] in NETWORK_TYPES
        if network and _matches(fields[1], database) and _matches(fields[2], user):
            return fields[4]
    return None


def test_pg_hba_fields_are_known_types():
    for fields in _lines():
        assert fields[0] == "local" or fields[0] in NETWORK_TYPES, fields
        assert len(fields) >= (4 if fields[0] == "local" else 5), fields


@pytest.mark.parametrize("database", ["mlflow", "postgres", "template1", "replication"])
def test_pg_hba_superuser_over_network_rejected(database):
    assert _network_method("postgres", database) in ("reject", None)


def test_pg_hba_superuser_reject_precedes_every_network_admission():
    network = [fields for fields in _lines() if fields[0] in NETWORK_TYPES]
    assert network[0][2] == "postgres" and network[0][4] == "reject"


def test_pg_hba_mlflow_over_network_scram_to_its_database_only():
    assert _network_method("mlflow", "mlflow") == "scram-sha-256"
    assert _network_method("mlflow", "postgres") is None


def test_entrypoint_initdb_superuser_postgres_network_rejected():
    """The cluster's own pg_hba.conf (unused: the entrypoint names the image's) rejects the
    network too, so a start without hba_file admits no one from outside."""
    script = (ROOT / "postgres" / "entrypoint.sh").read_text()
    assert "--username=postgres" in script and "--auth-host=reject" in script
    assert "--pwfile" not in script
