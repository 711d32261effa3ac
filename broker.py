"""broker: a real-time backend-as-a-service in one file.

Create users, log in for a JWT, insert events, and every subscriber of the same tenant
receives them over Server-Sent Events. A new subscriber first gets the latest value of
every event of its tenant (or, resuming with Last-Event-ID, everything it missed).

Reading order, top to bottom, follows a request:
  configuration -> HTTP framing (Connection, on h11) -> routing and handlers (App)
  -> authentication (Auth) -> storage (store.py) -> fan-out to subscribers (Hub).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import functools
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import jwt

import store
from store import Engine, Event, Pruned, QuotaExceeded, StoreError, User, UsernameTaken

if TYPE_CHECKING:
    import argon2

log = logging.getLogger("broker")

DEFAULT_ADMIN_TOKEN = "letmein"
MAX_HEADER_BYTES = 16 * 1024
HTTP_BUFFER = 64 * 1024  # unsent bytes of answers after which a connection stops reading
SYNC_PAGE = 1000  # events read per query when replaying a backlog
FANOUT_SLICE = 256  # subscribers written per turn of the loop: 1-2 ms, 6-8 us a write
JWT_ISSUER = "Broker"

# ---------------------------------------------------------------------------------------
# Configuration: every option is a flag and an environment variable BROKER_<NAME>.
# ---------------------------------------------------------------------------------------

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds in `45s`, `90m`, `12h` or `30d` (or a plain `0`)."""
    match = re.fullmatch(r"(\d{1,9})([smhd]?)", text.strip())
    if not match or (not match.group(2) and match.group(1).strip("0")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 45s, 90m, 12h, 30d")
    return int(match.group(1)) * DURATION_UNITS.get(match.group(2), 0)


OPTIONS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    ("host", str, "0.0.0.0", "address to listen on"),
    ("port", int, 8080, "port to listen on; 0 picks a free one"),
    ("db", str, "broker.db", "SQLite database file, or a postgresql:// URL (several processes)"),
    ("admin_token", str, DEFAULT_ADMIN_TOKEN, "token of the admin endpoints; change it"),
    ("jwt_secret", str, None, "HS256 secret for JWTs (default: a random one, kept in the db)"),
    ("jwt_expiry", int, 86400, "JWT lifetime in seconds"),
    ("origin", str, "*", "value of Access-Control-Allow-Origin (CORS)"),
    ("cert_path", str, None, "TLS certificate chain (PEM); with --key_path, serve HTTPS"),
    ("key_path", str, None, "TLS private key (PEM)"),
    ("log_level", str, "info", "debug, info, warning or error"),
    ("log_format", str, "text", "text, or json for log shippers"),
    ("heartbeat", float, 15.0, "seconds between keep-alive comments on idle streams"),
    ("max_buffer", int, 1 << 20, "unsent bytes a subscriber may lag before it is cut off"),
    ("max_body", int, 1 << 20, "largest request body in bytes"),
    ("request_timeout", float, 10.0, "seconds a client has to send a whole request"),
    ("idle_timeout", float, 60.0, "seconds an idle keep-alive connection is kept"),
    ("max_connections", int, 10000, "connections served at once; more get 503"),
    ("auth_failures", int, 20, "failed logins a minute per username (x3 per address)"),
    ("trusted_proxies", str, "", "proxy addresses (comma-separated) trusted for X-Forwarded-For"),
    ("password_checker", bool, False, "refuse weak passwords (zxcvbn; the 'passwords' extra)"),
    ("enforce_scopes", bool, False, "let scopes decide who may post and get what (NAME:post)"),
    ("retention", duration, "0", "delete events older than this (30d), but each name's newest"),
    ("argon2_memory_kib", int, 19456, "Argon2id memory per password hash, in KiB"),
    ("argon2_time_cost", int, 2, "Argon2id passes over that memory"),
    ("argon2_parallelism", int, 1, "Argon2id lanes (threads) per hash"),
    ("reuse_port", bool, False, "share the port with other processes (PostgreSQL only)"),
    ("max_streams_per_user", int, 100, "streams one user may hold; one more ends its oldest"),
    ("cache_bytes", int, 64 << 20, "bytes of tenants' latest and recent events kept in memory"),
    ("fanout_slice", int, FANOUT_SLICE, "streams written to before other work may run"),
    ("max_inserts_per_second", int, 0, "inserts a user may make per second; 0: no limit"),
    ("max_event_names", int, 10000, "distinct event names a tenant may have; 0: no limit"),
    ("max_tenant_bytes", int, 16 << 20, "bytes of a tenant's newest values; 0: no limit"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Real-time backend-as-a-service: users, JWT, events over SSE, on SQLite.",
        epilog="Every option can also be set as an environment variable BROKER_<NAME>, "
               "for example BROKER_ADMIN_TOKEN. Flags win over the environment.")
    for name, kind, default, help_text in OPTIONS:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        env = os.environ.get(f"BROKER_{name.upper()}")
        if kind is bool:
            on = env is not None and env.lower() in ("1", "true", "yes", "on")
            parser.add_argument(*flags, dest=name, action="store_true", default=on,
                                help=help_text)
            continue
        shown = "" if default is None else f" (default: {default})"
        # argparse converts a string default with `type`, so the env value is checked too.
        parser.add_argument(*flags, dest=name, type=kind, metavar=name.upper(),
                            default=env if env is not None else default, help=help_text + shown)
    config = parser.parse_args(argv)
    if bool(config.cert_path) != bool(config.key_path):
        parser.error("--cert_path and --key_path go together")
    if config.log_format not in ("text", "json"):
        parser.error("--log_format is text or json")
    # Argon2's own bounds: at least one pass, and 8 KiB of memory per lane.
    if not (config.argon2_time_cost >= 1 and 1 <= config.argon2_parallelism <= 255
            and 8 * config.argon2_parallelism <= config.argon2_memory_kib <= 1 << 22):
        parser.error("Argon2 needs --argon2_time_cost >= 1, --argon2_parallelism 1-255 and "
                     "--argon2_memory_kib from 8 x parallelism to 4194304 (4 GiB)")
    if config.reuse_port and not store.is_postgres_url(config.db):
        parser.error("--reuse_port needs PostgreSQL (--db postgresql://...): one process "
                     "owns a SQLite file")
    if CONTROL_CHARS.search(config.origin):
        parser.error("--origin must not contain control characters")
    if config.fanout_slice < 1 or min(config.max_inserts_per_second, config.max_event_names,
                                      config.max_tenant_bytes) < 0:
        parser.error("--fanout_slice must be at least 1; --max_inserts_per_second, "
                     "--max_event_names and --max_tenant_bytes 0 (no limit) or more")
    # An empty token is what `$(openssl rand ...)` gives when openssl is missing.
    if not config.admin_token.strip():
        parser.error("the admin token (--admin_token, BROKER_ADMIN_TOKEN) must not be empty")
    return config


class JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: argparse.Namespace) -> None:
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(JSONLogFormatter() if config.log_format == "json" else text)
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)


# ---------------------------------------------------------------------------------------
# Requests, responses and errors
# ---------------------------------------------------------------------------------------

class HTTPError(Exception):
    """Raised anywhere in a handler; becomes `{"error": message}` with this status."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]  # each parameter's values, in order
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: str
    conn: Connection


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


STREAMING = Response(0)  # returned by a handler that has taken the connection over


def reply(obj: Any, status: int = 200) -> Response:
    return Response(status, compact_json(obj))


def compact_json(obj: Any) -> bytes:
    # ASCII only (non-ASCII as \u escapes): broker-client decodes the stream one byte per
    # character, so raw UTF-8 in an event's data would reach it garbled.
    return json.dumps(obj, separators=(",", ":")).encode()


LONE_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _finite_number(text: str) -> float:
    """A JSON number as a float; NaN, Infinity and numbers too large for a float refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def read_json(req: Request) -> dict[str, Any]:
    """The body as a JSON object. A missing or odd Content-Type is forgiven when the body
    parses as JSON (curl -d sends form encoding by default); otherwise 415 or 400."""
    try:
        # Strict UTF-8 (json.loads on bytes would let encoded surrogates through), no NaN or
        # Infinity, and no nesting deep enough to exhaust the recursion limit.
        body = json.loads(req.body.decode("utf-8"), parse_constant=_finite_number,
                          parse_float=_finite_number)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        content_type = req.headers.get("content-type", "")
        if content_type and "json" not in content_type.lower():
            raise HTTPError(415, "the body must be JSON (Content-Type: application/json)")
        raise HTTPError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    if LONE_SURROGATE_ESCAPE.search(req.body):
        # "\ud800" is valid JSON but no valid UTF-8 text: refuse it here, once, so no
        # later encode (SQLite, Argon2, the stream) meets it.
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise HTTPError(400, "invalid Unicode: a lone surrogate escape") from None
    return body


# -- field validation ----------------------------------------------------------------------

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s.]+")


def string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} is required and must be a string")
    return value


def text_field(body: dict[str, Any], name: str, *, max_len: int = 64) -> str:
    """A non-empty string of at most max_len characters without control characters."""
    value = string_field(body, name)
    if not 1 <= len(value) <= max_len:
        raise HTTPError(400, f"{name} must be 1 to {max_len} characters")
    if CONTROL_CHARS.search(value):
        raise HTTPError(400, f"{name} must not contain control characters")
    return value


def password_field(body: dict[str, Any], checker: Callable[[str], str | None] | None) -> str:
    value = string_field(body, "password")
    if not 8 <= len(value) <= 1024:
        raise HTTPError(400, "password must be 8 to 1024 characters")
    problem = checker(value) if checker else None
    if problem:
        raise HTTPError(400, f"password is too weak: {problem}")
    return value


def email_field(body: dict[str, Any]) -> str | None:
    value = body.get("email")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 254 or not EMAIL.fullmatch(value):
        raise HTTPError(400, "email must be a valid address or null")
    return value


