"""Stream filters (issue 20): `GET /sse?event=NAME&event=chat.*` carries only the events whose
name matches one of the values, in the sync on connect, in a Last-Event-ID replay and live.

A value is an event name, or a prefix when it ends with `*` (as in scopes: `chat.*` matches
`chat.room1` and `chat.a.b`, not `chatroom`; only a final `*` is special; `*` alone matches
every name). With --enforce_scopes a stream gets the intersection of its filter and its user's
`NAME:get` grants. The resume rule is unchanged and the replay is filtered, so a narrower
filter with an old id is exact. Bad values get 400 with a JSON error.

Real server, real sockets. `matches` below is the test's own reading of the rules; every
expectation is computed from it and from the ids the inserts returned.
"""

from __future__ import annotations

import json
import random
import threading
import time
from urllib.parse import quote

import pytest
from conftest import ENGINES, SSE, Server, basic
from stream_support import unique

PASSWORD = "correct horse 1"
WRITER = ["*:post"]
MAX_VALUES = 64
MAX_LENGTH = 256
# Frames a stream may send past what the test expects before it stops reading them.
EXTRA_FRAMES_READ = 2000

# The resume and replay tests run on SQLite and on PostgreSQL; the others on SQLite.
both_engines = pytest.mark.parametrize("engine", ENGINES, indirect=True)

Log = dict[int, str]  # id -> event name, in insertion order


# -- the rules, as the test reads them -------------------------------------------------------


def matches(patterns: list[str] | None, name: str) -> bool:
    """Whether `name` matches one of `patterns` (None: no filter, everything matches)."""
    if patterns is None:
        return True
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def gets(scopes: list[str], name: str) -> bool:
    """Whether these scopes grant receiving `name` (`NAME:get`, NAME as in a filter)."""
    patterns = [scope.removesuffix(":get") for scope in scopes if scope.endswith(":get")]
    return matches(patterns, name)


def selected(log: Log, patterns: list[str] | None, after: int = 0) -> Log:
    """The events of `log` after `after` that the filter lets through, in id order."""
    return {i: name for i, name in sorted(log.items()) if i > after and matches(patterns, name)}


def newest_of_each(log: Log, patterns: list[str] | None) -> Log:
    """What a fresh connect syncs: the newest event of each matching name, oldest first."""
    newest = {name: i for i, name in sorted(log.items())}
    return {i: name for name, i in sorted(newest.items(), key=lambda item: item[1])
            if matches(patterns, name)}


# -- requests --------------------------------------------------------------------------------


def sse_path(patterns: list[str] | None, **params: str | int) -> str:
    """/sse with one `event` parameter per pattern (percent-encoded; `*` is left as it is,
    as URLSearchParams and encodeURIComponent leave it) and any other parameters."""
    pairs = [("event", p) for p in patterns or []] + [(k, str(v)) for k, v in params.items()]
    query = "&".join(f"{k}={quote(v, safe='*')}" for k, v in pairs)
    return f"/sse?{query}" if query else "/sse"


def subscribe(server: Server, auth: dict[str, str] | None, patterns: list[str] | None,
              last_id: int | None = None, via: str = "header", **params: str | int) -> SSE:
    """Open a stream with this filter; resume after `last_id` the way EventSource does
    (`Last-Event-ID` header) or with `?last_event_id=`."""
    headers = {}
    if last_id is not None and via == "header":
        headers["Last-Event-ID"] = str(last_id)
    elif last_id is not None:
        params["last_event_id"] = last_id
    stream = server.sse(auth, path=sse_path(patterns, **params), headers=headers)
    assert stream.status == 200, (patterns, stream.status, stream.body)
    return stream


def insert_all(server: Server, auth: dict[str, str], names: list[str]) -> Log:
    """Insert one event per name; return id -> name in insertion order."""
    log = {}
    for n, name in enumerate(names):
        resp = server.insert(auth, name, {"n": n, "name": name})
        assert resp.status == 200, (name, resp.body)
        log[resp.json()["id"]] = name
    return log


# -- reading -------------------------------------------------------------------------------


