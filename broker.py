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
import hashlib
import hmac
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
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import h11
import jwt

import store
from store import Engine, Event, QuotaExceeded, StoreError, User, UsernameTaken

if TYPE_CHECKING:
    import argon2

log = logging.getLogger("broker")

DEFAULT_ADMIN_TOKEN = "letmein"
MAX_HEADER_BYTES = 16 * 1024
SYNC_PAGE = 1000  # events read per query when replaying a backlog
SYNC_BYTES = 1 << 20  # and at most about this many bytes of data
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
    ("db", str, "broker.db",
     "path of the SQLite database file, or a postgresql:// URL (several processes)"),
    ("admin_token", str, DEFAULT_ADMIN_TOKEN,
     "token that create_user and the other admin endpoints require; change it"),
    ("jwt_secret", str, None,
     "HS256 secret for JWTs; when not given, a random one is made once and kept in the db"),
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
    ("auth_failures", int, 20,
     "failed logins per minute allowed for one username (three times that per address)"),
    ("trusted_proxies", str, "",
     "comma-separated addresses of reverse proxies whose X-Forwarded-For is believed"),
    ("password_checker", bool, False,
     "refuse weak passwords (zxcvbn score below 3; needs the 'passwords' extra)"),
    ("enforce_scopes", bool, False,
     "let users insert and receive only the events their scopes grant (NAME:post, NAME:get)"),
    ("retention", duration, "0",
     ("delete events older than this (45s, 90m, 12h, 30d), except the newest of each name; "
      "0 keeps everything")),
    ("argon2_memory_kib", int, 19456, "Argon2id memory per password hash, in KiB"),
    ("argon2_time_cost", int, 2, "Argon2id passes over that memory"),
    ("argon2_parallelism", int, 1, "Argon2id lanes (threads) per hash"),
    ("reuse_port", bool, False,
     "share the port with other broker processes (SO_REUSEPORT; PostgreSQL only)"),
    ("max_streams_per_user", int, 100,
     "event streams one user may hold open; one more closes that user's oldest"),
    ("cache_bytes", int, 64 << 20,
     "bytes of encoded events kept in memory for syncs and short replays"),
    ("fanout_slice", int, FANOUT_SLICE,
     "subscribers a fan-out writes to before it lets other work run"),
    ("max_event_names", int, 10000, "distinct event names one tenant may have; 0: no limit"),
    ("max_tenant_bytes", int, 16 << 20,
     "bytes of one tenant's newest values (each name's length + its data's); 0: no limit"),
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
    if config.fanout_slice < 1:
        parser.error("--fanout_slice must be at least 1")
    if config.max_event_names < 0 or config.max_tenant_bytes < 0:
        parser.error("--max_event_names and --max_tenant_bytes are 0 (no limit) or more")
    return config


def password_hasher(config: argparse.Namespace) -> argon2.PasswordHasher:
    # Imported at the first password check, not at start: its 1 MB (and cffi) waits until
    # a server needs it.
    import argon2

    return_big_blocks_to_the_system()

    # Default: OWASP's recommended Argon2id profile (m=19456 KiB, t=2, p=1), also the
    # default of Rust's `argon2` crate: about 26 ms of CPU and 19 MiB per hash.
    return argon2.PasswordHasher(time_cost=config.argon2_time_cost,
                                 memory_cost=config.argon2_memory_kib,
                                 parallelism=config.argon2_parallelism)


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
    if config.log_format == "json":
        handler.setFormatter(JSONLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)


# ---------------------------------------------------------------------------------------
# Requests, responses and errors
# ---------------------------------------------------------------------------------------

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout",
           413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


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
    query: dict[str, str]
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


def error_response(exc: HTTPError) -> Response:
    return Response(exc.status, compact_json({"error": exc.message}), exc.headers)


def compact_json(obj: Any) -> bytes:
    # ASCII only (non-ASCII as \u escapes): broker-client decodes the stream one byte per
    # character, so raw UTF-8 in an event's data would reach it garbled.
    return json.dumps(obj, separators=(",", ":")).encode()


LONE_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


def read_json(req: Request) -> dict[str, Any]:
    """The body as a JSON object. A missing or odd Content-Type is forgiven when the body
    parses as JSON (curl -d sends form encoding by default); otherwise 415 or 400."""
    try:
        # Strict UTF-8 (json.loads on bytes would let encoded surrogates through), no NaN or
        # Infinity, and no nesting deep enough to exhaust the recursion limit.
        body = json.loads(req.body.decode("utf-8"), parse_constant=_no_constants,
                          parse_float=_finite_float)
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


def text_field(body: dict[str, Any], name: str, *, max_len: int = 64) -> str:
    """A non-empty string of at most max_len characters without control characters."""
    value = body.get(name)
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} is required and must be a string")
    if not 1 <= len(value) <= max_len:
        raise HTTPError(400, f"{name} must be 1 to {max_len} characters")
    if CONTROL_CHARS.search(value):
        raise HTTPError(400, f"{name} must not contain control characters")
    return value


def password_field(body: dict[str, Any], checker: Callable[[str], str | None] | None) -> str:
    value = body.get("password")
    if not isinstance(value, str):
        raise HTTPError(400, "password is required and must be a string")
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


def event_name_field(body: dict[str, Any]) -> str:
    # A CR or LF in the name would inject SSE fields into every subscriber's stream.
    return text_field(body, "event", max_len=256)


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
# Fan-out: who listens to which tenant. Each committed event is encoded once, and the
# same bytes go to every subscriber of its tenant with one transport.write each.
# With --enforce_scopes, a tenant's subscribers are grouped by what they may read: each
# group gets the frames it may read, with no check per subscriber. Without, a tenant is
# one group.
# ---------------------------------------------------------------------------------------


def sse_frame(event: Event) -> bytes:
    return f"id:{event.id}\nevent:{event.event}\ndata:{event.data}\n\n".encode()