def scopes_field(body: dict[str, Any]) -> list[str]:
    value = body.get("scopes")
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise HTTPError(400, "scopes must be a list of strings")
    for scope in value:
        # Scopes travel in the JWT joined by commas, so a comma would split one in two.
        if not 1 <= len(scope) <= 256 or "," in scope or CONTROL_CHARS.search(scope):
            raise HTTPError(400, "each scope must be 1 to 256 characters, without commas")
    return value


# The fields of an account besides its username and password, each with its check, in the
# order they are checked (create_user: every one; update_user: those in the body).
ACCOUNT_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tenant_name": lambda body: text_field(body, "tenant_name"),
    "email": email_field,
    "scopes": scopes_field,
    "data": lambda body: body.get("data"),
}


# -- scopes: which events a user may insert and receive (with --enforce_scopes) -----------


@dataclass(frozen=True, slots=True)
class EventNames:
    """The event names that some scope patterns grant: exact names, and literal prefixes
    (the pattern `chat.*` is the prefix "chat.", and `*` the prefix "", which every name
    has). Compared by value: subscribers with equal EventNames share one fan-out group."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    def __call__(self, name: str) -> bool:
        return name in self.exact or name.startswith(self.prefixes)


def event_names(patterns: list[str]) -> EventNames:
    # Normalized, so that equal grants compare equal (`*` with `news` is just `*`).
    stems = {p[:-1] for p in patterns if p.endswith("*")}
    prefixes = tuple(sorted(p for p in stems if not any(p != q and p.startswith(q)
                                                         for q in stems)))
    exact = frozenset(p for p in patterns if not p.endswith("*") and not p.startswith(prefixes))
    return EventNames(exact, prefixes)


@functools.lru_cache(maxsize=4096)
def both(a: EventNames | None, b: EventNames | None) -> EventNames | None:
    """The names that both allow (None allows every name)."""
    if a is None or b is None:
        return b if a is None else a
    patterns = [name for name in a.exact if b(name)] + [name for name in b.exact if a(name)]
    # A name with both prefixes starts with the longer one.
    patterns += [max(p, q, key=len) + "*" for p in a.prefixes for q in b.prefixes
                 if p.startswith(q) or q.startswith(p)]
    return event_names(patterns)


def event_filter(values: list[str]) -> EventNames | None:
    """The names a stream asks for with `?event=` (exact, or a prefix ending in `*`);
    None for every name."""
    if not values:
        return None
    if len(values) > 64:
        raise HTTPError(400, "at most 64 event filters")
    for value in values:
        if not 1 <= len(value) <= 256 or CONTROL_CHARS.search(value):
            raise HTTPError(400, "each event filter must be 1 to 256 characters, without "
                                 "control characters")
    names = event_names(values)
    return None if "" in names.prefixes else names


@functools.lru_cache(maxsize=4096)
def grants(scopes: tuple[str, ...]) -> tuple[EventNames, EventNames]:
    """The names these scopes may get (`NAME:get`) and post (`NAME:post`). Other scopes
    stay on the user and in its JWT, and grant nothing here."""
    patterns: dict[str, list[str]] = {"get": [], "post": []}
    for scope in scopes:
        name, _, action = scope.rpartition(":")
        if name and action in patterns:
            patterns[action].append(name)
    return event_names(patterns["get"]), event_names(patterns["post"])


# ---------------------------------------------------------------------------------------
# Delivery: from a commit to the subscribers' sockets.
#
# A Stream is one subscriber. The Hub keeps, per tenant, a Tenant: its streams, grouped by
# the event names they read (Group: everything, or a filter, or scopes with
# --enforce_scopes), and its state (the newest event of each name and its recent events,
# as SSE frames) for syncs and short replays. Each committed event is encoded once; a
# group's streams share one joined bytes object per position, so nothing is checked or
# encoded per subscriber. The Writer is the hub's one schedule for writing them.
# ---------------------------------------------------------------------------------------


def sse_frame(event: Event) -> bytes:
    return f"id:{event.id}\nevent:{event.event}\ndata:{event.data}\n\n".encode()


def chunk(payload: bytes) -> bytes:
    """HTTP/1.1 chunked framing around one payload."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


HEARTBEAT = b":\n\n"
LAST_CHUNK = b"0\r\n\r\n"
LINGER = 0.005  # longest wait between two passes of the writer: see Writer._pass_over
RECENT_LOADED = 100  # a tenant's newest events read when its state is loaded
RECENT_KEPT = 1000  # events of a tenant's recent past kept at most, and at most RECENT_BYTES
RECENT_BYTES = 256 * 1024
STATE_LOAD_TIMEOUT = 10.0
DRAIN_DEADLINE = 5.0  # a sync or replay the client takes nothing of for this long ends
END_DEADLINE = 5.0  # a stream broker ends is aborted if its last bytes are not taken by then


def retry_frame() -> bytes:
    """The first frame of every stream: EventSource's reconnection delay, 2 to 6 s and
    different for each stream, so that after a restart browsers come back spread out rather
    than all at once. The comment line before it names `data:`, `event:` and `id:` with
    nothing after them: broker-client finds fields by indexOf on the whole frame and would
    otherwise read the retry line as an event named ":300" with data "y:300"; this way it
    sees an empty frame, as for a heartbeat. EventSource skips the comment, and a frame
    without data dispatches nothing."""
    return b":data:event:id:\nretry:%d\n\n" % random.randint(2000, 6000)


def in_pieces(frames: list[bytes], size: int) -> list[bytes]:
    """Whole frames joined into pieces of about `size` bytes (half --max_buffer): what
    Stream.send writes at a time."""
    pieces: list[bytes] = []
    start = total = 0
    for end, frame in enumerate(frames, 1):
        total += len(frame)
        if total >= size or end == len(frames):
            pieces.append(b"".join(frames[start:end]))
            start, total = end, 0
    return pieces


class Stream(asyncio.Protocol):
    """One subscriber: the transport of a `/sse` connection, taken over from its Connection
    once the response has begun. It only writes; whatever the client sends is ignored."""

    # No per-instance dict: an idle stream is mostly this object and its transport.
    __slots__ = ("app", "chunked", "group", "head", "live", "position", "reads", "tenant",
                 "transport", "unpaused", "user", "username")
    group: Group  # its group, set when it joins (Hub.join)

    def __init__(self, app: App, transport: asyncio.Transport, chunked: bool, user: User,
                 reads: EventNames | None) -> None:
        self.app = app
        self.transport = transport
        self.chunked = chunked  # HTTP/1.1 chunks, or a body that ends with the connection
        self.user = user  # as it was when the stream began (App.account_changed)
        self.username = user.username
        self.tenant = user.tenant_name
        self.reads = reads  # the event names it receives (its group); None: every name
        # Mutable: the log index (in its group) of the first frame it has not been sent;
        # while it syncs, where it joined (its group keeps the frames from there).
        self.position = 0
        self.live = False  # synced: the writer sends it its group's frames from `position`
        self.unpaused: asyncio.Future[None] | None = None  # set while a sync waits to drain
        transport.set_write_buffer_limits(high=app.config.max_buffer)
        retry = retry_frame()
        # The response head, until it goes out with the first frames (one write, not two).
        self.head = app.stream_heads[chunked] + (chunk(retry) if chunked else retry)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():  # uvloop raises on a write to a closed transport
            self.transport.write(data)

    async def send(self, pieces: list[bytes]) -> None:
        """Write a sync or a replay (see in_pieces), each piece once the client has taken
        most of what came before: a big sync holds at most about --max_buffer unsent bytes
        here. A client that takes nothing for DRAIN_DEADLINE ends it (TimeoutError); a slow
        one that keeps reading is waited for (uvloop resumes writing only once its buffer is
        written out, which on a slow link takes longer than that)."""
        for piece in pieces or [b""]:  # the head goes out, whatever there is to send
            self.write(self.head + (chunk(piece) if self.chunked and piece else piece))
            self.head = b""
            while self.unpaused is not None:  # over --max_buffer: wait while the client takes it
                unsent = self.transport.get_write_buffer_size()
                await asyncio.wait([self.unpaused], timeout=DRAIN_DEADLINE)
                if self.transport.get_write_buffer_size() >= unsent:  # no progress: give up
                    raise TimeoutError(f"the client took nothing for {DRAIN_DEADLINE} s")
            # Its group keeps what comes meanwhile for it: at most --max_buffer of that either.
            if self.transport.is_closing() or self.group.held(self) > self.app.config.max_buffer:
                raise ConnectionError("connection closed, or too slow to sync")

    def close(self, abort: bool = False) -> None:
        """End the stream: the terminating chunk and a close, and an abort after
        END_DEADLINE if the client has not taken them; at once when `abort`."""
        if abort:
            self.transport.abort()
        elif not self.transport.is_closing():
            self.write(self.head + (LAST_CHUNK if self.chunked else b""))
            self.transport.close()
            asyncio.get_running_loop().call_later(END_DEADLINE, self.transport.abort)

    # -- asyncio callbacks (at the client's EOF, asyncio closes the transport) --------------
    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        self.app.hub.leave(self)
        self.resume_writing()  # a sync waiting to drain sees the connection closed

    def pause_writing(self) -> None:
        # The kernel is not taking our bytes and the buffer passed --max_buffer.
        if self.live:
            self.app.hub.cut(self)  # a slow consumer
        elif self.unpaused is None:
            self.unpaused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.unpaused is not None and not self.unpaused.done():
            self.unpaused.set_result(None)
        self.unpaused = None


