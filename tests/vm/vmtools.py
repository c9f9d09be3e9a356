"""Helpers of the VM tier (see conftest.py): the simulated VM, the inventory, the playbook."""

import json
import os
import re
import secrets
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from mlflowstack.cabundle import compose_build_ca_bundle

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOGS = ROOT / "test-output" / "vm"
BIN = ROOT / ".venv" / "bin"
BASE_IMAGE = os.environ.get("BASE_IMAGE") or "debian:trixie-slim"
VM_IMAGE = "vmtest-vm:latest"
# Names what the playbook builds on this machine in ship mode (<project>-auth, ...) and the
# compose project inside each VM.
PROJECT = os.environ.get("VM_TEST_PROJECT") or "vmtest-stack"
RUN_ID = uuid.uuid4().hex[:6]
PORTS = range(18800, 18900)
VM_USER = "ops"
# Inside the VM the stack listens on every interface at this port; only the VM container's
# port mapping publishes it, on 127.0.0.1.
VM_HTTP_PORT = 8080
# The same for HTTPS (published by the VM container always; the stack listens there only
# while TLS_MODE is on).
VM_HTTPS_PORT = 8443

# Verified on these machines (see ../shared/README.md): --privileged fails; these boot systemd
# and let Docker run inside.
VM_RUN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/run/lock",
]  # fmt: skip

# Phase name -> seconds, printed by pytest_terminal_summary.
TIMINGS: dict[str, float] = {}


def record_time(phase: str, seconds: float) -> None:
    TIMINGS[phase] = seconds
    print(f"[vm timing] {phase}: {seconds:.1f} s")


def run(command, *, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=timeout, **kwargs
    )
    if check and result.returncode:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_taken_ports: set[int] = set()


def free_port() -> int:
    for port in PORTS:
        if port not in _taken_ports and _port_is_free(port):
            _taken_ports.add(port)
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1")


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; that value and the seconds it took."""
    start = time.monotonic()
    while True:
        value = predicate()
        elapsed = time.monotonic() - start
        if value:
            return value, elapsed
        if elapsed > timeout:
            raise AssertionError(f"{what}: not reached after {elapsed:.1f} s")
        time.sleep(interval)


# --- the simulated VM --------------------------------------------------------------------------


class VM:
    """One simulated VM: a systemd container with SSH, driven from outside like a real VM."""

    def __init__(self, role: str, key: Path):
        self.name = f"vmtest-{RUN_ID}-{role}"
        self.volume = f"{self.name}-docker"
        self.key = key
        self.ssh_port = free_port()
        self.http_port = free_port()
        self.https_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.https_url = f"https://127.0.0.1:{self.https_port}"

    def start(self) -> None:
        run(["docker", "volume", "create", "--label", "vmtest=1", self.volume])
        run([
            "docker", "run", "-d", "--name", self.name, "--hostname", self.name,
            "--label", "vmtest=1", *VM_RUN_FLAGS,
            "-v", f"{self.volume}:/var/lib/docker",
            "-p", f"127.0.0.1:{self.ssh_port}:22",
            "-p", f"127.0.0.1:{self.http_port}:{VM_HTTP_PORT}",
            "-p", f"127.0.0.1:{self.https_port}:{VM_HTTPS_PORT}",
            "-e", f"AUTHORIZED_KEY={self.key.with_suffix('.pub').read_text().strip()}",
            VM_IMAGE,
        ])  # fmt: skip
        self.wait_for_ssh()

    def wait_for_ssh(self, timeout: float = 90) -> float:
        def ready():
            state = self.ssh("systemctl is-system-running --wait", check=False, timeout=60)
            return state.stdout.strip() in (
                "running",
                "degraded",
            )

        return wait_until(ready, timeout, interval=1, what=f"SSH and systemd in {self.name}")[1]

    def ssh(self, command: str, *, check: bool = True, input: str | None = None, timeout=300):
        """Run ``command`` on the VM as root (sudo), over SSH as Ansible does."""
        return run(
            [
                "ssh", "-i", str(self.key), "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                f"{VM_USER}@127.0.0.1", f"sudo -n sh -c {_quote(command)}",
            ],
            check=check, input=input, timeout=timeout,
        )  # fmt: skip

    def reboot(self) -> float:
        """Restart the container: systemd stops every unit (SIGRTMIN+3), then boots again."""
        start = time.monotonic()
        run(["docker", "restart", "--time", "60", self.name], timeout=120)
        return time.monotonic() - start

    def started_at(self) -> dict[str, str]:
        """When the VM's systemd and each service's container last started."""
        times = {
            "systemd": self.ssh("systemctl show --property=UserspaceTimestampMonotonic").stdout
            + run(["docker", "inspect", "-f", "{{.State.StartedAt}}", self.name]).stdout
        }
        for service in ("auth", "server", "nginx"):
            container = self.container_id(service)
            times[service] = self.ssh(
                f"docker inspect -f '{{{{.State.StartedAt}}}}' {container}"
            ).stdout.strip()
        return times

    def remove(self) -> None:
        run(["docker", "rm", "--force", "--volumes", self.name], check=False)
        run(["docker", "volume", "rm", "--force", self.volume], check=False)

    # What the tests read on the VM (as root, through the VM's own Docker).

    def container_id(self, service: str) -> str:
        return self.ssh(
            "docker ps -q --no-trunc"
            f" --filter label=com.docker.compose.project={PROJECT}"
            f" --filter label=com.docker.compose.service={service}"
        ).stdout.strip()

    def users_files(self) -> str:
        """The users and tokens files, as the gate reads them (hashes only, no secret)."""
        auth = self.container_id("auth")
        assert auth, "no auth container on the VM"
        return self.ssh(
            f"docker exec {auth} sh -c 'cd /var/lib/mlflow-stack/users &&"
            ' for f in htpasswd tokens*; do [ -f "$f" ] && echo "== $f" && cat "$f"; done\''
        ).stdout

    def snapshot(self) -> dict:
        """What a converge that changes nothing must leave exactly as it was."""
        return {
            "users": self.users_files(),
            "env": self.ssh("cat /opt/mlflow-stack/.env", check=False).stdout,
            "containers": self.ssh(
                f"docker ps -a --no-trunc --filter label=com.docker.compose.project={PROJECT}"
                " --format '{{.ID}} {{.Names}} {{.Image}} {{.CreatedAt}}' | grep -v -- -init-"
                " | sort",
                check=False,
            ).stdout,
        }

    def healthz(self) -> int:
        try:
            return requests.get(self.url + "/healthz", timeout=5).status_code
        except requests.RequestException:
            return 0


# The ship path's VM while it runs (conftest.ship_vm), for retire_ship_vm.
SHIP_VMS: list[VM] = []


def retire_ship_vm() -> None:
    """Remove the ship path's VM, if one runs (before the build path starts its own)."""
    while SHIP_VMS:
        SHIP_VMS.pop().remove()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def make_token_secret() -> str:
    """A token secret as `scripts/stackctl token secret` prints it."""
    result = run([str(ROOT / "scripts" / "stackctl"), "token", "secret"], check=False)
    secret = result.stdout.strip()
    if result.returncode == 0 and re.fullmatch(r"mlst_[A-Za-z0-9_-]{32,}", secret):
        return secret
    return "mlst_" + secrets.token_urlsafe(32)


