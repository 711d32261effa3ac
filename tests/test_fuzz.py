"""Garbage in: hypothesis fuzzes the HTTP layer of a live broker over raw sockets.

Broken request lines, bad chunked framing, bodies that are not JSON or not UTF-8,
duplicated and conflicting headers, forged credentials, malformed event ids, pipelined
requests, truncated bodies and subscribers that hang up at once. For every example the server must answer with a 4xx (never a 5xx, never a Python
traceback) or close the connection, and a normal request on a fresh connection must still
succeed afterwards. At the end, the server's log must hold no traceback.

Bounded: at most 80 examples per test and no shrinking, 5-second socket deadlines, one server per module
(plus one for the pipelining test, whose expectations a login throttle must not disturb).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Server
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=80,
    deadline=None,
    # No shrinking: a failing example can cost a socket deadline per replay, and the
    # assertion messages carry the bytes sent, which is what a reproduction needs.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)
DEADLINE = 5.0  # seconds for the server to answer or close; far below --request_timeout
PASSWORD = "fuzz passw0rd"
INSERT_BODY = json.dumps({"event": "fuzz", "data": {"n": 1}}).encode()
JSON_ROUTES = ["/insert", "/login", "/create_user", "/get_user", "/update_user",
               "/list_users", "/revoke_user", "/unrevoke_user"]
# A syntactically valid HTTP/1.x request line (RFC 9112 section 3): token SP target SP version.
# Also tolerated by lenient parsers (RFC 9112 3: "MAY parse on whitespace"), hence [ \t]+.
VALID_REQUEST_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]+[\x21-\x7e\x80-\xff]+[ \t]+HTTP/\d\.\d")


# -- talking to the server -------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    """What came back on one connection: the parsed responses and whether it was closed."""

    sent: bytes
    replies: list[Reply] = field(default_factory=list)
    closed: bool = False
    raw: bytes = b""

    def __str__(self) -> str:
        return f"sent {self.sent[:400]!r}\n got {self.raw[:400]!r} (closed: {self.closed})"

    @property
    def first(self) -> Reply | None:
        return self.replies[0] if self.replies else None


def exchange(port: int, payload: bytes, half_close: bool = False, heads: int = 0,
             wait_for: int | None = None, stream: bool = False,
             deadline: float = DEADLINE) -> Exchange:
    """Send raw bytes; read until the server closes, `wait_for` responses arrived, or deadline.

    `heads` marks that many leading responses as answers to HEAD (no body whatever the headers).
    With `stream`, reading also stops at the head of a 200 response, whose body never ends.
    A reset counts as a close: a server that rejects early may close with our bytes unread.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    result = Exchange(payload)
    try:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading; its answer (if any) is still readable
        ends = time.monotonic() + deadline
        while time.monotonic() < ends:
            sock.settimeout(max(0.05, ends - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                result.closed = True
                break
            if not chunk:
                result.closed = True
                break
            result.raw += chunk
            if wait_for is not None and len(parse_replies(result.raw, heads)) >= wait_for:
                break
            if stream and result.raw.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in result.raw:
                break
    finally:
        sock.close()
    result.replies = parse_replies(result.raw, heads)
    return result


def parse_replies(data: bytes, heads: int = 0) -> list[Reply]:
    """Split a byte stream into complete HTTP responses (Content-Length or chunked bodies)."""
    replies: list[Reply] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ")
        if len(parts) < 2 or not parts[1].isdigit():
            raise AssertionError(f"not an HTTP response: {data[:200]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if len(replies) < heads or status in (204, 304):
            body, data = b"", rest
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parsed = decode_chunked(rest)
            if parsed is None:
                break
            body, data = parsed
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if len(rest) < size:
                break
            body, data = rest[:size], rest[size:]
        else:
            body, data = rest, b""
        replies.append(Reply(status, headers, body))
    return replies


def decode_chunked(data: bytes) -> tuple[bytes, bytes] | None:
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return None
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, sep, rest = rest.partition(b"\r\n")  # no trailers from this server
            return (body, rest) if sep else None
        if len(rest) < size + 2:
            return None
        body += rest[:size]
        data = rest[size + 2:]


def request(method: str, path: str, headers: list[tuple[str, str]] | None = None,
            body: bytes = b"", close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_post(path: str, body: bytes, auth: str | None = None, close: bool = True,
              content_type: str = "application/json") -> bytes:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if auth:
        headers.append(("Authorization", auth))
    return request("POST", path, headers, body, close)


# -- the properties --------------------------------------------------------------------------

def assert_no_crash(result: Exchange) -> None:
    """Never a 5xx, never a traceback, and every answer is a complete HTTP response."""
    assert b"Traceback" not in result.raw, str(result)
    for reply in result.replies:
        assert reply.status < 500, str(result)
    if not result.replies:
        # Nothing parsable came back: the only acceptable outcome is a closed connection.
        assert result.closed, f"no answer and no close within {DEADLINE}s: {result}"


def assert_rejected(result: Exchange) -> None:
    """The request was garbage: a 4xx error as JSON, or the connection closed."""
    assert_no_crash(result)
    reply = result.first
    if reply is None:
        return
    assert 400 <= reply.status < 500, str(result)
    assert_error_body(reply)


def assert_error_body(reply: Reply) -> None:
    """Every error the API sends is `{"error": "<text>"}`."""
    if not reply.body:
        return
    body = json.loads(reply.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body


def assert_still_serving(srv: Server) -> None:
    resp = srv.get("/", timeout=DEADLINE)
    assert resp.status == 200, (resp.status, resp.body)


# -- fixtures --------------------------------------------------------------------------------

@dataclass
class Target:
    srv: Server
    bearer: str
    basic: str


def start_target(tmp: Path, name: str) -> Target:
    srv = Server(tmp).start()
    auth = srv.user(name, PASSWORD, tenant=f"{name}_tenant")
    raw = base64.b64encode(f"{name}:{PASSWORD}".encode()).decode()
    return Target(srv, auth["Authorization"], f"Basic {raw}")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tgt = start_target(tmp_path_factory.mktemp("fuzz"), "fuzzer")
    yield tgt
    tgt.srv.kill()


# -- broken request lines --------------------------------------------------------------------

TOKENS = st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"get",
                          b"G\x00T", b"GE T", b"", b"\xff\xfe", b"POST\t", b"CONNECT"])
TARGETS = st.sampled_from([b"/", b"/insert", b"/sse", b"*", b"", b"/ /", b"/%ff%fe",
                           b"/\xff", b"/\x00", b"http://127.0.0.1/", b"//", b"/..%2f..",
                           b"/sse?last_event_id=%zz", b"/" + b"a" * 20000])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/1",
                            b"HTTP/1.1 extra", b"http/1.1", b"", b"HTTP/\xff", b"HTTP/9.9"])
SEPARATORS = st.sampled_from([b" ", b"  ", b"\t", b"", b"\x00"])


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        sep = draw(SEPARATORS)
        return draw(TOKENS) + sep + draw(TARGETS) + sep + draw(VERSIONS)
    return draw(st.binary(max_size=300).filter(lambda b: b"\r\n" not in b))


@FUZZ
@given(line=request_lines(), terminator=st.sampled_from([b"\r\n", b"\n", b"\r"]))
@example(line=b"GET / HTTP/1.1 junk", terminator=b"\r\n")
@example(line=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", terminator=b"\r\n")  # TLS hello
def test_broken_request_lines(target: Target, line: bytes, terminator: bytes) -> None:
    payload = line + terminator + b"Host: x\r\nConnection: close\r\n\r\n"
    result = exchange(target.srv.port, payload, half_close=True)
    if VALID_REQUEST_LINE.fullmatch(line) and terminator != b"\r":
        # A well-formed line may be served (200, 404, 405, ...); a bare LF may end a line
        # (RFC 9112 2.2), a bare CR may not.
        assert_no_crash(result)
    else:
        assert_rejected(result)
    assert_still_serving(target.srv)


# -- bad chunked encoding --------------------------------------------------------------------

def chunk(data: bytes, size: bytes | None = None, crlf: bytes = b"\r\n") -> bytes:
    return (size if size is not None else b"%x" % len(data)) + crlf + data + crlf


@st.composite
def broken_chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A chunked body for POST /insert whose framing is wrong in exactly one way, and
    whether it must be refused (chunk extensions are discarded unparsed by h11 and may be
    served)."""
    body = draw(_broken_chunked())
    return body, b";" not in body.split(b"\r\n", 1)[0]


@st.composite
def _broken_chunked(draw: st.DrawFn) -> bytes:
    data = INSERT_BODY
    cut = draw(st.integers(1, len(data) - 1))
    first, second = data[:cut], data[cut:]
    kind = draw(st.sampled_from(["bad_size", "short_size", "long_size", "no_crlf",
                                 "lf_only", "no_terminator", "huge_size", "bad_extension",
                                 "bad_trailer"]))
    end = b"0\r\n\r\n"
    if kind == "bad_size":
        size = draw(st.sampled_from([b"zz", b"-1", b"0x5", b" 5", b"5 5", b"", b"\xff",
                                     b"1_0", b"+5", b"5\x00"]))
        return chunk(first, size) + chunk(second) + end
    if kind == "short_size":
        # Fewer bytes declared than sent: the chunk's CRLF is not where the size says.
        return chunk(data, b"%x" % draw(st.integers(1, len(data) - 1))) + end
    if kind == "long_size":
        extra = draw(st.integers(1, 64))
        return chunk(first, b"%x" % (len(first) + extra)) + chunk(second) + end
    if kind == "no_crlf":
        return b"%x\r\n" % len(first) + first + chunk(second) + end
    if kind == "lf_only":
        return chunk(first, crlf=b"\n") + chunk(second, crlf=b"\n") + b"0\n\n"
    if kind == "no_terminator":
        return chunk(first) + chunk(second)
    if kind == "huge_size":
        return chunk(first, b"F" * draw(st.integers(9, 40))) + end
    if kind == "bad_extension":
        ext = draw(st.sampled_from([b";\x00", b";\xff\xfe", b"; =", b";a=\"unterminated",
                                    b";" + b"x" * 20000]))
        return chunk(first, b"%x" % len(first) + ext) + chunk(second) + end
    trailer = draw(st.sampled_from([b"no colon here", b"Bad Name: x", b": empty name",
                                    b"X: \x00"]))
    return chunk(first) + chunk(second) + b"0\r\n" + trailer + b"\r\n\r\n"


@FUZZ
@given(case=broken_chunked_bodies())
def test_bad_chunked_encoding(target: Target, case: tuple[bytes, bool]) -> None:
    body, strict = case
    headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
               ("Authorization", target.bearer)]
    # Half-close: a body that is merely incomplete must end in an answer or a close, not a wait.
    result = exchange(target.srv.port, request("POST", "/insert", headers) + body, half_close=True)
    if strict:
        assert_rejected(result)
    else:
        assert_no_crash(result)
    assert_still_serving(target.srv)


def test_valid_chunked_body_is_accepted(target: Target) -> None:
    """The control for the test above: correct chunked framing of the same body is served."""
    headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
               ("Authorization", target.bearer)]
    body = chunk(INSERT_BODY[:7]) + chunk(INSERT_BODY[7:]) + b"0\r\n\r\n"
    result = exchange(target.srv.port, request("POST", "/insert", headers) + body)
    assert result.first is not None and result.first.status == 200, result.raw[:500]
    assert json.loads(result.first.body)["event"] == "fuzz"


# -- bodies that are not JSON, not UTF-8, or not the right JSON -------------------------------

INVALID_UTF8 = [b"\x80", b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
WRONG_SHAPES = [b"[]", b'"insert"', b"1", b"null", b"true", b"{}", b'{"event": 1, "data": 1}',
                b'{"event": "x"}', b'{"data": 1}', b'{"event": ["x"], "data": 1}',
                b'{"event": "", "data": 1}', b'{"event": "a\\nb", "data": 1}',
                b'{"event": "x", "data": NaN}', b'{"event": "x", "data": Infinity}',
                b'{"username": 5, "password": 5}', b'{"admin_token": null}',
                b'{"admin_token": ["x"], "username": {}}']


@st.composite
def broken_json(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["binary", "bad_utf8", "truncated", "wrong_shape"]))
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(INSERT_BODY)))
        return INSERT_BODY[:at] + draw(st.sampled_from(INVALID_UTF8)) + INSERT_BODY[at:]
    if kind == "truncated":
        return INSERT_BODY[:draw(st.integers(0, len(INSERT_BODY) - 1))]
    return draw(st.sampled_from(WRONG_SHAPES))


def is_acceptable_json(body: bytes) -> bool:
    """Whether a request body is strict JSON (RFC 8259) of the shape /insert accepts."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return False
    return (isinstance(value, dict) and isinstance(value.get("event"), str)
            and 0 < len(value["event"]) <= 256 and value["event"].isprintable() and "data" in value)


def _reject_constant(name: str) -> None:
    raise ValueError(name)


@FUZZ
@given(route=st.sampled_from(JSON_ROUTES), body=broken_json(),
       content_type=st.sampled_from(["application/json", "text/plain", "",
                                     "application/json; charset=utf-8"]))
@example(route="/insert", body=b'{"event": "x", "data": "\xed\xa0\x80"}',  # an encoded surrogate
         content_type="application/json")
@example(route="/insert", body=b'{"event": "x", "data": "caf\xe9"}', content_type="application/json")
def test_invalid_json_bodies(target: Target, route: str, body: bytes, content_type: str) -> None:
    assume(not is_acceptable_json(body))
    result = exchange(target.srv.port, json_post(route, body, target.bearer,
                                                 content_type=content_type))
    assert_rejected(result)
    # A body that is valid HTTP deserves an answer, not a dropped connection.
    assert result.first is not None, str(result)
    assert_still_serving(target.srv)


# These are JSON as Python reads it but hazards downstream: each must be refused with a 4xx
# or stored and served, never crash the request or the stream.
HAZARDS = [
    b'{"event": "x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"event": "x", "data": ' + b"1" * 5000 + b"}",  # past int's str-digits limit
    b'{"event": "x", "data": "\\ud800"}',  # a lone surrogate
    b'{"event": "\\udfff", "data": 1}',
    b'{"event": "x", "data": "\\u0000"}',
    b'{"event": "a", "event": "b", "data": 1}',
    b'{"event": "x", "data": 1e999}',
]


@pytest.mark.parametrize("body", HAZARDS, ids=lambda b: repr(b[:40]))
def test_json_hazards_do_not_crash(target: Target, body: bytes) -> None:
    sub = target.srv.sse({"Authorization": target.bearer})
    assert sub.status == 200
    try:
        result = exchange(target.srv.port, json_post("/insert", body, target.bearer))
        assert_no_crash(result)
        assert result.first is not None, str(result)
        if result.first.status == 200:
            # Accepted: then it reaches a subscriber as one frame of valid JSON.
            inserted = json.loads(result.first.body)
            frame = next(f for f in iter(lambda: sub.next(DEADLINE), None)
                         if f.id == inserted["id"])
            assert frame.data is not None
            # Strict JSON: NaN or Infinity would break JSON.parse in every browser.
            json.loads(frame.data, parse_constant=_reject_constant)
        else:
            assert 400 <= result.first.status < 500, str(result)
            assert_error_body(result.first)
    finally:
        sub.close()
    assert_still_serving(target.srv)


# -- duplicated and conflicting headers ------------------------------------------------------

@dataclass
class HeaderCase:
    """A POST /insert with its headers altered in one way."""

    name: str
    headers: list[tuple[str, str]]
    body: bytes
    strict: bool  # the framing or routing is ambiguous: 4xx or close, never served
    must_close: bool = False  # RFC 9112 6.1: CL + TE must close after responding


def header_case(kind: str, n: int, auth: str) -> HeaderCase:
    size = str(len(INSERT_BODY))
    base = [("Content-Type", "application/json"), ("Authorization", auth)]
    chunked = chunk(INSERT_BODY) + b"0\r\n\r\n"
    cases = {
        "two_lengths": ([("Content-Length", size), ("Content-Length", str(len(INSERT_BODY) + n))],
                        INSERT_BODY, True),
        "length_list": ([("Content-Length", f"{size}, {len(INSERT_BODY) + n}")], INSERT_BODY, True),
        "equal_lengths": ([("Content-Length", size), ("Content-Length", size)], INSERT_BODY, False),
        "bad_length": ([("Content-Length", f"+{size}")], INSERT_BODY, True),
        "negative_length": ([("Content-Length", f"-{n}")], INSERT_BODY, True),
        "length_and_chunked": ([("Content-Length", str(n)), ("Transfer-Encoding", "chunked")],
                               chunked, False),
        "two_transfer_encodings": ([("Transfer-Encoding", "chunked"),
                                    ("Transfer-Encoding", "chunked")], chunked, True),
        "gzip": ([("Transfer-Encoding", "gzip")], INSERT_BODY, True),
        "gzip_chunked": ([("Transfer-Encoding", "gzip, chunked")], chunked, True),
        "two_hosts": ([("Host", f"other{n}.example"), ("Content-Length", size)], INSERT_BODY, True),
        "space_before_colon": ([("Content-Length ", size)], INSERT_BODY, True),
        "nul_in_value": ([("X-Fuzz", "a\x00b"), ("Content-Length", size)], INSERT_BODY, True),
        "two_authorizations": ([("Authorization", "Bearer forged." * n),
                                ("Content-Length", size)], INSERT_BODY, False),
        "two_content_types": ([("Content-Type", "text/html"), ("Content-Length", size)],
                              INSERT_BODY, False),
        "obs_text_value": ([("X-Fuzz", "caf\xe9\xff" * n), ("Content-Length", size)],
                           INSERT_BODY, False),
    }
    extra, body, strict = cases[kind]
    return HeaderCase(kind, base + extra, body, strict, must_close=kind == "length_and_chunked")


@FUZZ
@given(kind=st.sampled_from(["two_lengths", "length_list", "equal_lengths", "bad_length",
                             "negative_length", "length_and_chunked", "two_transfer_encodings",
                             "gzip", "gzip_chunked", "two_hosts", "space_before_colon",
                             "nul_in_value", "two_authorizations", "two_content_types",
                             "obs_text_value"]),
       n=st.integers(1, 50))
@example(kind="gzip", n=1)  # h11 hints 501 for these two; the answer must still be a 4xx
@example(kind="two_transfer_encodings", n=1)
@example(kind="length_and_chunked", n=1)
def test_conflicting_headers(target: Target, kind: str, n: int) -> None:
    case = header_case(kind, n, target.bearer)
    payload = request("POST", "/insert", case.headers, case.body, close=not case.must_close)
    if case.must_close:
        # The answer, then one second for the close that must follow it.
        result = exchange(target.srv.port, payload, wait_for=1)
        if not result.closed:
            result = exchange(target.srv.port, payload, deadline=1.0)
        assert result.closed, f"{kind}: connection left open after the response: {result}"
    else:
        result = exchange(target.srv.port, payload)
    if case.strict:
        assert_rejected(result)
    else:
        assert_no_crash(result)
    assert_still_serving(target.srv)


def test_missing_host_is_rejected(target: Target) -> None:
    payload = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"
    result = exchange(target.srv.port, payload)
    assert_rejected(result)
    assert result.first is not None and result.first.status == 400, str(result)


# -- forged and malformed credentials --------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@st.composite
def bad_credentials(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["Basic ", "Bearer ", "basic ", "BEARER ", "Digest ", "",
                                   "Basic", "Bearer", "Bearer  "]))
    kind = draw(st.sampled_from(["text", "base64", "jwt_shaped", "none_alg"]))
    if kind == "text":
        secret = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff),
                              max_size=80))
    elif kind == "base64":
        # Random bytes: often invalid UTF-8, sometimes without a colon.
        secret = b64(draw(st.binary(max_size=60)))
    elif kind == "jwt_shaped":
        parts = [draw(st.binary(max_size=40)) for _ in range(3)]
        header = draw(st.sampled_from([None, b'{"alg":"HS256"}', b'{"alg":"none"}', b"[]",
                                       b'{"alg":"HS256","typ":"JWT"}', b'{"alg":"RS256"}']))
        if header is not None:
            parts[0] = header
        secret = ".".join(b64url(p) for p in parts)
    else:
        claims = {"sub": "fuzzer", "iss": "Broker", "aud": "", "iat": 0, "exp": 2**40}
        secret = ".".join([b64url(b'{"alg":"none","typ":"JWT"}'),
                           b64url(json.dumps(claims).encode()), ""])
    return scheme + secret


