"""The sliced fan-out writer (issue 13): a large tenant is written to a slice of subscribers at
a time, other work runs between slices, and events committed meanwhile travel together. With
`--fanout_slice` small, a few dozen real subscribers make many slices, so every test here runs
against a fan-out that is still under way while more events arrive."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading

from conftest import ROOT, SSE, Server, parse_frame
from stream_support import dechunk, open_resume, sequence_problems, unique
from test_stream import FanOutReaders, drain, open_stalled_subscriber

PUBLISHERS = 4
INSERTS_EACH = 25


def open_live(server: Server, auth: dict[str, str], count: int) -> list[SSE]:
    """`count` subscribers, each known to be live (it received a new warm-up event after
    its sync, which holds the previous one)."""
    streams = [server.sse(auth) for _ in range(count)]
    assert all(stream.status == 200 for stream in streams)
    warm_id = server.insert(auth, "warmup", 0).json()["id"]
    for stream in streams:
        while (frame_id := stream.next().id) != warm_id:
            assert frame_id < warm_id, (frame_id, warm_id)
    return streams


def publish_concurrently(server: Server, auth: dict[str, str]) -> list[int]:
    """PUBLISHERS threads insert INSERTS_EACH events each; returns the acknowledged ids."""
    acked: list[int] = []

    def publish(publisher: int) -> None:
        for n in range(INSERTS_EACH):
            resp = server.insert(auth, "load", {"seq": publisher * 1000 + n, "sent": 0})
            assert resp.status == 200, resp.body
            acked.append(resp.json()["id"])

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a publisher did not finish"
    return sorted(acked)


def read_ids(stream: SSE, count: int) -> list[int]:
    return [frame.id for frame in stream.take(count, timeout=10.0)]


def test_every_subscriber_gets_every_event_once_in_order_during_sliced_fanouts(make_server):
    # One subscriber per slice: each fan-out takes 60 turns of the loop, so commits from four
    # publishers land while passes are under way and must be merged into later writes.
    server = make_server("--fanout_slice", "1")
    auth = server.user(unique("slicer"), tenant=unique("sliced"))
    streams = open_live(server, auth, 60)
    acked = publish_concurrently(server, auth)
    assert len(acked) == PUBLISHERS * INSERTS_EACH
    for index, stream in enumerate(streams):
        ids = read_ids(stream, len(acked))
        assert ids == acked, f"subscriber {index}: " + sequence_problems(ids, acked)
        assert stream.nothing_within(0.2), f"subscriber {index} got more than it should"
        stream.close()


def test_a_request_is_answered_while_a_large_fanout_is_still_going_out(make_server):
    # Subscribers are written in the order they went live, one per slice. The insert is
    # answered after the first slice; a /verify sent then must come back before the fan-out
    # reaches the last subscriber (the old writer finished every write before answering).
    server = make_server("--fanout_slice", "1", "--max_streams_per_user", "1000")
    auth = server.user(unique("busy"), tenant=unique("large"))
    streams = open_live(server, auth, 800)
    last = streams[-1]
    other = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    verify = ("GET /verify HTTP/1.1\r\nHost: x\r\n"
              + "".join(f"{k}: {v}\r\n" for k, v in auth.items()) + "\r\n").encode()
    event_id = server.insert(auth, "big", {"n": 1}).json()["id"]
    other.sendall(verify)
    answer = other.recv(65536)
    last_had_it = bool(select.select([last.sock], [], [], 0)[0])
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert not last_had_it, "the fan-out finished before another request was answered"
    for stream in streams:  # and the fan-out does complete, for everyone
        assert stream.next(timeout=10.0).id == event_id
        stream.close()
    other.close()


def test_a_slow_consumer_is_cut_mid_slice_and_resumes_while_the_others_get_everything(
        make_server):
    # The stalled subscriber sits between readers that share its slices; cutting it off must
    # not cost them a frame, and it resumes from the last frame it received whole.
    server = make_server("--max_buffer", "65536", "--fanout_slice", "3")
    auth = server.user(unique("cut"), tenant=unique("cutting"))
    before = open_live(server, auth, 10)
    stalled = open_stalled_subscriber(server.port, auth)
    after = open_live(server, auth, 10)
    streams = before + after
    for stream in before:  # the second warm-up, sent to all
        stream.next()

    readers = FanOutReaders(streams)
    ids = []

    def publish() -> None:
        for seq in range(120):
            resp = server.insert(auth, "load", {"seq": seq, "sent": 0, "pad": "x" * 3000})
            assert resp.status == 200, resp.body
            ids.append(resp.json()["id"])

    publishers = [threading.Thread(target=publish) for _ in range(2)]
    for thread in publishers:
        thread.start()
    readers.read_until_complete(240, timeout=30.0)
    for thread in publishers:
        thread.join(10)
    for index, seqs in readers.seqs.items():
        assert sorted(seqs) == sorted(list(range(120)) * 2), f"reader {index}: {len(seqs)}"

    data, ended = drain(stalled, timeout=5.0)
    stalled.close()
    assert ended, "the stalled subscriber was not cut off"
    body, _ = dechunk(data.partition(b"\r\n\r\n")[2])
    got = [parse_frame(raw + b"\n\n").id for raw in body.split(b"\n\n")[:-1]]
    assert not set(ids) <= set(got), "the stalled subscriber received everything"
    missing = sorted(event_id for event_id in ids if event_id > got[-1])
    resumed = open_resume(server, auth, got[-1], "header")
    assert read_ids(resumed, len(missing)) == missing
    assert resumed.nothing_within(0.2)
    resumed.close()
    for stream in streams:
        stream.close()


def test_a_fanout_slice_below_one_is_refused_at_start() -> None:
    result = subprocess.run([sys.executable, "-m", "broker", "--fanout_slice", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--fanout_slice must be at least 1" in result.stderr