def read_frames(stream: SSE, count: int, quiet: float) -> list[tuple[int, str]]:
    """(id, name) of the next `count` frames, or fewer if the stream goes silent for 5 s,
    then of any frame that follows within `quiet` seconds of the last one."""
    frames: list[tuple[int, str]] = []
    while len(frames) < count + EXTRA_FRAMES_READ:
        try:
            frame = stream.next(5.0 if len(frames) < count else quiet)
        except (TimeoutError, ConnectionError):
            break
        assert frame.id is not None and frame.event is not None, frame.raw
        assert frame.json()["name"] == frame.event, frame.raw  # the data of that very event
        frames.append((frame.id, frame.event))
    return frames


def check(got: list[tuple[int, str]], expected: Log, what: str) -> None:
    """`got` is exactly `expected`, in order; else say what the stream did wrong."""
    wanted = list(expected.items())
    if got == wanted:
        return
    excluded = [frame for frame in got if frame not in wanted]
    missing = [frame for frame in wanted if frame not in got]
    problems = []
    if excluded:
        problems.append(f"received {len(excluded)} event(s) which the filter excludes, "
                        f"first {excluded[:6]}")
    if missing:
        problems.append(f"missed {len(missing)} event(s), first {missing[:6]}")
    if not excluded and not missing:
        problems.append("the right events, but out of order or repeated")
    raise AssertionError(f"{what}: " + "; ".join(problems) +
                         f" (expected {len(wanted)}, received {len(got)})")


def receives_exactly(stream: SSE, expected: Log, what: str, quiet: float = 0.3) -> None:
    """The stream sends exactly these events, in this order, then nothing for `quiet` s."""
    check(read_frames(stream, len(expected), quiet), expected, what)


def all_receive_exactly(cases: list[tuple[SSE, Log, str]], quiet: float = 0.3) -> None:
    """receives_exactly for several streams, with one quiet period for all of them: the
    expected frames first, then a wait, then whatever else each stream has sent."""
    received = [read_frames(stream, len(expected), 0.0) for stream, expected, _ in cases]
    time.sleep(quiet)
    for (stream, expected, what), got in zip(cases, received, strict=True):
        got += read_frames(stream, 0, 0.05)
        check(got, expected, what)


# -- sync and live ---------------------------------------------------------------------------

# Names that probe the rules: `chat.*` takes `chat.`, `chat.room1`, `chat.a.b`, not `chat` or
# `chatroom`; `a*b` is a literal name (only a final `*` is special); non-ASCII and a space
# travel percent-encoded.
NAMES = ["news", "chat.room1", "chatroom", "chat.a.b", "chat", "chat.", "a*b", "axb",
         "news feed/é", "newsletter", "chat.room2", "news"]

FILTERS: list[list[str]] = [
    ["news"],
    ["chat.*"],
    ["news", "chat.*"],
    ["*"],
    ["chat.room1", "chat.room1"],  # a duplicate
    ["news", "*"],  # overlapping: `*` covers `news`
    ["chat.*", "chat.room1"],  # overlapping: the prefix covers the name
    ["chat.a.*", "chat.*"],  # a prefix inside another
    ["a*b"],
    ["news feed/é", "chatroom"],
    ["chat.room1*"],  # a prefix that is also a whole name
    ["nothing-has-this-name"],
    ["newsletter", "ne*"],
]


def test_sync_and_live_carry_only_the_matching_events(server):
    tenant = unique("filters")
    writer = server.user(unique("writer"), tenant=tenant)
    log = insert_all(server, writer, NAMES)
    # Another tenant's events of the same names never reach these streams.
    insert_all(server, server.user(unique("stranger"), tenant=unique("other")), NAMES)
    streams = [subscribe(server, writer, patterns) for patterns in FILTERS]
    all_receive_exactly([(stream, newest_of_each(log, patterns), f"sync with {patterns}")
                         for patterns, stream in zip(FILTERS, streams, strict=True)])
    live = insert_all(server, writer, list(reversed(NAMES)) + ["chat.room1.x", "*", "z"])
    all_receive_exactly([(stream, selected(live, patterns), f"live with {patterns}")
                         for patterns, stream in zip(FILTERS, streams, strict=True)])
    for stream in streams:
        stream.close()


def test_no_filter_and_star_carry_everything(server):
    tenant = unique("everything")
    writer = server.user(unique("writer"), tenant=tenant)
    log = insert_all(server, writer, NAMES)
    # `*` written as `%2A` is the same value once decoded.
    paths = ["/sse", "/sse?event=*", "/sse?event=%2A", "/sse?event=*&event=news"]
    streams = [server.sse(writer, path=path) for path in paths]
    assert [stream.status for stream in streams] == [200] * len(paths)
    all_receive_exactly([(stream, newest_of_each(log, None), f"sync of {path}")
                         for path, stream in zip(paths, streams, strict=True)])
    live = insert_all(server, writer, NAMES)
    all_receive_exactly([(stream, live, f"live on {path}")
                         for path, stream in zip(paths, streams, strict=True)])
    for stream in streams:
        stream.close()