class Group:
    """The streams of one tenant that read the same event names, and the frames of the
    events they read that not all of them have been sent, as (id, frame), in id order.
    A heartbeat is a frame too, with the id of the newest event published before it."""

    __slots__ = ("base", "log", "streams")

    def __init__(self) -> None:
        self.streams: dict[Stream, None] = {}  # live and syncing, in the order they joined
        self.log: list[tuple[int, bytes]] = []  # log[i] has the log index base + i
        self.base = 0

    def end(self) -> int:
        return self.base + len(self.log)

    def held(self, stream: Stream) -> int:
        return sum(len(frame) for _, frame in self.log[stream.position - self.base:])

    def trim(self) -> None:
        """Forget the frames every stream has been sent (or, syncing, does not want)."""
        oldest = min((stream.position for stream in self.streams), default=self.end())
        del self.log[:oldest - self.base]
        self.base = oldest


# A pass's joined frames: (group, position, end, chunked) -> bytes (Writer.unsent_data).
Joined = dict[tuple[Group, int, int, bool], bytes]


class Writer:
    """The hub's one schedule for writing the groups' frames to their live streams.

    A pass visits the streams that lack frames, `fanout_slice` of them per turn of the loop
    (call_soon), so requests, acks and connects wait at most one slice. A stream visited gets
    everything from its position to its group's end in one write: frames published while a
    pass is under way travel together, and streams at the same position share one joined
    bytes object. A publish that finds the writer idle starts a pass at once.

    The send system call is the cost (a few us a write), not the bytes, so under load fewer,
    larger writes are the lever: when a pass ends while an insert is on its way to a commit
    (or a request arrived during the pass, which under a flood is the next insert), the
    writer lingers, as long as the pass took and at most LINGER, so that the commits of a
    flood gather into the next pass and the loop is free for the requests at least half
    the time. At an everyday rate nothing is on its way when a pass ends, and the next event
    is written the moment it is published. bench/README.md has the measurements ("The
    fan-out writer", "The delivery path rebuilt").
    """

    __slots__ = ("busy", "due", "inserting", "request_seen", "slice")

    def __init__(self, fanout_slice: int) -> None:
        self.slice = fanout_slice
        # Mutable, each needed: the groups with frames a live stream lacks (the next pass);
        self.due: dict[Group, None] = {}
        self.busy = False  # a pass or a linger is under way: publish() only queues
        self.request_seen = 0.0  # when the newest request arrived (Connection.start_request)
        self.inserting = 0  # inserts on their way to a commit (App.insert)

    def kick(self) -> None:
        """Start a pass now, unless one is under way or the writer lingers."""
        if not self.busy and self.due:
            self.busy = True
            self._start_pass()

    def _start_pass(self) -> None:
        groups, self.due = self.due, {}
        visits = []
        for group in groups:
            group.trim()
            end = group.end()
            visits += [stream for stream in group.streams
                       if stream.live and stream.position < end]
        # The pass's own state goes from slice to slice with it, and is freed when it ends:
        # the streams left to visit (existing objects: a list of 10,000 new tuples a pass,
        # alive for its dozens of turns, would fill the GC's oldest generation), its joined
        # frames (see unsent_data) and when it began (monotonic: uvloop caches loop.time).
        self._slice(iter(visits), {}, time.monotonic())

    def _slice(self, visits: Iterator[Stream], joined: Joined, started: float) -> None:
        visited = 0
        for stream in itertools.islice(visits, self.slice):
            data = self.unsent_data(stream, joined)
            if data:
                stream.write(data)  # may cut it (Stream.pause_writing): the pass goes on
            visited += 1
        if visited == self.slice:
            asyncio.get_running_loop().call_soon(self._slice, visits, joined, started)
        else:
            self._pass_over(started)

    def _pass_over(self, started: float) -> None:
        loop = asyncio.get_running_loop()
        if self.inserting or self.request_seen > started:
            took = time.monotonic() - started
            loop.call_later(min(took, LINGER), self._linger_over)
        elif self.due:
            loop.call_soon(self._start_pass)
        else:
            self.busy = False

    def _linger_over(self) -> None:
        self.busy = False
        self.kick()

    @staticmethod
    def unsent_data(stream: Stream, joined: Joined) -> bytes:
        """What `stream` has not been sent yet, framed for it; its position moves to the
        end (before the write, which may cut it). The joined frames of one position are
        shared by the streams at it."""
        group = stream.group
        position, end = stream.position, group.end()
        if position >= end:
            return b""
        stream.position = end
        key = (group, position, end, stream.chunked)
        data = joined.get(key)
        if data is None:
            data = b"".join(frame for _, frame in group.log[position - group.base:])
            data = joined[key] = chunk(data) if stream.chunked else data
        return data


class Tenant:
    """One tenant, as the hub holds it: its streams by group, and its state.

    The state is the newest event of each name and the tenant's recent events, as frames,
    kept current by every publish, so that a sync, and a replay from one of the recent
    events, read no SQL. It is loaded from the store at the first connect that needs it
    (Hub.hold) and may be dropped again to stay within --cache_bytes (Hub.evict)."""

    __slots__ = ("groups", "horizon", "latest", "loading", "recent", "recent_bytes", "syncs")

    def __init__(self) -> None:
        # Mutable, each needed: its streams by what they read (a group each);
        self.groups: dict[EventNames | None, Group] = {}
        # the newest event of each name: name -> (id, frame), in id order; None: not held;
        self.latest: dict[str, tuple[int, bytes]] | None = None
        # its recent events, (id, name, frame) in id order: every one with an id above
        # `horizon` (the newest dropped, or the pruned horizon, whichever is larger);
        self.recent: list[tuple[int, str, bytes]] = []
        self.recent_bytes = 0
        self.horizon = 0
        # the sync of each group, in pieces, built at its first connect after a change;
        self.syncs: dict[EventNames | None, list[bytes]] = {}
        self.loading: asyncio.Future[None] | None = None  # a read from the store under way

    def held(self) -> bool:
        return self.latest is not None and self.loading is None

    def size(self) -> int:
        return self.recent_bytes + sum(len(frame) for _, frame in (self.latest or {}).values())

    def apply(self, events: list[Event], frames: list[bytes]) -> int:
        """Take in newly published events (each newer than anything held) and their frames;
        returns the change in bytes held."""
        if self.latest is None:
            return 0
        grown = 0
        for event, frame in zip(events, frames):
            old = self.latest.pop(event.event, None)  # put back at the end: id order
            self.latest[event.event] = (event.id, frame)
            self.recent.append((event.id, event.event, frame))
            self.recent_bytes += len(frame)
            grown += len(frame) - (len(old[1]) if old else 0)  # the newest of its name
            grown += len(frame)  # and one of the recent events
        self.syncs.clear()
        return grown - self.trim_recent(self.horizon)

    def trim_recent(self, horizon: int) -> int:
        """Drop the recent events up to `horizon`, then the oldest while more than
        RECENT_KEPT or RECENT_BYTES are left; returns the bytes freed."""
        cut = bisect.bisect_right(self.recent, horizon, key=itemgetter(0))
        freed = sum(len(item[2]) for item in self.recent[:cut])
        while cut < len(self.recent) and (len(self.recent) - cut > RECENT_KEPT
                                          or self.recent_bytes - freed > RECENT_BYTES):
            freed += len(self.recent[cut][2])
            cut += 1
        if cut:
            horizon = max(horizon, self.recent[cut - 1][0])
            del self.recent[:cut]
            self.recent_bytes -= freed
        self.horizon = max(self.horizon, horizon)
        return freed

    def load(self, latest: list[tuple[Event, bytes]], recent: list[tuple[Event, bytes]],
             pruned: int) -> None:
        """Merge what the store read (oldest first) into what publish() applied meanwhile:
        every event of the tenant from the oldest of `recent` on, and above `pruned` (the
        horizon retention left)."""
        assert self.latest is not None
        # Publishes since the read began are here already, newer than the store's rows
        # they do not repeat; so the store's rows go before them, in both.
        first = self.recent[0][0] if self.recent else math.inf
        older = [(event.id, event.event, frame) for event, frame in recent if event.id < first]
        self.recent = older + self.recent
        self.recent_bytes += sum(len(item[2]) for item in older)
        horizon = max(pruned, recent[0][0].id - 1) if recent else pruned
        self.trim_recent(max(self.horizon, horizon))
        merged = {event.event: (event.id, frame) for event, frame in latest}
        for name, entry in self.latest.items():
            merged.pop(name, None)  # put back at the end: id order
            merged[name] = entry
        self.latest = merged
        self.syncs.clear()

    def forget(self) -> int:
        """Drop the state (not the streams); returns the bytes freed."""
        freed = self.size()
        self.latest, self.recent, self.recent_bytes = None, [], 0
        self.syncs.clear()
        return freed

    def sync(self, reads: EventNames | None, piece: int) -> list[bytes]:
        """The newest event of each name that `reads` allows, oldest first, in pieces."""
        assert self.latest is not None
        pieces = self.syncs.get(reads)
        if pieces is None:
            if len(self.syncs) >= 16:  # many filters: keep the memory bounded
                self.syncs.clear()
            frames = [frame for name, (_, frame) in self.latest.items()
                      if reads is None or reads(name)]
            pieces = self.syncs[reads] = in_pieces(frames, piece)
        return pieces

    def after(self, last_id: int, reads: EventNames | None) -> list[bytes] | None:
        """The frames of every event after `last_id` that `reads` allows, when `last_id` is
        one of the recent events (so every later event is here); else None."""
        at = bisect.bisect_left(self.recent, last_id, key=itemgetter(0))
        if at == len(self.recent) or self.recent[at][0] != last_id:
            return None
        return [frame for _, name, frame in self.recent[at + 1:] if reads is None or reads(name)]


