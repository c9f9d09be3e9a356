""".ci/imageaudit.py: advisories in the images' Python environments fail CI when a fix exists,
and an audit that could not reach any advisory service says so instead of passing."""

import urllib.error

import imageaudit

REPORT = {
    "dependencies": [
        {
            "name": "flask",
            "version": "2.0.0",
            "vulns": [
                {"id": "PYSEC-1", "aliases": ["CVE-1"], "fix_versions": ["2.2.5"]},
                {"id": "GHSA-nofix", "aliases": [], "fix_versions": []},
            ],
        },
        {
            "name": "jinja2",
            "version": "3.0.0",
            "vulns": [
                {"id": "GHSA-accepted", "aliases": ["CVE-2"], "fix_versions": ["3.1.4"]},
            ],
        },
        {"name": "bcrypt", "version": "5.0.0", "vulns": []},
    ]
}


class Answer:
    def __init__(self, status):
        self.status = status

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def test_reachable_service_none_when_every_probe_fails():
    def opener(request, timeout):
        raise urllib.error.URLError("blocked by the proxy")

    assert imageaudit.reachable_service(opener=opener) is None


def test_reachable_service_404_not_counted_first_answering_chosen():
    def opener(request, timeout):
        if "pypi.org" in request.full_url:
            raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)
        return Answer(200)

    assert imageaudit.reachable_service(opener=opener) == "osv"


def test_findings_fixable_fails_unless_accepted_by_id_or_alias():
    fixable, other = imageaudit.findings(REPORT, {"CVE-2"})
    assert fixable == ["flask 2.0.0: PYSEC-1 (fixed in 2.2.5)"]
    assert other == [
        "flask 2.0.0: GHSA-nofix (fixed in none)",
        "jinja2 3.0.0: GHSA-accepted (fixed in 3.1.4)",
    ]


def test_accepted_ids_comments_and_reasons_ignored():
    text = "# accepted advisories\nGHSA-x  no fix for Debian's python yet\n\n  PYSEC-2 # why\n"
    assert imageaudit.accepted_ids(text) == {"GHSA-x", "PYSEC-2"}


def test_main_no_service_skipped_loudly_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(imageaudit, "image_packages", lambda image, python: ["flask==2.0.0"])
    monkeypatch.setattr(imageaudit, "reachable_service", lambda: None)
    assert imageaudit.main(["pip-audit", "srv=/opt/mlflow/bin/python"]) == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_main_fixable_advisory_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(imageaudit, "image_packages", lambda image, python: ["flask==2.0.0"])
    monkeypatch.setattr(imageaudit, "reachable_service", lambda: "pypi")
    monkeypatch.setattr(imageaudit, "audit", lambda pip_audit, packages, service: REPORT)
    monkeypatch.setattr(imageaudit, "ACCEPTED", imageaudit.ACCEPTED.with_name("absent.txt"))
    assert imageaudit.main(["pip-audit", "srv=/opt/mlflow/bin/python"]) == 1
    assert "FIXABLE flask 2.0.0: PYSEC-1" in capsys.readouterr().out


def test_main_bad_usage_exit_2():
    assert imageaudit.main(["pip-audit"]) == 2
    assert imageaudit.main(["pip-audit", "image-without-python"]) == 2
