"""Known advisories in the Python environments of our images (issue 13), for .ci/run.

Contract: ``python3 .ci/imageaudit.py PIP_AUDIT IMAGE=PYTHON ...`` lists the packages of each
image's environment as that environment's own interpreter sees them (``importlib.metadata``,
run with ``--network none``: the list is what the image holds, extra packages included), and
asks pip-audit about them, exact versions, no resolution. Exit 1 when an advisory has a fixed
version (upgrading is possible, so it is a defect), unless ``.ci/audit-accepted.txt`` names
its id with a reason; advisories without a fix are printed, not fatal. Exit 0 with one loud
``SKIPPED`` line when no advisory service answers from this machine (a TLS-inspecting proxy
that blocks PyPI's per-release JSON and osv.dev, as here): an audit that cannot see
advisories must not pass as one that found none. Exit 2 on bad usage or a failing image.
"""

import json
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ACCEPTED = Path(__file__).with_name("audit-accepted.txt")
# What pip-audit's two services fetch: a release's JSON on PyPI, and OSV's query API.
PROBES = {
    "pypi": ("https://pypi.org/pypi/pip/24.0/json", None),
    "osv": ("https://api.osv.dev/v1/query", b'{"package": {"name": "pip", "ecosystem": "PyPI"}}'),
}
LIST_PACKAGES = (
    "import importlib.metadata as m\n"
    "for d in m.distributions():\n"
    "    print(f\"{d.metadata['Name']}=={d.version}\")\n"
)


def reachable_service(probes=PROBES, opener=urllib.request.urlopen) -> str | None:
    """The first advisory service that answers 200 from here, or None."""
    for service, (url, body) in probes.items():
        try:
            with opener(urllib.request.Request(url, data=body), timeout=10) as answer:
                if answer.status == 200:
                    return service
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return None


def image_packages(image: str, python: str) -> list[str]:
    """``name==version`` of every distribution in ``image``'s environment at ``python``."""
    command = ["docker", "run", "--rm", "--network", "none", "--entrypoint", python, image]
    result = subprocess.run([*command, "-c", LIST_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{image}: cannot list packages: {result.stderr.strip()[-200:]}")
    return sorted({line.strip() for line in result.stdout.splitlines() if "==" in line})


def accepted_ids(text: str) -> set[str]:
    """Advisory ids from the accepted list: ``ID  reason`` per line, ``#`` comments."""
    ids = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.add(line.split()[0])
    return ids


def findings(report: dict, accepted: set[str]) -> tuple[list[str], list[str]]:
    """(fixable advisories not accepted, the others) from pip-audit's JSON, one line each."""
    fixable, other = [], []
    for dependency in report.get("dependencies", []):
        for vuln in dependency.get("vulns", []):
            ids = {vuln["id"], *vuln.get("aliases", [])}
            fixes = ", ".join(vuln.get("fix_versions", [])) or "none"
            line = f"{dependency['name']} {dependency['version']}: {vuln['id']} (fixed in {fixes})"
            if vuln.get("fix_versions") and not ids & accepted:
                fixable.append(line)
            else:
                other.append(line)
    return fixable, other


def audit(pip_audit: str, packages: list[str], service: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        requirements.write("\n".join(packages) + "\n")
        requirements.flush()
        command = [pip_audit, "--requirement", requirements.name, "--no-deps", "--disable-pip"]
        command += ["--vulnerability-service", service, "--format", "json", "--progress-spinner"]
        result = subprocess.run([*command, "off"], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"pip-audit failed: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in spec for spec in argv[1:]):
        print("usage: imageaudit.py PIP_AUDIT IMAGE=PYTHON ...", file=sys.stderr)
        return 2
    pip_audit, specs = argv[0], [spec.split("=", 1) for spec in argv[1:]]
    try:
        packages = {image: image_packages(image, python) for image, python in specs}
    except RuntimeError as error:
        print(f"image audit: {error}", file=sys.stderr)
        return 2
    service = reachable_service()
    if service is None:
        counts = ", ".join(f"{image} {len(found)}" for image, found in packages.items())
        print(
            "image audit: SKIPPED: no advisory service (PyPI's per-release JSON, osv.dev) "
            f"answers from this machine; packages not audited: {counts}"
        )
        return 0
    accepted = accepted_ids(ACCEPTED.read_text() if ACCEPTED.exists() else "")
    failed = False
    for image, found in packages.items():
        try:
            report = audit(pip_audit, found, service)
            fixable, other = findings(report, accepted)
        except (RuntimeError, ValueError) as error:
            print(f"image audit: {image}: {error}", file=sys.stderr)
            return 2
        skipped = sum("skip_reason" in dependency for dependency in report["dependencies"])
        print(
            f"image audit: {image}: {len(found)} packages via {service}, {len(fixable)} "
            f"fixable, {skipped} not audited (unknown to {service})"
        )
        for line in fixable:
            print(f"  FIXABLE {line}")
        for line in other:
            print(f"  known   {line}")
        failed = failed or bool(fixable)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
