"""Per-event permissions from scopes (issue 11): with --enforce_scopes, `NAME:post` lets a
user insert NAME and `NAME:get` lets it receive NAME (`chat.*` a literal prefix, `*` every
name), in the sync, in a replay and live; the stored user's scopes decide at once. Without
the flag, scopes mean nothing to the server. Real server, real sockets."""

from __future__ import annotations

import threading

import pytest
from api_support import launch
from conftest import SSE, Server, basic
from stream_support import admin, open_resume, unique, wait_until_closed
from test_stream import drain, open_stalled_subscriber

PASSWORD = "correct horse 1"
WRITER = ["*:post"]


@pytest.fixture
def enforcing(make_server) -> Server:
    return make_server("--enforce_scopes")


def ids(frames) -> list[int]:
    return [frame.id for frame in frames]


def insert_all(server: Server, auth: dict[str, str], names: list[str]) -> dict[int, str]:
    """Insert one event per name; return id -> name in insertion order."""
    inserted = {}
    for n, name in enumerate(names):
        resp = server.insert(auth, name, {"n": n})
        assert resp.status == 200, (name, resp.body)
        inserted[resp.json()["id"]] = name
    return inserted


def receives_exactly(stream: SSE, expected: list[int]) -> None:
    frames = stream.take(len(expected))
    assert ids(frames) == expected
    assert stream.nothing_within(0.3), "a frame the subscriber may not read, or a duplicate"


# -- inserting ---------------------------------------------------------------------------


def test_insert_is_allowed_by_exact_names_prefixes_and_star(enforcing):
    tenant = unique("post")
    name = unique("poster")
    scopes = ["news:post", "chat.*:post", "news:get", "moderator", "urn:x:admin"]
    bearer_auth = enforcing.user(name, tenant=tenant, scopes=scopes)
    everyone = enforcing.user(unique("all"), tenant=tenant, scopes=["*:post"])
    for auth in (bearer_auth, basic(name, PASSWORD)):  # the same rules for Bearer and Basic
        for event in ("news", "chat.room1", "chat.a.b", "chat."):
            assert enforcing.insert(auth, event, 1).status == 200, event
        for event in ("chatroom", "chat", "newsletter", "new", "moderator", "anything"):
            resp = enforcing.insert(auth, event, 1)
            assert resp.status == 403, event
            assert resp.headers["content-type"] == "application/json"
            assert event in resp.json()["error"]
    for event in ("chatroom", "anything", "*", "news"):
        assert enforcing.insert(everyone, event, 1).status == 200, event
    # Scopes that are not NAME:get or NAME:post are kept and returned as before.
    assert enforcing.get("/verify", headers=bearer_auth).json()["scopes"] == scopes


def test_a_refused_insert_stores_nothing(enforcing):
    tenant = unique("nothing")
    reader = enforcing.user(unique("reader"), tenant=tenant, scopes=["*:get", "mine:post"])
    assert enforcing.insert(reader, "config", {"evil": True}).status == 403
    assert enforcing.insert(reader, "mine", 1).status == 200
    stream = enforcing.sse(reader)
    assert stream.next().event == "mine"  # the sync holds the accepted event, no "config"
    assert stream.nothing_within(0.3)
    # A replay of the whole log has no trace of it either.
    replay = open_resume(enforcing, reader, 0, "header")
    assert replay.next().event == "mine"
    assert replay.nothing_within(0.3)
    stream.close()
    replay.close()


def test_a_user_without_post_scopes_may_insert_nothing(enforcing):
    auth = enforcing.user(unique("mute"), tenant=unique("mute"), scopes=["*:get", "news:Post"])
    assert enforcing.insert(auth, "news", 1).status == 403


# -- receiving ---------------------------------------------------------------------------


def test_sync_replay_and_live_each_carry_only_readable_events(enforcing):
    tenant = unique("filter")
    writer = enforcing.user(unique("writer"), tenant=tenant, scopes=WRITER)
    reader = enforcing.user(unique("reader"), tenant=tenant,
                            scopes=["news:get", "chat.*:get", "chat.x:post"])
    log = insert_all(enforcing, writer, ["news", "secret", "chat.r1", "chatroom", "chat.r1",
                                         "newsy", "news"])
    readable = [i for i, name in log.items() if name in ("news", "chat.r1")]

    # The sync: the latest value of each readable name only.
    stream = enforcing.sse(reader)
    latest = {name: i for i, name in log.items()}
    receives_exactly(stream, sorted([latest["news"], latest["chat.r1"]]))

    # Live.
    live = insert_all(enforcing, writer, ["secret", "chat.x", "chatroom", "news", "chat"])
    live_readable = [i for i, name in live.items() if name in ("chat.x", "news")]
    receives_exactly(stream, live_readable)
    stream.close()

    # A replay from the first event: every later readable event, in order, then live.
    readable += live_readable
    for via in ("header", "query"):
        since = readable[0]
        replay = open_resume(enforcing, reader, since, via)
        receives_exactly(replay, [i for i in readable if i > since])
        more = insert_all(enforcing, writer, ["secret", "chat.r2"])
        readable += [i for i, name in more.items() if name == "chat.r2"]
        receives_exactly(replay, readable[-1:])
        replay.close()


