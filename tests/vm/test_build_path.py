"""Issue 10's step 6: the ``build`` path on a second fresh VM, which builds the images itself.

Its Docker engine cannot pull, so the inventory hands it the Debian base image as a
`docker save` archive made here (mlflow_stack_base_image_archive), standing in for Docker Hub;
pip in the VM's builds trusts the CA bundle of mlflow_stack_ca_bundle. A few minutes of
building: runs only with VM_TEST_BUILD=1 (.ci/run sets it).
"""

import os
import secrets
import time

import pytest
import requests
from vmtools import (
    BASE_IMAGE,
    PROJECT,
    Site,
    assert_converged,
    make_token_secret,
    record_time,
    retire_ship_vm,
    run,
)

ROLE = "build"

pytestmark = pytest.mark.skipif(
    os.environ.get("VM_TEST_BUILD") != "1",
    reason="the build path builds every image inside a VM (minutes): VM_TEST_BUILD=1 runs it",
)


@pytest.fixture(scope="module")
def vm(make_vm):
    retire_ship_vm()  # one VM at a time on this machine
    vm = make_vm(ROLE)
    yield vm
    vm.remove()


@pytest.fixture(scope="module")
def base_image_archive(vm_workdir):
    archive = vm_workdir / "base-image.tar"
    start = time.monotonic()
    run(["docker", "save", "--output", str(archive), BASE_IMAGE])
    record_time(
        f"{ROLE}: docker save {BASE_IMAGE} on the control machine", time.monotonic() - start
    )
    yield archive
    archive.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def site(vm, vm_workdir, base_image_archive):
    folder = vm_workdir / ROLE
    folder.mkdir()
    return Site(vm, folder, images="build", mlflow_stack_base_image_archive=str(base_image_archive))


@pytest.fixture(scope="module")
def people():
    return {
        "carol": {"name": "carol", "password": secrets.token_urlsafe(18), "role": "editor"},
        "token": {"name": "ci-build", "secret": make_token_secret(), "role": "viewer"},
    }


def test_build_path_on_a_second_fresh_vm(vm, site, people):
    carol, token = people["carol"], people["token"]
    site.write([carol], [token])
    assert vm.ssh("docker --version", check=False).returncode != 0, "the fresh VM has Docker"

    converge = site.converge("first")
    record_time(f"{ROLE}: 6. first converge (images built on the VM)", converge.seconds)
    recap = assert_converged(converge, site.host, "build path: first converge")
    assert recap["changed"] > 0

    assert vm.healthz() == 200
    search = vm.url + "/api/2.0/mlflow/experiments/search"
    params = {"max_results": 1}
    assert requests.get(search, params=params, timeout=15).status_code == 401
    answer = requests.get(
        search, params=params, auth=(carol["name"], carol["password"]), timeout=15
    )
    assert answer.status_code == 200
    created = requests.post(
        vm.url + "/api/2.0/mlflow/experiments/create",
        json={"name": "built-on-the-vm"},
        auth=(carol["name"], carol["password"]),
        timeout=15,
    )
    assert created.status_code == 200, created.text
    bearer = {"Authorization": f"Bearer {token['secret']}"}
    assert requests.get(search, params=params, headers=bearer, timeout=15).status_code == 200
    # The images were built there, from the bundle, not shipped.
    images = vm.ssh("docker images --format '{{.Repository}}'").stdout.split()
    assert {f"{PROJECT}-{name}" for name in ("auth", "server", "nginx")} <= set(images), images

    again = site.converge("second")
    record_time(f"{ROLE}: 6. second converge (build from the VM's cache)", again.seconds)
    recap = assert_converged(again, site.host, "build path: second converge")
    assert recap["changed"] == 0, (
        f"second converge reported changed={recap['changed']}: {again.changed_tasks()}"
        f"\n{again.tail()}"
    )