def test_a_filter_that_matches_nothing_yet_waits_for_its_first_event(server):
    tenant = unique("empty")
    writer = server.user(unique("writer"), tenant=tenant)
    insert_all(server, writer, ["a", "b"])
    stream = subscribe(server, writer, ["c", "d.*"])
    receives_exactly(stream, {}, "sync with nothing matching")
    live = insert_all(server, writer, ["a", "c", "b", "d.1", "d"])
    receives_exactly(stream, selected(live, ["c", "d.*"]), "live")
    stream.close()


# -- resume ----------------------------------------------------------------------------------


@both_engines
def test_the_same_filter_resumes_exactly_from_memory_and_from_the_log(server):
    # An EventSource reconnects with the same URL: the replay after the last id it saw is
    # every matching event after it, then live. The second time, the id is older than what
    # a restarted server keeps in memory (its newest hundred events or so), so the replay
    # comes from the stored log.
    tenant = unique("same")
    writer = server.user(unique("writer"), tenant=tenant)
    patterns = ["a", "chat.*"]
    log = insert_all(server, writer, ["a", "b", "chat.x", "chatroom"])
    stream = subscribe(server, writer, patterns)
    receives_exactly(stream, newest_of_each(log, patterns), "sync")
    last_seen = max(newest_of_each(log, patterns))
    stream.close()
    for restart in (False, True):
        missed = insert_all(server, writer, ["b", "a", "chat.y", "chatroom", "a", "b", "chat."])
        log.update(missed)
        if restart:
            log.update(_insert_quickly(server, writer, ["filler"] * 150 + ["chat.after"]))
            server.restart()
        for via in ("header", "query"):
            resumed = subscribe(server, writer, patterns, last_id=last_seen, via=via)
            what = f"resume via {via}{' after a restart' if restart else ''}"
            receives_exactly(resumed, selected(log, patterns, after=last_seen), what)
            live = insert_all(server, writer, ["b", "chat.z", "a"])
            log.update(live)
            receives_exactly(resumed, selected(live, patterns), what + ", then live")
            resumed.close()
        last_seen = max(selected(log, patterns))


@both_engines
def test_a_narrower_filter_with_an_old_id_gets_exactly_the_matching_events_after_it(server):
    tenant = unique("narrow")
    writer = server.user(unique("writer"), tenant=tenant)
    everything = subscribe(server, writer, None)
    log = insert_all(server, writer, ["a", "b", "a.1", "c", "a"])
    receives_exactly(everything, log, "unfiltered")
    everything.close()
    last_seen = max(log)
    log.update(insert_all(server, writer, ["b", "a", "c", "a.2", "ab", "a", "b"]))
    for patterns in (["a"], ["a.*", "c"], ["b", "b"], ["zzz"]):
        for via in ("header", "query"):
            what = f"{patterns} resumed via {via}"
            narrow = subscribe(server, writer, patterns, last_id=last_seen, via=via)
            receives_exactly(narrow, selected(log, patterns, after=last_seen), what)
            live = insert_all(server, writer, ["c", "a", "a.3", "b"])
            log.update(live)
            receives_exactly(narrow, selected(live, patterns), what + ", then live")
            narrow.close()


@both_engines
def test_a_filtered_replay_reads_past_whole_pages_of_other_events(server):
    # Over a thousand events after the id, only a few of which match: the replay reads the
    # log in pages, and a page that holds few or no matching events is not the end of it.
    tenant = unique("pages")
    writer = server.user(unique("writer"), tenant=tenant)
    start = max(insert_all(server, writer, ["start"]))
    names = ["other"] * 1300
    for position in (5, 999, 1000, 1001, 1150, 1299):
        names[position] = f"wanted.{position}"
    log = _insert_quickly(server, writer, names)
    server.restart()  # nothing of it in memory: the replay comes from the stored log
    stream = subscribe(server, writer, ["wanted.*"], last_id=start)
    receives_exactly(stream, selected(log, ["wanted.*"], after=start), "replay across pages")
    stream.close()


