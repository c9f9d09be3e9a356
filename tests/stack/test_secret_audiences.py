"""Each container reads only the secrets it needs (review of issue 13; compose.yaml, "Who reads
which secret"). Every service runs as uid 10001, so what separates them is which volumes they
mount; this checks the outcome from inside each running container, not the compose file.

Invariants: MLflow's key-encryption passphrase is readable only inside the server container;
the proxy secret only in nginx, the gate and the server; the serving secret and viewer token
only in nginx and serving; the users files only in the gate. Checked twice: by file name under
every directory a volume may be mounted on, and by value anywhere those directories and the
processes' environments hold it (a copy under another name counts too).

And the upgrade: a stack of the layout before the split (the passphrase in the shared volume,
tests/stack/compose.old-secrets-layout.yaml) brought up with today's compose.yaml keeps its
passphrase, now in the server's own volume only, and MLflow runs with that one.
"""

import json
import os
import subprocess

import pytest
from conftest import ROOT, SecondStack

RUNNING = ("auth", "server", "nginx", "serving")
# The table of compose.yaml: each secret file -> the running services that can read it.
READERS = {
    "proxy-secret": {"auth", "server", "nginx"},
    "mlflow-kek-passphrase": {"server"},
    "serving-secret": {"nginx", "serving"},
    "token": {"nginx", "serving"},
    "htpasswd": {"auth"},
    "tokens": {"auth"},
    "initial-admin-password": {"auth"},
}
# Where the holder of each value reads it, to fetch the value for the search by content.
HOLDER = {
    "proxy-secret": ("server", "/var/lib/mlflow-stack/secrets/proxy-secret"),
    "mlflow-kek-passphrase": (
        "server",
        "/var/lib/mlflow-stack/server-secrets/mlflow-kek-passphrase",
    ),
    "serving-secret": ("serving", "/var/lib/mlflow-serving/serving-secret"),
    "token": ("serving", "/var/lib/mlflow-serving/token"),
    "initial-admin-password": ("auth", "/var/lib/mlflow-stack/users/initial-admin-password"),
}
# Every place a volume is or could be mounted, and writable scratch space: not /usr or /opt,
# whose packages hold files named "token" that are no secret.
ROOTS = "/var /run /tmp /etc /srv /home /root /mnt /media"
KEK_IN_SERVER = "/var/lib/mlflow-stack/server-secrets/mlflow-kek-passphrase"
KEK_IN_SHARED = "/var/lib/mlflow-stack/secrets/mlflow-kek-passphrase"


@pytest.fixture(scope="module")
def running(stack):
    """The session's stack with the serving profile too (it runs while its models cannot
    load, which is all these tests need)."""
    if not stack.compose("ps", "-q", "serving").split():
        stack.compose("--profile", "serve", "up", "-d", "--no-build", "serving")
    return stack


def _readable_names(stack, service: str) -> set[str]:
    """The names in READERS of the regular files this service's user can read."""
    names = " -o ".join(f"-name {name}" for name in READERS)
    script = f"find {ROOTS} \\( {names} \\) -type f -readable 2>/dev/null || true"
    found = stack.compose("exec", "-T", service, "sh", "-c", script).split()
    return {path.rsplit("/", 1)[-1] for path in found}


@pytest.mark.parametrize("service", RUNNING)
def test_each_service_reads_exactly_its_secret_files(running, service):
    expected = {name for name, readers in READERS.items() if service in readers}
    assert _readable_names(running, service) == expected, service


@pytest.fixture(scope="module")
def secret_values(running) -> dict[str, str]:
    values = {}
    for name, (service, path) in HOLDER.items():
        values[name] = running.compose("exec", "-T", service, "cat", path).strip()
        assert len(values[name]) >= 16, name
    return values


@pytest.mark.parametrize("service", RUNNING)
def test_each_secret_value_only_where_its_readers_are(running, secret_values, service):
    """By content: in files under ROOTS and in the processes' environments (the server hands
    the passphrase to MLflow there; nginx's rendered config holds what it sends). The values
    go on stdin, never on a command line."""
    script = (
        "while read -r name value; do "
        f'if grep -rqsF -e "$value" {ROOTS} /proc/[0-9]*/environ; then echo "$name"; fi; '
        "done"
    )
    lines = "".join(f"{name} {value}\n" for name, value in secret_values.items())
    found = set(running.compose("exec", "-T", service, "sh", "-c", script, input=lines).split())
    expected = {name for name in secret_values if service in READERS[name]}
    assert found == expected, service


def test_kek_passphrase_mounted_only_in_server_init_and_stackctl():
    """compose.yaml's side of the table: the server-secrets volume's mounts."""
    config = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        env={**os.environ, "COMPOSE_PROFILES": "serve,tools"},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    services = json.loads(config)["services"]
    mounting = {
        name
        for name, service in services.items()
        if any(v.get("source") == "server-secrets" for v in service.get("volumes", []))
    }
    assert mounting == {"init", "server", "stackctl"}
    server = next(v for v in services["server"]["volumes"] if v["source"] == "server-secrets")
    assert server.get("read_only") is True


@pytest.fixture(scope="module")
def old_layout(stack):
    """A second stack started with the layout before the split (the session's stack first:
    its images are the ones this one runs)."""
    override = ROOT / "tests/stack/compose.old-secrets-layout.yaml"
    with SecondStack("oldsecrets", override) as second:
        yield second


def test_upgrade_from_shared_volume_keeps_the_same_kek_in_server_only(old_layout):
    second = old_layout
    before = second.compose("exec", "-T", "server", "cat", KEK_IN_SHARED)
    assert len(before.strip()) == 64
    # The old layout's weakness, which the upgrade removes: nginx reads the passphrase.
    assert second.compose("exec", "-T", "nginx", "cat", KEK_IN_SHARED) == before

    # `git pull && docker compose up -d`: compose.yaml alone, no override.
    upgrade = ["docker", "compose", "-p", second.project, "-f", str(ROOT / "compose.yaml")]
    second.command = upgrade
    second.compose("up", "-d", "--wait", "--no-build")

    assert second.compose("exec", "-T", "server", "cat", KEK_IN_SERVER) == before
    mode = second.compose("exec", "-T", "server", "stat", "-c", "%a %u", KEK_IN_SERVER).split()
    assert mode == ["600", "10001"]
    # The old place: the proxy secret, and an empty directory in the passphrase's stead, so
    # that images from before the split make no new one there (stacksecrets.mark_kek_moved).
    listing = "cd /var/lib/mlflow-stack/secrets && find . -mindepth 1 -printf '%y %p\\n'"
    for service in ("server", "auth", "nginx"):
        shared = second.compose("exec", "-T", service, "sh", "-c", listing).splitlines()
        assert sorted(shared) == ["d ./mlflow-kek-passphrase", "f ./proxy-secret"], service
    # MLflow runs with the moved passphrase (the server's process environment, read by the
    # server's own user), not a new one.
    script = "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep ^MLFLOW_CRYPTO_KEK_"
    environment = set(second.compose("exec", "-T", "server", "sh", "-c", script).split())
    assert environment == {"MLFLOW_CRYPTO_KEK_PASSPHRASE=" + before.strip()}
    logs = second.compose("logs", "--no-color", "init")
    assert "mlflow-kek-passphrase moved" in logs and "created mlflow-kek-passphrase" not in logs
    assert before.strip() not in logs

    # A later start moves nothing and makes nothing.
    second.compose("up", "-d", "--wait", "--no-build", "--force-recreate", "init", "server")
    assert second.compose("exec", "-T", "server", "cat", KEK_IN_SERVER) == before