def test_resume_is_exact_for_what_the_subscriber_may_see(enforcing):
    tenant = unique("resume")
    writer = enforcing.user(unique("writer"), tenant=tenant, scopes=WRITER)
    reader = enforcing.user(unique("reader"), tenant=tenant, scopes=["a:get"])
    stream = enforcing.sse(reader)
    first = insert_all(enforcing, writer, ["a", "b", "a", "b"])
    seen = ids(stream.take(2))
    assert seen == [i for i, name in first.items() if name == "a"]
    stream.close()
    # Missed while away, including events it may not read after its last seen id.
    missed = insert_all(enforcing, writer, ["b", "a", "b", "b", "a"])
    resumed = enforcing.sse(reader, headers={"Last-Event-ID": str(seen[-1])})
    receives_exactly(resumed, [i for i, name in missed.items() if name == "a"])
    resumed.close()


def test_subscribers_with_different_scopes_in_one_tenant_each_get_exactly_theirs(enforcing):
    tenant = unique("groups")
    writer = enforcing.user(unique("writer"), tenant=tenant, scopes=WRITER)
    kinds = {"a": ["a:get"], "b": ["b.*:get", "a:post"], "all": ["*:get"],
             "none": ["a:post"], "a-and-b": ["b.*:get", "a:get"]}
    streams, names = {}, {}
    for kind, scopes in kinds.items():
        names[kind] = unique(kind)
        enforcing.create_user(names[kind], PASSWORD, tenant, scopes=scopes)
        # Bearer for some, Basic for others: the same rules for both.
        auth = basic(names[kind], PASSWORD) if kind in ("b", "none") else \
            {"Authorization": f"Bearer {enforcing.login(names[kind])}"}
        streams[kind] = enforcing.sse(auth)
    # A second stream with equal permissions joins the same group; it too gets everything.
    streams["all-2"] = enforcing.sse(basic(names["all"], PASSWORD))
    log = insert_all(enforcing, writer, ["a", "b.1", "c", "b.2", "a", "bx", "b.1.z"])
    wanted = {"a": lambda n: n == "a", "b": lambda n: n.startswith("b."),
              "all": lambda n: True, "all-2": lambda n: True, "none": lambda n: False,
              "a-and-b": lambda n: n == "a" or n.startswith("b.")}
    for kind, stream in streams.items():
        receives_exactly(stream, [i for i, name in log.items() if wanted[kind](name)])
    admin_auth = {"Authorization": f"Bearer {enforcing.admin_token}"}
    metrics = enforcing.get("/metrics", headers=admin_auth)
    assert f'broker_sse_tenant_subscribers{{tenant="{tenant}"}} 6' in metrics.body.decode()
    for stream in streams.values():
        stream.close()



def test_a_stalled_subscriber_is_cut_off_and_its_group_and_others_carry_on(make_server):
    server = make_server("--enforce_scopes", "--max_buffer", "65536")
    tenant = unique("stall")
    writer = server.user(unique("writer"), tenant=tenant, scopes=WRITER)
    stalled_auth = server.user(unique("stalled"), tenant=tenant, scopes=["load:get"])
    peer = server.user(unique("peer"), tenant=tenant, scopes=["load:get"])  # the same group
    other = server.user(unique("other"), tenant=tenant, scopes=["*:get"])  # another group
    stalled = open_stalled_subscriber(server.port, stalled_auth)
    streams = [server.sse(peer), server.sse(other)]
    warm_id = server.insert(writer, "load", 0).json()["id"]
    assert [stream.next().id for stream in streams] == [warm_id, warm_id]

    ids: list[int] = []

    def publish() -> None:  # about 600 KB, far over --max_buffer
        for n in range(200):
            ids.append(server.insert(writer, "load", {"n": n, "pad": "x" * 3000}).json()["id"])

    publisher = threading.Thread(target=publish)
    publisher.start()
    received = [[frame.id for frame in stream.take(200, timeout=10.0)] for stream in streams]
    publisher.join(10.0)
    assert received == [ids, ids]
    data, ended = drain(stalled, timeout=5.0)
    stalled.close()
    assert ended and data.count(b"event:load") < 200, "the stalled subscriber was not cut off"
    metrics = server.get("/metrics", headers={"Authorization": f"Bearer {server.admin_token}"})
    assert "broker_slow_consumer_disconnects_total 1" in metrics.body.decode()
    assert f'broker_sse_tenant_subscribers{{tenant="{tenant}"}} 2' in metrics.body.decode()
    for stream in streams:
        stream.close()


