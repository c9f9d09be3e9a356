"""The Kubernetes example (deploy/kubernetes): our front's manifests and the chart's values.

No cluster and no helm binary here: these tests hold the files to what our images read and to
what compose.yaml gives the same services, validate the manifests against Kubernetes' schemas
(kubernetes-validate, offline), and check the values against the chart's selector labels, so a
rename on either side fails here instead of in someone's cluster.
"""

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import start
import yaml
from mlflowstack import users

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
FRONT = KUBE / "front"
# The Kubernetes release the schemas are taken from (one the package bundles).
SCHEMA_VERSION = "1.33.0"
# The chart's pod labels for the release "mlflow" (its mlflow.selectorLabels).
CHART_RELEASE = "mlflow"
CHART_SELECTOR = {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/instance": CHART_RELEASE}
# compose.yaml's service for each container of the front's pod.
COMPOSE_SERVICE = {"nginx": "nginx", "gate": "auth"}


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[dict]:
    kustomization = load(FRONT / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load(FRONT / name)]


def of_kind(kind: str) -> dict:
    (found,) = [doc for doc in manifests() if doc["kind"] == kind]
    return found


def pod_spec() -> dict:
    return of_kind("Deployment")["spec"]["template"]["spec"]


def container(name: str) -> dict:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def values() -> dict:
    return load(KUBE / "values-mlflow.yaml")[0]


def compose_service(name: str) -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"][name]


def test_yaml_files_every_file_parses_nonempty():
    paths = sorted(KUBE.rglob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        assert load(path), path


def test_kustomization_resources_every_manifest_listed_once():
    listed = load(FRONT / "kustomization.yaml")[0]["resources"]
    present = sorted(p.name for p in FRONT.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


@pytest.mark.parametrize("kind", ["Deployment", "Service", "NetworkPolicy"])
def test_manifest_against_schema_strict_valid(kind):
    kubernetes_validate.validate(of_kind(kind), SCHEMA_VERSION, strict=True)


def test_manifest_against_schema_misspelled_key_refused():
    # The validator can fail: a typo of the kind a hand-written manifest gets.
    broken = copy.deepcopy(of_kind("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSION, strict=True)


def env_names(name: str) -> set[str]:
    return {entry["name"] for entry in container(name).get("env", [])}


def test_nginx_env_every_name_read_by_the_nginx_image():
    sources = "".join(
        path.read_text()
        for path in [ROOT / "nginx" / "docker-entrypoint.sh", *(ROOT / "nginx").rglob("*.template")]
    )
    names = env_names("nginx")
    assert names
    for name in names:
        assert re.search(rf"\$\{{?{name}\b", sources), f"nginx never reads {name}"


def test_gate_env_every_name_read_by_the_auth_image():
    sources = "".join(
        path.read_text()
        for path in [ROOT / "auth/gunicorn.conf.py", *(ROOT / "scripts/mlflowstack").glob("*.py")]
    )
    names = env_names("gate")
    assert names
    for name in names:
        assert re.search(rf"environ(\.get\(|\[)\s*\"{name}\"", sources), f"gate never reads {name}"


def test_nginx_upstreams_chart_service_and_gate_in_pod():
    env = {e["name"]: e["value"] for e in container("nginx")["env"]}
    assert env["SERVER_UPSTREAM"] == f"{CHART_RELEASE}:{values()['service']['port']}"
    gunicorn = (ROOT / "auth/gunicorn.conf.py").read_text()
    bind = re.search(r'^bind = "0\.0\.0\.0:(\d+)"', gunicorn, re.M)
    assert env["GATE_UPSTREAM"] == f"127.0.0.1:{bind[1]}"
    assert {p["containerPort"] for p in container("gate")["ports"]} == {int(bind[1])}


def effective(name: str, key: str):
    """A container's security setting, or the pod's when the container does not set it."""
    own = container(name).get("securityContext", {})
    return own[key] if key in own else pod_spec()["securityContext"].get(key)


def memory_mounts(name: str) -> set[str]:
    memory = {
        v["name"] for v in pod_spec()["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
    }
    return {m["mountPath"] for m in container(name)["volumeMounts"] if m["name"] in memory}


@pytest.mark.parametrize("name", sorted(COMPOSE_SERVICE))
def test_container_security_as_compose_gives_the_same_service(name):
    service = compose_service(COMPOSE_SERVICE[name])
    uid, gid = (int(part) for part in service["user"].split(":"))
    assert effective(name, "runAsUser") == uid
    assert effective(name, "runAsGroup") == gid
    assert effective(name, "runAsNonRoot") is True
    assert effective(name, "readOnlyRootFilesystem") is service["read_only"] is True
    assert effective(name, "capabilities")["drop"] == service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert effective(name, "allowPrivilegeEscalation") is False
    assert memory_mounts(name) == {entry.split(":")[0] for entry in service["tmpfs"]}


@pytest.mark.parametrize("name", sorted(COMPOSE_SERVICE))
def test_container_mounts_every_secret_read_only(name):
    secret_volumes = {v["name"] for v in pod_spec()["volumes"] if "secret" in v}
    for mount in container(name)["volumeMounts"]:
        if mount["name"] in secret_volumes:
            assert mount.get("readOnly") is True, mount


def image_env(dockerfile: str, name: str) -> str:
    text = (ROOT / dockerfile).read_text()
    return re.search(rf"\b{name}=(\S+)", text)[1]


def secret_mount(container_name: str, path: str) -> dict:
    (mount,) = [m for m in container(container_name)["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]


def test_gate_users_secret_where_the_image_reads_users():
    secret = secret_mount("gate", image_env("auth/Dockerfile", "USERS_DIR"))
    assert {item["path"] for item in secret["items"]} == {users.USERS_FILE, users.TOKENS_FILE}


@pytest.mark.parametrize("name", sorted(COMPOSE_SERVICE))
def test_proxy_secret_where_gate_and_nginx_read_it(name):
    secret = secret_mount(name, image_env("auth/Dockerfile", "SECRETS_DIR"))
    assert [item["path"] for item in secret["items"]] == ["proxy-secret"]
    # nginx's entrypoint reads the same file name in that directory.
    default = "/var/lib/mlflow-stack/secrets/proxy-secret"
    assert default in (ROOT / "nginx/docker-entrypoint.sh").read_text()
    assert default == image_env("auth/Dockerfile", "SECRETS_DIR") + "/proxy-secret"


def test_secret_files_mode_group_read_only():
    for volume in pod_spec()["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440, volume["name"]


def test_probes_nginx_ready_and_live_on_healthz():
    nginx = container("nginx")
    for probe in ("readinessProbe", "livenessProbe"):
        assert nginx[probe]["httpGet"]["path"] == "/healthz"
        assert nginx[probe]["httpGet"]["port"] == "http"
    assert "location = /healthz" in (ROOT / "nginx/snippets/healthz.conf").read_text()


def test_front_service_selects_the_front_pods_clusterip():
    service = of_kind("Service")
    labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()


def test_mlflow_service_clusterip_no_ingress_no_own_auth():
    chart = values()
    assert chart["service"]["type"] == "ClusterIP"
    assert chart["ingress"]["enabled"] is False
    assert chart["auth"]["enabled"] is False
    assert chart["ldapAuth"]["enabled"] is False


def test_networkpolicy_admits_mlflow_pods_only_from_front_pods():
    policy = of_kind("NetworkPolicy")["spec"]
    front_labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"] == {"matchLabels": CHART_SELECTOR}
    assert "Ingress" in policy["policyTypes"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    # Only a pod selector: no namespaceSelector or ipBlock that would admit more.
    assert list(source) == ["podSelector"]
    assert source["podSelector"]["matchLabels"].items() <= front_labels.items()
    assert source["podSelector"]["matchLabels"]
    assert rule["ports"] == [{"protocol": "TCP", "port": values()["service"]["port"]}]


def test_networkpolicy_front_labels_not_on_mlflow_selector():
    # The policy would be void if the front's pods also matched MLflow's selector (or the
    # reverse): the two label sets must tell them apart.
    front_labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not CHART_SELECTOR.items() <= front_labels.items()


def pinned(tag: str) -> bool:
    return bool(tag) and tag != "latest" and not tag.startswith("latest")


def test_front_images_every_one_pinned_by_kustomization():
    images = {i["name"]: i for i in load(FRONT / "kustomization.yaml")[0]["images"]}
    for c in pod_spec()["containers"]:
        assert c["image"] in images, c["name"]
        assert pinned(str(images[c["image"]]["newTag"])), c["name"]


def test_mlflow_image_tag_pinned_to_our_mlflow_version():
    requirements = (ROOT / "server/requirements.txt").read_text()
    version = re.search(r"^mlflow==(\S+)", requirements, re.M)[1]
    tag = str(values()["image"]["tag"])
    assert pinned(tag)
    assert tag == version or tag.startswith(f"{version}-")


def test_mlflow_values_external_postgres_password_from_secret():
    store = values()["backendStore"]
    assert store["postgres"]["enabled"] is True
    assert "password" not in store["postgres"] and "user" not in store["postgres"]
    assert store["existingDatabaseSecret"]["name"]
    # Our image has psycopg 3; SQLAlchemy's default for postgresql:// is psycopg2.
    assert "psycopg==" in (ROOT / "server/requirements.txt").read_text()
    assert store["postgres"]["driver"] == "psycopg"


def test_mlflow_values_artifacts_served_through_server_s3_secret():
    root = values()["artifactRoot"]
    assert root["proxiedArtifactStorage"] is True
    assert root["s3"]["enabled"] is True
    assert root["s3"]["existingSecret"]["name"]
    assert "awsAccessKeyId" not in root["s3"] and "awsSecretAccessKey" not in root["s3"]


def test_mlflow_values_hardened_as_compose_server():
    chart, server = values(), compose_service("server")
    uid = int(server["user"].split(":")[0])
    context = chart["securityContext"]
    assert context["runAsUser"] == chart["podSecurityContext"]["runAsUser"] == uid
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == server["cap_drop"]
    assert context["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in chart["extraVolumeMounts"]}
    assert mounts == {entry.split(":")[0] for entry in server["tmpfs"]}


def test_mlflow_values_allowed_hosts_as_start_derives_from_public_hostname():
    env = {e["name"]: e["value"] for e in container("nginx")["env"]}
    expected = start.security_environment(env["PUBLIC_HOSTNAME"])
    extra = values()["extraEnvVars"]
    for name, value in expected.items():
        assert extra[name] == value, name