def chunk(payload: bytes) -> bytes:
    """HTTP/1.1 chunked framing around one payload."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


HEARTBEAT = b":\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def retry_frame() -> bytes:
    """The first frame of every stream: EventSource's reconnection delay, 2 to 6 s and
    different for each stream, so that after a restart browsers come back spread out rather
    than all at once. The comment line before it names `data:`, `event:` and `id:` with
    nothing after them: broker-client finds fields by indexOf on the whole frame and would
    otherwise read the retry line as an event named ":300" with data "y:300"; this way it
    sees an empty frame, as for a heartbeat. EventSource skips the comment, and a frame
    without data dispatches nothing."""
    return b":data:event:id:\nretry:%d\n\n" % random.randint(2000, 6000)


class Fanout:
    """Writes a set of live subscribers their frames, a slice of subscribers at a time.

    Frames go into a log; each member's position is the log index of the first frame it has
    not been sent. A pass walks the members that are behind, SLICE at a time, and yields to
    the loop between slices (call_soon), so requests, acks and connects wait at most one
    slice. A member visited gets everything from its position to the log's end in one write,
    so frames committed while a pass is under way travel together, and members at the same
    position share one joined bytes object: one encoding, no per-subscriber work.

    The send system call is the cost (6-8 us a write on loopback), not the bytes, so under
    load fewer, larger writes are the lever: after a round of passes (every Fanout's pass
    under way at once: a tenant's permission groups, tenants written at the same time) the
    writers wait as long as the round took, at most LINGER, before their next passes, so
    commits gather meanwhile and the loop is free for the publishers' requests at least half
    the time. An event that finds the writer idle is written at once, inside publish. Nagle
    (TCP_NODELAY off) was measured too and lost on latency; see bench/README.md, "The
    fan-out writer".
    """

    SLICE = FANOUT_SLICE  # writes between two turns of the loop (--fanout_slice)
    LINGER = 0.005  # longest wait between two passes: at most this added to a latency
    # The slice is one budget per turn of the loop, shared by every Fanout: a commit that
    # reaches many permission groups or tenants still holds the loop for one slice at most.
    budget = 0
    budget_turn_open = False
    # A round: from a pass starting while no Fanout had one under way, until none has at the
    # end of a turn of the loop (_end_round). The next passes wait for the round to end, then
    # linger as long as it took: a tenant split into permission groups (or many tenants at
    # once) then batches like one large group, instead of each short pass starting over
    # sooner and writing fewer frames per write.
    passes_under_way = 0
    round_started = 0.0
    round_done: ClassVar[list[Fanout]] = []

    __slots__ = ("_joined", "base", "frames", "members", "pass_at", "pass_order", "running")

    def __init__(self) -> None:
        self.members: dict[Connection, int] = {}  # member -> log index of its next frame
        self.frames: list[bytes] = []  # frames[i] has log index base + i
        self.base = 0
        self.pass_order: list[Connection] = []  # this pass: members to visit, in order
        self.pass_at = 0  # next one of pass_order to visit
        self.running = False  # a pass is under way or scheduled
        self._joined: dict[tuple[int, bool], bytes] = {}  # (position, chunked) -> bytes

    def end(self) -> int:
        return self.base + len(self.frames)

    def add(self, conn: Connection) -> None:
        """A member that has been sent everything up to now (sync, held events)."""
        self.members[conn] = self.end()

    def remove(self, conn: Connection) -> None:
        self.members.pop(conn, None)

    def send(self, frames: bytes) -> None:
        """Queue whole SSE frames for every member; written at once when no pass runs."""
        self.frames.append(frames)
        self._joined.clear()
        if not self.running:
            self.running = True
            self._next_pass()

    def pending(self, conn: Connection) -> bytes:
        """What `conn` has not been sent yet, framed for it; its position moves to the end."""
        position = self.members.get(conn)
        end = self.end()
        if position is None or position >= end:
            return b""
        self.members[conn] = end  # before the write: it may cut the member off (remove)
        key = (position, conn.chunked)
        data = self._joined.get(key)
        if data is None:
            data = b"".join(self.frames[position - self.base:])
            data = self._joined[key] = chunk(data) if conn.chunked else data
        return data

    def _next_pass(self) -> None:
        """Start a pass over the members behind; drop the frames every member has."""
        end = self.end()
        oldest = min(self.members.values(), default=end)
        del self.frames[:oldest - self.base]
        self.base = oldest
        self._joined.clear()
        self.pass_order = [conn for conn, position in self.members.items() if position < end]
        self.pass_at = 0
        if self.pass_order:
            self._begin_pass()
            self._slice()
        else:
            self.running = False

    @classmethod
    def _begin_pass(cls) -> None:
        if cls.passes_under_way == 0 and not cls.round_done:
            # Not loop.time(): uvloop caches it per turn of the loop.
            cls.round_started = time.monotonic()
        cls.passes_under_way += 1

    def _end_pass(self) -> None:
        Fanout.passes_under_way -= 1
        Fanout.round_done.append(self)
        if Fanout.passes_under_way == 0:
            asyncio.get_running_loop().call_soon(Fanout._end_round)

    @classmethod
    def _end_round(cls) -> None:
        """When no pass is under way at the end of a turn, every Fanout of the round starts
        its next pass (writing what came meanwhile) once the round's time has passed again,
        at most LINGER. At the end of the turn, not when the last pass ends: a pass that
        fits in one slice ends inside the callback that started it, before the tenant's
        other permission groups have started theirs (bench/README.md has the numbers)."""
        if cls.passes_under_way == 0 and cls.round_done:
            done, cls.round_done = cls.round_done, []
            linger = min(time.monotonic() - cls.round_started, cls.LINGER)
            asyncio.get_running_loop().call_later(linger, _next_passes, done)

    @classmethod
    def _writes_allowed(cls, wanted: int) -> int:
        """Up to `wanted` writes from what is left of this turn's slice."""
        if not cls.budget_turn_open:
            cls.budget_turn_open = True
            cls.budget = cls.SLICE
            asyncio.get_running_loop().call_soon(cls._close_budget_turn)
        allowed = min(wanted, cls.budget)
        cls.budget -= allowed
        return allowed

    @classmethod
    def _close_budget_turn(cls) -> None:
        cls.budget_turn_open = False

    def _slice(self) -> None:
        stop = self.pass_at + self._writes_allowed(len(self.pass_order) - self.pass_at)
        for conn in self.pass_order[self.pass_at:stop]:
            data = self.pending(conn)
            if data:
                try:
                    conn.transport.write(data)
                except RuntimeError:  # uvloop, on a transport that just closed: let it go
                    pass
        self.pass_at = stop
        loop = asyncio.get_running_loop()
        if stop < len(self.pass_order):
            loop.call_soon(self._slice)
        else:  # the pass is over; what comes meanwhile waits for the next one
            self._end_pass()


def _next_passes(fanouts: list[Fanout]) -> None:
    for fanout in fanouts:
        fanout._next_pass()


class Tenant:
    __slots__ = ("fanout", "live", "syncing")

    def __init__(self) -> None:
        self.fanout = Fanout()
        self.live = self.fanout.members  # the live subscribers (and their log positions)
        # Subscribers still being sent their backlog: live events are held for them here.
        self.syncing: dict[Connection, list[Event]] = {}

    def add_live(self, conn: Connection) -> None:
        self.fanout.add(conn)

    def remove(self, conn: Connection) -> None:
        self.syncing.pop(conn, None)
        self.fanout.remove(conn)


# -- what a new subscriber is sent, kept in memory ------------------------------------------
# Per tenant: the newest event of each name (the sync) and its most recent events (for short
# replays), already encoded as frames and kept current by every publish, so that a connect
# reads no SQL. Loaded from the store on a tenant's first connect, once however many
# subscribers ask at the same moment.

RECENT_LOADED = 100  # a tenant's newest events read when its state is loaded
RECENT_KEPT = 1000  # events of a tenant's recent past kept at most, and at most RECENT_BYTES
RECENT_BYTES = 256 * 1024
STATE_LOAD_TIMEOUT = 10.0


def _event_id(item: tuple[int, str, bytes]) -> int:
    return item[0]


class TenantState:
    """One tenant's latest values and recent past, as SSE frames. Every event of the tenant
    with an id above `horizon` is in `recent`; events are applied newest-wins, so applying
    one twice or out of order changes nothing."""

    __slots__ = ("_sync", "horizon", "latest", "recent", "recent_bytes", "size", "upto")

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, bytes]] = {}  # event name -> (id, frame)
        self.recent: list[tuple[int, str, bytes]] = []  # (id, name, frame), in id order
        self.recent_bytes = 0
        self.horizon = 0
        self.size = 0  # bytes of frames held, counted against --cache_bytes
        self._sync: bytes | None = None  # the latest values joined, built on demand
        # None while the cache keeps this state current; else the newest published id it
        # reflects (it was evicted, or never cached).
        self.upto: int | None = None

    def apply(self, event: Event, frame: bytes) -> None:
        """Take in one event and its frame (encoded once, by publish())."""
        current = self.latest.get(event.event)
        if current is None or current[0] < event.id:
            self.latest[event.event] = (event.id, frame)
            self.size += len(frame) - (len(current[1]) if current else 0)
            self._forget_sync()
        if event.id > self.horizon:
            self._add_recent((event.id, event.event, frame))

    def _add_recent(self, item: tuple[int, str, bytes]) -> None:
        recent = self.recent
        if recent and recent[-1][0] >= item[0]:  # not the newest: a late or repeated event
            at = bisect.bisect_left(recent, item[0], key=_event_id)
            if at < len(recent) and recent[at][0] == item[0]:
                return
            recent.insert(at, item)
        else:
            recent.append(item)
        self._resize_recent(len(item[2]))
        while len(recent) > RECENT_KEPT or self.recent_bytes > RECENT_BYTES:
            dropped = recent.pop(0)
            self.horizon = dropped[0]
            self._resize_recent(-len(dropped[2]))

    def _resize_recent(self, delta: int) -> None:
        self.recent_bytes += delta
        self.size += delta

    def _forget_sync(self) -> None:
        if self._sync is not None:
            self.size -= len(self._sync)
            self._sync = None

    def load(self, latest: list[Event], recent: list[Event], whole_log: bool) -> None:
        """Merge what the store returned into what publish() applied meanwhile."""
        if not whole_log and recent:
            # max: publish() may have trimmed what it applied meanwhile past that point.
            self.horizon = max(self.horizon, recent[0].id - 1)
            self.recent = [item for item in self.recent if item[0] > self.horizon]
            self.recent_bytes = sum(len(item[2]) for item in self.recent)
        for event in (*latest, *recent):
            self.apply(event, sse_frame(event))
        self.size = self.recent_bytes + sum(len(frame) for _, frame in self.latest.values())

    def sync(self, reads: EventNames | None = None) -> bytes:
        """The newest event of each name (that `reads` allows), oldest first."""
        if reads is not None:  # a permission group (--enforce_scopes): not kept
            return b"".join(frame for _, frame in sorted(
                entry for name, entry in self.latest.items() if reads(name)))
        if self._sync is None:
            self._sync = b"".join(frame for _, frame in sorted(self.latest.values()))
            self.size += len(self._sync)
        return self._sync

    def after(self, last_id: int, reads: EventNames | None = None) -> bytes | None:
        """The frames of every event after `last_id` (that `reads` allows), when `last_id`
        is the id of one of the recent events; else None."""
        at = bisect.bisect_left(self.recent, last_id, key=_event_id)
        if at == len(self.recent) or self.recent[at][0] != last_id:
            return None
        return b"".join(frame for _, name, frame in self.recent[at + 1:]
                        if reads is None or reads(name))


