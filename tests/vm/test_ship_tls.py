"""Issue 12's VM step, on the ship path's VM after test_ship_path.py (conftest.MODULE_ORDER):
TLS_MODE=self-signed in the inventory. The role makes the CA and certificate on the VM and
installs them for nginx; the real MLflow client reads and writes over HTTPS trusting the CA
read off the VM, and plain HTTP redirects to HTTPS (but for /healthz). TLS goes off again at
the end: test_ship_backup.py talks plain HTTP to this VM."""

import pytest
import requests
from test_ship_path import EXPERIMENTS, ROLE, mlflow_as, need, status
from vmtools import VM_HTTPS_PORT, assert_converged, record_time


def test_tls_self_signed_from_the_inventory_serves_https_and_redirects_http(
    ship_vm, ship_site, ship_people, ship_state, tmp_path, monkeypatch
):
    vm, site, state = ship_vm, ship_site, ship_state
    need(state, "converged", "run_id")
    good = (list(site.users), list(site.tokens), dict(site.env), site.exclusive)
    tls_env = {
        **site.env,
        "TLS_MODE": "self-signed",
        "HTTPS_PORT": VM_HTTPS_PORT,
        # Without ports: over HTTPS a client's Host names the HTTPS port.
        "PUBLIC_HOSTNAME": "127.0.0.1,localhost",
    }
    site.write(site.users, site.tokens, env=tls_env, exclusive=site.exclusive)
    try:
        converge = site.converge("tls-on")
        record_time(f"{ROLE}: 8. converge turning TLS_MODE=self-signed on", converge.seconds)
        recap = assert_converged(converge, site.host, "converge with TLS_MODE=self-signed")
        assert recap["changed"] > 0
        env = vm.ssh("cat /opt/mlflow-stack/.env").stdout
        assert "COMPOSE_FILE=compose.yaml:compose.tls.yaml\n" in env
        assert vm.ssh("stat -c %a /opt/mlflow-stack/tls/server.key").stdout.strip() == "600"
        ca = tmp_path / "ca.crt"
        ca.write_text(vm.ssh("cat /opt/mlflow-stack/tls/ca.crt").stdout)

        with pytest.raises(requests.exceptions.SSLError):
            requests.get(vm.https_url + "/healthz", timeout=10)
        assert requests.get(vm.https_url + "/healthz", verify=str(ca), timeout=10).ok
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(ca))
        alice = ship_people["alice"]
        with mlflow_as(vm.https_url, alice["name"], alice["password"]) as client:
            assert client.get_run(state["run_id"]).data.metrics == {"loss": 0.25}
            client.set_experiment_tag(state["experiment_id"], "seen_over", "https")
            assert client.get_experiment(state["experiment_id"]).tags["seen_over"] == "https"

        redirect = requests.get(
            vm.url + EXPERIMENTS, auth=(alice["name"], alice["password"]),
            allow_redirects=False, timeout=10,
        )  # fmt: skip
        assert redirect.status_code == 308
        location = redirect.headers["Location"]
        assert location.startswith(f"https://127.0.0.1:{VM_HTTPS_PORT}{EXPERIMENTS}"), location
        assert vm.healthz() == 200
    finally:
        site.write(*good)
        off = site.converge("tls-off")
        record_time(f"{ROLE}: 8. converge turning TLS off again", off.seconds)
    assert_converged(off, site.host, "converge with TLS_MODE off again")
    alice = ship_people["alice"]
    assert status(vm, (alice["name"], alice["password"])) == 200
