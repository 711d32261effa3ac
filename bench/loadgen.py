"""The load generator: raw asyncio sockets, one process per role.

Subscribers, publishers and connection storms each run in their own process (spawned with
`multiprocessing`), so the client work is spread over processes and none of it runs inside the
orchestrator. The hot path is kept tiny on purpose, so that the client is not the bottleneck:

- a subscriber counts frames by counting `data:` in the raw bytes it receives (one C-level
  `bytes.count` per `recv`, no JSON, no chunked decoding: chunk-size lines never contain
  `data:`, and `: ping` comments do not either);
- only a few evenly spread "probe" subscribers also pull the sequence number `"n":<seq>` out of
  each frame with one regex pass, and note the receive time;
- the publisher notes the send time of every sequence number; the orchestrator joins both
  (`time.monotonic` is one system-wide clock on Linux) into publish-to-receive latencies.

Every process reports its own CPU time (`resource.getrusage`), so a saturated client shows up
in the results instead of silently capping them.
"""

from __future__ import annotations

import asyncio
import base64
import re
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

SEQ_RE = re.compile(rb'"n": ?(\d+)')
MARK = b"data:"
CONNECT_TIMEOUT = 15.0


# -- process set-up -----------------------------------------------------------------------------
def use_fast_loop() -> str:
    """Install uvloop's policy when it is importable; return the loop name in use."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each stream is one descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- what to talk to ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Channel:
    """Where to subscribe and where to publish, for one server and one tenant/channel.

    `wrap_insert` publishes `{"event": "bench", "data": <payload>}` (broker, Starlette peer);
    otherwise the payload itself is the request body (nchan). Picklable, so it can be handed
    to a spawned process.
    """

    host: str
    port: int
    sse_path: str
    sse_headers: tuple[tuple[str, str], ...] = ()
    pub_path: str = "/insert"
    pub_headers: tuple[tuple[str, str], ...] = ()
    wrap_insert: bool = True

    def sse_request(self) -> bytes:
        lines = [f"GET {self.sse_path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Accept: text/event-stream", "Cache-Control: no-cache"]
        lines += [f"{name}: {value}" for name, value in self.sse_headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def other_request(self) -> bytes:
        """A cheap request on another connection, to time while a fan-out runs: broker's
        `GET /verify` (authenticated, so wrap_insert servers get the stream's headers), the
        root page elsewhere (nchan has no auth)."""
        lines = [f"GET {'/verify' if self.wrap_insert else '/'} HTTP/1.1",
                 f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.sse_headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def publish_request(self, payload: bytes, event: str = "bench") -> bytes:
        if self.wrap_insert:
            body = b'{"event":"%s","data":%s}' % (event.encode(), payload)
        else:
            body = payload
        lines = [f"POST {self.pub_path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in self.pub_headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def basic_header(username: str, password: str) -> tuple[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


def payload(seq: int, pad: int) -> bytes:
    """The event data: a sequence number the probes can find, padded to a realistic size."""
    return b'{"n":%d,"pad":"%s"}' % (seq, b"x" * pad)


def matches(patterns: tuple[str, ...], name: str) -> bool:
    """Whether a stream opened with `?event=` values `patterns` carries events named `name`
    (issue 20): each pattern is an exact name or a prefix ending in `*`; no pattern: all."""
    if not patterns:
        return True
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def expected_frames(patterns: tuple[str, ...], accepted_by_event: dict[str, int]) -> int:
    """Frames one stream with these filters should receive of the accepted events."""
    return sum(n for name, n in accepted_by_event.items() if matches(patterns, name))


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- subscribers --------------------------------------------------------------------------------
@dataclass
class Group:
    """Shared state of the subscriber connections of one process."""

    last_frame: float = 0.0  # monotonic time of the last received frame, any connection
    closed_by_server: int = 0
    cpu_at_reset: float = 0.0
    reads: int = 0  # data_received calls of every stream after its head: frames ÷ reads
    streams: list[SubscriberProtocol] = field(default_factory=list)
    channel_of: list[int] = field(default_factory=list)  # each stream's index in the channels
    channels: int = 1


class SubscriberProtocol(asyncio.Protocol):
    """One SSE stream: read the response head once, then only count `data:` marks."""

    __slots__ = (
        "buffer",
        "closed",
        "count",
        "group",
        "head",
        "probe",
        "ready",
        "request",
        "samples",
        "status",
        "tail",
        "transport",
    )

    def __init__(self, group: Group, ready: asyncio.Future, probe: bool,
                 request: bytes) -> None:
        self.group = group
        self.ready = ready
        self.probe = probe
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.count = 0
        self.tail = b""  # last 4 bytes: a mark split across two reads is still counted once
        self.buffer = b""  # probes only: bytes after the last complete line
        self.samples: list[tuple[int, float]] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.status != 200:
            if self.status:  # refused: the transport is closing, ignore the body
                return
            data = self._read_head(data)
            if not data:
                return
        self.group.reads += 1
        found = data.count(MARK) + (self.tail + data[:4]).count(MARK)
        self.tail = data[-4:] if len(data) >= 4 else (self.tail + data)[-4:]
        if found:
            self.count += found
            self.group.last_frame = time.monotonic()
        if self.probe:
            self._sample(data)

    def _read_head(self, data: bytes) -> bytes:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = self.head[:end], self.head[end + 4:]
        self.head = b""
        try:
            self.status = int(head[9:12])
        except ValueError:
            self.status = -1
        if not self.ready.done():
            self.ready.set_result(self.status)
        if self.status != 200:
            self.transport.close()  # type: ignore[union-attr]
            return b""
        return rest

    def _sample(self, data: bytes) -> None:
        """Note the arrival time of every `"n":<seq>`, once the line holding it is complete."""
        self.buffer += data
        end = self.buffer.rfind(b"\n")
        if end < 0:
            return
        seqs = SEQ_RE.findall(self.buffer, 0, end)
        if seqs:
            now = time.monotonic()
            self.samples.extend((int(seq), now) for seq in seqs)
        self.buffer = self.buffer[end + 1:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status == 200:
            self.group.closed_by_server += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the response head"))


async def open_stream(group: Group, host: str, port: int, probe: bool,
                      gate: asyncio.Semaphore, request: bytes) -> SubscriberProtocol | str:
    """Open one stream; return it, or a short error description."""
    loop = asyncio.get_running_loop()
    error = "?"
    async with gate:
        for attempt in range(3):
            ready = loop.create_future()
            try:
                _, proto = await asyncio.wait_for(loop.create_connection(
                    lambda ready=ready: SubscriberProtocol(group, ready, probe, request), host,
                    port), CONNECT_TIMEOUT)
                status = await asyncio.wait_for(ready, CONNECT_TIMEOUT)
            except (TimeoutError, OSError, ConnectionError) as exc:
                error = type(exc).__name__
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if status == 200:
                return proto
            return f"HTTP {status}"
    return error


def probe_positions(total: int, probes: int) -> set[int]:
    """Indexes of `probes` connections spread evenly over the connection order."""
    probes = min(total, probes)
    if probes <= 0:
        return set()
    return {round(i * (total - 1) / max(1, probes - 1)) for i in range(probes)}


async def _subscriber(conn: Connection, channels: tuple[Channel, ...], total: int, probes: int,
                      concurrency: int, loop_name: str) -> None:
    """Stream i subscribes as channels[i % len(channels)] (several users of one tenant)."""
    requests = [channel.sse_request() for channel in channels]
    host, port = channels[0].host, channels[0].port
    group = Group(channels=len(channels))
    gate = asyncio.Semaphore(concurrency)
    chosen = probe_positions(total, probes)
    started = time.monotonic()
    opened = await asyncio.gather(*(open_stream(group, host, port, i in chosen, gate,
                                                requests[i % len(requests)])
                                    for i in range(total)))
    for index, item in enumerate(opened):
        if isinstance(item, SubscriberProtocol):
            group.streams.append(item)
            group.channel_of.append(index % len(requests))
    errors: dict[str, int] = {}
    for item in opened:
        if isinstance(item, str):
            errors[item] = errors.get(item, 0) + 1
    conn.send({"connected": len(group.streams), "failed": total - len(group.streams),
               "by_channel": [group.channel_of.count(k) for k in range(len(channels))],
               "errors": errors, "connect_seconds": time.monotonic() - started})
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "reset":
            reset_counts(group)
            conn.send("ok")
        elif command == "count":
            conn.send((sum(s.count for s in group.streams), group.last_frame))
        elif command == "collect":
            conn.send(collect(group, loop_name))
        elif command == "close":
            for stream in group.streams:
                if stream.transport is not None:
                    stream.transport.close()
            await asyncio.sleep(0.05)
            conn.send("closed")
            return


def reset_counts(group: Group) -> None:
    for stream in group.streams:
        stream.count = 0
        stream.samples.clear()
    group.last_frame = 0.0
    group.closed_by_server = 0
    group.reads = 0
    group.cpu_at_reset = cpu_seconds()


def collect(group: Group, loop_name: str) -> dict:
    counts = [s.count for s in group.streams]
    samples = [sample for s in group.streams if s.probe for sample in s.samples]
    by_channel: list[list[int]] = [[] for _ in range(group.channels)]
    for count, channel in zip(counts, group.channel_of, strict=True):
        by_channel[channel].append(count)
    return {"received": sum(counts), "min_per_stream": min(counts, default=0),
            "counts_by_channel": by_channel, "reads": group.reads,
            "max_per_stream": max(counts, default=0), "closed_by_server": group.closed_by_server,
            "last_frame": group.last_frame, "samples": samples,
            "cpu": cpu_seconds() - group.cpu_at_reset,
            "loop": loop_name}


def subscriber_main(conn: Connection, channel: Channel | tuple[Channel, ...], total: int,
                    probes: int, concurrency: int) -> None:
    """Process entry point: hold `total` streams and answer the orchestrator's commands."""
    raise_fd_limit()
    loop_name = use_fast_loop()
    channels = channel if isinstance(channel, tuple) else (channel,)
    asyncio.run(_subscriber(conn, channels, total, probes, concurrency, loop_name))


# -- publishers ---------------------------------------------------------------------------------
class HttpClient:
    """A keep-alive HTTP/1.1 client connection that sends prepared request bytes."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        body = await self._read_body(lower)
        if b"connection: close" in lower:
            self.close()
        return status, body

    async def _read_body(self, lower_head: bytes) -> bytes:
        assert self.reader is not None
        at = lower_head.find(b"content-length:")
        if at >= 0:
            length = int(lower_head[at + 15:lower_head.find(b"\r\n", at)])
            return await self.reader.readexactly(length)
        if b"transfer-encoding: chunked" in lower_head:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    return body
                body += chunk[:-2]
        return b""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class PublishPlan:
    """How many events to send, how fast, and over how many keep-alive connections."""

    channel: Channel
    events: int
    concurrency: int = 4
    rate: float = 0.0  # events per second; 0 = as fast as the server accepts them
    max_seconds: float = 30.0
    pad: int = 48
    record_sends: bool = True  # keep each send time (for latencies); off for long insert runs
    distinct_events: bool = False  # name the events e0, e1, ... instead of one "bench"
    event_names: tuple[str, ...] = ()  # or cycle over these names (accepted counted by name)

    def event(self, index: int) -> str:
        if self.distinct_events:
            return f"e{index}"
        if self.event_names:
            return self.event_names[index % len(self.event_names)]
        return "bench"


async def _publish(plan: PublishPlan) -> dict:
    cpu_before = cpu_seconds()
    send_times = [0.0] * (plan.events if plan.record_sends else 0)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted_by_event = dict.fromkeys(plan.event_names, 0)  # bounded: one entry per name
    state = {"next": 0}
    started = time.monotonic()
    deadline = started + plan.max_seconds

    async def worker() -> None:
        client = HttpClient(plan.channel.host, plan.channel.port)
        while True:
            index = state["next"]
            if index >= plan.events or time.monotonic() > deadline:
                break
            state["next"] = index + 1
            if plan.rate:
                delay = started + index / plan.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            event = plan.event(index)
            data = plan.channel.publish_request(payload(index, plan.pad), event)
            sent = time.monotonic()
            if plan.record_sends:
                send_times[index] = sent
            status = await timed_request(client, data, sent, latencies, statuses)
            if event in accepted_by_event and 200 <= status < 300:
                accepted_by_event[event] += 1
        client.close()

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    finished = time.monotonic()
    sent_count = min(state["next"], plan.events)
    accepted = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return {"sent": sent_count, "accepted": accepted, "statuses": statuses,
            "accepted_by_event": accepted_by_event,
            "send_times": send_times[:sent_count], "started": started, "finished": finished,
            "request_p50": percentile(latencies, 50), "request_p99": percentile(latencies, 99),
            "request_max": max(latencies, default=None),
            "cpu": cpu_seconds() - cpu_before}


async def timed_request(client: HttpClient, data: bytes, sent: float, latencies: list[float],
                        statuses: dict[int, int]) -> int:
    """One request on `client`; its latency since `sent` and its status (-1: failed) noted
    and returned."""
    try:
        status, _ = await client.request(data)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        status = -1
        client.close()
    latencies.append(time.monotonic() - sent)
    statuses[status] = statuses.get(status, 0) + 1
    return status


def publisher_main(conn: Connection, plan: PublishPlan) -> None:
    """Process entry point: publish according to `plan`, send the result dict back."""
    loop_name = use_fast_loop()
    result = asyncio.run(_publish(plan))
    result["loop"] = loop_name
    conn.send(result)


# -- a request timed while a fan-out runs ------------------------------------------------------
async def _requests(channel: Channel, rate: float, seconds: float) -> dict:
    client = HttpClient(channel.host, channel.port)
    request = channel.other_request()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.monotonic()
    for index in range(int(rate * seconds)):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.monotonic()
        await timed_request(client, request, sent, latencies, statuses)
    client.close()
    return {"requests": len(latencies), "statuses": statuses,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies, default=None)}


def requester_main(conn: Connection, channel: Channel, rate: float, seconds: float) -> None:
    """Process entry point: `rate` requests/s for `seconds` on one keep-alive connection."""
    use_fast_loop()
    conn.send(asyncio.run(_requests(channel, rate, seconds)))


# -- connection storm ---------------------------------------------------------------------------
async def _connect_once(channel: Channel, request: bytes, expect: int) -> float:
    """Open a stream, read until `expect` frames arrived, close; return the seconds it took."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(channel.host, channel.port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if int(head[9:12]) != 200:
            raise ConnectionError(f"HTTP {int(head[9:12])}")
        seen, tail = 0, b""
        while seen < expect:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(f"closed after {seen} frames")
            seen += data.count(MARK) + (tail + data[:4]).count(MARK)
            tail = data[-4:]
        return time.monotonic() - started
    finally:
        writer.close()


async def _storm(channel: Channel, total: int, concurrency: int, expect: int,
                 max_seconds: float) -> dict:
    cpu_before = cpu_seconds()
    request = channel.sse_request()
    durations: list[float] = []
    errors: dict[str, int] = {}
    state = {"next": 0}
    started = time.monotonic()
    deadline = started + max_seconds

    async def worker() -> None:
        while state["next"] < total and time.monotonic() < deadline:
            state["next"] += 1
            try:
                durations.append(await asyncio.wait_for(
                    _connect_once(channel, request, expect), CONNECT_TIMEOUT))
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                key = str(exc)[:60] or type(exc).__name__
                errors[key] = errors.get(key, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"completed": len(durations), "errors": errors, "seconds": elapsed,
            "connects_per_s": len(durations) / elapsed if elapsed else 0.0,
            "p50": percentile(durations, 50), "p99": percentile(durations, 99),
            "cpu": cpu_seconds() - cpu_before}


def storm_main(conn: Connection, channel: Channel, total: int, concurrency: int, expect: int,
               max_seconds: float) -> None:
    """Process entry point: `total` short-lived streams that each wait for `expect` frames."""
    raise_fd_limit()
    loop_name = use_fast_loop()
    result = asyncio.run(_storm(channel, total, concurrency, expect, max_seconds))
    result["loop"] = loop_name
    conn.send(result)


# -- subscribers that resume (the restart scenario) ---------------------------------------------
ID_LINE = re.compile(rb"id:(\d+)\n")


@dataclass
class ResumeGroup:
    """The streams of one process that resume with Last-Event-ID whenever theirs ends."""

    channel: Channel
    count_after: int  # ids up to this one are the sync, not counted
    gate: asyncio.Semaphore
    # Cleared by the orchestrator before it restarts the server and set once the new one
    # accepts connections: the streams that ended meanwhile then all reconnect at once.
    server_up: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    streams: list[ResumingStream] = field(default_factory=list)


class ResumingStream(asyncio.Protocol):
    """One subscriber: checks that ids only grow, counts them, and when the stream ends
    reconnects at once (no EventSource delay: the worst case) from the last id it saw."""

    __slots__ = ("count", "disorder", "group", "head", "last", "ready", "resumes", "status",
                 "streaming_at", "tail", "transport")

    def __init__(self, group: ResumeGroup) -> None:
        self.group = group
        self.last = 0
        self.count = 0  # ids after group.count_after received
        self.disorder = 0  # ids not greater than the one before: duplicates or reordering
        self.resumes = 0
        self.streaming_at = 0.0  # when the head of the current stream arrived
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future | None = None
        self.head = self.tail = b""
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.head = self.tail = b""
        self.status = 0
        headers = (("Last-Event-ID", str(self.last)),) if self.last else ()
        channel = self.group.channel
        request = Channel(channel.host, channel.port, channel.sse_path,
                          channel.sse_headers + headers).sse_request()
        transport.write(request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.status != 200:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head[9:12])
            data, self.head = self.head[end + 4:], b""
            self.streaming_at = time.monotonic()
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(self.status)
        text = self.tail + data
        end = text.rfind(b"\n") + 1
        self.tail = text[end:]
        for match in ID_LINE.finditer(text, 0, end):
            event_id = int(match.group(1))
            if event_id <= self.last:
                self.disorder += 1
                continue
            self.last = event_id
            if event_id > self.group.count_after:
                self.count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.ready is None:  # a stream that was open: resume it
            if not self.group.stopping:
                asyncio.get_running_loop().create_task(self.resume())
        elif not self.ready.done():  # an attempt of resume() failed: it tries again
            self.ready.set_result(0)

    async def resume(self) -> None:
        """Connect again until a stream is open; one attempt per gate slot."""
        loop = asyncio.get_running_loop()
        while not self.group.stopping:
            await self.group.server_up.wait()
            async with self.group.gate:
                self.ready = loop.create_future()
                try:
                    await asyncio.wait_for(loop.create_connection(
                        lambda: self, self.group.channel.host, self.group.channel.port),
                        CONNECT_TIMEOUT)
                    status = await asyncio.wait_for(self.ready, CONNECT_TIMEOUT)
                except (TimeoutError, OSError):
                    status = 0
                self.ready = None
            if status == 200 and self.transport is not None:
                self.resumes += 1
                return
            if self.transport is not None:
                self.transport.close()
            await asyncio.sleep(0.2)


async def _resumers(conn: Connection, channel: Channel, total: int, count_after: int,
                    gate: int) -> None:
    group = ResumeGroup(channel, count_after, asyncio.Semaphore(gate))
    group.server_up.set()
    group.streams = [ResumingStream(group) for _ in range(total)]
    await asyncio.gather(*(stream.resume() for stream in group.streams))
    for stream in group.streams:
        stream.resumes = 0
    conn.send("connected")
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        streams = group.streams
        if command == "count":
            conn.send((sum(s.count for s in streams),
                       sum(s.transport is not None and s.status == 200 for s in streams)))
        elif command in ("down", "up"):
            (group.server_up.clear if command == "down" else group.server_up.set)()
            conn.send("ok")
        elif command == "collect":
            conn.send({"counts": [s.count for s in streams],
                       "disorder": sum(s.disorder for s in streams),
                       "resumed": sum(s.resumes > 0 for s in streams),
                       "streaming_at": [s.streaming_at for s in streams],
                       "cpu": cpu_seconds()})
        elif command == "close":
            group.stopping = True
            for stream in streams:
                if stream.transport is not None:
                    stream.transport.close()
            await asyncio.sleep(0.05)
            conn.send("closed")
            return


def resumer_main(conn: Connection, channel: Channel, total: int, count_after: int,
                 gate: int) -> None:
    """Process entry point: hold `total` resuming streams, answer the orchestrator."""
    raise_fd_limit()
    use_fast_loop()
    asyncio.run(_resumers(conn, channel, total, count_after, gate))