class StateCache:
    """The TenantStates of recently used tenants, within `max_bytes` of frames in all.

    Tenants with subscribers keep theirs; over the budget, the least recently used tenant
    without subscribers goes first, and only then one with subscribers (whose next connect
    loads it again). A state bigger than the whole budget is used once and not kept."""

    def __init__(self, hub: Hub, max_bytes: int) -> None:
        self.hub = hub
        self.max_bytes = max_bytes
        self.active: OrderedDict[str, TenantState] = OrderedDict()  # least recently used first
        self.idle: OrderedDict[str, TenantState] = OrderedDict()
        self.loading: dict[str, TenantState] = {}
        self.loads: dict[str, asyncio.Future[TenantState]] = {}
        self.size = 0
        self.evictions = 0

    def cached(self, tenant: str) -> TenantState | None:
        for pool in (self.active, self.idle):
            state = pool.get(tenant)
            if state is not None:
                pool.move_to_end(tenant)
                return state
        return None

    def set_active(self, tenant: str, active: bool) -> None:
        """The tenant got its first subscriber (active) or lost its last one."""
        source, target = (self.idle, self.active) if active else (self.active, self.idle)
        state = source.pop(tenant, None)
        if state is not None:
            target[tenant] = state

    def held(self, tenant: str) -> TenantState | None:
        """The tenant's state, kept or being loaded, without touching its LRU place."""
        return self.active.get(tenant) or self.idle.get(tenant) or self.loading.get(tenant)

    def remember(self, state: TenantState, batch: list[Event], frames: list[bytes]) -> None:
        """Apply one tenant's newly published events (and their frames) to its state."""
        before = state.size
        for event, frame in zip(batch, frames):
            state.apply(event, frame)
        if self.loading.get(batch[0].tenant_name) is not state:  # else counted once loaded
            self.size += state.size - before
            if self.size > self.max_bytes:
                self.evict()

    def evict(self, keep: TenantState | None = None) -> None:
        for pool in (self.idle, self.active):
            while self.size > self.max_bytes and pool:
                tenant, state = next(iter(pool.items()))
                if state is keep:  # the newest, so the last one left in its pool
                    break
                del pool[tenant]
                self.drop(state)

    def drop(self, state: TenantState) -> None:
        self.size -= state.size
        self.evictions += 1
        state.upto = self.hub.published_upto  # no longer kept current

    async def load(self, tenant: str, store: Engine) -> TenantState:
        """Read a tenant's state from the store; concurrent callers share one read."""
        future = self.loads.get(tenant)
        if future is None:
            future = self.loads[tenant] = asyncio.ensure_future(self._load(tenant, store))
            future.add_done_callback(lambda _: self.loads.pop(tenant, None))
        return await asyncio.shield(future)

    async def _load(self, tenant: str, store: Engine) -> TenantState:
        state = self.loading[tenant] = TenantState()  # publish() applies to it meanwhile
        try:
            latest, recent, covered, _ = await store.tenant_state(tenant, RECENT_LOADED)
            # Events up to `covered` are in what was read; wait until publish() has seen
            # them too, or they would be applied again later and sent twice.
            await asyncio.wait_for(self.hub.published(covered), STATE_LOAD_TIMEOUT)
        finally:
            del self.loading[tenant]
        state.load(latest, recent, whole_log=len(recent) < RECENT_LOADED)
        if state.size > self.max_bytes:
            state.upto = self.hub.published_upto
            return state
        pool = self.active if tenant in self.hub.tenants else self.idle
        pool[tenant] = state
        self.size += state.size
        self.evict(keep=state)
        return state