class Hub:
    """Who listens to which tenant, what each tenant's state is, and the writer."""

    def __init__(self, store: Engine, metrics: Metrics, config: argparse.Namespace) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.writer = Writer(config.fanout_slice)
        # Mutable, each needed: every tenant with streams or a held state, those that lost
        # their last stream longest ago first (evicted first);
        self.tenants: dict[str, Tenant] = {}
        self.cached = 0  # bytes of the tenants' states, bounded by --cache_bytes
        # each user's streams, oldest first (--max_streams_per_user).
        self.by_user: dict[str, dict[Stream, None]] = {}

    def publish(self, events: list[Event]) -> None:
        """Called by the store after each commit, with its events in id order."""
        by_tenant: dict[str, list[Event]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant_name, []).append(event)
        for name, batch in by_tenant.items():
            tenant = self.tenants.get(name)
            if tenant is None:
                continue
            frames = [sse_frame(event) for event in batch]  # each event encoded once
            self.cached += tenant.apply(batch, frames)
            for reads, group in tenant.groups.items():
                chosen = [(event.id, frame) for event, frame in zip(batch, frames)
                          if reads is None or reads(event.event)]
                if chosen:
                    self.metrics.frames_delivered += len(chosen) * len(group.streams)
                    group.log += chosen
                    self.writer.due[group] = None
        self.evict()
        self.writer.kick()

    def pruned(self, horizons: dict[str, int]) -> None:
        """Retention deleted events up to these ids: the memory's replays obey it too."""
        for name, upto in horizons.items():
            tenant = self.tenants.get(name)
            if tenant is not None and tenant.held():
                self.cached -= tenant.trim_recent(upto)

    def heartbeat(self) -> None:
        """A comment frame for every live stream, through the writer like events."""
        beat = [(self.store.published.upto, HEARTBEAT)]
        for tenant in self.tenants.values():
            for group in tenant.groups.values():  # each has streams: see leave_group
                group.log += beat
                self.writer.due[group] = None
        self.writer.kick()

    # -- a tenant's state ---------------------------------------------------------------
    async def hold(self, name: str) -> tuple[Tenant, int]:
        """The tenant of a joined stream with its state held, and the newest published id
        that state reflects. No SQL, and no wait, when it is held already."""
        while (tenant := self.tenants.get(name)) is not None:
            if tenant.held():
                return tenant, self.store.published.upto
            if tenant.loading is None:
                tenant.loading = asyncio.ensure_future(self._load(tenant, name))
            await asyncio.shield(tenant.loading)
        raise ConnectionError("the stream went away")  # and with it the tenant's last

    async def _load(self, tenant: Tenant, name: str) -> None:
        tenant.latest = {}  # publish() applies to it meanwhile
        try:
            latest, recent, newest, pruned = await self.store.tenant_state(
                name, RECENT_LOADED, RECENT_BYTES)
            # Events up to `newest` are in what was read; wait until publish() has applied
            # them too, or a later one would be applied before them.
            await asyncio.wait_for(self.store.published.reached(newest), STATE_LOAD_TIMEOUT)
            # Encoded in a thread: a tenant's 10,000 names would hold the loop for 10 ms.
            frames = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [sse_frame(event) for event in (*latest, *recent)])
            before = tenant.size()
            tenant.load(list(zip(latest, frames)), list(zip(recent, frames[len(latest):])),
                        pruned)
            self.cached += tenant.size() - before
        except BaseException:
            self.cached -= tenant.forget()
            raise
        finally:
            tenant.loading = None
        self.evict(keep=tenant)

    def evict(self, keep: Tenant | None = None) -> None:
        """Over --cache_bytes: drop the states of the least recently used tenants without
        streams, then of tenants with streams (their next connect reads it again)."""
        for name, tenant in list(self.tenants.items()):
            if self.cached <= self.config.cache_bytes:
                return
            if not tenant.groups and tenant.loading is None:
                del self.tenants[name]
                self.cached -= tenant.forget()
                self.metrics.state_evictions += 1
        for tenant in self.tenants.values():
            if self.cached <= self.config.cache_bytes:
                return
            if tenant is not keep and tenant.held():
                self.cached -= tenant.forget()
                self.metrics.state_evictions += 1

    # -- streams ------------------------------------------------------------------------
    def join(self, stream: Stream) -> None:
        """Add a new stream to its group; it is sent what it syncs, then goes live."""
        tenant = self.tenants.get(stream.tenant) or self.tenants.setdefault(stream.tenant, Tenant())
        group = stream.group = tenant.groups.get(stream.reads) or \
            tenant.groups.setdefault(stream.reads, Group())
        stream.position = group.end()  # the group keeps every frame from here
        group.streams[stream] = None
        streams = self.by_user.setdefault(stream.username, {})
        streams[stream] = None
        if len(streams) > self.config.max_streams_per_user:
            self.end_worst_stream(list(streams)[:-1])

    async def go_live(self, stream: Stream, covered: int) -> None:
        """The stream has been sent everything up to `covered` (sync or replay): from its
        group's frames, it is sent what came after, then everything as it comes."""
        if covered > self.store.published.upto:
            await asyncio.wait_for(self.store.published.reached(covered), STATE_LOAD_TIMEOUT)
        group = stream.group
        if stream not in group.streams:
            return  # it went away meanwhile (or was muted)
        # If its sync took so long that it is over --max_buffer behind, its first write cuts it.
        stream.position = group.base + bisect.bisect_right(
            group.log, covered, lo=stream.position - group.base, key=itemgetter(0))
        stream.live = True
        if stream.position < group.end():
            self.writer.due[group] = None
            self.writer.kick()

    def leave(self, stream: Stream) -> None:
        self.leave_group(stream)
        streams = self.by_user.get(stream.username, {})
        if stream in streams:
            del streams[stream]
            if not streams:
                del self.by_user[stream.username]

    def leave_group(self, stream: Stream) -> None:
        group = stream.group
        if stream not in group.streams:
            return  # left it already (muted, or gone)
        del group.streams[stream]
        tenant = self.tenants[stream.tenant]
        if not group.streams:
            del tenant.groups[stream.reads]
            self.writer.due.pop(group, None)
        if not tenant.groups:  # its state, if held, is kept while the cache has room
            if tenant.latest is None:
                del self.tenants[stream.tenant]
            else:
                self.tenants[stream.tenant] = self.tenants.pop(stream.tenant)  # to the end

    def end(self, stream: Stream, abort: bool = False) -> None:
        self.leave(stream)
        stream.close(abort)

    def cut(self, stream: Stream) -> None:
        self.metrics.slow_consumers_cut += 1
        log.warning("cut off slow subscriber %s: over --max_buffer unsent", stream.username)
        self.end(stream, abort=True)

    def end_worst_stream(self, streams: list[Stream]) -> None:
        """A user is over --max_streams_per_user (a front end that opens a stream on every
        render, say): end the stream with the most unsent bytes, a zombie behind a dead
        NAT, or else the oldest. A live tab simply reconnects."""
        victim = max(streams, key=lambda stream: stream.transport.get_write_buffer_size())
        self.metrics.user_streams_closed += 1
        log.info("closing the oldest stream of %s: over --max_streams_per_user", victim.username)
        self.end(victim)

    def end_user(self, username: str) -> None:
        for stream in list(self.by_user.get(username, ())):
            self.end(stream)


# ---------------------------------------------------------------------------------------
# Authentication: JWT (HS256) or Basic, against the stored user, which must not be revoked.
# ---------------------------------------------------------------------------------------


class Throttle:
    """Counts failures per key in a one-minute window; over the limit, answer 429. The keys
    come from clients (usernames, addresses): at most MAX_KEYS are kept, and at each failure
    the keys whose last failure is oldest go while they are over that or out of the window.
    Filling it takes that many failed Argon2 checks, or as many client addresses."""

    WINDOW = 60.0
    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self.failures: dict[str, tuple[int, float]] = {}

    def check(self, key: str, limit: int) -> None:
        count, since = self.failures.get(key, (0, 0.0))
        wait = since + self.WINDOW - time.monotonic()
        if count >= limit and wait > 0:
            raise HTTPError(429, "too many failed attempts; try again later",
                            [("retry-after", str(int(wait) + 1))])

    def fail(self, key: str) -> None:
        # Popped and put back: the dict stays in the order of the last failure.
        count, since = self.failures.pop(key, (0, 0.0))
        now = time.monotonic()
        if now - since > self.WINDOW:
            count, since = 0, now
        self.failures[key] = (count + 1, since)
        while len(self.failures) > self.MAX_KEYS or \
                next(iter(self.failures.values()))[1] < now - self.WINDOW:
            del self.failures[next(iter(self.failures))]


class InsertRate:
    """--max_inserts_per_second: a token bucket per user, holding up to `rate` inserts and
    refilled at `rate` a second. Kept as the time at which the bucket is full again (each
    insert moves it 1/rate s later; over a second ahead, the bucket is empty). A user
    without one has a full bucket, so full ones are forgotten: at each insert, those at the
    front of the dict (the longest unused) while they are full. One per user at most."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.full_at: dict[str, float] = {}  # username -> monotonic time
        self.refusals = 0

    def take(self, username: str) -> None:
        """Spend one insert of the user's bucket, or answer 429."""
        if not self.rate:
            return
        now = time.monotonic()
        full_at = max(self.full_at.get(username, now), now) + 1 / self.rate
        if full_at - now > 1.000001:  # (a millionth for the float sum of a whole burst)
            self.refusals += 1
            raise HTTPError(429, f"over {self.rate} inserts per second; try again later",
                            [("retry-after", str(math.ceil(full_at - now - 1)))])
        self.full_at.pop(username, None)  # put back at the end
        self.full_at[username] = full_at
        while next(iter(self.full_at.values())) <= now:
            del self.full_at[next(iter(self.full_at))]


