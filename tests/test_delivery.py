"""Delivery that the fan-out writer must keep whatever its internals (issue 18): with many
subscribers, small slices (--fanout_slice) and concurrent publishers, every stream gets
exactly the events it may read, each once, in id order; a slow consumer cut mid-pass costs
the others nothing; heartbeats go on during a pass; a shutdown during a pass ends every
stream cleanly after a gap-free prefix; a resume racing inserts is exact whether or not the
tenant's state is in memory. Real server, real sockets, a few hundred streams."""

from __future__ import annotations

import http.client
import json
import selectors
import signal
import threading
import time
from collections.abc import Callable

import pytest
from conftest import SSE, Server, bearer, parse_frame
from stream_support import RESET_ERRORS, dechunk, eventually, sequence_problems, unique
from test_ops import metric
from test_shutdown import EXIT_WITHIN, assert_exited_cleanly, replay_all
from test_stream import (
    ResumeRace,
    drain,
    open_stalled_subscriber,
)

HEARTBEAT = b":\n\n"


class Readers:
    """Many streams read by one selector loop, as many browser tabs: for each, the
    (id, event) of every event frame and the time of every heartbeat, in arrival order."""

    def __init__(self, streams: list[SSE]) -> None:
        self.streams = streams
        self.frames: list[list[tuple[int, str]]] = [[] for _ in streams]
        self.beats: list[list[float]] = [[] for _ in streams]
        self.selector = selectors.DefaultSelector()
        for index, stream in enumerate(streams):
            self.selector.register(stream.sock, selectors.EVENT_READ, index)
            self._take_decoded(index)  # frames that came with the response head

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.selector.select(min(remaining, 0.1)):
                self._read(key.data)
        return True

    def read_for(self, seconds: float) -> None:
        self.read_until(lambda: False, seconds)

    def _read(self, index: int) -> None:
        stream = self.streams[index]
        try:
            self._note(index, stream.read_raw(timeout=5.0))  # one recv, then whole frames
        except TimeoutError:
            pass  # part of a frame came; the rest is on its way
        except RESET_ERRORS:
            stream.ended = True
        self._take_decoded(index)
        if stream.ended:
            self.selector.unregister(stream.sock)

    def _take_decoded(self, index: int) -> None:
        stream = self.streams[index]
        while b"\n\n" in stream.body:
            self._note(index, stream.read_raw())

    def _note(self, index: int, raw: bytes) -> None:
        if raw == HEARTBEAT:
            self.beats[index].append(time.monotonic())
        elif raw and not raw.startswith(b":"):  # not the retry frame
            frame = parse_frame(raw)
            self.frames[index].append((frame.id, frame.event))  # type: ignore[arg-type]

    def close(self) -> None:
        self.selector.close()
        for stream in self.streams:
            stream.close()


