"""Authentication of /verify, /insert and /sse: Bearer JWTs (real and forged) and Basic.

The server runs with a known --jwt_secret and --jwt_expiry 120, so tests can check the
signature of issued tokens and craft their own: expired, wrong issuer, other algorithms.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from api_support import (
    JWT_CLAIMS,
    assert_error,
    assert_unauthorized,
    claims_for,
    forge,
    unique,
    unsigned_token,
    wait_for_log,
)
from conftest import ADMIN, Response, Server, basic, bearer, rows
from stream_support import admin

# 64 bytes, so pyjwt does not warn when the tests sign HS512 forgeries with it.
SECRET = "a-known-test-secret-" + "0123456789abcdef" * 3
EXPIRY = 120
COLON_PASSWORD = "pass:with:colons 1"


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    server = Server(tmp_path_factory.mktemp("auth"),
                    ["--jwt_secret", SECRET, "--jwt_expiry", str(EXPIRY)]).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def colon_user(srv: Server) -> tuple[str, str]:
    """(username, tenant) of a user whose password contains ':'."""
    name, tenant = unique("colon"), unique("tenant")
    resp = srv.create_user(name, COLON_PASSWORD, tenant, scopes=["news:get", "news:post"])
    assert resp.status == 200, resp.body
    return name, tenant


def call(srv: Server, endpoint: str, headers: dict[str, str]) -> Response:
    """One authenticated request to an endpoint; only used for answers that end (not a
    200 stream)."""
    if endpoint == "/insert":
        return srv.post("/insert", {"event": "auth", "data": 1}, headers=headers)
    return srv.get(endpoint, headers=headers, timeout=5)


ENDPOINTS = ["/verify", "/insert", "/sse"]


# -- issued tokens -------------------------------------------------------------------------

def test_login_token_is_signed_with_the_configured_secret(srv: Server, colon_user) -> None:
    name, _ = colon_user
    token = srv.login(name, COLON_PASSWORD)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="Broker",
                        audience="news:get,news:post")
    assert set(claims) == JWT_CLAIMS and claims["sub"] == name


def test_jwt_expiry_flag_sets_exp(srv: Server, colon_user) -> None:
    token = srv.login(colon_user[0], COLON_PASSWORD)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] == claims["iat"] + EXPIRY
    assert abs(claims["iat"] - time.time()) <= 5


def test_crafted_valid_token_is_accepted(srv: Server, colon_user) -> None:
    # The control for the forgeries below: a token made the same way, but correct, works.
    name, tenant = colon_user
    resp = srv.get("/verify", headers=bearer(forge(claims_for(name), SECRET)))
    assert resp.status == 200, resp.body
    assert resp.json()["tenant_name"] == tenant


# -- good credentials on every endpoint ----------------------------------------------------

def good_credentials(srv: Server, name: str) -> dict[str, dict[str, str]]:
    return {"bearer": bearer(srv.login(name, COLON_PASSWORD)),
            "basic": basic(name, COLON_PASSWORD)}


@pytest.mark.parametrize("kind", ["bearer", "basic"])
def test_verify_accepts(srv: Server, colon_user, kind: str) -> None:
    name, tenant = colon_user
    resp = srv.get("/verify", headers=good_credentials(srv, name)[kind])
    assert resp.status == 200, resp.body
    assert resp.json() == {"username": name, "tenant_name": tenant,
                           "scopes": ["news:get", "news:post"]}


@pytest.mark.parametrize("kind", ["bearer", "basic"])
def test_insert_accepts(srv: Server, colon_user, kind: str) -> None:
    resp = srv.insert(good_credentials(srv, colon_user[0])[kind], f"by_{kind}", kind)
    assert resp.status == 200, resp.body
    assert resp.json()["event"] == f"by_{kind}"


@pytest.mark.parametrize("kind", ["bearer", "basic"])
def test_sse_accepts(srv: Server, colon_user, kind: str) -> None:
    auth = good_credentials(srv, colon_user[0])[kind]
    stream = srv.sse(auth)
    try:
        assert stream.status == 200
        inserted = srv.insert(auth, f"sse_{kind}", {"via": kind}).json()["id"]
        # The tenant holds other tests' events too (sync): read until ours arrives.
        for _ in range(20):
            if stream.next().id == inserted:
                break
        else:
            pytest.fail(f"event {inserted} not delivered")
    finally:
        stream.close()


# -- bad credentials on every endpoint -----------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


BAD_CREDENTIALS: dict[str, Callable[[str], dict[str, str]]] = {
    "none": lambda name: {},
    "garbage bearer": lambda name: {"Authorization": "Bearer garbage"},
    "empty bearer": lambda name: {"Authorization": "Bearer "},
    "unknown scheme": lambda name: {"Authorization": f"Token {forge(claims_for(name), SECRET)}"},
    "alg none": lambda name: bearer(unsigned_token(claims_for(name))),
    "other secret": lambda name: bearer(forge(claims_for(name), "another-secret-" + "x" * 50)),
    "expired": lambda name: bearer(forge(claims_for(name, iat=int(time.time()) - 900,
                                                    exp=int(time.time()) - 600), SECRET)),
    "wrong iss": lambda name: bearer(forge(claims_for(name, iss="Dispatcher"), SECRET)),
    "no iss": lambda name: bearer(forge(claims_for(name, iss=None), SECRET)),
    "no exp": lambda name: bearer(forge(claims_for(name, exp=None), SECRET)),
    "HS512": lambda name: bearer(forge(claims_for(name), SECRET, "HS512")),
    "HS384": lambda name: bearer(forge(claims_for(name), SECRET, "HS384")),
    "unknown sub": lambda name: bearer(forge(claims_for(unique("ghost")), SECRET)),
    "tampered": lambda name: bearer(tamper(forge(claims_for(name), SECRET))),
    "basic wrong password": lambda name: basic(name, COLON_PASSWORD + "x"),
    "basic unknown user": lambda name: basic(unique("ghost"), COLON_PASSWORD),
    "basic no colon": lambda name: {"Authorization": f"Basic {b64(name)}"},
    "basic not base64": lambda name: {"Authorization": "Basic %%%not-base64%%%"},
}


def tamper(token: str) -> str:
    """Swap the payload for one naming another subject, keeping the original signature."""
    header, _, signature = token.split(".")
    other = forge(claims_for("admin"), SECRET).split(".")[1]
    return f"{header}.{other}.{signature}"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", BAD_CREDENTIALS.keys())
def test_bad_credentials_are_401(srv: Server, colon_user, endpoint: str, case: str) -> None:
    assert_unauthorized(call(srv, endpoint, BAD_CREDENTIALS[case](colon_user[0])))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_revoked_user_credentials_are_401(srv: Server, endpoint: str) -> None:
    name = unique("revoked")
    assert srv.create_user(name, COLON_PASSWORD).status == 200
    token = srv.login(name, COLON_PASSWORD)
    resp = srv.post("/revoke_user", {"admin_token": ADMIN, "username": name})
    assert resp.status == 200, resp.body
    assert_unauthorized(call(srv, endpoint, bearer(token)))
    assert_unauthorized(call(srv, endpoint, basic(name, COLON_PASSWORD)))
    assert_error(srv.post("/login", {"username": name, "password": COLON_PASSWORD}), 401)


# -- Argon2 parameters (issue 10) --------------------------------------------------------------

def stored_hash(srv: Server, username: str) -> str:
    return rows(srv.db, "SELECT password_hash FROM users WHERE username = ?", (username,))[0][0]


def test_default_argon2_parameters_are_owasps(srv: Server) -> None:
    name = unique("owasp")
    assert srv.create_user(name).status == 200
    assert stored_hash(srv, name).startswith("$argon2id$v=19$m=19456,t=2,p=1$")


@pytest.mark.parametrize(("how", "engine"), [("login", "sqlite"), ("basic", "sqlite"),
                                             ("login", "postgres")], indirect=["engine"])
def test_hash_is_upgraded_at_the_next_login_after_a_parameter_change(tmp_path, how,
                                                                    database) -> None:
    old = ["--argon2_memory_kib", "8192", "--argon2_time_cost", "1", "--argon2_parallelism", "2"]
    srv = Server(tmp_path, old, db=database).start()
    try:
        name = unique("upgrade")
        assert srv.create_user(name, "an old password 1").status == 200
        assert stored_hash(srv, name).startswith("$argon2id$v=19$m=8192,t=1,p=2$")
        token = srv.login(name, "an old password 1")
        srv.extra_args = ["--argon2_memory_kib", "9000", "--argon2_time_cost", "2"]
        srv.restart()
        # A wrong password changes nothing; the old hash still verifies the right one.
        assert srv.post("/login", {"username": name, "password": "wrong one 1"}).status == 401
        assert stored_hash(srv, name).startswith("$argon2id$v=19$m=8192,t=1,p=2$")
        if how == "login":
            new_token = srv.login(name, "an old password 1")
            assert srv.get("/verify", headers=bearer(new_token)).status == 200
        else:
            assert srv.get("/verify", headers=basic(name, "an old password 1")).status == 200
        assert stored_hash(srv, name).startswith("$argon2id$v=19$m=9000,t=2,p=1$")
        wait_for_log(srv, "rehashed the password of")
        # The same password: tokens issued before the rehash stay valid, and it logs in.
        assert srv.get("/verify", headers=bearer(token)).status == 200
        assert srv.login(name, "an old password 1")
    finally:
        srv.kill()


# -- authorization is current when it acts (issue 17) ---------------------------------------
# A Basic check waits for Argon2, which a login flood keeps busy; an admin change that
# commits meanwhile must win: the stream does not open in the old tenant, the insert is
# not stored. "other": the change is made through a second process (PostgreSQL only), and
# reaches the first by the database's account notices.

FLOOD = 40  # failed logins queued at once: Argon2's queue holds 64


def busy_argon2(server) -> list[socket.socket]:
    """Queue FLOOD failed logins at once, each on its own connection: Argon2 is then busy for
    FLOOD hashes (about a second), and a Basic check that comes next waits behind them."""
    flood = []
    for _ in range(FLOOD):
        body = json.dumps({"username": unique("flood"), "password": "wrong password"}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        flood.append(sock)
    time.sleep(0.2)  # every login has reached the hashing queue
    return flood


def during_a_basic_check(server, changer, call, change) -> object:
    """Run `call` (a request with Basic credentials not yet verified) while Argon2 is busy,
    make `change` through `changer` while it waits, and return what `call` returned."""
    flood = busy_argon2(server)
    with ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(call)
            time.sleep(0.1)  # the request reaches the server and waits for its verify
            change(changer)
            assert not pending.done(), "the Basic check ended before the change: no race"
            return pending.result(timeout=30)
        finally:
            for sock in flood:
                sock.close()


@pytest.fixture
def racing(via, make_server):
    """(the server, the server that makes admin changes: itself, or another process)."""
    server = make_server("--auth_failures", "10000")
    return server, make_server("--auth_failures", "10000") if via == "other" else server


# "other" needs PostgreSQL: one process owns a SQLite file.
RACES = pytest.mark.parametrize(("via", "engine"), [
    ("same", "sqlite"), ("same", "postgres"), ("other", "postgres")], indirect=["engine"])


@RACES
def test_a_stream_does_not_open_for_a_user_revoked_during_its_basic_check(racing):
    server, changer = racing
    name = unique("late")
    server.user(name, COLON_PASSWORD, tenant=unique("late"))
    stream = during_a_basic_check(
        server, changer, lambda: server.sse(basic(name, COLON_PASSWORD), timeout=30),
        lambda srv: admin(srv, "/revoke_user", username=name))
    stream.close()
    assert stream.status == 401


@RACES
def test_a_stream_checked_during_a_tenant_move_never_gets_the_old_tenant(racing):
    server, changer = racing
    old, new = unique("old"), unique("new")
    old_peer = server.user(unique("old_peer"), tenant=old)
    new_peer = server.user(unique("new_peer"), tenant=new)
    server.insert(old_peer, "colour", "old")
    server.insert(new_peer, "colour", "new")
    name = unique("mover")
    server.user(name, COLON_PASSWORD, tenant=old)
    stream = during_a_basic_check(
        server, changer, lambda: server.sse(basic(name, COLON_PASSWORD), timeout=30),
        lambda srv: admin(srv, "/update_user", username=name, tenant_name=new))
    try:
        assert stream.status in (200, 401), stream.status
        if stream.status == 200:  # then it is a stream of the new tenant
            assert [(f.event, f.json()) for f in stream.take(1)] == [("colour", "new")]
            server.insert(old_peer, "colour", "old again")
            new_id = server.insert(new_peer, "colour", "new again").json()["id"]
            assert stream.next().id == new_id, "the old tenant's event was delivered"
    finally:
        stream.close()


@RACES
def test_an_insert_checked_during_a_revoke_is_refused_and_not_stored(racing):
    server, changer = racing
    name, event = unique("late"), unique("never")
    server.user(name, COLON_PASSWORD, tenant=unique("late"))
    resp = during_a_basic_check(server, changer,
                                lambda: server.insert(basic(name, COLON_PASSWORD), event, 1),
                                lambda srv: admin(srv, "/revoke_user", username=name))
    assert resp.status == 401, resp.body
    assert rows(server.db, "SELECT count(*) FROM events WHERE event = ?", (event,)) == [(0,)]
