"""Every container of the stack is hardened (compose.yaml's x-hardened, README "Security"):
read from ``docker inspect`` and from the processes themselves. No process runs as root (nginx's
master included), the root file systems are read-only, no capability is kept or can be gained,
memory and process counts are capped, and no secret of the stack's volumes shows in a
container's settings, an image's history or a log."""

import json
import re
import subprocess

import pytest
import requests
from conftest import PROJECT

# Every service compose.yaml starts; init and migrate have run and exited, and serving is the
# opt-in profile (postgres, the other one, is checked in test_postgres.py).
RUNNING = ("auth", "server", "nginx", "serving")
SERVICES = ("init", "migrate", *RUNNING)
IMAGES = (f"{PROJECT}-auth", f"{PROJECT}-server", f"{PROJECT}-nginx")
STACK_UID = "10001"
# The files whose values are secret, read in containers that mount them (read-only there).
SECRET_FILES = {
    "auth": "/var/lib/mlflow-stack/users",
    "nginx": "/var/lib/mlflow-stack/secrets /var/lib/mlflow-serving",
    "server": "/var/lib/mlflow-stack/server-secrets",
}
# Long enough to be no accident in a log (the shortest secret, the first admin's password: 24).
MIN_SECRET = 16


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def containers(stack):
    """service -> its container's ``docker inspect`` (the serving profile started if need be:
    it runs even while its models cannot load)."""
    if not stack.compose("ps", "-q", "serving").split():
        stack.compose("--profile", "serve", "up", "-d", "--no-build", "serving")
    inspected = {}
    for service in SERVICES:
        ids = stack.compose("--profile", "serve", "ps", "-a", "-q", service).split()
        assert ids, f"no {service} container"
        inspected[service] = json.loads(_docker("inspect", ids[0]))[0]
    return inspected


@pytest.fixture(scope="module")
def secret_values(stack, containers):
    """The proxy secret, the key-encryption passphrase, the serving secret and token, the first
    admin's password, and the hashes in the users file (bcrypt) and the tokens file (sha256)."""
    values = set()
    for service, directories in SECRET_FILES.items():
        script = f'for f in $(find {directories} -type f); do echo "@@@ $f"; cat "$f"; done'
        content = stack.compose("exec", "-T", service, "sh", "-c", script)
        for part in content.split("@@@ ")[1:]:
            name, _, text = part.partition("\n")
            values.update(_secrets_of(name.rsplit("/", 1)[-1], text))
    values = {value for value in values if len(value) >= MIN_SECRET}
    assert len(values) >= 7, sorted(value[:4] for value in values)
    return values


def _secrets_of(name: str, text: str) -> list[str]:
    if name.startswith("tokens"):  # JSON lines: a name and role (not secret), the token's sha256
        return [json.loads(line)["sha256"] for line in text.splitlines() if line.strip()]
    # NAME:HASH ('!HASH': disabled), '#' lines: comments and roles; and stackctl's .bak copy
    if name.startswith("htpasswd"):
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        return [line.split(":", 1)[1].lstrip("!") for line in lines]
    return [text.strip()]


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_stack_user_not_root(containers, service):
    user = containers[service]["Config"]["User"]
    assert user.split(":")[0] == STACK_UID, (service, user)


@pytest.mark.parametrize("service", RUNNING)
def test_no_process_runs_as_root(containers, service):
    """nginx's master included: every process of the container, as the kernel sees it."""
    rows = _docker("top", containers[service]["Id"], "-o", "uid,ruid,pid,comm").splitlines()[1:]
    assert rows, service
    for row in rows:
        uid, ruid, _pid, command = row.split(None, 3)
        assert uid == ruid == STACK_UID, (service, row)
    if service == "nginx":
        assert any(row.split()[3] == "nginx" for row in rows)