class Auth:
    """Users (cached: this process is the database's only writer, or on PostgreSQL is told
    of every account change, see App.account_changed), password hashing in a bounded pool,
    JWTs, and a cache of verified Basic credentials."""

    MAX_QUEUED_HASHES = 64
    MAX_CACHED_TOKENS = 10_000

    def __init__(self, store: Engine, config: argparse.Namespace, jwt_secret: str) -> None:
        self.store = store
        self.config = config
        self.jwt_secret = jwt_secret
        self.users: dict[str, User] = {}
        self.changes = 0  # account changes seen: a read of a user that one overtook is not kept
        # One thread: Argon2 is CPU-bound; a login flood must leave a core to the loop.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="argon2",
                                       initializer=lower_thread_priority)
        self.queued_hashes = 0
        # Made at the first password check, not at start (a hash costs startup time).
        self.dummy_hash: str | None = None
        # Verified Basic credentials, as keyed hashes of (stored hash, password): a password
        # change makes a new stored hash and so voids the entry. Never the plain password.
        self.basic_key = secrets.token_bytes(32)
        self.basic_verified: dict[str, bytes] = {}
        self.basic_checks: dict[bytes, asyncio.Future[User]] = {}
        self.verified_tokens: dict[str, dict[str, Any]] = {}
        self.throttle = Throttle()
        self.insert_rate = InsertRate(config.max_inserts_per_second)

    @functools.cached_property
    def hasher(self) -> argon2.PasswordHasher:
        # Imported at the first password check, not at start: its 1 MB (and cffi) waits until
        # a server needs it.
        import argon2

        return_big_blocks_to_the_system()
        # Default: OWASP's recommended Argon2id profile (m=19456 KiB, t=2, p=1), also the
        # default of Rust's `argon2` crate: about 26 ms of CPU and 19 MiB per hash.
        return argon2.PasswordHasher(time_cost=self.config.argon2_time_cost,
                                     memory_cost=self.config.argon2_memory_kib,
                                     parallelism=self.config.argon2_parallelism)

    # -- users ------------------------------------------------------------------------
    async def user(self, username: str) -> User | None:
        """The cached user, else read from the store. A read that an account change
        overtook is not kept but made again: a state read before a change never replaces
        the changed one."""
        while (user := self.users.get(username)) is None:
            changes = self.changes
            user = await self.store.get_user(username)
            if user is None:
                return None
            if changes == self.changes:
                self.users[username] = user
        return user

    def current(self, user: User) -> User:
        """The user as it is now, for a request to act on with no await in between: a
        change that committed while its credentials were checked wins. 401 when the user
        was revoked or its credentials were voided meanwhile (a new password: a new hash
        and tokens_valid_after); else the current user, with its current tenant and scopes.
        (A rehash for new Argon2 parameters at that very moment also answers 401, once.)"""
        now = self.users.get(user.username)
        if now is None or now.revoked or now.password_hash != user.password_hash \
                or now.tokens_valid_after != user.tokens_valid_after:
            raise unauthorized("the user is revoked, or its password changed")
        return now

    def remember(self, user: User) -> None:
        """Cache the user as it is now, in place of everything cached about it before."""
        self.forget(user.username)
        self.users[user.username] = user

    def forget(self, username: str) -> None:
        """Drop everything cached about a user (changed by another process)."""
        self.users.pop(username, None)
        self.changes += 1
        self.basic_verified.pop(username, None)
        self.verified_tokens = {token: claims for token, claims in self.verified_tokens.items()
                                if claims["sub"] != username}

    # -- passwords --------------------------------------------------------------------
    async def _in_pool(self, work: Callable[..., Any], *args: Any) -> Any:
        if self.queued_hashes >= self.MAX_QUEUED_HASHES:
            raise HTTPError(503, "server busy hashing passwords; try again",
                            [("retry-after", "1")])
        self.queued_hashes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        finally:
            self.queued_hashes -= 1

    async def hash(self, password: str) -> str:
        return await self._in_pool(self.hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError
        try:
            return await self._in_pool(self.hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def check_password(self, username: str, password: str, client: str) -> User:
        """The user, if the password is right and the user not revoked; else 401 (or 429)."""
        if not 1 <= len(username) <= 64 or len(password) > 1024:
            # No user has such credentials (create_user's bounds): no throttle entry, no hash.
            raise unauthorized("wrong username or password, or the user is revoked")
        limit = self.config.auth_failures
        self.throttle.check(f"user:{username}", limit)
        self.throttle.check(f"addr:{client}", limit * 3)
        # Verify against a dummy hash for unknown users, so timing does not reveal names.
        # The dummy is made before the lookup, whoever asks: only the very first check
        # after start pays for it, known user or not.
        if self.dummy_hash is None:
            self.dummy_hash = await self.hash(secrets.token_hex(8))
        user = await self.user(username)
        ok = await self.verify(user.password_hash if user else self.dummy_hash, password)
        if not ok or user is None or user.revoked:
            self.throttle.fail(f"user:{username}")
            self.throttle.fail(f"addr:{client}")
            raise unauthorized("wrong username or password, or the user is revoked")
        if self.hasher.check_needs_rehash(user.password_hash):
            user = await self.rehash(user, password)
        return user

    async def rehash(self, user: User, password: str) -> User:
        """Store the password hashed with the current Argon2 parameters (they changed since
        it was set). Only if the stored hash is still the one just verified: a password
        changed meanwhile stays changed. Tokens stay valid: the password is the same."""
        updated = await self.store.replace_password_hash(
            user.username, user.password_hash, await self.hash(password))
        if updated is None:
            return user
        self.remember(updated)
        log.info("rehashed the password of %s with the current Argon2 parameters",
                 user.username)
        return updated

    def check_admin(self, body: dict[str, Any], client: str) -> None:
        if not self.is_admin_token(string_field(body, "admin_token"), client):
            raise HTTPError(401, "wrong admin_token")

    def is_admin_token(self, token: str, client: str) -> bool:
        """A constant-time comparison; failures are throttled per client address."""
        self.throttle.check(f"admin:{client}", self.config.auth_failures * 3)
        if hmac.compare_digest(token.encode(), self.config.admin_token.encode()):
            return True
        self.throttle.fail(f"admin:{client}")
        return False

    # -- tokens -----------------------------------------------------------------------
    async def issue_jwt(self, user: User) -> str:
        # After a password change, tokens of that second are void: wait for the next one.
        # (A loop, because a timer may fire a little early: libuv's clock is cached.)
        while (now := time.time()) < user.tokens_valid_after:
            await asyncio.sleep(user.tokens_valid_after - now + 0.001)
        issued = int(now)
        claims = {"iat": issued, "exp": issued + self.config.jwt_expiry, "sub": user.username,
                  "iss": JWT_ISSUER, "aud": ",".join(user.scopes)}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    async def authenticate(self, req: Request, token_in_query: bool = False) -> User:
        header = req.headers.get("authorization")
        tokens = req.query.get("access_token", []) if token_in_query else []
        if header is None and tokens:
            header = "Bearer " + tokens[-1]
        if not header:
            raise unauthorized("missing Authorization header")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":
            user = await self._from_jwt(credentials.strip())
        elif scheme.lower() == "basic":
            user = await self._from_basic(credentials.strip(), req.client)
        else:
            raise unauthorized("use Bearer or Basic authorization")
        return self.current(user)

    async def _from_jwt(self, token: str) -> User:
        # A token seen before (the exact string, signature and all) skips the signature
        # check, which was the largest cost of an insert; its expiry is still checked.
        claims = self.verified_tokens.get(token)
        if claims is None or claims["exp"] <= time.time():
            try:
                claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"],
                                    issuer=JWT_ISSUER,
                                    options={"require": ["exp", "iat", "iss", "sub"],
                                             "verify_aud": False})
            except jwt.PyJWTError as exc:
                raise unauthorized(f"invalid token: {exc}") from None
            if len(self.verified_tokens) >= self.MAX_CACHED_TOKENS:
                self.verified_tokens.clear()
            self.verified_tokens[token] = claims
        user = await self.user(str(claims["sub"]))
        if user is None:
            raise unauthorized("unknown user")
        if claims["iat"] < user.tokens_valid_after:
            raise unauthorized("token issued before the last password change")
        return user

    async def _from_basic(self, credentials: str, client: str) -> User:
        try:  # the password may hold ':'
            decoded = base64.b64decode(credentials, validate=True).decode()
            username, password = decoded.split(":", 1)
        except ValueError:  # not base64 (binascii.Error), not UTF-8, or no colon
            raise unauthorized("malformed Basic credentials") from None
        user = await self.user(username)
        if user is None:
            return await self.check_password(username, password, client)  # a slow 401
        digest = self.basic_digest(user, password)
        if hmac.compare_digest(self.basic_verified.get(username, b""), digest):
            return user
        # Requests that bring the same new credentials at once (a client opening 64
        # connections) share one Argon2 verify instead of queueing one each.
        check = self.basic_checks.get(digest)
        if check is None:
            check = asyncio.ensure_future(self.check_password(username, password, client))
            self.basic_checks[digest] = check
            check.add_done_callback(lambda _: self.basic_checks.pop(digest, None))
        user = await asyncio.shield(check)
        self.basic_verified[username] = self.basic_digest(user, password)
        return user

    def basic_digest(self, user: User, password: str) -> bytes:
        return hmac.digest(self.basic_key, f"{user.password_hash}\0{password}".encode(), "sha256")


def return_big_blocks_to_the_system() -> None:
    """glibc serves a large allocation with its own mmap and unmaps it when freed, but then
    raises that threshold to the size freed: from the second login on, each hash's 19 MiB
    would come from a heap that keeps it, and RSS would stay 20 MB higher for good. Pinning
    the threshold (which stops it moving) gives the memory back after every hash."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).mallopt(-3, 1 << 18)  # M_MMAP_THRESHOLD: 256 KiB and up are mmapped


def lower_thread_priority() -> None:
    """Nice this thread (and the threads Argon2 starts from it for its lanes), so that the
    scheduler prefers the event loop: inserts and streams stay prompt during a login flood."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def unauthorized(message: str) -> HTTPError:
    # Only a Bearer challenge: a Basic one would make browsers pop up a login dialog.
    return HTTPError(401, message, [("www-authenticate", 'Bearer realm="broker"')])


def weak_password_checker() -> Callable[[str], str | None]:
    try:
        from zxcvbn import zxcvbn
    except ImportError:
        raise SystemExit("--password_checker needs zxcvbn: pip install '.[passwords]'")

    def check(password: str) -> str | None:
        result = zxcvbn(password[:256])  # zxcvbn is slow on long input; 256 chars suffice
        if result["score"] >= 3:
            return None
        feedback = result.get("feedback", {})
        return feedback.get("warning") or " ".join(feedback.get("suggestions", [])) or \
            "choose a longer, less common password"
    return check


# ---------------------------------------------------------------------------------------
# Metrics, in the Prometheus text format.
# ---------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters, and the Prometheus text of them and of the server's gauges."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.events_inserted = 0
        self.insert_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.insert_seconds = 0.0
        self.frames_delivered = 0
        self.slow_consumers_cut = 0
        self.user_streams_closed = 0
        self.state_evictions = 0
        self.quota_refusals = 0

    def observe_insert(self, seconds: float) -> None:
        self.events_inserted += 1
        self.insert_seconds += seconds
        self.insert_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def render(self, app: App) -> str:
        hub = app.hub
        streaming = {name: sum(len(group.streams) for group in tenant.groups.values())
                     for name, tenant in sorted(hub.tenants.items()) if tenant.groups}
        samples = [
            ("open_connections", "gauge", len(app.connections)),
            ("sse_subscribers", "gauge", sum(streaming.values())),
            ("sse_tenants", "gauge", len(streaming)),
            ("events_inserted_total", "counter", self.events_inserted),
            ("frames_delivered_total", "counter", self.frames_delivered),
            ("slow_consumer_disconnects_total", "counter", self.slow_consumers_cut),
            ("user_stream_limit_closes_total", "counter", self.user_streams_closed),
            ("state_cache_bytes", "gauge", hub.cached),
            ("state_cache_tenants", "gauge", sum(t.held() for t in hub.tenants.values())),
            ("state_cache_evictions_total", "counter", self.state_evictions),
            ("insert_rate_refusals_total", "counter", app.auth.insert_rate.refusals),
            ("quota_refusals_total", "counter", self.quota_refusals),
        ]
        lines = []
        for name, kind, value in samples:
            lines += [f"# TYPE broker_{name} {kind}", f"broker_{name} {value}"]
        buckets = zip((*LATENCY_BUCKETS, "+Inf"), itertools.accumulate(self.insert_buckets))
        lines += [
            "# TYPE broker_sse_tenant_subscribers gauge",
            *(f'broker_sse_tenant_subscribers{{tenant="{label(name)}"}} {count}'
              for name, count in streaming.items()),
            "# TYPE broker_requests_total counter",
            *(f'broker_requests_total{{route="{route}",status="{status}"}} {count}'
              for (route, status), count in sorted(self.requests.items())),
            "# TYPE broker_insert_duration_seconds histogram",
            *(f'broker_insert_duration_seconds_bucket{{le="{bound}"}} {count}'
              for bound, count in buckets),  # cumulative counts
            f"broker_insert_duration_seconds_sum {self.insert_seconds:.6f}",
            f"broker_insert_duration_seconds_count {self.events_inserted}",
        ]
        return "\n".join(lines) + "\n"


def label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------------------
# The application: routes and handlers.
# ---------------------------------------------------------------------------------------


def user_object(user: User) -> dict[str, Any]:
    return {"id": user.id, "password": "***", "revoked": user.revoked,
            "tenant_name": user.tenant_name, "username": user.username, "email": user.email,
            "scopes": user.scopes, "data": user.data}


class App:
    def __init__(self, config: argparse.Namespace) -> None:
        self.config = config
        self.metrics = Metrics()
        self.connections: set[Connection | Stream] = set()
        self.in_flight: set[asyncio.Task] = set()  # handlers running (a reference keeps them)
        self.stopping = False
        self.trusted_proxies = {a.strip() for a in config.trusted_proxies.split(",") if a.strip()}
        self.password_checker = weak_password_checker() if config.password_checker else None
        self.stream_heads = {chunked: stream_head(config.origin, chunked)
                             for chunked in (True, False)}
        self.store: Engine
        self.hub: Hub
        self.auth: Auth
        Handler = Callable[[Request], Awaitable[Response]]
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.health, "HEAD": self.health},
            "/create_user": {"POST": self.create_user},
            "/login": {"POST": self.login},
            "/verify": {"GET": self.verify},
            "/insert": {"POST": self.insert},
            "/sse": {"GET": self.sse},
            "/revoke_user": {"POST": functools.partial(self.set_revoked, True)},
            "/unrevoke_user": {"POST": functools.partial(self.set_revoked, False)},
            "/list_users": {"POST": self.list_users},
            "/get_user": {"POST": self.get_user},
            "/update_user": {"POST": self.update_user},
            "/metrics": {"GET": self.metrics_page},
        }

    async def start(self) -> None:
        self.store = await store.open_store(
            self.config.db, lambda events: self.hub.publish(events), self.account_changed,
            max_event_names=self.config.max_event_names,
            max_tenant_bytes=self.config.max_tenant_bytes)
        self.hub = Hub(self.store, self.metrics, self.config)  # before anything is published
        secret = self.config.jwt_secret
        if not secret:
            secret = await self.store.setting_or_default("jwt_secret", secrets.token_hex(32))
        elif len(secret) < 32:
            log.warning("--jwt_secret is short (%d characters); use 32 or more", len(secret))
        self.auth = Auth(self.store, self.config, secret)
        if self.config.admin_token == DEFAULT_ADMIN_TOKEN:
            log.warning("!" * 72)
            log.warning("!!  The admin token is the default %r: anyone can create users.",
                        DEFAULT_ADMIN_TOKEN)
            log.warning("!!  Set --admin_token or BROKER_ADMIN_TOKEN before going public.")
            log.warning("!" * 72)

    async def account_changed(self, username: str | None) -> None:
        """Another process (or this one) changed an account, on PostgreSQL; None: changes
        may have been missed, so every account known here. Re-read it, replace what is
        cached about it, and close the streams that the local path would have closed.
        Until the read returns, requests act on the state cached before (never on none)."""
        names = [username] if username else list({*self.auth.users, *self.hub.by_user})
        for name in names:
            before = self.auth.users.get(name)
            self.auth.changes += 1  # a read of it under way began before the change: not kept
            try:
                user = await self.store.get_user(name)
            finally:
                # Else a newer state came meanwhile: this process's own change (whose notice
                # follows), or a read that began after this notice. When the read failed,
                # the user is read again at its next request.
                if self.auth.users.get(name) is before:
                    self.auth.forget(name)
            if user is not None and name not in self.auth.users:
                self.auth.remember(user)
            user = self.auth.users.get(name)
            # Each stream against the state it began with (one that opened during the read
            # may have the old state or the new one).
            for stream in list(self.hub.by_user.get(name, ())):
                began = stream.user
                if user is None or user.revoked or began.tenant_name != user.tenant_name \
                        or began.password_hash != user.password_hash \
                        or (self.config.enforce_scopes and began.scopes != user.scopes):
                    self.hub.end(stream)

    async def dispatch(self, req: Request) -> Response:
        methods = self.routes.get(req.path)
        if methods is None:
            raise HTTPError(404, f"no such endpoint: {req.path[:200]}")
        if req.method == "OPTIONS":
            return Response(204, headers=[
                ("access-control-allow-methods", "GET, POST, HEAD, OPTIONS"),
                ("access-control-allow-headers", "authorization, content-type, last-event-id"),
                ("access-control-max-age", "86400")])
        handler = methods.get(req.method)
        if handler is None:
            allow = ", ".join([*methods, "OPTIONS"])
            raise HTTPError(405, f"{req.method} is not allowed here", [("allow", allow)])
        return await handler(req)

    # -- public endpoints ---------------------------------------------------------------
    async def health(self, req: Request) -> Response:
        return reply({"status": "ok"})

    async def create_user(self, req: Request) -> Response:
        body = read_json(req)
        self.auth.check_admin(body, req.client)
        username = text_field(body, "username")
        password = password_field(body, self.password_checker)
        fields = {name: check(body) for name, check in ACCOUNT_FIELDS.items()}
        user = User(str(uuid.uuid4()), username, await self.auth.hash(password), False,
                    tokens_valid_after=0, **fields)
        try:
            await self.store.create_user(user)
        except UsernameTaken:
            raise HTTPError(400, "username already taken") from None
        self.auth.remember(user)
        return reply({"id": user.id})

    async def login(self, req: Request) -> Response:
        body = read_json(req)
        username = text_field(body, "username")  # 1-64 characters, as at create_user
        password = string_field(body, "password")
        user = await self.auth.check_password(username, password, req.client)
        token = await self.auth.issue_jwt(user)
        self.auth.current(user)  # not revoked, nor the password changed, while it was checked
        return reply({"jwt": token})

    # -- authenticated endpoints --------------------------------------------------------
    async def verify(self, req: Request) -> Response:
        user = await self.auth.authenticate(req)
        return reply({"username": user.username, "tenant_name": user.tenant_name,
                      "scopes": user.scopes})

    async def insert(self, req: Request) -> Response:
        user = await self.auth.authenticate(req)
        body = read_json(req)
        # A CR or LF in the name would inject SSE fields into every subscriber's stream.
        name = text_field(body, "event", max_len=256)
        if "data" not in body:
            raise HTTPError(400, "data is required (any JSON value)")
        data = compact_json(body["data"]).decode()
        user = self.auth.current(user)  # as it is now: no await from here to the insert
        if self.config.enforce_scopes and not grants(tuple(user.scopes))[1](name):
            raise HTTPError(403, f"no scope of {user.username!r} allows posting {name!r}")
        self.auth.insert_rate.take(user.username)
        started = time.perf_counter()
        self.hub.writer.inserting += 1  # its commit is near: see Writer._pass_over
        try:
            event = await self.store.insert_event(user.tenant_name, name, data)
        except QuotaExceeded as exc:  # 409: retrying cannot help until the tenant changes
            self.metrics.quota_refusals += 1
            raise HTTPError(409, str(exc)) from None
        finally:
            self.hub.writer.inserting -= 1
        self.metrics.observe_insert(time.perf_counter() - started)
        return reply({"id": event.id, "event": event.event, "timestamp": event.timestamp})

    async def sse(self, req: Request) -> Response:
        user = await self.auth.authenticate(req, token_in_query=True)
        last_id = last_event_id(req)
        wanted = event_filter(req.query.get("event", []))
        if req.conn.transport.is_closing():
            return STREAMING  # the client left while we checked its credentials
        user = self.auth.current(user)  # as it is now: no await from here to the join
        granted = grants(tuple(user.scopes))[0] if self.config.enforce_scopes else None
        stream = req.conn.become_stream(user, both(granted, wanted), req.client)
        self.hub.join(stream)
        try:
            # `covered`: the newest published id the sync or replay reflects. Every event up
            # to it was sent or is not wanted (superseded, or the client had it); its group
            # kept the later ones for it since join().
            if last_id is None:
                covered = await self.send_state(stream)
            else:
                covered = await self.replay(stream, user, last_id)
            await self.hub.go_live(stream, covered)
        except (StoreError, ConnectionError, TimeoutError) as exc:
            log.warning("stream for %s ended during sync: %s", user.username, exc)
            self.hub.end(stream, abort=True)
        return STREAMING

    async def send_state(self, stream: Stream) -> int:
        """The latest value of each name the stream reads, from memory. Returns the newest
        published id they reflect."""
        tenant, covered = await self.hub.hold(stream.tenant)
        await stream.send(tenant.sync(stream.reads, self.config.max_buffer // 2))
        return covered

    async def replay(self, stream: Stream, user: User, after: int) -> int:
        """Send every event of the stream's tenant after `after` that it reads. Returns the
        newest id the events sent reflect.

        The resume rule: replay only what the log can prove the client is missing. When it
        cannot (an id from another history or the future, a change of tenant or scopes at
        or after it, events after it pruned; see Engine.resume_page), send the latest values
        instead, as on a fresh connect: the client is whole again, without any extra frame.

        From memory, without SQL, when `after` is one of the tenant's recent events (which
        proves it is of this tenant and this history, and every later event is in memory:
        retention's horizon is below it) and the user's tenant and scopes did not change at
        or after it. Else from the store, page by page (each bounded in bytes too)."""
        tenant, covered = await self.hub.hold(stream.tenant)
        recent = tenant.after(after, stream.reads)
        if recent is not None and (user.access_changed_at or 0) < after:
            await stream.send(in_pieces(recent, self.config.max_buffer // 2))
            return covered
        while True:
            found = await self.store.resume_page(user.username, stream.tenant, after,
                                                 SYNC_PAGE, self.config.max_buffer)
            if found is None:
                return await self.send_state(stream)
            page, newest = found
            await stream.send(in_pieces([sse_frame(event) for event in page  # or the head
                                         if stream.reads is None or stream.reads(event.event)],
                                        self.config.max_buffer // 2))
            if not page:
                return newest
            after = page[-1].id

    # -- admin endpoints ----------------------------------------------------------------
    async def metrics_page(self, req: Request) -> Response:
        """Prometheus metrics; the admin token goes in an `Authorization: Bearer` header."""
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.auth.is_admin_token(token.strip(), req.client):
            raise unauthorized("metrics need the admin token as a Bearer token")
        text = self.metrics.render(self)
        return Response(200, text.encode(), content_type="text/plain; version=0.0.4")

    def _admin_target(self, req: Request) -> tuple[dict[str, Any], str]:
        body = read_json(req)
        self.auth.check_admin(body, req.client)
        return body, string_field(body, "username")

    async def _change_user(self, username: str, changes: dict[str, Any]) -> User:
        """Apply an admin's changes to a user. Its streams end when what they may carry
        changes (another tenant, or other scopes with --enforce_scopes) or its credentials
        do (revoked, a new password); they reconnect with the new state."""
        before = await self.auth.user(username)
        if before is None:
            raise HTTPError(404, f"no user named {username!r}")
        after = replace(before, **changes)
        access = after.tenant_name != before.tenant_name \
            or (self.config.enforce_scopes and after.scopes != before.scopes)
        if access:
            # Nothing more may reach the streams once the change commits, so their
            # Last-Event-ID stays at or before the id the change records
            # (Engine.update_user), and their resume gets the new state.
            for stream in self.hub.by_user.get(username, ()):
                self.hub.leave_group(stream)  # open, but sent nothing more until end_user
        try:
            user = await self.store.update_user(username, changes)
        finally:
            if access or after.revoked or after.password_hash != before.password_hash:
                self.hub.end_user(username)
        if user is None:
            raise HTTPError(404, f"no user named {username!r}")
        self.auth.remember(user)
        return user

    async def set_revoked(self, revoked: bool, req: Request) -> Response:
        """/revoke_user and /unrevoke_user."""
        _, username = self._admin_target(req)
        await self._change_user(username, {"revoked": revoked})
        return reply({"username": username, "revoked": revoked})

    async def list_users(self, req: Request) -> Response:
        self.auth.check_admin(read_json(req), req.client)
        return reply([user_object(user) for user in await self.store.list_users()])

    async def get_user(self, req: Request) -> Response:
        _, username = self._admin_target(req)
        user = await self.store.get_user(username)
        if user is None:
            raise HTTPError(404, f"no user named {username!r}")
        return reply(user_object(user))

    async def update_user(self, req: Request) -> Response:
        body, username = self._admin_target(req)
        changes = {name: check(body) for name, check in ACCOUNT_FIELDS.items() if name in body}
        if "password" in body:
            password = password_field(body, self.password_checker)
            changes["password_hash"] = await self.auth.hash(password)
            # Void every JWT issued up to and including this second.
            changes["tokens_valid_after"] = int(time.time()) + 1
        return reply(user_object(await self._change_user(username, changes)))


def stream_head(origin: str, chunked: bool) -> bytes:
    """The response head of an event stream, built once rather than by h11 per connect."""
    framing = "transfer-encoding: chunked" if chunked else "connection: close"
    return ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            f"x-accel-buffering: no\r\naccess-control-allow-origin: {origin}\r\n"
            f"{framing}\r\n\r\n").encode()


def last_event_id(req: Request) -> int | None:
    # Blank (whitespace only, Unicode's too: a latin-1 NBSP, say) is the same as no id.
    header = req.headers.get("last-event-id", "").strip()
    query = req.query.get("last_event_id", [""])[-1].strip()
    for raw in (header, query):  # both validated; the header wins when both are given
        # isascii: str.isdigit() is also true for "²", which int() refuses.
        if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise HTTPError(400, "Last-Event-ID must be a non-negative integer")
    raw = header or query
    return int(raw) if raw else None


# ---------------------------------------------------------------------------------------
# HTTP/1.1 on h11. One Connection per socket: it parses requests, runs one handler at a
# time (pipelined requests wait their turn), and, for /sse, turns into a raw stream.
# ---------------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    __slots__ = ("app", "body", "client", "http", "reading", "request", "started", "timer",
                 "transport")

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # h11's state; None once the connection is done (an event stream, or rejected).
        self.http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.client = "?"
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False  # a request has begun arriving and is not complete
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.started = 0.0

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else "local"
        self.app.connections.add(self)
        if len(self.app.connections) > self.app.config.max_connections:
            self.reject(HTTPError(503, "too many connections; try again", [("retry-after", "5")]))
            return
        # Small: a client that pipelines requests without reading their answers is held to
        # this much before broker reads no further (an event stream gets --max_buffer).
        self.transport.set_write_buffer_limits(high=HTTP_BUFFER)
        # A new connection must start its request promptly: silent sockets cost a slot.
        self.arm_timer(self.app.config.request_timeout)

    def data_received(self, data: bytes) -> None:
        if self.http is None:
            return  # rejected: whatever the client sends now is of no interest
        if not self.reading:
            self.reading = True
            self.arm_timer(self.app.config.request_timeout)
        self.http.receive_data(data)
        self.process()

    def eof_received(self) -> bool:
        self.data_received(b"")  # to h11, the end of the data
        # Keep our side open to answer a request that ended with the EOF; TLS has no half
        # close (and asyncio warns, once per connection, at a True).
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        self.disarm_timer()

    def resume_writing(self) -> None:
        """Read on, between requests: asyncio calls this once the client has taken most of
        the answers that had passed HTTP_BUFFER, next_request when they are within it."""
        if self.http is not None and self.request is None:
            self.transport.resume_reading()
            self.process()

    # -- timers ---------------------------------------------------------------------------
    def arm_timer(self, seconds: float) -> None:
        self.disarm_timer()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.timed_out)

    def disarm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timed_out(self) -> None:
        self.timer = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read: close() would wait for it
        elif self.reading:
            self.reject(HTTPError(408, "request not received in time"))
        else:
            self.transport.close()  # an idle keep-alive connection

    # -- requests -------------------------------------------------------------------------
    def process(self) -> None:
        """Pull h11 events until a request is complete, more data is needed, or it failed.

        Garbage from the client ends as RemoteProtocolError: answer it and close, since a
        broken byte stream cannot be trusted to find the next request's start. So does a
        request over a bound (HTTPError)."""
        assert self.http is not None
        try:
            while True:
                event = self.http.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self.start_request(event)
                elif isinstance(event, h11.Data):
                    self.body += event.data
                    if len(self.body) > self.app.config.max_body:
                        raise HTTPError(413, f"body over {self.app.config.max_body} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    self.disarm_timer()
                    self.transport.pause_reading()  # one request at a time; pipelined ones wait
                    task = asyncio.ensure_future(self.respond())
                    self.app.in_flight.add(task)
                    task.add_done_callback(self.app.in_flight.discard)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self.transport.close()
                    return
        except h11.RemoteProtocolError as exc:
            # h11 hints 431 for an overlong head, 400 for most garbage, and 501 for a
            # Transfer-Encoding it cannot decode: garbage from the client is a 4xx.
            hint = exc.error_status_hint
            self.reject(HTTPError(hint if hint < 500 else 400, f"bad request: {exc}"))
        except HTTPError as exc:
            self.reject(exc)

    def start_request(self, request: h11.Request) -> None:
        self.request = request
        self.body = bytearray()
        self.started = time.perf_counter()
        self.app.hub.writer.request_seen = time.monotonic()  # see Writer._pass_over
        # h11 bounds a head only while it is incomplete; one that came whole in a single
        # read is measured here.
        head_size = len(request.method) + len(request.target) + sum(
            len(name) + len(value) + 4 for name, value in request.headers)
        if head_size > MAX_HEADER_BYTES:
            raise HTTPError(431, "request line and headers over 16 KiB")
        headers = dict(request.headers)
        if b"content-length" in headers and b"transfer-encoding" in headers:
            # Ambiguous framing, the stuff of request smuggling (RFC 9112 section 6.1).
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if int(headers.get(b"content-length", 0)) > self.app.config.max_body:
            raise HTTPError(413, f"body over {self.app.config.max_body} bytes")
        if self.http.they_are_waiting_for_100_continue:  # type: ignore[union-attr]
            self.transport.write(self.http.send(  # type: ignore[union-attr]
                h11.InformationalResponse(status_code=100, headers=[])))

    def make_request(self) -> Request:
        assert self.request is not None
        target = urlsplit(self.request.target.decode("ascii", "replace"))
        values: dict[str, list[str]] = {}  # lower-case names (h11); repeated ones joined
        for name, value in self.request.headers:
            values.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        headers = {name: ", ".join(joined) for name, joined in values.items()}
        return Request(self.request.method.decode("ascii", "replace"), target.path or "/",
                       parse_qs(target.query, keep_blank_values=True), headers,
                       bytes(self.body), self.client_address(headers), self)

    def client_address(self, headers: dict[str, str]) -> str:
        """The peer, or behind a trusted proxy the address that proxy saw (the last entry
        of X-Forwarded-For: earlier ones are whatever the client claimed)."""
        forwarded = headers.get("x-forwarded-for")
        if forwarded and self.client in self.app.trusted_proxies:
            return forwarded.rsplit(",", 1)[-1].strip() or self.client
        return self.client

    async def respond(self) -> None:
        req = self.make_request()
        try:
            response = await self.app.dispatch(req)
        except HTTPError as exc:
            response = Response(exc.status, compact_json({"error": exc.message}), exc.headers)
        except StoreError as exc:
            log.error("storage failure on %s %s: %s", req.method, req.path, exc)
            response = reply({"error": "storage unavailable; try again"}, 503)
            response.headers.append(("retry-after", "1"))
        except Exception:
            log.exception("unexpected error on %s %s", req.method, req.path)
            response = reply({"error": "internal error"}, 500)
        if response is STREAMING:
            return
        if self.http is None:  # a stream whose handler failed; nothing more to say
            self.transport.close()
            return
        self.log_request(req.method, req.path, response.status, req.client)
        self.send(req.method, response)

    def log_request(self, method: str, path: str, status: int, client: str) -> None:
        # Path only: a query string may hold an access_token.
        route = path if path in self.app.routes else "other"
        self.app.metrics.requests[route, status] += 1
        if not log.isEnabledFor(logging.INFO):
            return
        millis = (time.perf_counter() - self.started) * 1000
        log.info("%s %s %d %.1fms", method, path, status, millis,
                 extra={"fields": {"method": method, "path": path, "status": status,
                                   "ms": round(millis, 1), "client": client}})

    def send(self, method: str, response: Response) -> None:
        if self.transport.is_closing():
            return  # the client left while we worked
        assert self.http is not None
        headers = [("access-control-allow-origin", self.app.config.origin), *response.headers]
        if response.status != 204:
            headers += [("content-type", response.content_type),
                        ("content-length", str(len(response.body)))]
        out = self.http.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=HTTPStatus(response.status).phrase))
        if response.body and method != "HEAD":
            out += self.http.send(h11.Data(data=response.body))
        out += self.http.send(h11.EndOfMessage())
        self.transport.write(out)
        self.next_request()

    def next_request(self) -> None:
        assert self.http is not None
        self.request = None
        if (self.http.our_state is h11.MUST_CLOSE or self.http.their_state is not h11.DONE
                or self.app.stopping):
            self.transport.close()
            return
        self.http.start_next_cycle()
        self.reading = bool(self.http.trailing_data[0])
        self.arm_timer(self.app.config.request_timeout if self.reading
                       else self.app.config.idle_timeout)
        if self.transport.get_write_buffer_size() <= HTTP_BUFFER:
            self.resume_writing()

    def reject(self, error: HTTPError) -> None:
        """Answer with an error and close, outside h11's state machine: used when the byte
        stream is broken, too slow, too big, or we are over capacity."""
        self.disarm_timer()
        if self.transport.is_closing():
            return
        body = compact_json({"error": error.message})
        head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
                "content-type: application/json", f"content-length: {len(body)}",
                "connection: close", f"access-control-allow-origin: {self.app.config.origin}"]
        head += [f"{name}: {value}" for name, value in error.headers]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.transport.close()
        path = self.request.target.split(b"?")[0].decode("ascii", "replace") \
            if self.request else "-"
        log.info("%s %s %d (closed)", self.request.method.decode() if self.request else "-",
                 path, error.status)
        self.http = None

    # -- event streams --------------------------------------------------------------------
    def become_stream(self, user: User, reads: EventNames | None, client: str) -> Stream:
        """From now on the connection carries only SSE frames: a Stream takes over the
        transport, and this HTTP connection (with its parser) is done."""
        assert self.http is not None
        chunked = self.http.their_http_version != b"1.0"
        self.log_request("GET", "/sse", 200, client)
        self.disarm_timer()
        self.http = None
        self.app.connections.discard(self)
        stream = Stream(self.app, self.transport, chunked, user, reads)
        self.app.connections.add(stream)
        self.transport.set_protocol(stream)
        self.transport.resume_reading()  # to notice the client hanging up
        return stream


# ---------------------------------------------------------------------------------------
# Start, serve, stop.
# ---------------------------------------------------------------------------------------


async def heartbeats(app: App) -> None:
    while True:
        await asyncio.sleep(app.config.heartbeat)
        app.hub.heartbeat()


PRUNE_BATCH = 500  # events deleted per write: short enough not to hold up inserts


async def enforce_retention(app: App) -> None:
    """Delete events older than --retention: at start, then every minute (or every half
    retention when that is shorter), in small batches that queue among the inserts."""
    keep = app.config.retention
    while True:
        deleted = 0
        try:
            pruned = Pruned(0, {}, more=True)
            while pruned.more:
                pruned = await app.store.prune(int(time.time() - keep), PRUNE_BATCH)
                app.hub.pruned(pruned.horizons)
                deleted += pruned.deleted
        except StoreError as exc:
            log.warning("retention: pruning failed, trying again later: %s", exc)
        if deleted:
            log.info("retention: deleted %d events older than %gs", deleted, keep)
        await asyncio.sleep(min(60.0, max(1.0, keep / 2)))


async def serve(config: argparse.Namespace) -> None:
    app = App(config)
    try:
        await app.start()
    except StoreError as exc:
        log.error("%s; refusing to start (the database was not changed)", exc)
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    tls = None
    if config.cert_path:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(config.cert_path, config.key_path)
    server = await loop.create_server(lambda: Connection(app), config.host, config.port,
                                      ssl=tls, backlog=2048,
                                      reuse_port=config.reuse_port or None)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if config.cert_path else "http"
    log.info("broker listening on %s:%d (%s, db %s)", config.host, port, scheme,
             store.shown_db(config.db))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Logs go to stderr (the journal, under systemd), so there is no file to reopen: a
    # SIGHUP from log rotation or a closed terminal must not stop the server.
    loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: logging to stderr, nothing to reopen")
    beat = asyncio.create_task(heartbeats(app))
    pruner = asyncio.create_task(enforce_retention(app)) if config.retention else None
    await stop.wait()
    log.info("shutting down")
    beat.cancel()
    if pruner:
        pruner.cancel()
    await shutdown(app, server)
    log.info("stopped")


async def shutdown(app: App, server: asyncio.Server, grace: float = 3.0) -> None:
    """Stop accepting, end streams cleanly, let requests in flight finish, close the db.

    A request is in flight from the moment its head arrived: a slow upload still gets its
    answer, as long as it completes within the grace period."""
    server.close()
    app.stopping = True
    for username in list(app.hub.by_user):  # a stream ending before a pass reached it
        app.hub.end_user(username)  # misses the last frames: its client resumes from its id
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for conn in list(app.connections):
            if isinstance(conn, Connection) and conn.request is None and conn.http is not None:
                conn.transport.close()  # idle between requests
        if not app.connections:
            break
        await asyncio.sleep(0.05)
    for conn in list(app.connections):
        conn.transport.close()
    await app.store.close()


def raise_open_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor; many systems start processes at 1,024. Best
    effort: a sandbox may refuse the change, and broker then serves with the limit it has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):  # Python reports EPERM as ValueError here
            target = soft
        if target < wanted:
            log.warning("only %d open files allowed; --max_connections %d will not fit",
                        target, wanted - 64)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and not args[0].startswith("-"):  # `broker TOOL ...`: see tools.py
        import tools
        logging.basicConfig(level="WARNING", format="%(levelname)s %(message)s")
        raise SystemExit(tools.main(args))
    config = parse_args(argv)
    setup_logging(config)
    raise_open_file_limit(config.max_connections + 64)  # + the database, logs, listeners
    try:
        import uvloop  # optional: the 'fast' extra
    except ImportError:
        asyncio.run(serve(config))
    else:
        log.debug("using uvloop")
        uvloop.run(serve(config))


if __name__ == "__main__":
    main()