def _insert_quickly(server: Server, auth: dict[str, str], names: list[str]) -> Log:
    """Insert these names from four threads at once; return id -> name."""
    log: Log = {}
    failures: list[str] = []

    def publish(part: list[tuple[int, str]]) -> None:
        for n, name in part:
            resp = server.insert(auth, name, {"n": n, "name": name})
            if resp.status != 200:
                failures.append(f"{name}: {resp.status}")
                return
            log[resp.json()["id"]] = name

    numbered = list(enumerate(names))
    threads = [threading.Thread(target=publish, args=(numbered[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]
    assert len(log) == len(names)
    return dict(sorted(log.items()))


@both_engines
def test_a_wider_filter_with_an_old_id_gets_only_what_came_after_it(server):
    # The documented limit: the replay holds only events after the id, so the names a client
    # adds to its filter come without their older values. Widening means a fresh connect.
    tenant = unique("wider")
    writer = server.user(unique("writer"), tenant=tenant)
    log = insert_all(server, writer, ["b", "a"])
    narrow = subscribe(server, writer, ["a"])
    receives_exactly(narrow, newest_of_each(log, ["a"]), "sync of a")
    narrow.close()
    last_seen = max(log)
    log.update(insert_all(server, writer, ["c", "b", "a"]))
    wide = subscribe(server, writer, ["a", "b", "c"], last_id=last_seen)
    receives_exactly(wide, selected(log, ["a", "b", "c"], after=last_seen), "widened resume")
    wide.close()
    fresh = subscribe(server, writer, ["a", "b", "c"])
    receives_exactly(fresh, newest_of_each(log, ["a", "b", "c"]), "fresh connect")
    fresh.close()


# -- with and without --enforce_scopes -------------------------------------------------------

# (scopes, filter): what the stream receives is the filter's names that the scopes grant.
SCOPED_READERS: list[tuple[list[str], list[str] | None]] = [
    (["*:get"], ["news"]),
    (["news:get"], None),
    (["news:get"], ["*"]),
    (["chat.*:get"], ["chat.room1", "secret"]),  # names a name it may not get
    (["chat.room1:get", "news:get"], ["chat.*"]),  # a wide filter, narrow grants
    (["news:get"], ["secret", "chat.*"]),  # nothing in common
    (["chat.*:get", "news:get"], ["chat.a.*", "news", "secret*"]),
    ([], ["news"]),  # no grants at all
    (["news:post"], ["news"]),  # a post scope grants no reading
]


def test_with_enforced_scopes_a_stream_gets_its_filter_intersected_with_its_grants(make_server):
    server = make_server("--enforce_scopes")
    tenant = unique("scoped")
    writer = server.user(unique("writer"), tenant=tenant, scopes=WRITER)
    readers = []
    for n, (scopes, patterns) in enumerate(SCOPED_READERS):
        name = unique(f"reader{n}")
        assert server.create_user(name, PASSWORD, tenant, scopes=scopes).status == 200
        # Basic for some, Bearer for others: the same rules for both.
        bearer_auth = {"Authorization": f"Bearer {server.login(name)}"}
        readers.append((scopes, patterns, basic(name, PASSWORD) if n % 2 else bearer_auth))

    def wanted(scopes: list[str], patterns: list[str] | None, log: Log, after: int = 0) -> Log:
        return {i: name for i, name in selected(log, patterns, after).items()
                if gets(scopes, name)}

    log = insert_all(server, writer, NAMES + ["secret", "secret.x"])
    streams = [subscribe(server, auth, patterns) for _, patterns, auth in readers]
    syncs = [{i: name for i, name in newest_of_each(log, patterns).items()
              if gets(scopes, name)} for scopes, patterns, _ in readers]
    all_receive_exactly([(stream, sync, f"sync with {patterns} and {scopes}")
                         for (scopes, patterns, _), stream, sync
                         in zip(readers, streams, syncs, strict=True)])
    live = insert_all(server, writer, ["secret", "news", "chat.room1", "chat.a.b", "chat.zz"])
    log.update(live)
    all_receive_exactly([(stream, wanted(scopes, patterns, live), f"live, {patterns} {scopes}")
                         for (scopes, patterns, _), stream in zip(readers, streams, strict=True)])
    since = min(live)
    replays = [subscribe(server, auth, patterns, last_id=since) for _, patterns, auth in readers]
    all_receive_exactly([(replay, wanted(scopes, patterns, log, since),
                          f"replay with {patterns} and {scopes}")
                         for (scopes, patterns, _), replay in zip(readers, replays, strict=True)])
    for stream in streams + replays:
        stream.close()


def test_without_enforcement_the_filter_alone_decides(server):
    tenant = unique("open")
    writer = server.user(unique("writer"), tenant=tenant)
    # Its scopes grant only `x`, but they mean nothing to a server without --enforce_scopes.
    reader = server.user(unique("reader"), tenant=tenant, scopes=["x:get"])
    log = insert_all(server, writer, ["x", "y", "z.1"])
    stream = subscribe(server, reader, ["y", "z.*"])
    receives_exactly(stream, newest_of_each(log, ["y", "z.*"]), "sync")
    live = insert_all(server, writer, ["x", "y", "z.2", "zz"])
    receives_exactly(stream, selected(live, ["y", "z.*"]), "live")
    stream.close()


# -- many subscribers, concurrent publishers -------------------------------------------------

PUBLISHERS = 4
INSERTS_PER_PUBLISHER = 60
RACE_NAMES = ["a", "b", "chat.r1", "chat.r2", "chat.r1.x", "chatroom", "news"]
RACE_FILTERS: list[list[str] | None] = [
    None, ["a"], ["a"], ["chat.*"], ["chat.*"], ["chat.r1", "a"], ["a", "chat.r1"], ["*"],
    ["news", "*"], ["chatroom"], ["zzz"], ["chat.r1*", "b", "b"], ["chat.*", "chat.r1"],
]


def publish_concurrently(server: Server, auth: dict[str, str]) -> Log:
    """PUBLISHERS threads insert RACE_NAMES at random; return every acknowledged id -> name."""
    acked: Log = {}
    failures: list[str] = []
    lock = threading.Lock()

    def publish(index: int) -> None:
        rng = random.Random(index)
        for n in range(INSERTS_PER_PUBLISHER):
            name = rng.choice(RACE_NAMES)
            resp = server.insert(auth, name, {"n": n, "name": name})
            with lock:
                if resp.status != 200:
                    failures.append(f"publisher {index}: {resp.status}")
                    return
                acked[resp.json()["id"]] = name

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert not failures, failures
    return acked


def test_many_filtered_subscribers_under_concurrent_publishers(server):
    tenant = unique("crowd")
    writer = server.user(unique("writer"), tenant=tenant)
    streams = [subscribe(server, writer, patterns) for patterns in RACE_FILTERS]
    acked = publish_concurrently(server, writer)
    assert len(acked) == PUBLISHERS * INSERTS_PER_PUBLISHER
    all_receive_exactly([(stream, selected(acked, patterns), f"{patterns} under load")
                         for patterns, stream in zip(RACE_FILTERS, streams, strict=True)])
    for stream in streams:
        stream.close()


def test_many_filtered_subscribers_with_enforced_scopes_under_concurrent_publishers(
        make_server):
    # Subscribers whose filter and grants select the same names, by different routes, may
    # share one group inside the server; each must still get exactly its own events.
    server = make_server("--enforce_scopes")
    tenant = unique("crowd")
    writer = server.user(unique("writer"), tenant=tenant, scopes=WRITER)
    kinds: list[tuple[list[str], list[str] | None]] = [
        (["*:get"], ["a"]), (["a:get"], None), (["a:get"], ["*"]), (["a:get", "b:get"], ["a"]),
        (["*:get"], None), (["chat.*:get"], ["chat.r1", "news"]), (["chat.r1:get"], ["chat.*"]),
        (["chat.r1:get"], None), (["b:get"], ["a"]), (["chat.*:get"], ["chat.*"]),
        (["chat.*:get"], None), (["news:get", "a:get"], ["news", "chat.*"]),
    ]
    streams = []
    for n, (scopes, patterns) in enumerate(kinds):
        auth = server.user(unique(f"reader{n}"), tenant=tenant, scopes=scopes)
        streams.append(subscribe(server, auth, patterns))
    acked = publish_concurrently(server, writer)
    expected = [{i: name for i, name in selected(acked, patterns).items() if gets(scopes, name)}
                for scopes, patterns in kinds]
    all_receive_exactly([(stream, wanted, f"{patterns} with {scopes} under load")
                         for (scopes, patterns), stream, wanted
                         in zip(kinds, streams, expected, strict=True)])
    for stream in streams:
        stream.close()


# -- bad input -------------------------------------------------------------------------------


def refused_with_400(server: Server, auth: dict[str, str] | None, path: str) -> str:
    """GET `path` as a stream must answer 400 with `{"error": "..."}`; returns the error."""
    stream = server.sse(auth, path=path)
    try:
        assert stream.status == 400, \
            f"{path[:120]}: status {stream.status}, not 400 (is the filter ignored?)"
        assert stream.headers.get("content-type", "").startswith("application/json")
        length = int(stream.headers["content-length"])
        while len(stream.body) < length and stream._read_more():
            stream._decode_available()
        body = json.loads(stream.body[:length])
    finally:
        stream.close()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"].strip(), body
    return body["error"]


BAD_QUERIES = {
    "an empty value": "event=",
    "a value without =": "event",
    "an empty value among good ones": "event=a&event=&event=b",
    "a NUL": "event=a%00b",
    "a line feed": "event=a%0Ab",
    "a carriage return": "event=%0D",
    "a tab": "event=chat.%09*",
    "a unit separator": "event=%1F",
    "a DEL": "event=news%7F",
    "a C1 control (NEL)": "event=a%C2%85",
    "a C1 control (U+009F)": "event=%C2%9F*",
    "a control character in the second value": "event=a&event=b%0A",
    f"{MAX_LENGTH + 1} characters": "event=" + "x" * (MAX_LENGTH + 1),
    f"{MAX_LENGTH + 1} characters ending in *": "event=" + "x" * MAX_LENGTH + "*",
    f"{MAX_VALUES + 1} values": "&".join(f"event=e{n}" for n in range(MAX_VALUES + 1)),
}


def test_each_bad_filter_is_refused_with_400_and_the_server_keeps_serving(server):
    tenant = unique("bad")
    writer = server.user(unique("writer"), tenant=tenant)
    for case, query in BAD_QUERIES.items():
        for extra in ("", "&last_event_id=0"):
            error = refused_with_400(server, writer, f"/sse?{query}{extra}")
            assert "Traceback" not in error, (case, error)
    # The server is still serving streams, filtered ones included, and logged no traceback.
    log = insert_all(server, writer, ["a", "b"])
    stream = subscribe(server, writer, ["b"])
    receives_exactly(stream, selected(log, ["b"]), "a good filter after the bad ones")
    stream.close()
    assert server.get("/").status == 200
    assert "Traceback" not in server.log, server.log[-3000:]


def test_the_limits_themselves_are_accepted(server):
    tenant = unique("limits")
    writer = server.user(unique("writer"), tenant=tenant)
    longest = "l" * MAX_LENGTH
    longest_prefix = "p" * (MAX_LENGTH - 1) + "*"
    many = [f"e{n}" for n in range(MAX_VALUES)]
    log = insert_all(server, writer, [longest, "p" * MAX_LENGTH, "e63", "e64", "x"])
    for patterns in ([longest], [longest_prefix], many):
        stream = subscribe(server, writer, patterns)
        receives_exactly(stream, newest_of_each(log, patterns), f"{patterns[0][:10]}...")
        stream.close()


# -- together with access_token --------------------------------------------------------------


def test_access_token_works_with_a_filter(server):
    tenant = unique("token")
    name = unique("browser")
    jwt = server.user(name, tenant=tenant)["Authorization"].removeprefix("Bearer ")
    writer = server.user(unique("writer"), tenant=tenant)
    log = insert_all(server, writer, ["room.1", "room.2", "lobby"])
    stream = subscribe(server, None, ["room.1", "lobby"], access_token=jwt)
    receives_exactly(stream, newest_of_each(log, ["room.1", "lobby"]), "sync via access_token")
    live = insert_all(server, writer, ["room.2", "room.1", "lobby"])
    log.update(live)
    receives_exactly(stream, selected(live, ["room.1", "lobby"]), "live via access_token")
    stream.close()
    # As the example chat page resumes: access_token, filter and last_event_id in the query
    # (and a Last-Event-ID header once EventSource reconnects by itself).
    for via in ("query", "header"):
        resumed = subscribe(server, None, ["room.*"], last_id=0, via=via, access_token=jwt)
        receives_exactly(resumed, selected(log, ["room.*"]), f"replay via {via}")
        resumed.close()
    # A bad filter is refused the same way with the token in the query.
    refused_with_400(server, None, f"/sse?access_token={jwt}&event=")
