"""The official npm client, `broker-client` 0.0.8, against the real server.

tests/npm/driver.mjs is a small Node program that uses the package exactly as a front end
does (fetch for the JSON endpoints, `new BrokerClient(url, {headers: {authorization}})` for
the stream). It is bundled with esbuild first, because the package's extensionless ES module
imports only load through a bundler (see the comment at the top of driver.mjs).

What broker-client needs from the wire format, read off its source:
- frames end at the first "\\n\\n"; single "\\n"s inside a frame are dropped, so every field
  must sit on one line and data must be compact JSON;
- fields are found with indexOf("id:"), indexOf("event:"), indexOf("data:"), so no space
  after the colon;
- bytes become characters one by one (String.fromCharCode), so data must be ASCII: non-ASCII
  text has to travel as JSON \\u escapes;
- every frame reaches `onmessage`, comments included, but named listeners only see frames
  whose `event:` matches.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Server, basic, bearer, wait_or_kill

NPM_DIR = Path(__file__).resolve().parent / "npm"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(
    not (NODE and NPM), reason="node and npm are needed to run the broker-client npm package")


def _install_npm_deps() -> None:
    """`npm ci` from the lock file when node_modules is missing (a clean clone, CI)."""
    installed = all((NPM_DIR / "node_modules" / name / "package.json").exists()
                    for name in ("broker-client", "esbuild"))
    if installed:
        return
    command = [NPM, "ci" if (NPM_DIR / "package-lock.json").exists() else "install",
               "--no-audit", "--no-fund"]
    done = subprocess.run(command, cwd=NPM_DIR, check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """driver.mjs and broker-client bundled into one file by esbuild."""
    _install_npm_deps()
    out = tmp_path_factory.mktemp("npm") / "driver.mjs"
    esbuild = NPM_DIR / "node_modules" / ".bin" / "esbuild"
    done = subprocess.run(
        [str(esbuild), "driver.mjs", "--bundle", "--platform=node", "--format=esm",
         "--target=node20", "--log-level=warning", f"--outfile={out}"],
        cwd=NPM_DIR, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def run_driver(bundle: Path, *args: str) -> dict:
    """Run a one-shot driver command and return the JSON it printed."""
    done = subprocess.run([NODE, str(bundle), *args], check=False, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class NodeSubscriber:
    """A broker-client subscription in a Node process; each callback it reports is a dict."""

    def __init__(self, bundle: Path, server: Server, authorization: str, events: list[str],
                 path: str = "/sse"):
        self.proc = subprocess.Popen(
            [NODE, str(bundle), "subscribe", base_url(server) + path, authorization, *events],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.calls: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.calls.put(json.loads(line))

    def next_call(self, timeout: float = 5.0) -> dict:
        try:
            return self.calls.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"broker-client reported nothing within {timeout}s; "
                                 f"node stderr: {self.stderr_so_far()}") from None

    def listener_calls(self, count: int, timeout: float = 5.0) -> list[dict]:
        """The next `count` calls of named listeners (onmessage/onopen calls are skipped)."""
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        while len(found) < count:
            call = self.next_call(max(0.01, deadline - time.monotonic()))
            if call["via"] == "listener":
                found.append(call)
        return found

    def calls_within(self, seconds: float) -> list[dict]:
        """Every callback reported during the next `seconds`."""
        deadline = time.monotonic() + seconds
        found: list[dict] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                found.append(self.calls.get(timeout=left))
            except queue.Empty:
                break
        return found

    def calls_until_closed(self, timeout: float = 5.0) -> list[dict]:
        """Every callback up to and including onclose (the server ended the stream)."""
        deadline = time.monotonic() + timeout
        found = [self.next_call(max(0.01, deadline - time.monotonic()))]
        while found[-1]["via"] != "onclose":
            found.append(self.next_call(max(0.01, deadline - time.monotonic())))
        return found

    def stderr_so_far(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()  # type: ignore[union-attr]

    def close(self) -> None:
        # Closing stdin makes the driver call client.close() and exit.
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            wait_or_kill(self.proc)


@pytest.fixture
def subscribers():
    started: list[NodeSubscriber] = []

    def subscribe(bundle: Path, server: Server, authorization: str,
                  events: list[str], path: str = "/sse") -> NodeSubscriber:
        sub = NodeSubscriber(bundle, server, authorization, events, path)
        started.append(sub)
        return sub

    yield subscribe
    for sub in started:
        sub.close()


def node_user(bundle: Path, server: Server, username: str, password: str = "pass:word 1",
              tenant: str = "tenant_1") -> str:
    """Create a user and log in, both from Node; return the JWT."""
    body = {"username": username, "password": password, "admin_token": server.admin_token,
            "tenant_name": tenant, "scopes": [], "email": None, "data": None}
    created = run_driver(bundle, "create_user", base_url(server), json.dumps(body))
    assert created["status"] == 200, created
    logged_in = run_driver(bundle, "login", base_url(server), username, password)
    assert logged_in["status"] == 200, logged_in
    return logged_in["body"]["jwt"]


def check_delivered(call: dict, inserted: dict, event: str, data) -> None:
    """One listener call carries exactly what one insert stored."""
    assert call["type"] == event
    assert call["lastEventId"] == str(inserted["id"])
    assert json.loads(call["data"]) == data


def test_create_user_and_login_from_node(bundle, server):
    jwt = node_user(bundle, server, "ada")
    assert jwt.count(".") == 2
    assert server.get("/verify", headers=bearer(jwt)).json()["username"] == "ada"
    wrong = run_driver(bundle, "login", base_url(server), "ada", "not the password")
    assert wrong["status"] == 401
    assert "error" in wrong["body"]


def test_bearer_latest_values_then_live_events_in_order(bundle, server, subscribers):
    auth = bearer(node_user(bundle, server, "ada"))
    server.insert(auth, "greeting", "old")  # superseded: must not be synced
    count = server.insert(auth, "count", 1).json()
    greeting = server.insert(auth, "greeting", {"text": "hello"}).json()

    sub = subscribers(bundle, server, auth["Authorization"], ["greeting", "count", "chat"])
    synced = sub.listener_calls(2)
    check_delivered(synced[0], count, "count", 1)
    check_delivered(synced[1], greeting, "greeting", {"text": "hello"})

    sent = []
    for n in range(20):
        event = ("chat", "count")[n % 2]
        data = {"n": n, "text": f"message {n}", "nested": [n, None, True]}
        sent.append((server.insert(auth, event, data).json(), event, data))
    live = sub.listener_calls(len(sent))
    for call, (inserted, event, data) in zip(live, sent):
        check_delivered(call, inserted, event, data)
    extra = [c for c in sub.calls_within(0.3) if c["via"] == "listener"]
    assert extra == [], "nothing more than what was inserted"


def test_basic_auth_subscription(bundle, server, subscribers):
    password = "s3cret:with:colons"
    jwt = node_user(bundle, server, "bob", password)
    first = server.insert(bearer(jwt), "status", "online").json()

    sub = subscribers(bundle, server, basic("bob", password)["Authorization"], ["status"])
    check_delivered(sub.listener_calls(1)[0], first, "status", "online")
    second = server.insert(bearer(jwt), "status", "away").json()
    check_delivered(sub.listener_calls(1)[0], second, "status", "away")


def test_large_payload_arrives_intact(bundle, server, subscribers):
    auth = bearer(node_user(bundle, server, "ada"))
    sub = subscribers(bundle, server, auth["Authorization"], ["doc", "after"])
    ready = server.insert(auth, "after", "ready").json()
    check_delivered(sub.listener_calls(1)[0], ready, "after", "ready")

    # About 200 KB of compact JSON, with characters broker-client's parser cares about
    # ("\n", ":", "data:", "event:") inside strings.
    rows = [{"row": i, "text": f"line {i}\nkey: value data:x event:y", "values": list(range(10))}
            for i in range(2400)]
    doc = {"rows": rows, "total": len(rows)}
    assert len(json.dumps(doc, separators=(",", ":"))) > 200_000
    big = server.insert(auth, "doc", doc).json()
    after = server.insert(auth, "after", "done").json()  # the frame after must stay separate

    calls = sub.listener_calls(2, timeout=10)
    check_delivered(calls[0], big, "doc", doc)
    check_delivered(calls[1], after, "after", "done")


def test_non_ascii_data_survives_broker_client(bundle, server, subscribers):
    # broker-client turns each byte into one character, so raw UTF-8 would arrive garbled;
    # the server has to send non-ASCII text as JSON \u escapes for it to arrive intact.
    auth = bearer(node_user(bundle, server, "ada"))
    text = {"fr": "café crème", "ja": "こんにちは", "emoji": "🙂", "math": "∑ ≠ ∞"}
    sub = subscribers(bundle, server, auth["Authorization"], ["text"])
    first = server.insert(auth, "text", "start").json()
    check_delivered(sub.listener_calls(1)[0], first, "text", "start")
    inserted = server.insert(auth, "text", text).json()
    check_delivered(sub.listener_calls(1)[0], inserted, "text", text)


def test_a_filtered_url_delivers_only_the_matching_events(bundle, server, subscribers):
    # broker-client takes a URL and headers: the filter (issue 20) is part of the URL.
    # Listeners for every name are registered, so an event the filter lets through wrongly
    # would be reported; onmessage would see it too.
    auth = bearer(node_user(bundle, server, "ada"))
    names = ["chat.room1", "chat.room2", "chatroom", "news", "chat.room1.thread"]
    synced = {name: server.insert(auth, name, {"old": name}).json() for name in names}
    sub = subscribers(bundle, server, auth["Authorization"], names,
                      path="/sse?event=chat.room1&event=news")
    first = sub.listener_calls(2)
    types = [call["type"] for call in first]
    assert types == ["chat.room1", "news"], f"the sync holds events the filter excludes: {types}"
    check_delivered(first[0], synced["chat.room1"], "chat.room1", {"old": "chat.room1"})
    check_delivered(first[1], synced["news"], "news", {"old": "news"})

    sent = []
    for n in range(12):
        event = names[n % len(names)]
        data = {"n": n}
        sent.append((server.insert(auth, event, data).json(), event, data))
    wanted = [entry for entry in sent if entry[1] in ("chat.room1", "news")]
    live = sub.listener_calls(len(wanted))
    types = [call["type"] for call in live]
    assert types == [event for _, event, _ in wanted], f"live, excluded events came: {types}"
    for call, (inserted, event, data) in zip(live, wanted, strict=True):
        check_delivered(call, inserted, event, data)
    later = [c for c in sub.calls_within(0.3) if c["via"] == "listener"]
    assert later == [], f"events the filter excludes: {later}"


def test_heartbeat_triggers_no_listener(bundle, make_server, subscribers):
    server = make_server("--heartbeat", "1")
    auth = bearer(node_user(bundle, server, "ada"))
    first = server.insert(auth, "tick", 0).json()
    # "message" too: EventSource users often listen for it, and broker-client would call it
    # for a frame whose event field parsed as "message".
    sub = subscribers(bundle, server, auth["Authorization"], ["tick", "message"])
    check_delivered(sub.listener_calls(1)[0], first, "tick", 0)

    idle = sub.calls_within(2.6)
    assert [c for c in idle if c["via"] == "listener"] == [], idle
    # broker-client passes every frame to onmessage, a comment included, as a message with an
    # empty type and empty data; seeing those proves heartbeats were really sent meanwhile.
    heartbeats = [c for c in idle if c["via"] == "onmessage"]
    assert len(heartbeats) >= 2, f"expected heartbeats on an idle stream, got {idle}"
    assert all(c["type"] == "" and c["data"] == "" for c in heartbeats), heartbeats

    # The parser's state is still clean: the next event arrives whole.
    later = server.insert(auth, "tick", 1).json()
    check_delivered(sub.listener_calls(1)[0], later, "tick", 1)


def test_retry_field_triggers_no_listener(bundle, server, subscribers):
    # Every stream begins with a `retry:` frame. broker-client parses fields with indexOf on
    # the whole frame, so a bare "retry:2345" would reach it as an event named ":234" with data
    # "y:234"; the frame is built so that it sees an empty one instead, as for a heartbeat.
    auth = bearer(node_user(bundle, server, "ada"))  # an empty tenant: no sync after it
    sub = subscribers(bundle, server, auth["Authorization"], ["tick", "message", "retry"])
    first = sub.calls_within(1.0)
    assert [c["via"] for c in first] == ["onopen", "onmessage"], first
    assert (first[1]["type"], first[1]["data"], first[1]["lastEventId"]) == ("", "", ""), first
    inserted = server.insert(auth, "tick", 1).json()
    check_delivered(sub.listener_calls(1)[0], inserted, "tick", 1)


def test_rejected_token_delivers_nothing(bundle, server, subscribers):
    jwt = node_user(bundle, server, "ada")
    server.insert(bearer(jwt), "secret", 42)
    forged = jwt[:-4] + ("AAAA" if not jwt.endswith("AAAA") else "BBBB")
    sub = subscribers(bundle, server, f"Bearer {forged}", ["secret"])
    # broker-client does not look at the status: the 401's JSON body must not parse as an
    # event, and the stream must end rather than hang.
    calls = sub.calls_until_closed(timeout=3)
    assert [c for c in calls if c["via"] == "listener"] == [], calls