class Publishers:
    """One thread per plan, each inserting its (event, data) in order over one keep-alive
    connection, until the plan ends or the monotonic time `until`; `acked` maps each
    acknowledged id to its event name."""

    def __init__(self, server: Server, auth: dict[str, str],
                 plans: list[list[tuple[str, object]]], until: float = float("inf")) -> None:
        self.server, self.auth, self.until = server, auth, until
        self.acked: dict[int, str] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(plan,)) for plan in plans]

    def start(self) -> Publishers:
        for thread in self.threads:
            thread.start()
        return self

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a publisher did not finish"
        assert not self.errors, self.errors

    def _run(self, plan: list[tuple[str, object]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            for event, data in plan:
                if time.monotonic() >= self.until:
                    return
                body = json.dumps({"event": event, "data": data})
                conn.request("POST", "/insert", body,
                             {**self.auth, "Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                if resp.status != 200:
                    self.errors.append(f"{event}: {resp.status} {payload[:100]!r}")
                    return
                with self.lock:
                    self.acked[json.loads(payload)["id"]] = event
        finally:
            conn.close()

    def expected(self, reads: Callable[[str], bool] = lambda name: True) -> list[tuple]:
        return [(i, name) for i, name in sorted(self.acked.items()) if reads(name)]


def admin_metrics(server: Server) -> str:
    return server.get("/metrics", headers=bearer(server.admin_token)).body.decode()


def assert_exactly(readers: Readers, index: int, expected: list[tuple], label: str) -> None:
    got = readers.frames[index]
    assert got == expected, f"{label}: " + sequence_problems(
        [i for i, _ in got], [i for i, _ in expected])


# -- 1. mixed permission groups, concurrent publishers, sliced passes -----------------------

NAMES = ["a", "a.x", "a.y", "ab", "b", "b.z", "bx", "c"]
# Overlapping grants: the tenant's streams fall into five permission groups ("all" and
# "all, spelled otherwise" are one), each written its own frames.
KINDS: dict[str, tuple[list[str], Callable[[str], bool]]] = {
    "all": (["*:get"], lambda name: True),
    "all, spelled otherwise": (["b:get", "*:get", "c:post"], lambda name: True),
    "a prefix": (["a*:get"], lambda name: name.startswith("a")),
    "a.x and b": (["a.x:get", "b:get"], lambda name: name in ("a.x", "b")),
    "b prefix and a.x": (["b*:get", "a.x:get"],
                         lambda name: name.startswith("b") or name == "a.x"),
    "nothing": (["a.x:post", "moderator"], lambda name: False),
}
STREAMS_PER_KIND = 50  # 300 streams
GROUP_PUBLISHERS = 6
INSERTS_EACH = 50


def test_mixed_permission_groups_each_get_exactly_theirs_under_concurrent_publishers(
        make_server):
    server = make_server("--enforce_scopes", "--fanout_slice", "16")
    tenant = unique("mixed")
    writer = server.user(unique("writer"), tenant=tenant, scopes=["*:post"])
    auths = {kind: server.user(unique("reader"), tenant=tenant, scopes=scopes)
             for kind, (scopes, _) in KINDS.items()}
    # Interleaved, so that every slice of a pass holds several groups' streams.
    kinds = [kind for _ in range(STREAMS_PER_KIND) for kind in KINDS]
    streams = [server.sse(auths[kind]) for kind in kinds]
    assert all(stream.status == 200 for stream in streams)
    readers = Readers(streams)
    plans = [[(NAMES[(p * 3 + n) % len(NAMES)], {"p": p, "n": n}) for n in range(INSERTS_EACH)]
             for p in range(GROUP_PUBLISHERS)]
    # The same names in another tenant, at the same time: none of it may reach these streams.
    stranger = server.user(unique("stranger"), tenant=unique("elsewhere"), scopes=["*:post"])
    try:
        publishers = Publishers(server, writer, plans).start()
        foreign = Publishers(server, stranger, plans[:1]).start()
        readers.read_until(publishers.done, timeout=60)
        publishers.join(10)
        foreign.join(10)
        expected = {kind: publishers.expected(reads) for kind, (_, reads) in KINDS.items()}
        complete = readers.read_until(lambda: all(
            len(readers.frames[i]) >= len(expected[kind]) for i, kind in enumerate(kinds)), 30)
        assert complete, "some streams did not get all their events"
        readers.read_for(0.3)  # nothing more may come: no duplicate, no stranger's event
        assert len(publishers.acked) == GROUP_PUBLISHERS * INSERTS_EACH
        for index, kind in enumerate(kinds):
            assert_exactly(readers, index, expected[kind], f"stream {index} ({kind})")
    finally:
        readers.close()


# -- 2. a slow consumer cut in the middle of a pass -----------------------------------------

def test_a_slow_consumer_cut_mid_pass_costs_the_200_others_nothing(make_server):
    server = make_server("--fanout_slice", "16", "--max_buffer", "65536",
                         "--max_streams_per_user", "1000")
    auth = server.user(unique("crowd"), tenant=unique("crowd"))
    before = [server.sse(auth) for _ in range(100)]
    stalled = open_stalled_subscriber(server.port, auth)  # in the middle of every pass
    after = [server.sse(auth) for _ in range(99)]
    assert eventually(lambda: "broker_sse_subscribers 200" in admin_metrics(server), 5)
    readers = Readers(before + after)
    pad = "p" * 20_000
    plans = [[("load", {"p": p, "n": n, "pad": pad}) for n in range(50)] for p in range(2)]
    try:
        publishers = Publishers(server, auth, plans).start()
        readers.read_until(publishers.done, timeout=60)
        publishers.join(10)
        expected = publishers.expected()
        complete = readers.read_until(lambda: all(
            len(frames) >= len(expected) or stream.ended
            for frames, stream in zip(readers.frames, readers.streams)), 30)
        readers.read_for(0.3)
        for index in range(len(readers.streams)):
            assert_exactly(readers, index, expected, f"reader {index}")
        assert complete
    finally:
        readers.close()
    data, ended = drain(stalled, timeout=5.0)
    stalled.close()
    assert ended, "the stalled subscriber was not cut off"
    body, _ = dechunk(data.partition(b"\r\n\r\n")[2])
    got = [parse_frame(raw + b"\n\n").id for raw in body.split(b"\n\n")[:-1]
           if not raw.startswith(b":")]
    ids = [event_id for event_id, _ in expected]
    assert got == ids[:len(got)], "the stalled subscriber's frames: " + \
        sequence_problems(got, ids[:len(got)])
    assert len(got) < len(ids), "the stalled subscriber received everything"
    text = admin_metrics(server)
    assert metric(text, "broker_slow_consumer_disconnects_total") == 1


# -- 3. heartbeats while a pass goes on -----------------------------------------------------

HEARTBEAT_EVERY = 0.2
BUSY_FOR = 3.0


def test_idle_streams_get_heartbeats_while_another_tenants_fanout_goes_on(make_server):
    server = make_server("--heartbeat", str(HEARTBEAT_EVERY), "--fanout_slice", "4",
                         "--max_streams_per_user", "1000")
    busy_auth = server.user(unique("busy"), tenant=unique("busy"))
    idle_auth = server.user(unique("idle"), tenant=unique("idle"))
    busy = [server.sse(busy_auth) for _ in range(100)]
    idle = [server.sse(idle_auth) for _ in range(3)]
    readers = Readers(busy + idle)
    stop = time.monotonic() + BUSY_FOR
    try:
        publishers = Publishers(server, busy_auth, [
            [("tick", {"p": p, "n": n, "pad": "t" * 500}) for n in range(2000)]
            for p in range(4)], until=stop)
        started = time.monotonic()
        publishers.start()
        readers.read_until(publishers.done, timeout=BUSY_FOR + 30)
        ended = time.monotonic()
        publishers.join(10)
        expected = publishers.expected()
        complete = readers.read_until(lambda: all(
            len(readers.frames[i]) >= len(expected) for i in range(len(busy))), 30)
        readers.read_for(0.3)
    finally:
        readers.close()
    assert len(expected) > 100, f"only {len(expected)} inserts: no real fan-out load"
    assert complete, "busy streams did not get all the events"
    for index in range(len(busy)):
        assert_exactly(readers, index, expected, f"busy stream {index}")
    print(f"\nheartbeats: {len(expected)} events to {len(busy)} streams in "
          f"{ended - started:.1f} s")
    for index in range(len(busy), len(busy) + len(idle)):
        assert readers.frames[index] == [], "an idle stream got another tenant's events"
        beats = [at for at in readers.beats[index] if started <= at <= ended]
        gaps = [b - a for a, b in zip([started, *beats], [*beats, ended])]
        print(f"idle stream {index}: {len(beats)} heartbeats, longest gap {max(gaps):.2f} s")
        assert len(beats) >= (ended - started) / HEARTBEAT_EVERY / 3, \
            f"idle stream {index}: {len(beats)} heartbeats in {ended - started:.1f} s"
        assert max(gaps) < 1.2, f"idle stream {index}: no heartbeat for {max(gaps):.2f} s " \
                                f"while another tenant's fan-out went on"


# -- 4. a shutdown during a pass ------------------------------------------------------------

def test_sigterm_during_a_sliced_fanout_ends_every_stream_after_a_gapless_prefix(make_server):
    server = make_server("--fanout_slice", "4", "--max_streams_per_user", "1000")
    auth = server.user(unique("ending"), tenant=unique("ending"))
    streams = [server.sse(auth) for _ in range(200)]
    warm_id = server.insert(auth, "warmup", 0).json()["id"]
    for stream in streams:
        assert stream.next().id == warm_id  # live
    stop = threading.Event()
    acked: list[int] = []

    def insert_until_stopped(writer: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for n in range(2000):
                if stop.is_set():
                    return
                body = json.dumps({"event": f"w{writer}", "data": n})
                conn.request("POST", "/insert", body, {**auth, "Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                if resp.status != 200:
                    return
                acked.append(json.loads(payload)["id"])
        except (OSError, http.client.HTTPException):
            return  # the server is going away
        finally:
            conn.close()

    writers = [threading.Thread(target=insert_until_stopped, args=(i,)) for i in range(4)]
    for thread in writers:
        thread.start()
    try:
        assert eventually(lambda: len(acked) >= 100, timeout=10)
        signalled = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        received = [read_to_the_end(stream, signalled + EXIT_WITHIN) for stream in streams]
    finally:
        stop.set()
        for thread in writers:
            thread.join(EXIT_WITHIN)
    assert_exited_cleanly(server, signalled)
    server.start()
    log = [event_id for event_id, _, _ in replay_all(server, auth) if event_id > warm_id]
    assert set(acked) <= set(log)
    for index, (ids, terminated) in enumerate(received):
        assert terminated, f"stream {index} ended without the terminating chunk"
        assert ids == log[:len(ids)], f"stream {index}: " + sequence_problems(
            ids, log[:len(ids)])
    print(f"\nshutdown: streams got {min(len(ids) for ids, _ in received)} to "
          f"{max(len(ids) for ids, _ in received)} of {len(log)} events")


def read_to_the_end(stream: SSE, deadline: float) -> tuple[list[int], bool]:
    """The ids of the event frames a stream still delivers until the server ends it, and
    whether it ended with the terminating chunk (after whole frames only)."""
    raw = stream.buffer
    try:
        while time.monotonic() < deadline:
            stream.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = stream.sock.recv(65536)
            if not data:
                break
            raw += data
    except (TimeoutError, *RESET_ERRORS):
        pass
    finally:
        stream.close()
    body, terminated = dechunk(raw)
    body = stream.body + body
    frames = body.split(b"\n\n")
    whole = frames.pop() == b""
    ids = [parse_frame(frame + b"\n\n").id for frame in frames if not frame.startswith(b":")]
    return [i for i in ids if i is not None], terminated and whole


# -- 5. a resume racing inserts, the tenant's state not in memory ---------------------------

@pytest.mark.parametrize("cache", ["never cached", "evicted meanwhile"])
def test_resume_racing_inserts_is_exact_when_the_state_is_not_in_memory(make_server, cache):
    # The cached case is tests/test_stream.py's; here every resume loads the tenant's state
    # from the store ("never cached": a one-byte cache), or another tenant's connects keep
    # evicting it while the race goes on.
    server = make_server("--cache_bytes", "1" if cache == "never cached" else "26000")
    auth = server.user(unique("racer"), tenant=unique("race"))
    start_id = server.insert(auth, "start", None).json()["id"]
    race = ResumeRace(server, auth, start_id)
    # A state of 24 KB: it fits in the cache, and with the race tenant's, it does not. Its
    # streams resume from its newest event: no sync is built (a sync is counted against
    # --cache_bytes wrongly today: test_stream_bounds.py).
    evictor = server.user(unique("evictor"), tenant=unique("evictor"))
    evictor_at = {"Last-Event-ID": str(server.insert(evictor, "e", "e" * 12_000).json()["id"])}

    def evict_meanwhile() -> None:
        while race.final_id is None and time.monotonic() < race.deadline:
            server.sse(evictor, headers=evictor_at).close()

    evicting = cache == "evicted meanwhile"
    race.run(extra_clients=[threading.Thread(target=evict_meanwhile, name="evictor")]
             if evicting else [])
    evictions = metric(admin_metrics(server), "broker_state_cache_evictions_total")
    if evicting:
        assert evictions >= 5, f"only {evictions:.0f} evictions: the race tenant stayed cached"
