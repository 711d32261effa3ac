"""Checks of the load generator's byte counting (run: pytest bench).

The subscriber never parses frames, so these feed it real SSE bytes cut at every awkward place
and check that it counts each frame exactly once and that probes see every sequence number.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from loadgen import Channel, Group, SubscriberProtocol, payload, percentile, probe_positions

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


def broker_frames(count: int) -> list[bytes]:
    return [b"id:%d\nevent:bench\ndata:%s\n\n" % (i, payload(i, 48)) for i in range(count)]


def feed(stream: bytes, sizes: list[int], probe: bool, seed: int) -> SubscriberProtocol:
    loop = asyncio.new_event_loop()
    try:
        proto = SubscriberProtocol(Group(), loop.create_future(), probe,
                                   b"GET / HTTP/1.1\r\n\r\n")
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        rng = random.Random(seed)
        at = 0
        while at < len(stream):
            size = rng.choice(sizes)
            proto.data_received(stream[at:at + size])
            at += size
        return proto
    finally:
        loop.close()


@pytest.mark.parametrize("seed", range(20))
def test_counts_every_frame_once_across_any_split(seed: int) -> None:
    frames = broker_frames(300)
    # One frame per chunk, then many frames in one chunk, with comments in between.
    body = chunked([b":\n\n", *frames[:150], b": ping\r\n\r\n", b"".join(frames[150:])])
    proto = feed(HEAD + body, [1, 2, 3, 4, 5, 6, 9, 64, 4096], probe=True, seed=seed)
    assert proto.status == 200
    assert proto.count == 300
    assert [seq for seq, _ in proto.samples] == list(range(300))


def test_counts_raw_nchan_and_crlf_starlette_frames() -> None:
    nchan = b"".join(b"id: 1:%d\nevent: bench\ndata: %s\n\n" % (i, payload(i, 8)) for i in range(50))
    proto = feed(HEAD.replace(b"Transfer-Encoding: chunked\r\n", b"") + b": hi\n\n" + nchan,
                 [7, 100], probe=True, seed=1)
    assert proto.count == 50
    starlette = b"".join(b"id: %d\r\nevent: bench\r\ndata: %s\r\n\r\n" % (i, payload(i, 8))
                         for i in range(50))
    proto = feed(HEAD + chunked([starlette]), [3, 11], probe=True, seed=2)
    assert proto.count == 50
    assert [seq for seq, _ in proto.samples] == list(range(50))


def test_a_refused_stream_is_closed_and_counts_nothing() -> None:
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 20\r\n\r\n"
    proto = feed(head + b'{"error": "data:x"}\n', [5], probe=False, seed=0)
    assert proto.status == 401
    assert proto.count == 0
    assert proto.transport is not None and proto.transport.closed  # type: ignore[attr-defined]


def test_publish_request_is_valid_http_with_exact_length() -> None:
    channel = Channel("127.0.0.1", 8080, "/sse", (("Authorization", "Bearer t"),), "/insert",
                      (("Authorization", "Bearer t"),), True)
    request = channel.publish_request(payload(7, 4), "e1")
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /insert HTTP/1.1\r\n")
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"event": "e1", "data": {"n": 7, "pad": "xxxx"}}
    raw = Channel("127.0.0.1", 1, "/sse?id=a", (), "/pub?id=a", (), False)
    assert raw.publish_request(payload(3, 0)).endswith(b'\r\n\r\n{"n":3,"pad":""}')


def test_probes_spread_over_the_connection_order() -> None:
    assert probe_positions(1000, 32) >= {0, 999}
    assert len(probe_positions(1000, 32)) == 32
    assert probe_positions(10, 32) == set(range(10))
    assert probe_positions(5, 0) == set()


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) in (50.0, 51.0)
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None


@pytest.mark.parametrize("sizes", [[1], [1, 2, 3, 7], [5, 64, 1000]])
def test_resuming_stream_counts_each_id_once_and_spots_repeats(sizes):
    """The restart scenario's subscriber, fed a retry frame, a sync, heartbeats and a repeated
    id, cut at every awkward place."""
    from loadgen import ResumeGroup, ResumingStream

    loop = asyncio.new_event_loop()
    try:
        group = ResumeGroup(Channel("127.0.0.1", 1, "/sse"), 3, asyncio.Semaphore(1))
        stream = ResumingStream(group)
        stream.connection_made(FakeTransport())  # type: ignore[arg-type]
        frames = [b":data:event:id:\nretry:2345\n\n", *broker_frames(11)[1:], b":\n\n",
                  broker_frames(11)[10]]  # ids 1 to 10, then 10 again: a duplicate
        body = HEAD + chunked(frames)
        rng, at = random.Random(7), 0
        while at < len(body):
            size = rng.choice(sizes)
            stream.data_received(body[at:at + size])
            at += size
    finally:
        loop.close()
    assert stream.status == 200
    assert (stream.last, stream.count, stream.disorder) == (10, 7, 1)  # ids 4 to 10 counted


def test_stream_filters_match_exact_names_and_prefixes() -> None:
    from loadgen import expected_frames, matches

    assert matches((), "anything")
    assert matches(("f01", "f1*"), "f01") and matches(("f01", "f1*"), "f17")
    assert not matches(("f01", "f1*"), "f011") and not matches(("f01", "f1*"), "f2")
    assert matches(("*",), "x")
    assert expected_frames(("f0*",), {"f00": 3, "f01": 4, "f10": 5}) == 7
    assert expected_frames((), {"f00": 3, "f10": 5}) == 8


def test_filters_scenario_gives_every_event_to_one_filter_of_two_names() -> None:
    """Each of the 10 filters matches 2 of the 20 names and every name is matched once, so a
    filtered run delivers a tenth of an unfiltered one's frames, spread evenly."""
    from loadgen import PublishPlan, matches
    from run import FILTER_NAMES, FILTERS, per_stream_expected, stream_channels

    assert len(FILTERS) == 10 and len(set(FILTERS)) == 10
    assert all(sum(matches(f, name) for name in FILTER_NAMES) == 2 for f in FILTERS)
    assert all(sum(matches(f, name) for f in FILTERS) == 1 for name in FILTER_NAMES)
    plan = PublishPlan(Channel("127.0.0.1", 1, "/sse"), 45, event_names=FILTER_NAMES)
    sent = [plan.event(i) for i in range(45)]
    pub = {"accepted": 45, "accepted_by_event": {n: sent.count(n) for n in FILTER_NAMES}}
    assert per_stream_expected(False, pub) == [45]
    assert per_stream_expected(True, pub) == [6, 6, 5, 4, 4, 4, 4, 4, 4, 4]  # f00-f04 thrice
    paths = [c.sse_path for c in stream_channels(Channel("h", 1, "/sse"), True)]
    assert paths[0] == "/sse?event=f00&event=f01" and paths[9] == "/sse?event=f18*&event=f19*"


def test_subscriber_counts_per_channel_and_reads() -> None:
    from loadgen import collect

    loop = asyncio.new_event_loop()
    try:
        group = Group(channels=2)
        for index, frames in enumerate([3, 1, 2]):
            proto = SubscriberProtocol(group, loop.create_future(), False,
                                       b"GET / HTTP/1.1\r\n\r\n")
            proto.connection_made(FakeTransport())  # type: ignore[arg-type]
            proto.data_received(HEAD)
            for frame in broker_frames(frames):
                proto.data_received(chunked([frame]))
            group.streams.append(proto)
            group.channel_of.append(index % 2)
        result = collect(group, "asyncio")
    finally:
        loop.close()
    assert result["counts_by_channel"] == [[3, 2], [1]]
    assert result["received"] == 6 and result["reads"] == 6