# --- the inventory and the playbook ------------------------------------------------------------


@dataclass
class Converge:
    """One ansible-playbook run: its exit code, output, PLAY RECAP and duration."""

    returncode: int
    output: str
    recap: dict[str, dict[str, int]]
    seconds: float
    log: Path

    def host(self, name: str) -> dict[str, int]:
        assert name in self.recap, f"no PLAY RECAP line for {name}:\n{self.tail()}"
        return self.recap[name]

    def tail(self, lines: int = 80) -> str:
        return f"(whole output: {self.log})\n" + "\n".join(self.output.splitlines()[-lines:])

    def changed_tasks(self) -> list[str]:
        """The names of the tasks that reported a change (for messages)."""
        names, task = [], None
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line[6:].split("]")[0]
            elif line.startswith("changed:") and task:
                names.append(task)
        return names


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap, in_recap = {}, False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            match = re.match(r"^(\S+)\s+:\s+(.*)$", line)
            if not match:
                continue
            recap[match.group(1)] = {
                key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(2))
            }
    return recap


class Site:
    """The inventory (with an Ansible Vault for passwords and token secrets) of one VM, and
    ansible-playbook runs of ansible/site.yml against it, as the README tells an operator."""

    def __init__(self, vm: VM, folder: Path, images: str, **extra_vars):
        self.vm = vm
        self.host = vm.name
        self.folder = folder
        self.images = images
        self.extra_vars = extra_vars
        self.vault_password_file = folder / "vault-password"
        self.vault_password_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.vault_password_file.chmod(0o600)
        self.runs = 0
        # Every password and secret the inventory ever held: none may appear in any output.
        self.all_secrets: set[str] = set()
        self.users: list[dict] = []
        self.tokens: list[dict] = []
        self.env: dict = {}
        self.exclusive = False

    def write(self, users, tokens, env=None, exclusive=False) -> Path:
        """Write the inventory: plain variables in hosts.yml, every password and secret in an
        encrypted group_vars file that hosts.yml names through ``vault_`` variables."""
        self.users, self.tokens, self.env, self.exclusive = users, tokens, env or {}, exclusive
        vault = {
            "vault_mlflow_passwords": {u["name"]: u["password"] for u in users if "password" in u},
            "vault_mlflow_token_secrets": {t["name"]: t["secret"] for t in tokens if "secret" in t},
        }
        for values in vault.values():
            self.all_secrets.update(v for v in values.values() if isinstance(v, str) and v)

        def from_vault(entry, key, vault_name):
            out = {k: v for k, v in entry.items() if k != key}
            if key in entry:
                out[key] = f"{{{{ {vault_name}[{json.dumps(entry['name'])}] }}}}"
            return out

        ca_bundle = compose_build_ca_bundle(ROOT / "compose.yaml") or (
            "/etc/ssl/certs/ca-certificates.crt"
            if Path("/etc/ssl/certs/ca-certificates.crt").is_file()
            else ""
        )
        variables = {
            "docker_engine_source": "distribution",
            "mlflow_stack_project": PROJECT,
            "mlflow_stack_images": self.images,
            "mlflow_stack_ca_bundle": ca_bundle,
            "mlflow_stack_ship_cache_dir": str(self.folder / "ship-cache"),
            "mlflow_stack_env": {
                "BIND_ADDRESS": "0.0.0.0",
                "HTTP_PORT": VM_HTTP_PORT,
                "PUBLIC_HOSTNAME": f"127.0.0.1:{self.vm.http_port},localhost",
                **self.env,
            },
            "mlflow_users": [from_vault(u, "password", "vault_mlflow_passwords") for u in users],
            "mlflow_users_tokens": [
                from_vault(t, "secret", "vault_mlflow_token_secrets") for t in tokens
            ],
            "mlflow_users_exclusive": exclusive,
            **self.extra_vars,
        }
        inventory = {
            "all": {
                "children": {
                    "mlflow_servers": {
                        "hosts": {
                            self.host: {
                                "ansible_host": "127.0.0.1",
                                "ansible_port": self.vm.ssh_port,
                                "ansible_user": VM_USER,
                                "ansible_ssh_private_key_file": str(self.vm.key),
                                "ansible_ssh_common_args": (
                                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                                ),
                            }
                        },
                        "vars": variables,
                    }
                }
            }
        }
        inventory_dir = self.folder / "inventory"
        vault_dir = inventory_dir / "group_vars" / "mlflow_servers"
        vault_dir.mkdir(parents=True, exist_ok=True)
        (inventory_dir / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
        vault_file = vault_dir / "vault.yml"
        vault_file.write_text(yaml.safe_dump(vault, sort_keys=False))
        run([
            str(BIN / "ansible-vault"), "encrypt",
            "--vault-password-file", str(self.vault_password_file), str(vault_file),
        ], cwd=ROOT)  # fmt: skip
        assert vault_file.read_text().startswith("$ANSIBLE_VAULT;")
        return inventory_dir / "hosts.yml"

    def converge(
        self, label: str, *args: str, playbook: str = "ansible/site.yml", timeout: float = 1800
    ) -> Converge:
        """Run a playbook (site.yml unless told) as an operator would (from the repository
        root)."""
        self.runs += 1
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{self.host.split('-', 2)[-1]}-{self.runs:02d}-{label}.log"
        command = [
            str(BIN / "ansible-playbook"),
            "-i", str(self.folder / "inventory" / "hosts.yml"),
            "--vault-password-file", str(self.vault_password_file),
            playbook, *args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": "ansible/ansible.cfg",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_LOCAL_TEMP": str(self.folder / "ansible-tmp"),
            # Each task's duration in the log (test-output/vm/), where the time goes.
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        start = time.monotonic()
        try:
            result = subprocess.run(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=timeout, check=False,
            )  # fmt: skip
            returncode, output = result.returncode, result.stdout
        except subprocess.TimeoutExpired as error:
            partial = error.stdout or ""
            if isinstance(partial, bytes):  # TimeoutExpired may hold bytes even with text=True
                partial = partial.decode(errors="replace")
            returncode, output = (
                -1,
                f"{partial}\n[vm test] ansible-playbook killed after {timeout} s",
            )
        seconds = time.monotonic() - start
        log.write_text(f"$ {' '.join(command)}\n\n{output}")
        converge = Converge(returncode, output, parse_recap(output), seconds, log)
        leaked = sorted(s for s in self.all_secrets if s in output)
        assert not leaked, (
            f"{len(leaked)} inventory password(s)/secret(s) appear in the playbook's output ({log})"
        )
        return converge


def first_inventory(site: Site, people: dict) -> Path:
    """The ship path's first inventory: four users and a token (conftest.ship_people)."""
    users = [people[name] for name in ("alice", "victor", "bob", "dave")]
    return site.write(users, [people["token"]], env={}, exclusive=False)


def assert_converged(converge: Converge, host: str, what: str) -> dict[str, int]:
    assert converge.returncode == 0, (
        f"{what}: ansible-playbook exited {converge.returncode}\n{converge.tail()}"
    )
    recap = converge.host(host)
    assert recap.get("failed", 0) == 0 and recap.get("unreachable", 0) == 0, (
        f"{what}: {recap}\n{converge.tail()}"
    )
    return recap