class Hub:
    def __init__(self, published_upto: int = 0, cache_bytes: int = 64 << 20,
                 max_streams_per_user: int = 100) -> None:
        # Tenant name -> what its subscribers may read (Connection.reads) -> their group.
        self.tenants: dict[str, dict[EventNames | None, Tenant]] = {}
        # A user's streams, oldest first (a dict keeps insertion order).
        self.by_user: dict[str, dict[Connection, None]] = {}
        self.max_streams_per_user = max_streams_per_user
        self.user_streams_closed = 0
        self.states = StateCache(self, cache_bytes)
        self.catching_up: list[tuple[int, asyncio.Future[None]]] = []
        # The newest event id handed to publish(). A backlog read can see a commit a moment
        # before it is published; such a subscriber waits here (id it has been sent up to)
        # until publish() catches up, or it would receive those events twice.
        self.published_upto = published_upto
        self.waiting: dict[Connection, int] = {}
        self.slow_consumers_cut = 0
        self.frames_delivered = 0

    def publish(self, events: list[Event]) -> None:
        """Called by the store after each commit, with its events in id order."""
        by_tenant: dict[str, list[Event]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant_name, []).append(event)
        for name, batch in by_tenant.items():
            groups = self.tenants.get(name)
            state = self.states.held(name)
            if groups is None and state is None:
                continue
            frames = [sse_frame(event) for event in batch]  # each event encoded once
            if state is not None:
                self.states.remember(state, batch, frames)
            if groups is not None:
                self.fan_out(groups, batch, frames)
        self.published_upto = events[-1].id
        for conn, sent_upto in list(self.waiting.items()):
            if sent_upto <= self.published_upto:
                self.go_live(conn, sent_upto)
        self.release_caught_up()

    def fan_out(self, groups: dict[EventNames | None, Tenant], batch: list[Event],
                frames: list[bytes]) -> None:
        """Hand one tenant's new frames to each permission group, as it may read them."""
        everything = b"".join(frames)
        # A copy: a write can cut a slow subscriber and so remove its group.
        for reads, group in tuple(groups.items()):
            for held in group.syncing.values():
                held.extend(batch)  # Connection.send_events filters them
            if not group.live:
                continue
            payload, count = (everything, len(batch)) if reads is None else \
                readable_frames(reads, batch, frames, everything)
            if count:
                self.frames_delivered += len(group.live) * count
                group.fanout.send(payload)

    async def published(self, upto: int) -> None:
        """Return once publish() has been handed every event up to `upto`."""
        if upto > self.published_upto:
            future = asyncio.get_running_loop().create_future()
            self.catching_up.append((upto, future))
            await future

    def release_caught_up(self) -> None:
        if self.catching_up:
            waiting, self.catching_up = self.catching_up, []
            for upto, future in waiting:
                if upto > self.published_upto:
                    self.catching_up.append((upto, future))
                elif not future.done():
                    future.set_result(None)

    async def state_of(self, tenant: str, store: Engine) -> tuple[TenantState, int]:
        """The tenant's state, and the newest published id it reflects. No SQL, and no
        wait, when the state is cached; use it before awaiting anything else."""
        state = self.states.cached(tenant) or await self.states.load(tenant, store)
        return state, self.published_upto if state.upto is None else state.upto

    def group_of(self, conn: Connection) -> Tenant | None:
        return self.tenants.get(conn.tenant, {}).get(conn.reads)

    def join(self, conn: Connection) -> None:
        """Start holding live events for a new subscriber while it syncs."""
        groups = self.tenants.get(conn.tenant)
        if groups is None:
            groups = self.tenants[conn.tenant] = {}
            self.states.set_active(conn.tenant, True)
        groups.setdefault(conn.reads, Tenant()).syncing[conn] = []
        streams = self.by_user.setdefault(conn.username, {})
        streams[conn] = None
        if len(streams) > self.max_streams_per_user:
            self.close_oldest_stream(list(streams)[:-1])

    def close_oldest_stream(self, streams: list[Connection]) -> None:
        """A user is over --max_streams_per_user (a front end that opens a stream on every
        render, say): close the stream with the most unsent bytes, a zombie behind a dead
        NAT, or else the oldest. A live tab simply reconnects."""
        victim = max(streams, key=lambda conn: conn.transport.get_write_buffer_size())
        self.user_streams_closed += 1
        log.info("closing the oldest stream of %s: over --max_streams_per_user", victim.username)
        victim.end_stream()

    def go_live(self, conn: Connection, sent_upto: int) -> None:
        """Everything up to `sent_upto` is dealt with: send what was held, then go live."""
        tenant = self.group_of(conn)
        if tenant is None or conn not in tenant.syncing:
            return  # it went away meanwhile
        if sent_upto > self.published_upto:
            self.waiting[conn] = sent_upto
            return
        self.waiting.pop(conn, None)
        held = [event for event in tenant.syncing.pop(conn) if event.id > sent_upto]
        tenant.add_live(conn)
        if held:
            conn.send_events(held)

    def leave(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)
        tenant = self.group_of(conn)
        if tenant is not None:
            tenant.remove(conn)
            if not tenant.live and not tenant.syncing:
                groups = self.tenants[conn.tenant]
                del groups[conn.reads]
                if not groups:
                    del self.tenants[conn.tenant]
                    self.states.set_active(conn.tenant, False)
        users = self.by_user.get(conn.username)
        if users is not None:
            users.pop(conn, None)
            if not users:
                del self.by_user[conn.username]

    def mute_user(self, username: str) -> None:
        """Stop sending to the user's streams, but leave them open until close_user."""
        for conn in self.by_user.get(username, ()):
            group = self.group_of(conn)
            if group is not None:
                group.remove(conn)

    def close_user(self, username: str) -> None:
        for conn in list(self.by_user.get(username, ())):
            conn.end_stream()

    def close_all(self) -> None:
        # What a pass has not reached yet goes first.
        for group in [g for groups in self.tenants.values() for g in groups.values()]:
            for conn in list(group.live):
                data = group.fanout.pending(conn)
                if data and not conn.transport.is_closing():
                    conn.transport.write(data)
        for users in list(self.by_user.values()):
            for conn in list(users):
                conn.end_stream()

    def heartbeat(self) -> None:
        # Through the sliced writer, like events: a comment frame, delivered once per member.
        # A copy: a write can cut a slow subscriber and so remove its group.
        for group in [g for groups in self.tenants.values() for g in groups.values()]:
            if group.live and not group.fanout.running:
                group.fanout.send(HEARTBEAT)

    def count(self, tenant: str | None = None) -> int:
        """Subscribers of one tenant, or of all."""
        chosen = [self.tenants.get(tenant, {})] if tenant else self.tenants.values()
        return sum(len(g.live) + len(g.syncing) for groups in chosen for g in groups.values())


