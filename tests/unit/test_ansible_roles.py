"""The Ansible roles' conventions, fast and without Docker or a VM (tests/vm runs them for real).

- every role documents its variables in meta/argument_specs.yml, and those match
  defaults/main.yml (same names, same default values where both give one);
- every variable a role defines (defaults, vars, set_fact, register, task vars, loop_var) starts
  with the role's name;
- site.yml passes `ansible-playbook --syntax-check`;
- every variable ansible/inventory.example.yml sets is one an argument spec knows;
- the preflight checks refuse bad input with a message naming it, and never print a password.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLES = sorted(p.name for p in (ANSIBLE / "roles").iterdir() if p.is_dir())
SITE_ROLES = ["docker_engine", "mlflow_stack", "mlflow_users", "mlflow_backup"]


def _load(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _options(role: str) -> dict:
    """The options of every entry point (main, and e.g. mlflow_backup's fetch and restore)."""
    specs = _load(ANSIBLE / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = {}
    for entry in specs.values():
        for name, spec in entry["options"].items():
            assert options.get(name, spec) == spec, f"{role}: {name} differs between entries"
            options[name] = spec
    return options


def _defaults(role: str) -> dict:
    return _load(ANSIBLE / "roles" / role / "defaults" / "main.yml") or {}


def _ansible_tool(name: str) -> str:
    """The tool from this interpreter's environment (.venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)")
    return found


def test_site_runs_the_four_roles_in_order():
    (play,) = _load(ANSIBLE / "site.yml")
    assert play["hosts"] == "mlflow_servers"
    assert play["become"] is True
    assert [r["role"] if isinstance(r, dict) else r for r in play["roles"]] == SITE_ROLES
    assert sorted(ROLES) == sorted(SITE_ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults(role):
    options, defaults = _options(role), _defaults(role)
    assert set(defaults) <= set(options), f"{role}: defaults without a spec"
    assert set(options) <= set(defaults), f"{role}: specs without a default in defaults/main.yml"
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: {name} has no description"
        if "default" in spec:
            assert spec["default"] == defaults[name], f"{role}: {name}'s defaults differ"


def _task_variables(tasks) -> set[str]:
    """Names a task list defines: register, set_fact keys, task vars, loop_var (blocks too)."""
    names: set[str] = set()
    for task in tasks or []:
        if not isinstance(task, dict):
            continue
        if "register" in task:
            names.add(task["register"])
        names.update((task.get("vars") or {}).keys())
        names.update((task.get("loop_control") or {}).get("loop_var", "item").split())
        fact = task.get("ansible.builtin.set_fact")
        if isinstance(fact, dict):
            names.update(k for k in fact if k != "cacheable")
        for key in ("block", "rescue", "always"):
            names |= _task_variables(task.get(key))
    return names - {"item"}


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_is_prefixed_with_the_role_name(role):
    root = ANSIBLE / "roles" / role
    names = set(_defaults(role)) | set(_options(role))
    names |= set(_load(root / "vars" / "main.yml") or {})
    for path in [*sorted((root / "tasks").glob("*.yml")), root / "handlers" / "main.yml"]:
        names |= _task_variables(_load(path))
    unprefixed = sorted(n for n in names if n != role and not n.startswith(role + "_"))
    assert not unprefixed, f"{role}: variables without the prefix {role}_: {unprefixed}"


@pytest.mark.parametrize("role", ROLES)
def test_modules_are_named_fully(role):
    """FQCN: every task's module is namespace.collection.module."""
    keywords = {
        "name", "when", "register", "vars", "loop", "loop_control", "tags", "block", "rescue",
        "always", "become", "delegate_to", "changed_when", "failed_when", "check_mode",
        "no_log", "notify", "environment", "args", "until", "retries", "delay", "throttle",
        "run_once", "diff", "ignore_errors", "listen",
    }  # fmt: skip

    def modules(tasks):
        for task in tasks or []:
            yield from (k for k in task if k not in keywords)
            for key in ("block", "rescue", "always"):
                yield from modules(task.get(key))

    root = ANSIBLE / "roles" / role
    for path in [*sorted((root / "tasks").glob("*.yml")), root / "handlers" / "main.yml"]:
        for module in modules(_load(path)):
            assert module.count(".") >= 2, f"{path.name}: {module} is not a FQCN"


def test_inventory_example_sets_only_known_variables():
    known = set().union(*(_options(role) for role in ROLES))
    inventory = _load(ANSIBLE / "inventory.example.yml")
    group = inventory["mlflow_servers"]
    names = set(group.get("vars", {}))
    for host_vars in group["hosts"].values():
        names |= {n for n in host_vars or {} if not n.startswith("ansible_")}
    assert names, "the example sets no variable"
    assert names <= known, f"unknown to every argument spec: {sorted(names - known)}"
    # A newcomer finds every setting (commented or not) in the example, but for those that
    # only say where things are when the roles are used apart from site.yml.
    text = (ANSIBLE / "inventory.example.yml").read_text()
    internal = {
        "mlflow_stack_env_defaults",
        "mlflow_stack_source_dir",
        "mlflow_users_stack_dir",
        "mlflow_users_stack_project",
        "mlflow_backup_stack_dir",
        "mlflow_backup_stack_project",
    }
    assert [n for n in sorted(known - internal) if n not in text] == []


def test_requirements_pin_the_collections_the_roles_use():
    pinned = {c["name"]: c["version"] for c in _load(ANSIBLE / "requirements.yml")["collections"]}
    used = set()
    for path in (ANSIBLE / "roles").rglob("*.yml"):
        for word in path.read_text().split():
            word = word.strip("\"'{}[](),:")
            if word.startswith("community."):
                used.add(".".join(word.split(".")[:2]))
    assert used <= set(pinned), f"used but not pinned: {sorted(used - set(pinned))}"
    assert all(version.count(".") == 2 for version in pinned.values()), pinned


def _playbook(tmp_path: Path, play: list, inventory: dict, *args: str):
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        [_ansible_tool("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), *args,
         str(tmp_path / "play.yml")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_site_syntax_checks(tmp_path):
    inventory = {"mlflow_servers": {"hosts": {"vm": {"ansible_host": "192.0.2.1"}}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    result = subprocess.run(
        [_ansible_tool("ansible-playbook"), "--syntax-check", "-i",
         str(tmp_path / "inventory.yml"), str(ANSIBLE / "site.yml")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
             "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
PASSWORD = "s3cret-never-printed"
TOKEN = "mlst_rLbqSC_wczLMjjfP2VBYjs1zgmQPFbkbs0kKw5G1ew8"  # what `stackctl token secret` makes


def _preflight(role: str) -> list:
    return [
        {
            "name": "preflight",
            "hosts": "mlflow_servers",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Preflight",
                    "ansible.builtin.include_role": {"name": role, "tasks_from": "preflight.yml"},
                }
            ],
        }
    ]


def test_users_preflight_accepts_a_good_list(tmp_path):
    users = [
        {"name": "alice", "password": PASSWORD, "role": "admin"},
        {"name": "bob", "password": PASSWORD, "state": "disabled"},
        {"name": "carol", "state": "absent"},
    ]
    tokens = [{"name": "ci", "secret": TOKEN, "expires_on": "2030-01-01"}]
    inventory = {
        "mlflow_servers": {
            "hosts": {"here": LOCAL},
            "vars": {"mlflow_users": users, "mlflow_users_tokens": tokens},
        }
    }
    result = _playbook(tmp_path, _preflight("mlflow_users"), inventory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_users_preflight_names_every_problem_and_no_password(tmp_path):
    users = [
        {"name": "alice", "role": "editor"},  # no password
        {"name": "bob", "password": PASSWORD, "role": "superuser"},
        {"name": "bob", "password": PASSWORD},
        {"name": "eve", "password": 987654321},
        {"name": "bad:name", "password": PASSWORD},
        {"name": "frank", "password": PASSWORD, "state": "gone"},
    ]
    tokens = [
        {"name": "ci", "secret": PASSWORD},
        {"name": "old", "secret": TOKEN, "expires_on": "31.12.2030"},
    ]
    inventory = {
        "mlflow_servers": {
            "hosts": {"here": LOCAL},
            "vars": {"mlflow_users": users, "mlflow_users_tokens": tokens},
        }
    }
    result = _playbook(tmp_path, _preflight("mlflow_users"), inventory, "-vv")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in (
        "user alice: state present needs a password",
        'user bob: role "superuser" is not one of viewer, editor, admin',
        "user bob: listed twice",
        "user eve: the password is not a string",
        'user #5: name "bad:name" is not 1-64 characters',
        'user frank: state "gone" is not one of present, disabled, absent',
        "token ci: the secret is not mlst_ and 43 URL-safe characters",
        'token old: expires_on "31.12.2030" is not a date YYYY-MM-DD',
    ):
        assert expected in output, expected
    assert PASSWORD not in output
    assert "987654321" not in output


def test_stack_preflight_refuses_bad_settings(tmp_path):
    settings = {
        "HTTP_PORT": "eighty",
        "PUBLIC_HOSTNAME": "https://mlflow.example.com",
        "SERVER_WORKER": 4,
        "COMPOSE_PROJECT_NAME": "x",
        "PROXY_TIMEOUT": "1 h",
    }
    inventory = {
        "mlflow_servers": {
            "hosts": {"here": LOCAL},
            "vars": {"mlflow_stack_env": settings, "mlflow_stack_ca_bundle": "/nonexistent.pem"},
        }
    }
    result = _playbook(tmp_path, _preflight("mlflow_stack"), inventory)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for expected in (
        "HTTP_PORT=eighty: not a port number (1-65535)",
        "PUBLIC_HOSTNAME entry https://mlflow.example.com: host[:port] only, without a scheme",
        "mlflow_stack_env.SERVER_WORKER: not a setting of the stack",
        "mlflow_stack_env.COMPOSE_PROJECT_NAME: set mlflow_stack_project instead",
        "PROXY_TIMEOUT=1 h: only letters",
        "mlflow_stack_ca_bundle=/nonexistent.pem: no such file on the control machine",
    ):
        assert expected in output, expected


def test_stack_env_renders_booleans_and_host_lists_as_the_stack_reads_them(tmp_path):
    settings = {
        "MLFLOW_TELEMETRY": False,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": True,
        "PUBLIC_HOSTNAME": ["mlflow.example.com", "10.0.0.5:8080"],
        "HTTP_PORT": 18799,
        "BIND_ADDRESS": "127.0.0.1",
    }
    play = _preflight("mlflow_stack")
    play[0]["tasks"].append(
        {
            "name": "Show",
            "ansible.builtin.copy": {
                "content": "{{ mlflow_stack_env_final | to_nice_json }}",
                "dest": str(tmp_path / "env.json"),
                "mode": "0600",
            },
        }
    )
    inventory = {
        "mlflow_servers": {"hosts": {"here": LOCAL}, "vars": {"mlflow_stack_env": settings}}
    }
    result = _playbook(tmp_path, play, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    env = yaml.safe_load((tmp_path / "env.json").read_text())
    assert env["MLFLOW_TELEMETRY"] == "off"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
    assert env["PUBLIC_HOSTNAME"] == "mlflow.example.com,10.0.0.5:8080"
    assert env["HTTP_PORT"] == "18799"
    assert env["SERVER_WORKERS"] == "2"  # a default kept
