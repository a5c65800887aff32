"""Schemathesis fuzzes a live daemon from its own OpenAPI document (S19).

Every operation of ``/api/openapi.json`` (the S3 surface, described minimally and fuzzed by its own
tests, aside) is called with generated valid and invalid inputs as four callers: no key, a viewer,
an operator and an admin. Checks: no 5xx, status codes / content types / bodies as documented,
JSON ``{error, detail}`` errors, no traceback text (``tests/fuzz_checks.py``), and every request
answered within 10 s on Schemathesis' keep-alive session. Bounded: a few examples per operation
and a time cap per caller, so the whole test stays within about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest_twisted
import treq
from twisted.internet import threads

from tests.authhelpers import create_user, user_key

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_EXAMPLES = int(os.environ.get("STDAEMON_FUZZ_EXAMPLES", "4"))
MAX_SECONDS = int(os.environ.get("STDAEMON_FUZZ_SECONDS", "25"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,no_traceback_text,json_error_bodies")


def run_schemathesis(url: str, headers: dict, report: str) -> subprocess.CompletedProcess:
    st = os.path.join(os.path.dirname(sys.executable), "st")
    command = [st, "run", f"{url}/api/openapi.json", "--checks", CHECKS,
               "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_SECONDS),
               "--request-timeout", "10", "--max-response-time", "10", "--workers", "1",
               "--exclude-path-regex", "^/api/cloud/storage", "--seed", "14",
               "--generation-database", "none", "--no-color", "--suppress-health-check", "all",
               "--report", "ndjson", "--report-ndjson-path", report]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_checks",
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command, capture_output=True, text=True, timeout=MAX_SECONDS * 3 + 60,
                          env=env, cwd=os.path.dirname(report))


@pytest_twisted.ensureDeferred
async def test_openapi_document_describes_every_route_and_its_role(daemon):
    response = await treq.get(daemon.url + "/api/openapi.json")   # public: no credentials
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/json")
    raw = await response.content()
    document = json.loads(raw)
    assert document["openapi"] == "3.1.0"
    assert set(document["components"]["securitySchemes"]) == {"apiKey", "bearer", "session"}
    assert document["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    assert daemon.admin_key.encode() not in raw
    routes = daemon.service.root.routes()
    assert len(routes) > 40
    for template, methods, endpoint, info in routes:
        path = template
        for name in ("<", ">"):
            path = path.replace(name, "{" if name == "<" else "}")
        path = path.replace("{path:", "{")
        for method in methods:
            operation = document["paths"][path][method.lower()]
            assert operation["x-stdaemon-access"] == info.access.name.lower(), (path, method)
            assert (operation["security"] == []) == (info.access.name == "PUBLIC"), (path, method)
            if info.body is not None:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                assert schema["$ref"].rsplit("/", 1)[-1] in document["components"]["schemas"]
    submit = document["paths"]["/api/cloud/jobs/submit"]["post"]
    body = document["components"]["schemas"][
        submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert "hardware_profile" in body["properties"] and "config" in body["properties"]
    listing = {p["name"]: p for p in document["paths"]["/api/cloud/jobs"]["get"]["parameters"]}
    assert listing["limit"]["schema"]["maximum"] == 500
    assert listing["offset"]["schema"]["maximum"] == 2 ** 63 - 1
    assert document["paths"]["/api/events/stream"]["get"]["responses"]["2XX"]["content"] == {
        "text/event-stream": {}}


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_nothing_for_any_caller(daemon, tmp_path):
    response = await treq.get(daemon.url + "/api/openapi.json")
    assert response.code == 200
    document = json.loads(await response.content())
    assert document["openapi"].startswith("3.1")
    viewer = await user_key(daemon, (await create_user(daemon, "fuzz-viewer", "viewer"))["id"], "viewer")
    operator = await user_key(daemon, (await create_user(daemon, "fuzz-operator", "operator"))["id"], "operator")
    callers = [("anonymous", {}), ("viewer", {"X-API-Key": viewer}), ("operator", {"X-API-Key": operator}),
               ("admin", {"X-API-Key": daemon.admin_key})]
    failures = []
    for name, headers in callers:
        report = str(tmp_path / f"{name}.ndjson")
        # In a thread: the daemon under test runs on this reactor.
        done = await threads.deferToThread(run_schemathesis, daemon.url, headers, report)
        tested = _tested_operations(report)
        if done.returncode != 0 or not tested:
            failures.append(f"--- {name}: exit {done.returncode}, {len(tested)} operations\n"
                            + _failures_part(done.stdout) + done.stderr[-2000:])
    assert not failures, "\n".join(failures)
    live = await treq.get(daemon.url + "/api/cloud/health/live")
    assert live.code == 200
    await live.content()


def _failures_part(output: str) -> str:
    """The failures section of Schemathesis' output (each with its curl reproduction)."""
    start = output.find("FAILURES")
    end = output.find("WARNINGS", start) if start >= 0 else -1
    if start < 0:
        return output[-6000:]
    return output[start:end if end > 0 else start + 12000][:12000]


def _tested_operations(report: str) -> set:
    seen = set()
    try:
        with open(report) as fh:
            for line in fh:
                if '"label"' in line:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    _labels(event, seen)
    except OSError:
        return set()
    return seen


def _labels(value, seen: set) -> None:
    if isinstance(value, dict):
        label = value.get("label")
        if isinstance(label, str) and " /" in label:
            seen.add(label)
        for item in value.values():
            _labels(item, seen)
    elif isinstance(value, list):
        for item in value:
            _labels(item, seen)