def readable_frames(reads: EventNames, batch: list[Event], frames: list[bytes],
                    everything: bytes) -> tuple[bytes, int]:
    """The frames of the batch whose events `reads` allows, joined, and how many."""
    chosen = [frame for event, frame in zip(batch, frames) if reads(event.event)]
    if len(chosen) == len(frames):
        return everything, len(frames)
    return b"".join(chosen), len(chosen)


# ---------------------------------------------------------------------------------------
# Authentication: JWT (HS256) or Basic, against the stored user, which must not be revoked.
# ---------------------------------------------------------------------------------------


class Throttle:
    """Counts failures per key in a one-minute window; over the limit, answer 429."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self.failures: dict[str, tuple[int, float]] = {}

    def check(self, key: str, limit: int) -> None:
        count, since = self.failures.get(key, (0, 0.0))
        wait = since + self.WINDOW - time.monotonic()
        if count >= limit and wait > 0:
            raise HTTPError(429, "too many failed attempts; try again later",
                            [("retry-after", str(int(wait) + 1))])

    def fail(self, key: str) -> None:
        count, since = self.failures.get(key, (0, 0.0))
        now = time.monotonic()
        if now - since > self.WINDOW:
            count, since = 0, now
        self.failures[key] = (count + 1, since)

    def forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, since) in self.failures.items() if now - since > self.WINDOW]:
            del self.failures[key]


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
        self._hasher: argon2.PasswordHasher | None = None
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

    @property
    def hasher(self) -> argon2.PasswordHasher:
        if self._hasher is None:
            self._hasher = password_hasher(self.config)
        return self._hasher

    # -- users ------------------------------------------------------------------------
    async def user(self, username: str) -> User | None:
        user = self.users.get(username)
        if user is None:
            user = await self.store.get_user(username)
            if user is not None:
                self.users[username] = user
        return user

    def remember(self, user: User) -> None:
        self.users[user.username] = user
        self.basic_verified.pop(user.username, None)

    def forget(self, username: str) -> None:
        """Drop everything cached about a user (changed by another process)."""
        self.users.pop(username, None)
        self.basic_verified.pop(username, None)
        for token in [t for t, claims in self.verified_tokens.items()
                      if claims.get("sub") == username]:
            del self.verified_tokens[token]

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
        def check() -> bool:
            from argon2.exceptions import InvalidHashError, VerificationError
            try:
                return self.hasher.verify(password_hash, password)
            except (VerificationError, InvalidHashError):
                return False
        return await self._in_pool(check)

    async def check_password(self, username: str, password: str, client: str) -> User:
        """The user, if the password is right and the user not revoked; else 401 (or 429)."""
        limit = self.config.auth_failures
        self.throttle.check(f"user:{username}", limit)
        self.throttle.check(f"addr:{client}", limit * 3)
        # Verify against a dummy hash for unknown users, so timing does not reveal names.
        # The dummy is made before the lookup, whoever asks: only the very first check
        # after start pays for it, known user or not.
        dummy = self.dummy_hash or await self.make_dummy_hash()
        user = await self.user(username)
        ok = await self.verify(user.password_hash if user else dummy, password)
        if not ok or user is None or user.revoked:
            self.throttle.fail(f"user:{username}")
            self.throttle.fail(f"addr:{client}")
            raise unauthorized("wrong username or password, or the user is revoked")
        if self.hasher.check_needs_rehash(user.password_hash):
            user = await self.rehash(user, password)
        return user

    async def make_dummy_hash(self) -> str:
        self.dummy_hash = await self._in_pool(self.hasher.hash, secrets.token_hex(8))
        return self.dummy_hash

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
        token = body.get("admin_token")
        if not isinstance(token, str):
            raise HTTPError(400, "admin_token is required and must be a string")
        if not self.is_admin_token(token, client):
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
        if header is None and token_in_query and "access_token" in req.query:
            header = "Bearer " + req.query["access_token"]
        if not header:
            raise unauthorized("missing Authorization header")
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            user = await self._from_jwt(credentials.strip())
        elif scheme == "basic":
            user = await self._from_basic(credentials.strip(), req.client)
        else:
            raise unauthorized("use Bearer or Basic authorization")
        if user.revoked:
            raise unauthorized("user is revoked")
        return user

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
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            raise unauthorized("malformed Basic credentials") from None
        username, colon, password = decoded.partition(":")  # the password may hold ':'
        if not colon:
            raise unauthorized("malformed Basic credentials")
        user = await self.user(username)
        if user is None:
            return await self.check_password(username, password, client)  # a slow 401
        digest = self.basic_digest(user, password)
        known = self.basic_verified.get(username)
        if known is not None and hmac.compare_digest(known, digest):
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
        return hmac.new(self.basic_key, f"{user.password_hash}\0{password}".encode(),
                        hashlib.sha256).digest()


def return_big_blocks_to_the_system() -> None:
    """glibc serves a large allocation with its own mmap and unmaps it when freed, but then
    raises that threshold to the size freed: from the second login on, each hash's 19 MiB
    would come from a heap that keeps it, and RSS would stay 20 MB higher for good. Pinning
    the threshold (which stops it moving) gives the memory back after every hash."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB and up are mmapped


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
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.events_inserted = 0
        self.insert_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.insert_seconds = 0.0
        self.quota_refusals = 0

    def count_request(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_insert(self, seconds: float) -> None:
        self.events_inserted += 1
        self.insert_seconds += seconds
        self.insert_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def render(self, app: App) -> str:
        tenants = app.hub.tenants
        lines = [
            "# TYPE broker_open_connections gauge",
            f"broker_open_connections {len(app.connections)}",
            "# TYPE broker_sse_subscribers gauge",
            f"broker_sse_subscribers {app.hub.count()}",
            "# TYPE broker_sse_tenants gauge",
            f"broker_sse_tenants {len(tenants)}",
            "# TYPE broker_sse_tenant_subscribers gauge",
            *(f'broker_sse_tenant_subscribers{{tenant="{label(name)}"}} '
              f"{app.hub.count(name)}" for name in sorted(tenants)),
            "# TYPE broker_events_inserted_total counter",
            f"broker_events_inserted_total {self.events_inserted}",
            "# TYPE broker_frames_delivered_total counter",
            f"broker_frames_delivered_total {app.hub.frames_delivered}",
            "# TYPE broker_slow_consumer_disconnects_total counter",
            f"broker_slow_consumer_disconnects_total {app.hub.slow_consumers_cut}",
            "# TYPE broker_user_stream_limit_closes_total counter",
            f"broker_user_stream_limit_closes_total {app.hub.user_streams_closed}",
            "# TYPE broker_state_cache_bytes gauge",
            f"broker_state_cache_bytes {app.hub.states.size}",
            "# TYPE broker_state_cache_tenants gauge",
            f"broker_state_cache_tenants {len(app.hub.states.active) + len(app.hub.states.idle)}",
            "# TYPE broker_state_cache_evictions_total counter",
            f"broker_state_cache_evictions_total {app.hub.states.evictions}",
            "# TYPE broker_quota_refusals_total counter",
            f"broker_quota_refusals_total {self.quota_refusals}",
            "# TYPE broker_requests_total counter",
            *(f'broker_requests_total{{route="{route}",status="{status}"}} {count}'
              for (route, status), count in sorted(self.requests.items())),
            "# TYPE broker_insert_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.insert_buckets):
            cumulative += count
            lines.append(f'broker_insert_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"broker_insert_duration_seconds_sum {self.insert_seconds:.6f}",
                  f"broker_insert_duration_seconds_count {self.events_inserted}"]
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
        self.hub = Hub(cache_bytes=config.cache_bytes,
                       max_streams_per_user=config.max_streams_per_user)
        Fanout.SLICE = config.fanout_slice  # one server per process
        self.metrics = Metrics()
        self.connections: set[Connection] = set()
        self.in_flight: set[asyncio.Task] = set()  # handlers running (a reference keeps them)
        self.stopping = False
        self.trusted_proxies = {a.strip() for a in config.trusted_proxies.split(",") if a.strip()}
        self.password_checker = weak_password_checker() if config.password_checker else None
        self.stream_heads = {chunked: stream_head(config.origin, chunked)
                             for chunked in (True, False)}
        self.store: Engine
        self.auth: Auth
        Handler = Callable[[Request], Awaitable[Response]]
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.health, "HEAD": self.health},
            "/create_user": {"POST": self.create_user},
            "/login": {"POST": self.login},
            "/verify": {"GET": self.verify},
            "/insert": {"POST": self.insert},
            "/sse": {"GET": self.sse},
            "/revoke_user": {"POST": self.revoke_user},
            "/unrevoke_user": {"POST": self.unrevoke_user},
            "/list_users": {"POST": self.list_users},
            "/get_user": {"POST": self.get_user},
            "/update_user": {"POST": self.update_user},
            "/metrics": {"GET": self.metrics_page},
        }

    async def start(self) -> None:
        self.store = await store.open_store(
            self.config.db, self.hub.publish, self.account_changed,
            max_event_names=self.config.max_event_names,
            max_tenant_bytes=self.config.max_tenant_bytes)
        self.hub.published_upto = self.store.published.upto
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
        may have been missed, so every account known here. Drop what is cached about it,
        re-read it, and close the streams that the local path would have closed."""
        names = [username] if username else list({*self.auth.users, *self.hub.by_user})
        for name in names:
            before = self.auth.users.get(name)
            # The streams opened with `before` or older: one opened while the user is re-read
            # below already has the new state (this process's own change, say) and stays.
            streams = list(self.hub.by_user.get(name, ()))
            self.auth.forget(name)
            user = await self.store.get_user(name)
            if user is not None:
                self.auth.remember(user)
            rescoped = self.config.enforce_scopes and before is not None and \
                user is not None and before.scopes != user.scopes
            for conn in streams:
                if user is None or user.revoked or conn.tenant != user.tenant_name or rescoped \
                        or (before is not None and before.password_hash != user.password_hash):
                    conn.end_stream()

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
        tenant = text_field(body, "tenant_name")
        email = email_field(body)
        scopes = scopes_field(body)
        user = User(str(uuid.uuid4()), username, await self.auth.hash(password), False,
                    tenant, email, scopes, body.get("data"), 0)
        try:
            await self.store.create_user(user)
        except UsernameTaken:
            raise HTTPError(400, "username already taken") from None
        self.auth.remember(user)
        return reply({"id": user.id})

    async def login(self, req: Request) -> Response:
        body = read_json(req)
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise HTTPError(400, "username and password are required strings")
        if len(password) > 1024:
            raise unauthorized("wrong username or password, or the user is revoked")
        user = await self.auth.check_password(username, password, req.client)
        return reply({"jwt": await self.auth.issue_jwt(user)})

    # -- authenticated endpoints --------------------------------------------------------
    async def verify(self, req: Request) -> Response:
        user = await self.auth.authenticate(req)
        return reply({"username": user.username, "tenant_name": user.tenant_name,
                      "scopes": user.scopes})

    async def insert(self, req: Request) -> Response:
        user = await self.auth.authenticate(req)
        body = read_json(req)
        name = event_name_field(body)
        if "data" not in body:
            raise HTTPError(400, "data is required (any JSON value)")
        data = compact_json(body["data"]).decode()
        if self.config.enforce_scopes and not grants(tuple(user.scopes))[1](name):
            raise HTTPError(403, f"no scope of {user.username!r} allows posting {name!r}")
        started = time.perf_counter()
        try:
            event = await self.store.insert_event(user.tenant_name, name, data)
        except QuotaExceeded as exc:  # 409: retrying cannot help until the tenant changes
            self.metrics.quota_refusals += 1
            raise HTTPError(409, str(exc)) from None
        self.metrics.observe_insert(time.perf_counter() - started)
        return reply({"id": event.id, "event": event.event, "timestamp": event.timestamp})

    async def sse(self, req: Request) -> Response:
        user = await self.auth.authenticate(req, token_in_query=True)
        last_id = last_event_id(req)
        conn = req.conn
        if conn.transport.is_closing():
            return STREAMING  # the client left while we checked its credentials
        conn.start_stream(user, req.client)
        self.hub.join(conn)
        try:
            # `covered`: the newest published id the sync or replay reflects. Every event up
            # to it was sent or is not wanted (superseded, or the client had it); later ones
            # were held for this subscriber since join().
            if last_id is None:
                covered = await self.send_state(conn, user)
            else:
                covered = await self.replay(conn, user, last_id)
            conn.send_frames(b"")  # the head, when there was nothing to send with it
            await conn.drained()
        except (StoreError, ConnectionError, TimeoutError) as exc:
            log.warning("stream for %s ended during sync: %s", user.username, exc)
            conn.end_stream()
            return STREAMING
        self.hub.go_live(conn, covered)
        return STREAMING

    async def send_state(self, conn: Connection, user: User) -> int:
        """The latest value of each name the stream may read, from memory. Returns the
        newest published id they reflect."""
        state, covered = await self.hub.state_of(user.tenant_name, self.store)
        conn.send_frames(state.sync(conn.reads))
        return covered

    async def replay(self, conn: Connection, user: User, after: int) -> int:
        """Send every event of the user's tenant after `after`. Returns the newest id the
        events sent reflect.

        The resume rule: replay only what the log can prove the client is missing. When it
        cannot (an id from another history or the future, a change of tenant or scopes at
        or after it, events after it pruned; see Engine.resume_page), send the latest values
        instead, as on a fresh connect: the client is whole again, without any extra frame.

        From memory, without SQL, when `after` is one of the tenant's recent events (which
        proves it is of this tenant and this history, and every later event is in memory)
        and the user's tenant and scopes did not change at or after it. Else from the
        store, page by page."""
        state, covered = await self.hub.state_of(user.tenant_name, self.store)
        recent = state.after(after, conn.reads)
        if recent is not None and (user.access_changed_at or 0) < after:
            conn.send_frames(recent)
            return covered
        while True:
            found = await self.store.resume_page(user.username, user.tenant_name, after,
                                                 SYNC_PAGE, SYNC_BYTES)
            if found is None:
                return await self.send_state(conn, user)
            page, newest = found
            if page:
                conn.send_events(page)
                after = page[-1].id
            if len(page) < SYNC_PAGE and sum(len(event.data) for event in page) < SYNC_BYTES:
                return newest
            await conn.drained()

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
        username = body.get("username")
        if not isinstance(username, str):
            raise HTTPError(400, "username is required and must be a string")
        return body, username

    async def _change_user(self, username: str, changes: dict[str, Any]) -> User:
        user = await self.store.update_user(username, changes)
        if user is None:
            raise HTTPError(404, f"no user named {username!r}")
        self.auth.remember(user)
        return user

    async def revoke_user(self, req: Request) -> Response:
        _, username = self._admin_target(req)
        await self._change_user(username, {"revoked": True})
        self.hub.close_user(username)
        return reply({"username": username, "revoked": True})

    async def unrevoke_user(self, req: Request) -> Response:
        _, username = self._admin_target(req)
        await self._change_user(username, {"revoked": False})
        return reply({"username": username, "revoked": False})

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
        changes: dict[str, Any] = {}
        if "tenant_name" in body:
            changes["tenant_name"] = text_field(body, "tenant_name")
        if "email" in body:
            changes["email"] = email_field(body)
        if "scopes" in body:
            changes["scopes"] = scopes_field(body)
        if "data" in body:
            changes["data"] = body["data"]
        password = password_field(body, self.password_checker) if "password" in body else None
        if password is not None:
            changes["password_hash"] = await self.auth.hash(password)
            # Void every JWT issued up to and including this second.
            changes["tokens_valid_after"] = int(time.time()) + 1
        before = await self.auth.user(username)
        rescoped = self.config.enforce_scopes and before is not None \
            and changes.get("scopes", before.scopes) != before.scopes
        moving = before is not None and changes.get("tenant_name", before.tenant_name) \
            != before.tenant_name
        if moving or rescoped:
            # What the user's streams may carry changes: nothing more may reach them once the
            # change commits, so their Last-Event-ID stays at or before the id the change
            # records (Store.update_user), and their resume gets the new state.
            self.hub.mute_user(username)
        try:
            user = await self._change_user(username, changes)
        finally:
            if moving or rescoped or password is not None:
                self.hub.close_user(username)  # they reconnect with the new state
        return reply(user_object(user))


def stream_head(origin: str, chunked: bool) -> bytes:
    """The response head of an event stream, built once rather than by h11 per connect."""
    framing = "transfer-encoding: chunked" if chunked else "connection: close"
    return ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            f"x-accel-buffering: no\r\naccess-control-allow-origin: {origin}\r\n"
            f"{framing}\r\n\r\n").encode()


def last_event_id(req: Request) -> int | None:
    header, query = req.headers.get("last-event-id"), req.query.get("last_event_id")
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
    # No per-instance dict: an idle stream is mostly this object and its transport.
    __slots__ = ("app", "body", "chunked", "client", "drain_waiter", "http", "reading",
                 "reads", "request", "started", "tenant", "timer", "transport", "unsent",
                 "username", "write_paused")

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # h11's state; None once the connection is an event stream (it is no longer needed).
        self.http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.client = "?"
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False  # a request has begun arriving and is not complete
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.chunked = True
        self.username = ""
        self.tenant = ""
        self.reads: EventNames | None = None  # what a stream may receive; None: everything
        self.drain_waiter: asyncio.Future | None = None
        self.write_paused = False
        self.unsent = b""  # a stream's head, until its first frames go out with it
        self.started = 0.0

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else "local"
        self.app.connections.add(self)
        if len(self.app.connections) > self.app.config.max_connections:
            self.reject(503, "too many connections; try again", [("retry-after", "5")])
            return
        self.transport.set_write_buffer_limits(high=self.app.config.max_buffer)
        # A new connection must start its request promptly: silent sockets cost a slot.
        self.arm_timer(self.app.config.request_timeout)

    def data_received(self, data: bytes) -> None:
        if self.http is None:
            return  # an event stream: whatever the client sends now is of no interest
        if not self.reading:
            self.reading = True
            self.arm_timer(self.app.config.request_timeout)
        self.http.receive_data(data)
        self.process()

    def eof_received(self) -> bool:
        if self.http is None:
            self.app.hub.leave(self)  # a subscriber hung up: write nothing more, and close
            return False
        self.http.receive_data(b"")
        self.process()
        return True  # keep our side open to answer a request that ended with the EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        self.disarm_timer()
        if self.username:
            self.app.hub.leave(self)
        if self.drain_waiter and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionError("connection lost"))

    def pause_writing(self) -> None:
        # The kernel is not taking our bytes and the buffer passed --max_buffer.
        tenant = self.app.hub.group_of(self) if self.username else None
        if tenant is not None and self in tenant.live:
            self.app.hub.slow_consumers_cut += 1
            log.warning("cut off slow subscriber %s (%s): over %d unsent bytes",
                        self.username, self.client, self.app.config.max_buffer)
            self.app.hub.leave(self)
            self.transport.abort()
        else:
            self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

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
        if self.reading:
            self.reject(408, "request not received in time")
        else:
            self.transport.close()  # an idle keep-alive connection

    # -- requests -------------------------------------------------------------------------
    def process(self) -> None:
        """Pull h11 events until a request is complete, more data is needed, or it failed.

        Garbage from the client ends as RemoteProtocolError: answer it and close, since a
        broken byte stream cannot be trusted to find the next request's start."""
        assert self.http is not None
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                # h11 hints 431 for an overlong head, 400 for most garbage, and 501 for a
                # Transfer-Encoding it cannot decode: garbage from the client is a 4xx.
                hint = exc.error_status_hint
                self.reject(hint if hint < 500 else 400, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self.start_request(event):
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.app.config.max_body:
                    self.reject(413, f"body over {self.app.config.max_body} bytes")
                    return
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

    def start_request(self, request: h11.Request) -> bool:
        self.request = request
        self.body = bytearray()
        self.started = time.perf_counter()
        # h11 bounds a head only while it is incomplete; one that came whole in a single
        # read is measured here.
        head_size = len(request.method) + len(request.target) + sum(
            len(name) + len(value) + 4 for name, value in request.headers)
        if head_size > MAX_HEADER_BYTES:
            self.reject(431, "request line and headers over 16 KiB")
            return False
        headers = dict(request.headers)
        if b"content-length" in headers and b"transfer-encoding" in headers:
            # Ambiguous framing, the stuff of request smuggling (RFC 9112 section 6.1).
            self.reject(400, "both Content-Length and Transfer-Encoding")
            return False
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.app.config.max_body:
            self.reject(413, f"body over {self.app.config.max_body} bytes")
            return False
        if self.http.they_are_waiting_for_100_continue:  # type: ignore[union-attr]
            self.transport.write(self.http.send(  # type: ignore[union-attr]
                h11.InformationalResponse(status_code=100, headers=[])))
        return True

    def make_request(self) -> Request:
        assert self.request is not None
        target = urlsplit(self.request.target.decode("ascii", "replace"))
        headers: dict[str, str] = {}
        for name, value in self.request.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return Request(self.request.method.decode("ascii", "replace"), target.path or "/",
                       dict(parse_qsl(target.query, keep_blank_values=True)), headers,
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
            response = error_response(exc)
        except StoreError as exc:
            log.error("storage failure on %s %s: %s", req.method, req.path, exc)
            response = reply({"error": "storage unavailable; try again"}, 503)
            response.headers.append(("retry-after", "1"))
        except Exception:
            log.exception("unexpected error on %s %s", req.method, req.path)
            response = reply({"error": "internal error"}, 500)
        if response is STREAMING:
            return
        if self.http is None:  # a stream that failed before it began; nothing more to say
            self.transport.close()
            return
        self.log_request(req.method, req.path, response.status, req.client)
        self.send(req.method, response)

    def log_request(self, method: str, path: str, status: int, client: str) -> None:
        # Path only: a query string may hold an access_token.
        route = path if path in self.app.routes else "other"
        self.app.metrics.count_request(route, status)
        if not log.isEnabledFor(logging.INFO):
            return
        millis = (time.perf_counter() - self.started) * 1000
        log.info("%s %s %d %.1fms", method, path, status, millis,
                 extra={"fields": {"method": method, "path": path, "status": status,
                                   "ms": round(millis, 1), "client": client}})

    def base_headers(self) -> list[tuple[str, str]]:
        return [("access-control-allow-origin", self.app.config.origin)]

    def send(self, method: str, response: Response) -> None:
        if self.transport.is_closing():
            return  # the client left while we worked
        assert self.http is not None
        headers = self.base_headers() + response.headers
        if response.status != 204:
            headers += [("content-type", response.content_type),
                        ("content-length", str(len(response.body)))]
        out = self.http.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=REASONS.get(response.status, "")))
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
        self.transport.resume_reading()
        self.process()

    def reject(self, status: int, message: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        """Answer with an error and close, outside h11's state machine: used when the byte
        stream is broken, too slow, too big, or we are over capacity."""
        self.disarm_timer()
        if self.transport.is_closing():
            return
        body = compact_json({"error": message})
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
                "content-type: application/json", f"content-length: {len(body)}",
                "connection: close", f"access-control-allow-origin: {self.app.config.origin}"]
        head += [f"{name}: {value}" for name, value in headers or []]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.transport.close()
        path = self.request.target.split(b"?")[0].decode("ascii", "replace") \
            if self.request else "-"
        log.info("%s %s %d (closed)", self.request.method.decode() if self.request else "-",
                 path, status)
        self.http = None

    # -- event streams --------------------------------------------------------------------
    def start_stream(self, user: User, client: str) -> None:
        """From now on the connection carries only SSE frames. The head and the retry frame
        go out with the first frames (one write instead of two): see send_frames."""
        assert self.http is not None and self.request is not None
        # Chunked for HTTP/1.1 clients, a body that ends with the connection for 1.0.
        self.chunked = self.http.their_http_version != b"1.0"
        retry = retry_frame()
        self.unsent = self.app.stream_heads[self.chunked] + (
            chunk(retry) if self.chunked else retry)
        self.log_request("GET", "/sse", 200, client)
        self.http = None
        self.request = None
        self.body = bytearray()
        self.disarm_timer()
        self.transport.resume_reading()  # to notice the client hanging up
        self.username = user.username
        self.tenant = user.tenant_name
        self.reads = grants(tuple(user.scopes))[0] if self.app.config.enforce_scopes else None

    def send_events(self, events: list[Event]) -> None:
        """Send those of the events this stream may read (held while syncing, a replay
        from the store)."""
        if self.reads is not None:
            events = [event for event in events if self.reads(event.event)]
        self.send_frames(b"".join(sse_frame(event) for event in events))

    def send_frames(self, payload: bytes) -> None:
        """Write frames (and the stream's head, if it is still unsent)."""
        if self.transport.is_closing():  # uvloop raises on a write to a closed transport
            return
        data = (chunk(payload) if self.chunked else payload) if payload else b""
        if self.unsent:
            data, self.unsent = self.unsent + data, b""
        if data:
            self.transport.write(data)

    async def drained(self, timeout: float = 30.0) -> None:
        """Wait until the client has taken most of what we wrote (flow control for syncs)."""
        if self.transport.is_closing():
            raise ConnectionError("connection closed")
        if not self.write_paused:
            return
        self.drain_waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(self.drain_waiter, timeout)

    def end_stream(self) -> None:
        """Close a stream cleanly: the terminating chunk, then close after the buffer."""
        self.app.hub.leave(self)
        self.send_frames(b"")  # the head, if the stream ends before anything was sent
        if not self.transport.is_closing():
            if self.chunked:
                self.transport.write(LAST_CHUNK)
            self.transport.close()