@FUZZ
@given(credentials=bad_credentials(), path=st.sampled_from(["/verify", "/sse", "/insert"]))
@example(credentials="Basic " + b64(b"\xff\xfe:" + PASSWORD.encode()), path="/verify")
@example(credentials="Basic " + b64(b"fuzzer"), path="/verify")
@example(credentials="Basic !!!", path="/insert")
@example(credentials="Basic caf\xe9", path="/verify")  # not ASCII: not base64 at all
def test_bad_credentials_are_refused(target: Target, credentials: str, path: str) -> None:
    headers = [("Authorization", credentials)]
    if path == "/insert":
        payload = json_post(path, INSERT_BODY, credentials)
    else:
        payload = request("GET", path, headers)
    result = exchange(target.srv.port, payload, wait_for=1)
    assert_no_crash(result)
    reply = result.first
    assert reply is not None, str(result)
    assert reply.status in (400, 401, 429), str(result)
    assert_error_body(reply)
    if reply.status == 401:
        assert reply.headers.get("www-authenticate"), reply.headers
    assert_still_serving(target.srv)


@FUZZ
@given(last_id=st.one_of(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff),
                                 max_size=40),
                         st.integers(-(2**80), 2**80).map(str)),
       where=st.sampled_from(["header", "query"]))
