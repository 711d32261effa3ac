"""Account changes take effect at once (issue 3): revoking a user closes its streams and
refuses its existing credentials; a password change invalidates earlier JWTs and the old
password; a tenant change closes the user's streams and the reconnect lands in the new tenant."""

from __future__ import annotations

import time

from conftest import basic, bearer
from stream_support import (
    admin,
    assert_all_closed_within,
    eventually,
    sse_status,
    status_everywhere,
    unique,
    wait_until_closed,
)

REFUSED = {"verify": 401, "insert": 401, "sse": 401}
ACCEPTED = {"verify": 200, "insert": 200, "sse": 200}
PASSWORD = "correct horse 1"


def test_revoked_user_streams_close_within_a_second_and_credentials_are_refused(server):
    tenant = unique("revoked")
    name = unique("doomed")
    token_auth = server.user(name, tenant=tenant)
    token = token_auth["Authorization"].removeprefix("Bearer ")
    basic_auth = basic(name, PASSWORD)
    peer = server.user(unique("peer"), tenant=tenant)
    streams = {"bearer": server.sse(token_auth), "basic": server.sse(basic_auth),
               "access_token": server.sse(path=f"/sse?access_token={token}")}
    peer_stream = server.sse(peer)
    assert all(stream.status == 200 for stream in streams.values())
    # Every stream is live: each receives an event before the revocation.
    warm_id = server.insert(peer, "before", 1).json()["id"]
    for stream in [*streams.values(), peer_stream]:
        assert stream.next().id == warm_id

    assert admin(server, "/revoke_user", username=name).status == 200
    revoked_at = time.monotonic()
    assert_all_closed_within(streams, revoked_at, 1.0)
    # Another user's stream of the same tenant is untouched.
    after_id = server.insert(peer, "after", 2).json()["id"]
    assert peer_stream.next().id == after_id
    peer_stream.close()

    assert status_everywhere(server, token_auth) == REFUSED
    assert status_everywhere(server, basic_auth) == REFUSED
    assert sse_status(server, None, path=f"/sse?access_token={token}") == 401
    assert server.post("/login", {"username": name, "password": PASSWORD}).status == 401

    assert admin(server, "/unrevoke_user", username=name).status == 200
    assert status_everywhere(server, basic_auth) == ACCEPTED
    # The old JWT may stay dead after the unrevoke; a fresh login must work.
    assert status_everywhere(server, bearer(server.login(name))) == ACCEPTED


def test_password_change_invalidates_earlier_tokens_and_the_old_password(server):
    name = unique("changer")
    old_auth = server.user(name, tenant=unique("changer"))
    assert server.get("/verify", headers=old_auth).status == 200
    resp = admin(server, "/update_user", username=name, password="a brand new one 2")
    assert resp.status == 200, resp.body

    assert status_everywhere(server, old_auth) == REFUSED
    assert status_everywhere(server, basic(name, PASSWORD)) == REFUSED
    assert server.post("/login", {"username": name, "password": PASSWORD}).status == 401
    new_basic = basic(name, "a brand new one 2")
    assert status_everywhere(server, new_basic) == ACCEPTED

    # A token issued in the very second of the change may still be refused (iat has a
    # one-second resolution); within about a second a fresh login's token is accepted.
    def fresh_token_works() -> bool:
        fresh = bearer(server.login(name, "a brand new one 2"))
        return server.get("/verify", headers=fresh).status == 200

    assert eventually(fresh_token_works, timeout=2.5, interval=0.25)
    assert status_everywhere(server, bearer(server.login(name, "a brand new one 2"))) == ACCEPTED
    assert server.get("/verify", headers=old_auth).status == 401  # and stays refused


def test_update_without_a_password_keeps_tokens_valid(server):
    name = unique("steady")
    auth = server.user(name, tenant=unique("steady"))
    resp = admin(server, "/update_user", username=name, email="steady@example.com",
                 data={"nickname": "rock"})
    assert resp.status == 200, resp.body
    assert status_everywhere(server, auth) == ACCEPTED


def test_tenant_change_closes_streams_and_reconnect_lands_in_the_new_tenant(server):
    red, blue = unique("red"), unique("blue")
    red_peer = server.user(unique("red_peer"), tenant=red)
    blue_peer = server.user(unique("blue_peer"), tenant=blue)
    server.insert(red_peer, "colour", "red")
    server.insert(red_peer, "only_red", 1)
    server.insert(blue_peer, "colour", "blue")
    server.insert(blue_peer, "only_blue", 2)
    name = unique("mover")
    mover = server.user(name, tenant=red)
    stream = server.sse(mover)
    assert {(f.event, f.json()) for f in stream.take(2)} == {("colour", "red"), ("only_red", 1)}

    assert admin(server, "/update_user", username=name, tenant_name=blue).status == 200
    started = time.monotonic()
    assert wait_until_closed(stream, timeout=2.0) is not None, "stream left open in old tenant"
    stream.close()
    assert time.monotonic() - started < 2.0

    verified = server.get("/verify", headers=mover)
    assert verified.status == 200 and verified.json()["tenant_name"] == blue, verified.body
    moved = server.sse(mover)  # the same JWT, as EventSource's reconnect would use
    sync = {(f.event, f.json()) for f in moved.take(2)}
    assert sync == {("colour", "blue"), ("only_blue", 2)}
    assert moved.nothing_within(0.3), "more than the new tenant's latest values"
    server.insert(red_peer, "colour", "red again")
    blue_id = server.insert(blue_peer, "colour", "blue again").json()["id"]
    frame = moved.next()
    assert (frame.id, frame.json()) == (blue_id, "blue again"), "old tenant's event delivered"
    moved.close()