# ---------------------------------------------------------------------------------------
# Start, serve, stop.
# ---------------------------------------------------------------------------------------


async def heartbeats(app: App) -> None:
    while True:
        await asyncio.sleep(app.config.heartbeat)
        app.hub.heartbeat()
        app.auth.throttle.forget_old()


PRUNE_BATCH = 500  # events deleted per write: short enough not to hold up inserts


async def enforce_retention(app: App) -> None:
    """Delete events older than --retention: at start, then every minute (or every half
    retention when that is shorter), in small batches that queue among the inserts."""
    keep = app.config.retention
    while True:
        deleted = 0
        try:
            while True:
                pruned = await app.store.prune(int(time.time() - keep), PRUNE_BATCH)
                deleted += pruned.deleted
                if not pruned.more:
                    break
        except StoreError as exc:
            log.warning("retention: pruning failed, trying again later: %s", exc)
        if deleted:
            log.info("retention: deleted %d events older than %gs", deleted, keep)
        await asyncio.sleep(min(60.0, max(1.0, keep / 2)))


def tls_context(config: argparse.Namespace) -> ssl.SSLContext | None:
    if not config.cert_path:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.cert_path, config.key_path)
    return context


async def serve(config: argparse.Namespace) -> None:
    app = App(config)
    try:
        await app.start()
    except StoreError as exc:
        log.error("%s", exc)
        log.error("refusing to start (the database was not changed)")
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(app), config.host, config.port,
                                      ssl=tls_context(config), backlog=2048,
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
    app.hub.close_all()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for conn in list(app.connections):
            if conn.request is None and conn.http is not None:
                conn.transport.close()  # idle between requests
        if not app.connections:
            break
        await asyncio.sleep(0.05)
    for conn in list(app.connections):
        conn.transport.close()
    await app.store.close()


def raise_open_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor; many systems start processes at 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
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