@example(last_id="9" * 30, where="header")
@example(last_id="18446744073709551616", where="query")
@example(last_id="-1", where="header")
@example(last_id=" 1", where="header")
@example(last_id="\xb2", where="header")  # a digit to str.isdigit, not to int()
def test_last_event_id_garbage(target: Target, last_id: str, where: str) -> None:
    if where == "header":
        payload = request("GET", "/sse", [("Authorization", target.bearer),
                                          ("Last-Event-ID", last_id)])
    else:
        query = "".join(f"%{byte:02X}" for byte in last_id.encode("utf-8"))
        payload = request("GET", f"/sse?last_event_id={query}",
                          [("Authorization", target.bearer)])
    result = exchange(target.srv.port, payload, wait_for=1, stream=True)
    assert b"Traceback" not in result.raw, str(result)
    status = int(result.raw.split(b" ", 2)[1]) if result.raw.startswith(b"HTTP/1.") else None
    assert status is not None, str(result)
    if not last_id.strip():
        assert status == 200, str(result)  # empty is the same as no id: the latest values
    elif parses_as_int(last_id):
        # Whether "+5" or " 7" resumes or is refused is a choice; a crash is not.
        assert status in (200, 400), str(result)
    else:
        assert status == 400, str(result)
        assert result.first is not None
        assert_error_body(result.first)
    assert_still_serving(target.srv)


