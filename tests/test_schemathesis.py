"""Property-based API conformance: schemathesis drives a live broker from docs/openapi.yaml.

For every operation of the spec, schemathesis sends the spec's examples, boundary values
(lengths 0/1/64/65, 7/8/1024/1025, wrong types, missing fields) and random valid and invalid
requests, and checks every answer: never a 5xx, a status code the spec lists, the documented
Content-Type, a body matching the documented schema, the required headers (CORS, WWW-Authenticate,
Retry-After, the SSE headers), invalid input rejected with a 4xx, and authenticated routes
refusing requests without credentials.

One server serves the whole module; the run is bounded by a small number of examples per
operation so that it stays within about a minute on two cores.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import yaml
from conftest import ADMIN, ROOT, Server
from openapi_spec_validator import validate
from schemathesis.checks import positive_data_acceptance

SPEC = ROOT / "docs" / "openapi.yaml"
# Random examples per operation in the fuzzing phase; the coverage phase adds its own
# deterministic boundary cases on top.
MAX_EXAMPLES = 12
# Credentials of the user whose tokens authenticate /verify, /insert and /sse.
FUZZ_USER = "schemathesis-" + secrets.token_hex(4)
FUZZ_PASSWORD = "fuzzing passw0rd:with colon"
# A user the admin operations may revoke, update and read, so that their 200 paths run
# without touching FUZZ_USER.
TARGET_USER = "target-" + secrets.token_hex(4)
ADMIN_OPERATIONS = {"/revoke_user", "/unrevoke_user", "/get_user", "/update_user"}
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "ignored_auth",
    "unsupported_method",
]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Login throttling has its own tests; here it would turn schemathesis' probes with wrong
    # credentials into 429s where the check for ignored authentication expects 401.
    srv = Server(tmp_path_factory.mktemp("schemathesis"), ["--auth_failures", "1000000"]).start()
    yield srv
    srv.kill()


def static_config() -> dict[str, Any]:
    """What is known before the server starts: how much to generate and what to check."""
    return {
        "request-timeout": 10.0,
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "checks": {name: {"enabled": True} for name in CHECKS},
        # Credentials come from the fixture below, not from signing up through the API.
        "auth": {"auto-signup": False},
        # A stream never ends: read it until its first event, or for one second when the
        # resume point is past the newest event and only heartbeats would come.
        "operations": [
            {"include-name": "GET /sse", "request-timeout": 1.0, "max-stream-events": 1},
        ],
    }


# Loaded at import so that pytest can make one test per operation. (The lazy
# `schemathesis.pytest.from_fixture` loader does not work with pytest 9.)
schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict(static_config()))


@pytest.fixture(scope="module")
def base_url(live_server: Server) -> str:
    """Give the schema a real user's credentials; return the live server's URL."""
    jwt = live_server.user(FUZZ_USER, FUZZ_PASSWORD, tenant="fuzz_tenant")["Authorization"]
    assert live_server.create_user(TARGET_USER, tenant="target_tenant").status == 200
    # One event in the tenant, so that a fresh subscription has something to sync at once
    # and the stream read can stop after its first event.
    resp = live_server.insert({"Authorization": jwt}, "seed", {"n": 1})
    assert resp.status == 200, resp.body
    token = jwt.removeprefix("Bearer ")
    credentials = schemathesis.Config.from_dict({"auth": {"auto-signup": False, "openapi": {
        "bearerAuth": {"bearer": token},
        "basicAuth": {"username": FUZZ_USER, "password": FUZZ_PASSWORD},
        "accessToken": {"api_key": token},
        "adminBearer": {"bearer": ADMIN},
    }}}).projects.get_default().auth
    schema.config.auth = credentials
    # The operations were made at collection, before the port was known: each call is
    # given the URL instead.
    return f"http://127.0.0.1:{live_server.port}"


@schema.parametrize()
def test_api_conforms_to_openapi(case: Any, base_url: str, live_server: Server) -> None:
    aim_at_real_targets(case)
    if username_taken(case, live_server):
        # "username already taken" is a documented 400 for a request the schema calls valid.
        case.call_and_validate(base_url=base_url, excluded_checks=[positive_data_acceptance])
    else:
        case.call_and_validate(base_url=base_url)


def test_openapi_document_is_valid() -> None:
    validate(yaml.safe_load(SPEC.read_text()))


def test_spec_lists_every_method_the_server_serves(live_server: Server) -> None:
    """For each documented path, the server's `Allow` (on a 405) names exactly the
    documented methods: no undocumented method, no documented one missing."""
    document = yaml.safe_load(SPEC.read_text())
    http_methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    for path, item in document["paths"].items():
        documented = {method.upper() for method in item if method in http_methods}
        resp = live_server.request("PATCH", path)
        assert resp.status == 405, (path, resp.status, resp.body)
        allowed = {method.strip() for method in resp.headers["allow"].split(",")}
        assert allowed == documented, (path, allowed, documented)


def test_no_traceback_in_server_log(live_server: Server) -> None:
    """Runs after the generated tests: a handled error is fine, but an exception escaping
    into the log is a bug whatever status the client saw."""
    assert live_server.get("/").status == 200
    assert "Traceback" not in live_server.log, traceback_excerpt(live_server.log)


def username_taken(case: Any, srv: Server) -> bool:
    body = case.body
    if case.path != "/create_user" or not isinstance(body, dict):
        return False
    if not isinstance(body.get("username"), str):
        return False
    resp = srv.post("/get_user", {"admin_token": ADMIN, "username": body["username"]})
    return resp.status == 200


def aim_at_real_targets(case: Any) -> None:
    """Make generated admin requests reach past the admin-token check.

    A random admin token only ever meets 401, and failed admin-token attempts are throttled,
    which would turn the rest of the run into 429s. So every string token is replaced with the
    real one (non-string tokens stay, to be rejected as mistyped). For the admin operations
    on one user, half of the string usernames are pointed at TARGET_USER so that their 200
    paths run; the other half exercise 404. Assigning `case.body` makes schemathesis
    re-classify the case as valid or invalid before it is sent.
    """
    body = case.body
    if case.method != "POST" or not isinstance(body, dict):
        return
    changed = dict(body)
    if isinstance(body.get("admin_token"), str):
        changed["admin_token"] = ADMIN
    username = body.get("username")
    if case.path in ADMIN_OPERATIONS and isinstance(username, str) and len(username) % 2 == 0:
        changed["username"] = TARGET_USER
    if changed != body:
        case.body = changed


def traceback_excerpt(log: str) -> str:
    """The log from two lines before the first traceback, enough to see what raised."""
    lines = log.splitlines()
    first = next(i for i, line in enumerate(lines) if "Traceback" in line)
    return "\n".join(lines[max(0, first - 2):first + 30])
