"""End-to-end tests of the API contract of issue 2, against one real server per module.

Tests share the server, so each uses its own usernames and tenants (`unique`): usernames are
global, and a tenant's latest values reach every new subscriber of that tenant.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest
from api_support import (
    JWT_CLAIMS,
    assert_error,
    assert_unauthorized,
    compact,
    head_raw,
    unique,
)
from conftest import ADMIN, ENGINES, Server, basic, bearer, database_for

PASSWORD = "correct horse 1"
ROUTES = ["/", "/create_user", "/login", "/sse", "/insert", "/verify", "/revoke_user",
          "/unrevoke_user", "/list_users", "/get_user", "/update_user"]
USER_KEYS = {"id", "password", "revoked", "tenant_name", "username", "email", "scopes", "data"}


@pytest.fixture(scope="module", params=ENGINES)
def api(request, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("api")
    srv = Server(tmp, db=database_for(request, request.param, tmp)).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def member(api: Server) -> tuple[str, str, dict[str, str]]:
    """(username, tenant, Bearer headers) of a user for tests that only need to be signed in."""
    name, tenant = unique("member"), unique("tenant")
    return name, tenant, api.user(name, tenant=tenant, scopes=["news:get"])


def user_body(**override: Any) -> dict[str, Any]:
    """A valid create_user body; an override of `...` removes that field."""
    body = {"username": unique("u"), "password": PASSWORD, "admin_token": ADMIN,
            "tenant_name": "tenant_1", "scopes": []}
    body.update(override)
    return {k: v for k, v in body.items() if v is not ...}


def get_user(api: Server, username: str) -> dict[str, Any]:
    resp = api.post("/get_user", {"admin_token": ADMIN, "username": username})
    assert resp.status == 200, resp.body
    return resp.json()


# -- health check --------------------------------------------------------------------------

def test_get_root_is_200(api: Server) -> None:
    assert api.get("/").status == 200


def test_head_root_is_200_without_body(api: Server) -> None:
    head, rest = head_raw(api)
    assert head.split(b"\r\n")[0].split()[1] == b"200", head
    assert rest == b""


# -- create_user ---------------------------------------------------------------------------

def test_create_user_returns_uuid4(api: Server) -> None:
    resp = api.post("/create_user", user_body(scopes=["news:get", "news:post"],
                                              email="bob@example.com", data={"name": "Bob"}))
    assert resp.status == 200, resp.body
    body = resp.json()
    assert set(body) == {"id"}
    parsed = uuid.UUID(body["id"])
    assert parsed.version == 4 and str(parsed) == body["id"]


def test_create_user_ids_differ(api: Server) -> None:
    first = api.post("/create_user", user_body()).json()["id"]
    second = api.post("/create_user", user_body()).json()["id"]
    assert first != second


def test_create_user_wrong_admin_token_is_401(api: Server) -> None:
    body = user_body(admin_token="not-the-token")
    assert_error(api.post("/create_user", body), 401)
    # Nothing was created: the name is still free.
    assert api.post("/create_user", {**body, "admin_token": ADMIN}).status == 200


@pytest.mark.parametrize("field", ["username", "password", "tenant_name", "scopes"])
def test_create_user_missing_field_is_400(api: Server, field: str) -> None:
    assert_error(api.post("/create_user", user_body(**{field: ...})), 400)


def test_create_user_missing_admin_token_is_rejected(api: Server) -> None:
    # "Missing field" (400) and "wrong admin token" (401) both describe this; never a 200.
    resp = api.post("/create_user", user_body(admin_token=...))
    assert resp.status in (400, 401), resp.body
    assert_error(resp, resp.status)


@pytest.mark.parametrize("field,value", [
    ("username", 5), ("username", None), ("username", ["bob"]),
    ("password", 12345678), ("password", None),
    ("tenant_name", 5), ("tenant_name", None), ("tenant_name", {"a": 1}),
    ("scopes", "news:get"), ("scopes", [1]), ("scopes", ["ok", None]), ("scopes", {"a": "b"}),
    ("scopes", None), ("scopes", [["nested"]]),
    ("email", 5), ("email", ["bob@example.com"]),
])
def test_create_user_mistyped_field_is_400(api: Server, field: str, value: Any) -> None:
    assert_error(api.post("/create_user", user_body(**{field: value})), 400)


def test_create_user_mistyped_admin_token_is_rejected(api: Server) -> None:
    resp = api.post("/create_user", user_body(admin_token=12345))
    assert resp.status in (400, 401), resp.body
    assert_error(resp, resp.status)


@pytest.mark.parametrize("email", ["not-an-email", "bob@", "@example.com", "bob example.com",
                                   "bob@@example.com"])
def test_create_user_bad_email_is_400(api: Server, email: str) -> None:
    assert_error(api.post("/create_user", user_body(email=email)), 400)


def test_create_user_username_taken_in_other_tenant_is_400(api: Server) -> None:
    name = unique("taken")
    assert api.post("/create_user", user_body(username=name, tenant_name="t_a")).status == 200
    assert_error(api.post("/create_user", user_body(username=name, tenant_name="t_b")), 400)
    assert_error(api.post("/create_user", user_body(username=name, tenant_name="t_a")), 400)
    assert get_user(api, name)["tenant_name"] == "t_a"


def test_create_user_optional_fields_absent(api: Server) -> None:
    body = user_body(scopes=[])
    assert api.post("/create_user", body).status == 200
    user = get_user(api, body["username"])
    assert user["email"] is None and user["data"] is None and user["scopes"] == []


def test_create_user_optional_fields_null(api: Server) -> None:
    body = user_body(email=None, data=None)
    assert api.post("/create_user", body).status == 200
    user = get_user(api, body["username"])
    assert user["email"] is None and user["data"] is None


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[]", b'"text"', b"42", b"null"])
def test_create_user_body_not_an_object_is_400(api: Server, raw: bytes) -> None:
    resp = api.post("/create_user", raw=raw, headers={"Content-Type": "application/json"})
    assert_error(resp, 400)


# -- login ---------------------------------------------------------------------------------

def test_login_jwt_claims(api: Server) -> None:
    name = unique("claims")
    assert api.create_user(name, scopes=["news:get", "news:post"]).status == 200
    before = int(time.time())
    resp = api.post("/login", {"username": name, "password": PASSWORD})
    assert resp.status == 200, resp.body
    assert set(resp.json()) == {"jwt"}
    token = resp.json()["jwt"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == JWT_CLAIMS
    assert claims["sub"] == name and claims["iss"] == "Broker"
    assert claims["aud"] == "news:get,news:post"
    assert type(claims["iat"]) is int and type(claims["exp"]) is int
    assert before - 2 <= claims["iat"] <= time.time() + 2
    assert claims["exp"] == claims["iat"] + 86400  # the default --jwt_expiry


def test_login_aud_is_empty_without_scopes(api: Server) -> None:
    name = unique("noscope")
    assert api.create_user(name, scopes=[]).status == 200
    claims = jwt.decode(api.login(name), options={"verify_signature": False})
    assert claims["aud"] == ""


def test_login_wrong_password_is_401(api: Server, member) -> None:
    name, _, _ = member
    assert_error(api.post("/login", {"username": name, "password": PASSWORD + "x"}), 401)


def test_login_unknown_user_is_401(api: Server) -> None:
    assert_error(api.post("/login", {"username": unique("ghost"), "password": PASSWORD}), 401)


def test_login_malformed_json_is_400(api: Server) -> None:
    resp = api.post("/login", raw=b'{"username": ', headers={"Content-Type": "application/json"})
    assert_error(resp, 400)


# -- verify --------------------------------------------------------------------------------

def test_verify_body(api: Server, member) -> None:
    name, tenant, auth = member
    resp = api.get("/verify", headers=auth)
    assert resp.status == 200, resp.body
    assert resp.json() == {"username": name, "tenant_name": tenant, "scopes": ["news:get"]}


def test_verify_without_auth_is_401(api: Server) -> None:
    assert_unauthorized(api.get("/verify"))


# -- insert --------------------------------------------------------------------------------

def test_insert_response_shape(api: Server, member) -> None:
    _, _, auth = member
    first = api.insert(auth, "shape", {"n": 1})
    second = api.insert(auth, "shape", {"n": 2})
    for resp in (first, second):
        assert resp.status == 200, resp.body
        body = resp.json()
        assert set(body) == {"id", "event", "timestamp"}
        assert body["event"] == "shape"
        assert type(body["id"]) is int and type(body["timestamp"]) is int
        assert abs(body["timestamp"] - time.time()) <= 5
    assert second.json()["id"] > first.json()["id"]


@pytest.mark.parametrize("event", ["x" * 256, "événement ✓", "news:post", "a b"])
def test_insert_accepts_valid_event_names(api: Server, member, event: str) -> None:
    resp = api.insert(member[2], event, 1)
    assert resp.status == 200, resp.body
    assert resp.json()["event"] == event


BAD_INSERTS = {
    "missing event": {"data": 1},
    "empty event": {"event": "", "data": 1},
    "257 chars": {"event": "x" * 257, "data": 1},
    "LF": {"event": "a\nb", "data": 1},
    "CR": {"event": "a\rb", "data": 1},
    "CRLF": {"event": "a\r\ndata:evil", "data": 1},
    "NUL": {"event": "a\x00b", "data": 1},
    "TAB": {"event": "a\tb", "data": 1},
    "ESC": {"event": "a\x1bb", "data": 1},
    "DEL": {"event": "a\x7fb", "data": 1},
    "C1 NEL": {"event": "a\x85b", "data": 1},
    "event not a string": {"event": 5, "data": 1},
    "event null": {"event": None, "data": 1},
    "missing data": {"event": "ok"},
}


@pytest.mark.parametrize("body", BAD_INSERTS.values(), ids=BAD_INSERTS.keys())
def test_insert_bad_body_is_400(api: Server, member, body: dict) -> None:
    assert_error(api.post("/insert", body, headers=member[2]), 400)


@pytest.mark.parametrize("raw", [b"[]", b'"event"', b"1", b"null", b"{not json", b""])
def test_insert_non_object_or_malformed_is_400(api: Server, member, raw: bytes) -> None:
    headers = {**member[2], "Content-Type": "application/json"}
    assert_error(api.post("/insert", raw=raw, headers=headers), 400)


def test_insert_without_auth_is_401(api: Server) -> None:
    assert_unauthorized(api.post("/insert", {"event": "x", "data": 1}))


# -- the stream ----------------------------------------------------------------------------

def test_sse_headers(api: Server, member) -> None:
    stream = api.sse(member[2])
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].split(";")[0].strip() == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
    finally:
        stream.close()


def test_sse_without_auth_is_401(api: Server) -> None:
    assert_unauthorized(api.get("/sse", timeout=5))


def test_sse_frame_bytes_exact_for_sync_and_live(api: Server) -> None:
    auth = api.user(unique("frames"), tenant=unique("tenant"))
    synced = api.insert(auth, "before", {"a": [1, 2], "b": "x y"}).json()
    stream = api.sse(auth)
    try:
        assert stream.next().raw == (f'id:{synced["id"]}\nevent:before\n'
                                     'data:{"a":[1,2],"b":"x y"}\n\n').encode()
        live = api.insert(auth, "after", [1, {"k": None}]).json()
        expected = f'id:{live["id"]}\nevent:after\ndata:[1,{{"k":null}}]\n\n'
        assert stream.next().raw == expected.encode()
    finally:
        stream.close()


JSON_VALUES = {
    "null": None, "true": True, "false": False, "int": 42, "negative": -7, "float": 1.5,
    "string": "hello", "empty string": "", "list": [1, "two", None, [3]], "empty list": [],
    "empty object": {}, "nested": {"a": {"b": {"c": [1, {"d": False}]}}, "e": None},
    "newline in string": "line1\nline2\r\n", "quotes": 'say "hi"',
}


def test_sse_delivers_every_json_type_compact(api: Server) -> None:
    auth = api.user(unique("types"), tenant=unique("tenant"))
    stream = api.sse(auth)
    try:
        for index, value in enumerate(JSON_VALUES.values()):
            assert api.insert(auth, f"t{index}", value).status == 200
        for index, (label, value) in enumerate(JSON_VALUES.items()):
            frame = stream.next()
            assert frame.event == f"t{index}", label
            assert frame.data == compact(value), label
            assert frame.raw.count(b"\n") == 4, label  # id, event, data, blank line
    finally:
        stream.close()


def test_sse_delivers_non_ascii_data_on_one_line(api: Server) -> None:
    auth = api.user(unique("utf8"), tenant=unique("tenant"))
    value = {"text": "héllo wörld ✓ \u2028 日本"}
    stream = api.sse(auth)
    try:
        assert api.insert(auth, "utf8", value).status == 200
        frame = stream.next()
        assert frame.json() == value
        assert frame.raw.count(b"\n") == 4
    finally:
        stream.close()


def test_sse_sync_sends_latest_value_of_each_event_once_oldest_first(api: Server) -> None:
    auth = api.user(unique("sync"), tenant=unique("tenant"))
    ids = {}
    for event, value in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)]:
        ids[event] = api.insert(auth, event, value).json()["id"]
    stream = api.sse(auth)
    try:
        frames = stream.take(3)
        assert [(f.event, f.json(), f.id) for f in frames] == [
            ("a", 2, ids["a"]), ("c", 1, ids["c"]), ("b", 2, ids["b"])]
        assert stream.nothing_within(0.3)  # each name once, no older values
        live = api.insert(auth, "a", 3).json()["id"]
        frame = stream.next()
        assert (frame.event, frame.json(), frame.id) == ("a", 3, live)
    finally:
        stream.close()


def test_sse_live_events_reach_every_subscriber_in_order(api: Server) -> None:
    tenant = unique("tenant")
    writer = api.user(unique("w"), tenant=tenant)
    reader = api.user(unique("r"), tenant=tenant)
    streams = [api.sse(writer), api.sse(reader), api.sse(reader)]
    try:
        # Each stream has read its sync once it has the warm-up event: inserted earlier, the
        # events below could be folded into the sync's latest value (slower syncs on
        # PostgreSQL made that race visible).
        warm = api.insert(writer, "warm", 0).json()["id"]
        assert all(stream.next().id == warm for stream in streams)
        ids = [api.insert(writer, "seq", n).json()["id"] for n in range(5)]
        for stream in streams:
            assert [f.id for f in stream.take(5)] == ids
    finally:
        for stream in streams:
            stream.close()


def test_tenant_isolation(api: Server) -> None:
    tenant_a, tenant_b = unique("tenant_a"), unique("tenant_b")
    alice = api.user(unique("alice"), tenant=tenant_a)
    bob = api.user(unique("bob"), tenant=tenant_b)
    api.insert(alice, "secret", "for a only")
    api.insert(bob, "own", "for b")
    stream_a, stream_b = api.sse(alice), api.sse(bob)
    try:
        assert stream_b.next().event == "own"  # sync: only tenant B's event
        assert stream_a.next().event == "secret"
        api.insert(alice, "secret", "live for a only")
        marker = api.insert(bob, "marker", 1).json()["id"]
        # Alice's event was committed first: had it leaked, it would arrive before the marker.
        assert stream_b.next().id == marker
        assert stream_a.next().json() == "live for a only"
    finally:
        stream_a.close()
        stream_b.close()


def test_update_user_tenant_applies_to_next_connection(api: Server) -> None:
    tenant_a, tenant_b = unique("tenant_a"), unique("tenant_b")
    mover_name = unique("mover")
    mover = api.user(mover_name, tenant=tenant_a)
    stay_a = api.user(unique("stay_a"), tenant=tenant_a)
    stay_b = api.user(unique("stay_b"), tenant=tenant_b)
    api.insert(stay_a, "in_a", 1)
    in_b = api.insert(stay_b, "in_b", 1).json()["id"]
    resp = api.post("/update_user", {"admin_token": ADMIN, "username": mover_name,
                                     "tenant_name": tenant_b})
    assert resp.status == 200, resp.body
    assert api.get("/verify", headers=mover).json()["tenant_name"] == tenant_b
    stream = api.sse(mover)  # the JWT from before the move still works
    try:
        assert stream.next().id == in_b
        api.insert(stay_a, "in_a", 2)
        marker = api.insert(stay_b, "marker", 1).json()["id"]
        assert stream.next().id == marker
    finally:
        stream.close()


# -- revoke / unrevoke ---------------------------------------------------------------------

def test_revoke_and_unrevoke(api: Server) -> None:
    name = unique("rev")
    auth = api.user(name)
    resp = api.post("/revoke_user", {"admin_token": ADMIN, "username": name})
    assert resp.status == 200, resp.body
    assert get_user(api, name)["revoked"] is True
    assert_error(api.post("/login", {"username": name, "password": PASSWORD}), 401)
    assert_unauthorized(api.get("/verify", headers=auth))
    assert_unauthorized(api.get("/verify", headers=basic(name, PASSWORD)))
    resp = api.post("/unrevoke_user", {"admin_token": ADMIN, "username": name})
    assert resp.status == 200, resp.body
    assert get_user(api, name)["revoked"] is False
    assert api.get("/verify", headers=bearer(api.login(name))).status == 200


@pytest.mark.parametrize("path", ["/revoke_user", "/unrevoke_user"])
def test_revoke_unknown_user_is_404(api: Server, path: str) -> None:
    assert_error(api.post(path, {"admin_token": ADMIN, "username": unique("ghost")}), 404)


@pytest.mark.parametrize("path", ["/revoke_user", "/unrevoke_user"])
def test_revoke_wrong_admin_token_is_401(api: Server, member, path: str) -> None:
    assert_error(api.post(path, {"admin_token": "nope", "username": member[0]}), 401)
    assert get_user(api, member[0])["revoked"] is False


# -- list_users / get_user -----------------------------------------------------------------

def test_list_users(api: Server) -> None:
    full, bare = unique("full"), unique("bare")
    full_id = api.create_user(full, tenant="t_list", scopes=["x:y"], email="f@example.com",
                              data={"k": [1]}).json()["id"]
    bare_id = api.create_user(bare, tenant="t_list").json()["id"]
    resp = api.post("/list_users", {"admin_token": ADMIN})
    assert resp.status == 200, resp.body
    assert b"$argon2" not in resp.body and PASSWORD.encode() not in resp.body
    users = {u["username"]: u for u in resp.json()}
    assert all(set(u) == USER_KEYS and u["password"] == "***" for u in users.values())
    assert users[full] == {"id": full_id, "password": "***", "revoked": False,
                           "tenant_name": "t_list", "username": full, "email": "f@example.com",
                           "scopes": ["x:y"], "data": {"k": [1]}}
    assert users[bare] == {"id": bare_id, "password": "***", "revoked": False,
                           "tenant_name": "t_list", "username": bare, "email": None,
                           "scopes": [], "data": None}


def test_list_users_wrong_admin_token_is_401(api: Server) -> None:
    assert_error(api.post("/list_users", {"admin_token": "nope"}), 401)


def test_get_user(api: Server) -> None:
    name = unique("get")
    uid = api.create_user(name, tenant="t_get", scopes=["a", "b"], data=[1, 2]).json()["id"]
    assert get_user(api, name) == {"id": uid, "password": "***", "revoked": False,
                                   "tenant_name": "t_get", "username": name, "email": None,
                                   "scopes": ["a", "b"], "data": [1, 2]}


def test_get_user_unknown_is_404(api: Server) -> None:
    assert_error(api.post("/get_user", {"admin_token": ADMIN, "username": unique("no")}), 404)


def test_get_user_wrong_admin_token_is_401(api: Server, member) -> None:
    assert_error(api.post("/get_user", {"admin_token": "nope", "username": member[0]}), 401)


# -- update_user ---------------------------------------------------------------------------

def make_full_user(api: Server) -> tuple[str, dict[str, Any]]:
    name = unique("upd")
    resp = api.create_user(name, tenant="t_upd", scopes=["s1"], email="u@example.com",
                           data={"v": 1})
    assert resp.status == 200, resp.body
    return name, get_user(api, name)


@pytest.mark.parametrize("change", [
    {"data": {"v": 2}}, {"scopes": ["s2", "s3"]}, {"email": "new@example.com"},
    {"tenant_name": "t_other"}, {"scopes": []},
])
def test_update_user_changes_only_present_fields(api: Server, change: dict) -> None:
    name, before = make_full_user(api)
    resp = api.post("/update_user", {"admin_token": ADMIN, "username": name, **change})
    assert resp.status == 200, resp.body
    assert get_user(api, name) == {**before, **change}


def test_update_user_password(api: Server) -> None:
    name, before = make_full_user(api)
    new = "a brand new: password"
    resp = api.post("/update_user", {"admin_token": ADMIN, "username": name, "password": new})
    assert resp.status == 200, resp.body
    assert_error(api.post("/login", {"username": name, "password": PASSWORD}), 401)
    token = api.login(name, new)
    assert api.get("/verify", headers=bearer(token)).status == 200
    assert api.get("/verify", headers=basic(name, new)).status == 200
    assert get_user(api, name) == before  # password still shown as "***"


def test_update_user_unknown_is_404(api: Server) -> None:
    body = {"admin_token": ADMIN, "username": unique("ghost"), "data": 1}
    assert_error(api.post("/update_user", body), 404)


def test_update_user_wrong_admin_token_is_401(api: Server) -> None:
    name, before = make_full_user(api)
    resp = api.post("/update_user", {"admin_token": "nope", "username": name, "data": 9})
    assert_error(resp, 401)
    assert get_user(api, name) == before


@pytest.mark.parametrize("change", [
    {"scopes": "s1"}, {"scopes": [1]}, {"email": "not-an-email"}, {"email": 5},
    {"tenant_name": 5}, {"tenant_name": ["t"]}, {"password": 12345678},
])
def test_update_user_invalid_field_is_400(api: Server, change: dict) -> None:
    name, before = make_full_user(api)
    resp = api.post("/update_user", {"admin_token": ADMIN, "username": name, **change})
    assert_error(resp, 400)
    assert get_user(api, name) == before  # nothing half-applied


# -- CORS ----------------------------------------------------------------------------------

def cors_samples(api: Server, auth: dict[str, str]) -> dict[str, Any]:
    origin = {"Origin": "https://somewhere.example"}
    return {
        "GET /": api.get("/", headers=origin),
        "404": api.get("/nope", headers=origin),
        "405": api.get("/insert", headers=origin),
        "400": api.post("/login", raw=b"{", headers=origin),
        "401": api.get("/verify", headers=origin),
        "verify": api.get("/verify", headers={**origin, **auth}),
        "insert": api.post("/insert", {"event": "cors", "data": 1}, headers={**origin, **auth}),
        "preflight": api.request("OPTIONS", "/insert", headers=origin),
    }


def test_cors_header_on_every_response(api: Server, member) -> None:
    for label, resp in cors_samples(api, member[2]).items():
        assert resp.headers.get("access-control-allow-origin") == "*", label
    stream = api.sse(member[2])
    try:
        assert stream.headers.get("access-control-allow-origin") == "*"
    finally:
        stream.close()


def test_cors_custom_origin(make_server) -> None:
    srv = make_server("--origin", "https://app.example")
    auth = srv.user(unique("cors"))
    for label, resp in cors_samples(srv, auth).items():
        assert resp.headers.get("access-control-allow-origin") == "https://app.example", label
    stream = srv.sse(auth)
    try:
        assert stream.headers.get("access-control-allow-origin") == "https://app.example"
    finally:
        stream.close()


@pytest.mark.parametrize("path", ROUTES)
def test_cors_preflight(api: Server, path: str) -> None:
    resp = api.request("OPTIONS", path, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, last-event-id"})
    assert resp.status == 204
    assert resp.body == b""
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["access-control-allow-methods"] == "GET, POST, HEAD, OPTIONS"
    allowed = {h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id"} <= allowed
    assert int(resp.headers["access-control-max-age"]) > 0


# -- routing and errors --------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/nope"),
                                         ("GET", "/sse/extra"), ("GET", "/favicon.ico")])
def test_unknown_path_is_404(api: Server, method: str, path: str) -> None:
    assert_error(api.request(method, path, body={} if method == "POST" else None), 404)


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/insert", "POST"), ("POST", "/sse", "GET"), ("GET", "/login", "POST"),
    ("PUT", "/create_user", "POST"), ("DELETE", "/", "GET"), ("POST", "/", "GET"),
    ("GET", "/list_users", "POST"), ("POST", "/verify", "GET"), ("PATCH", "/update_user", "POST"),
])
def test_wrong_method_is_405_with_allow(api: Server, method: str, path: str, allowed: str) -> None:
    resp = api.request(method, path, body={} if method != "GET" else None)
    assert_error(resp, 405)
    methods = {m.strip().upper() for m in resp.headers["allow"].split(",")}
    assert allowed in methods and method not in methods


@pytest.mark.parametrize("path", ["/create_user", "/login", "/revoke_user", "/unrevoke_user",
                                  "/list_users", "/get_user", "/update_user", "/insert"])
def test_malformed_json_is_400(api: Server, member, path: str) -> None:
    headers = {**member[2], "Content-Type": "application/json"}
    assert_error(api.post(path, raw=b'{"admin_token": "' + ADMIN.encode(), headers=headers), 400)


def test_error_body_is_json_even_for_non_json_request(api: Server) -> None:
    resp = api.post("/login", raw=b"username=bob&password=x",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status in (400, 415)
    assert_error(resp, resp.status)