def test_malformed_query_id_is_refused_beside_a_header(target: Target) -> None:
    """The header wins when both are given, but a malformed query id is still garbage."""
    payload = request("GET", "/sse?last_event_id=abc",
                      [("Authorization", target.bearer), ("Last-Event-ID", "1")])
    result = exchange(target.srv.port, payload, wait_for=1, stream=True)
    assert result.raw.startswith(b"HTTP/1.1 400"), str(result)


def parses_as_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# -- pipelined requests ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tgt = start_target(tmp_path_factory.mktemp("pipeline"), "piper")
    yield tgt
    tgt.srv.kill()


# What a pipelined request may be; `pipelined` builds it with its expected status.
PIPELINE_KINDS = ["health", "head", "verify", "insert", "bad_json", "not_found", "wrong_method",
                  "garbage"]


def pipelined(kind: str, tgt: Target) -> tuple[bytes, int | None]:
    """The request's bytes and its expected status (None: garbage that ends the exchange)."""
    auth = [("Authorization", tgt.bearer)]
    if kind == "health":
        return request("GET", "/", close=False), 200
    if kind == "head":
        return request("HEAD", "/", close=False), 200
    if kind == "verify":
        return request("GET", "/verify", auth, close=False), 200
    if kind == "insert":
        return json_post("/insert", INSERT_BODY, tgt.bearer, close=False), 200
    if kind == "bad_json":
        return json_post("/insert", b'{"event": ', tgt.bearer, close=False), 400
    if kind == "not_found":
        return request("GET", "/nope", close=False), 404
    if kind == "wrong_method":
        return request("DELETE", "/insert", auth, close=False), 405
    return b"\x00\x01 garbage \xff\r\n\r\n", None