@pytest.mark.parametrize("service", RUNNING)
def test_process_has_no_capability_and_no_new_privileges(stack, service):
    status = stack.compose("exec", "-T", service, "cat", "/proc/1/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1", service
    for capabilities in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, (service, capabilities, fields[capabilities])
    assert fields["Uid"].split() == [STACK_UID] * 4, service


@pytest.mark.parametrize("service", SERVICES)
def test_read_only_root_with_size_capped_tmp(containers, service):
    host = containers[service]["HostConfig"]
    assert host["ReadonlyRootfs"] is True, service
    assert "size=" in (host.get("Tmpfs") or {}).get("/tmp", ""), (service, host.get("Tmpfs"))


@pytest.mark.parametrize("service", RUNNING)
def test_root_file_system_refuses_writes_tmp_takes_them(stack, service):
    script = (
        "for p in /probe /etc/probe /opt/probe /var/probe; do touch $p 2>/dev/null && echo $p;"
        " done; touch /tmp/probe && rm /tmp/probe && echo tmp-ok"
    )
    assert stack.compose("exec", "-T", service, "sh", "-c", script).split() == ["tmp-ok"]


@pytest.mark.parametrize("service", SERVICES)
def test_all_capabilities_dropped_none_added(containers, service):
    host = containers[service]["HostConfig"]
    assert host["CapDrop"] == ["ALL"], service
    assert not host["CapAdd"], (service, host["CapAdd"])
    assert "no-new-privileges:true" in (host["SecurityOpt"] or []), service
    assert not host["Privileged"], service


@pytest.mark.parametrize("service", SERVICES)
def test_memory_and_process_limits(containers, service):
    host = containers[service]["HostConfig"]
    assert host["Memory"] > 0, service
    assert (host["PidsLimit"] or 0) > 0, service


@pytest.mark.parametrize("service", ("server", "serving"))
def test_init_reaps_zombies(containers, service):
    assert containers[service]["HostConfig"]["Init"] is True, service


def test_stackctl_container_hardened_too(stack):
    """The tools profile (scripts/stackctl runs it for user and token commands)."""
    script = (
        "id -u; touch /etc/probe 2>/dev/null && echo root-writable; "
        "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status | tr -s '\\t' ' '"
    )
    output = stack.compose("run", "--rm", "-T", "--entrypoint", "sh", "stackctl", "-c", script)
    assert output.splitlines() == [STACK_UID, "NoNewPrivs: 1", "CapEff: 0000000000000000"] or (
        output.splitlines() == [STACK_UID, "CapEff: 0000000000000000", "NoNewPrivs: 1"]
    ), output


@pytest.mark.parametrize("service", SERVICES)
def test_no_secret_in_container_settings(containers, secret_values, service):
    environment = "\n".join(containers[service]["Config"]["Env"])
    inspected = json.dumps(containers[service])
    for value in secret_values:
        assert value not in environment, (service, value[:4])
        assert value not in inspected, (service, value[:4])


@pytest.mark.parametrize("image", IMAGES)
def test_no_secret_in_image_history(secret_values, image):
    history = _docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    assert history.strip(), image
    for value in secret_values:
        assert value not in history, (image, value[:4])
    # The build's CA bundle is a BuildKit secret: mounted while pip runs, never copied into a
    # layer or named in the image's environment.
    for step in history.splitlines():
        assert not (step.startswith(("COPY", "ADD")) and re.search(r"\.(crt|pem)\b", step)), step
    config = json.loads(_docker("image", "inspect", image))[0]["Config"]
    for entry in config["Env"] or []:
        assert not entry.startswith(("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT")), entry


def test_no_secret_in_any_log(stack, secret_values):
    logs = stack.compose("--profile", "serve", "--profile", "tools", "logs", "--no-color")
    assert logs.strip()
    for value in secret_values:
        assert value not in logs, value[:4]


def test_fresh_server_answers_assistant_routes_first(stack):
    """The assistant's routes open MLflow's default tracking URI, not the server's store: in a
    fresh worker that was ./mlflow.db, which the read-only root refuses, and the worker retried
    for minutes (start.py points the tracking URI at the store). Each of the server's fresh
    workers gets an assistant route as its very first request, and answers within 5 s."""
    stack.add_user("hardened-fresh", "fresh-password-4", "viewer")
    stack.compose("up", "-d", "--wait", "--no-build", "--force-recreate", "server")
    for _ in range(4):  # round robin over the workers: each gets one first
        for route in ("assistant/providers", "assistant/config"):
            answer = requests.get(
                f"{stack.url}/ajax-api/3.0/mlflow/{route}",
                auth=("hardened-fresh", "fresh-password-4"),
                timeout=5,
            )
            assert answer.status_code == 200, (route, answer.status_code, answer.text[:200])
    # (Unreadable directories, e.g. /root, are nothing the server's user could have written.)
    script = "find / -xdev -name mlflow.db 2>/dev/null || true"
    found = stack.compose("exec", "-T", "server", "sh", "-c", script)
    assert found.split() == [], found