# -- the stored scopes decide, at once ----------------------------------------------------


def test_a_scope_removed_by_the_admin_takes_effect_at_once(enforcing):
    tenant = unique("removed")
    writer = enforcing.user(unique("writer"), tenant=tenant, scopes=WRITER)
    name = unique("member")
    token_auth = enforcing.user(name, tenant=tenant, scopes=["news:get", "news:post", "x:get"])
    basic_auth = basic(name, PASSWORD)
    streams = [enforcing.sse(token_auth), enforcing.sse(basic_auth)]
    news_id = enforcing.insert(token_auth, "news", 1).json()["id"]
    for stream in streams:
        assert stream.next().id == news_id

    # A change that leaves the scopes as they are closes nothing.
    assert admin(enforcing, "/update_user", username=name, email="m@example.com").status == 200
    x_id = enforcing.insert(writer, "x", 1).json()["id"]
    for stream in streams:
        assert stream.next().id == x_id

    resp = admin(enforcing, "/update_user", username=name, scopes=["x:get"])
    assert resp.status == 200 and resp.json()["scopes"] == ["x:get"]
    for stream in streams:
        assert wait_until_closed(stream, timeout=1.0) is not None, "stream still open"
        stream.close()
    # The old JWT still authenticates, but its copy of the scopes no longer counts.
    for auth in (token_auth, basic_auth):
        assert enforcing.insert(auth, "news", 2).status == 403
    # Reconnected, the stream has the new permissions: "x" in the sync, no "news".
    stream = enforcing.sse(token_auth)
    receives_exactly(stream, [x_id])
    insert_all(enforcing, writer, ["news"])
    later_x = insert_all(enforcing, writer, ["x"])
    receives_exactly(stream, list(later_x))
    stream.close()


def test_a_scope_added_by_the_admin_takes_effect_at_once(enforcing):
    tenant = unique("added")
    writer = enforcing.user(unique("writer"), tenant=tenant, scopes=WRITER)
    name = unique("member")
    auth = enforcing.user(name, tenant=tenant, scopes=[])
    assert enforcing.insert(auth, "news", 1).status == 403
    stream = enforcing.sse(auth)
    news = insert_all(enforcing, writer, ["news"])
    assert stream.nothing_within(0.3)
    assert admin(enforcing, "/update_user", username=name,
                 scopes=["news:get", "news:post"]).status == 200
    assert wait_until_closed(stream, timeout=1.0) is not None
    assert enforcing.insert(auth, "news", 2).status == 200
    stream = enforcing.sse(auth)
    assert stream.next().id > next(iter(news))  # the sync: the newest "news"
    stream.close()


# -- without the flag, as before ----------------------------------------------------------


def test_without_enforcement_scopes_limit_nothing(server):
    tenant = unique("open")
    name = unique("reader")
    auth = server.user(name, tenant=tenant, scopes=["x:get"])
    other = server.user(unique("other"), tenant=tenant, scopes=[])
    stream = server.sse(auth)
    log = insert_all(server, other, ["config", "x", "news"])
    receives_exactly(stream, list(log))
    # A scope change does not close the stream either.
    assert admin(server, "/update_user", username=name, scopes=["y:get"]).status == 200
    later = insert_all(server, auth, ["config"])
    receives_exactly(stream, list(later))
    stream.close()


def test_the_environment_variable_turns_enforcement_on(tmp_path):
    srv = Server(tmp_path)
    launch(srv, [], {"BROKER_ENFORCE_SCOPES": "1", "BROKER_ADMIN_TOKEN": srv.admin_token})
    try:
        auth = srv.user(unique("env"), tenant=unique("env"), scopes=["a:post"])
        assert srv.insert(auth, "a", 1).status == 200
        assert srv.insert(auth, "b", 1).status == 403
    finally:
        srv.kill()