@settings(FUZZ, max_examples=30)
@given(kinds=st.lists(st.sampled_from(PIPELINE_KINDS), min_size=2, max_size=8))
def test_pipelined_requests(pipeline_target: Target, kinds: list[str]) -> None:
    """All requests sent in one write; answers come back in order, one per request."""
    # HEAD answers carry no body; they are only unambiguous to parse at the front.
    kinds = [k for i, k in enumerate(kinds) if k != "head" or all(p == "head" for p in kinds[:i])]
    assume(len(kinds) >= 2)
    built = [pipelined(kind, pipeline_target) for kind in kinds]
    expected = []
    for _, status in built:
        if status is None:
            break
        expected.append(status)
    payload = b"".join(raw for raw, _ in built)
    if len(expected) == len(built):
        payload += request("GET", "/", close=True)  # ask the server to close at the end
        expected.append(200)
    result = exchange(pipeline_target.srv.port, payload, heads=kinds.count("head"))
    assert_no_crash(result)
    statuses = [reply.status for reply in result.replies]
    # A response may announce `Connection: close`; the requests after it may go unanswered.
    closing = next((i for i, reply in enumerate(result.replies)
                    if "close" in reply.headers.get("connection", "").lower()), None)
    if closing is not None and closing < len(expected) - 1:
        expected = expected[:closing + 1]
        built = built[:closing + 1]
    # Until the garbage, every request gets its own answer, in order.
    assert statuses[:len(expected)] == expected, (kinds, statuses, str(result))
    if len(expected) < len(built):
        # After the garbage: at most one 4xx, then the connection is closed.
        assert all(400 <= s < 500 for s in statuses[len(expected):]), str(result)
        assert len(statuses) <= len(expected) + 1, str(result)
        assert result.closed, str(result)
    ids = [json.loads(r.body)["id"] for k, r in zip(kinds, result.replies) if k == "insert"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert_still_serving(pipeline_target.srv)


# -- truncated requests (the client half-closes) ---------------------------------------------

@FUZZ
@given(route=st.sampled_from(JSON_ROUTES), data=st.data())
def test_truncated_bodies(target: Target, route: str, data: st.DataObject) -> None:
    full = json_post(route, INSERT_BODY, target.bearer)
    head_end = full.index(b"\r\n\r\n") + 4
    # Cut anywhere: inside the request line, the headers or the body, never at the end.
    cut = data.draw(st.integers(1, len(full) - 1), label="cut")
    result = exchange(target.srv.port, full[:cut], half_close=True)
    assert_no_crash(result)
    if result.first is not None:
        assert 400 <= result.first.status < 500, (cut, head_end, str(result))
        assert_error_body(result.first)
    assert_still_serving(target.srv)


def test_truncated_body_answers_fast(target: Target) -> None:
    """The EOF is final: the server must not wait for --request_timeout to give up."""
    full = json_post("/insert", INSERT_BODY, target.bearer)
    started = time.monotonic()
    result = exchange(target.srv.port, full[:-5], half_close=True)
    assert result.closed or result.first is not None
    assert time.monotonic() - started < 2.0


# -- subscribers that hang up at once --------------------------------------------------------

def test_subscribers_hanging_up_during_sync(target: Target) -> None:
    """Clients that ask for a stream and leave before (or while) the sync is written: the
    server must drop them quietly, not raise on the closed socket."""
    for i in range(5):
        assert target.srv.insert({"Authorization": target.bearer}, f"sync_{i}",
                                 {"pad": "x" * 4000}).status == 200
    payload = request("GET", "/sse", [("Authorization", target.bearer)], close=False)
    for i in range(60):
        with socket.create_connection(("127.0.0.1", target.srv.port), timeout=DEADLINE) as sock:
            sock.sendall(payload)
            if i % 2:
                sock.recv(16)  # leave after the first bytes of the head, else at once
    time.sleep(0.5)  # let the server notice the hang-ups
    assert_still_serving(target.srv)
    assert "Traceback" not in target.srv.log, traceback_excerpt(target.srv.log)


# -- the log ---------------------------------------------------------------------------------

def test_no_traceback_in_server_logs(target: Target, pipeline_target: Target) -> None:
    """Runs last in this module: nothing above made an exception escape into the logs."""
    for tgt in (target, pipeline_target):
        assert_still_serving(tgt.srv)
        assert "Traceback" not in tgt.srv.log, traceback_excerpt(tgt.srv.log)
        assert tgt.srv.proc is not None and tgt.srv.proc.poll() is None


def traceback_excerpt(log: str) -> str:
    """The log from two lines before the first traceback, enough to see what raised."""
    lines = log.splitlines()
    first = next(i for i, line in enumerate(lines) if "Traceback" in line)
    return "\n".join(lines[max(0, first - 2):first + 30])
