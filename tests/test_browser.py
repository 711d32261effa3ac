"""examples/index.html in a real browser: headless Chromium (Debian's package) via Playwright.

The page is served by a static file server on another port than the API, so every request it
makes is cross-origin and the server's CORS headers are exercised for real. The stream is the
browser's own EventSource, with `access_token` and its built-in reconnect.

What the page received is observed through the DevTools protocol (Network.eventSourceMessage-
Received), not through test hooks in the page, so a duplicate sent by the server is seen even
though the page itself would hide it.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, Server

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = ROOT / "examples"

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None,
                       reason="Playwright for Python is not installed (pip install playwright)"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

# Headless and quiet: no sandbox (we run as root in CI), and no calls home of any kind.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    """examples/ on its own loopback port: a different origin than the API."""
    handler = functools.partial(QuietHandler, directory=str(EXAMPLES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    """One browser tab on the example page, with what its EventSource received."""

    page: Page
    received_ids: list[int] = field(default_factory=list)
    # (event name, id) of every message EventSource dispatched, as DevTools saw it.
    dispatched: list[tuple[str, str]] = field(default_factory=list)
    stream_requests: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def messages(self) -> list[tuple[int, str, str]]:
        """(id, from, text) of every message shown, top to bottom."""
        rows = self.page.eval_on_selector_all(
            "#messages li",
            "items => items.map(li => [Number(li.dataset.id),"
            " li.querySelector('.from').textContent, li.querySelector('.text').textContent])")
        return [tuple(row) for row in rows]

    def state(self) -> str:
        return self.page.get_attribute("#status", "data-state") or ""

    def send(self, text: str) -> None:
        self.page.fill("#send [name=text]", text)
        self.page.click("#send button")

    def wait_for_text(self, text: str, timeout: float) -> None:
        self.page.locator("#messages li .text", has_text=text).wait_for(timeout=timeout * 1000)

    def wait_for_state(self, state: str, timeout: float = 10) -> None:
        self.page.wait_for_selector(f"#status[data-state={state}]", timeout=timeout * 1000)


def open_tab(context, site: str, server: Server, username: str, password: str,
             room: str | None = "", page_query: str = "") -> Tab:
    """A tab logged in on the example page; `room` is typed into the room field, unless it
    is None (then the field keeps what the page filled in from `page_query`)."""
    tab = Tab(context.new_page())
    cdp = context.new_cdp_session(tab.page)
    cdp.send("Network.enable")
    cdp.on("Network.eventSourceMessageReceived", lambda msg: _note_message(tab, msg))
    # The headers as sent on the wire (Last-Event-ID is only in this "extra info" event).
    cdp.on("Network.requestWillBeSentExtraInfo", lambda msg: _note_stream_request(tab, msg))
    tab.page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.page.goto(f"{site}/?api=http://127.0.0.1:{server.port}{page_query}")
    tab.page.fill("#login [name=username]", username)
    tab.page.fill("#login [name=password]", password)
    if room is not None:
        tab.page.fill("#login [name=room]", room)
    tab.page.click("#login button")
    tab.wait_for_state("live", timeout=5)
    return tab


def _note_message(tab: Tab, msg: dict) -> None:
    tab.dispatched.append((msg["eventName"], msg["eventId"]))
    tab.received_ids.append(int(msg["eventId"]))


def _note_stream_request(tab: Tab, msg: dict) -> None:
    headers = {name.lower(): value for name, value in msg["headers"].items()}
    if headers.get("accept") == "text/event-stream":
        tab.stream_requests.append(headers)


def check_list(tab: Tab, expected_texts: list[str], event: str = "chat") -> None:
    """The tab shows exactly these messages, in id order, and was sent none twice; every
    message the server sent it was an `event` (a room page's filter excludes the others)."""
    # Every stream began with a retry field and heartbeats may have come: neither may
    # have dispatched a message.
    others = [(name, ident) for name, ident in tab.dispatched if name != event or not ident]
    assert others == [], f"the server sent {len(others)} message(s) other than {event}: {others}"
    shown = tab.messages()
    assert [text for _, _, text in shown] == expected_texts
    ids = [ident for ident, _, _ in shown]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert len(set(tab.received_ids)) == len(tab.received_ids), \
        f"the server sent an event twice: {tab.received_ids}"
    assert sorted(tab.received_ids) == ids, (tab.received_ids, ids)
    assert tab.errors == []


def test_two_tabs_chat_live_and_catch_up_after_restart(browser, site, server):
    for name in ("alice", "bob"):
        assert server.create_user(name, f"password-{name}", tenant="demo").status == 200
    carol = server.user("carol", tenant="demo")  # the test's own writer, over plain HTTP
    context = browser.new_context()
    alice = open_tab(context, site, server, "alice", "password-alice")
    bob = open_tab(context, site, server, "bob", "password-bob")

    # Live, both ways, each within a second of the click.
    alice.send("hello from alice")
    bob.wait_for_text("hello from alice", timeout=1)
    bob.send("hi alice")
    alice.wait_for_text("hi alice", timeout=1)
    bob.wait_for_text("hi alice", timeout=1)  # its own message comes back by the stream too
    assert [m[1:] for m in bob.messages()] == [("alice", "hello from alice"), ("bob", "hi alice")]

    # Restart the broker. While the tabs are cut off, messages arrive over HTTP. The tabs'
    # stream requests are refused until then, so these are certainly missed, not live.
    for tab in (alice, bob):
        tab.page.route("**/sse?*", lambda route: route.abort())
    server.restart()
    for tab in (alice, bob):
        tab.wait_for_state("reconnecting")
    missed = [f"missed {n}" for n in range(3)]
    for text in missed:
        assert server.insert(carol, "chat", {"from": "carol", "text": text}).status == 200
    for tab in (alice, bob):
        tab.page.unroute("**/sse?*")

    # EventSource reconnects by itself (its retry delay is about 3 s) and catches up.
    for tab in (alice, bob):
        tab.wait_for_text(missed[-1], timeout=10)
        tab.wait_for_state("live", timeout=2)
    alice.send("back again")
    bob.wait_for_text("back again", timeout=1)
    alice.wait_for_text("back again", timeout=1)

    expected = ["hello from alice", "hi alice", *missed, "back again"]
    for tab in (alice, bob):
        check_list(tab, expected)
        # The reconnect that succeeded resumed from the last id seen before the restart.
        resumed = [r for r in tab.stream_requests if "last-event-id" in r]
        assert resumed, tab.stream_requests
        assert resumed[-1]["last-event-id"] == str(tab.messages()[1][0])

    # A newcomer's tab gets the whole history (last_event_id=0), then live messages.
    newcomer = open_tab(context, site, server, "carol", "correct horse 1")
    newcomer.wait_for_text("back again", timeout=2)
    check_list(newcomer, expected)
    context.close()


def test_a_room_page_receives_only_its_rooms_messages(browser, site, server):
    # A page logged in with a room posts `chat.<room>` events and subscribes with
    # ?event=chat.<room>: the server sends it that room's history and live messages, and
    # nothing of the other rooms or of the room-less page's "chat" events. What the server
    # sent is what DevTools saw arrive, whether or not the page listens for it.
    for name in ("dora", "eve"):
        assert server.create_user(name, f"password-{name}", tenant="rooms").status == 200
    frank = server.user("frank", tenant="rooms")  # the test's own writer, over plain HTTP
    history = [("chat.lobby", "lobby history"), ("chat.kitchen", "kitchen history"),
               ("chat", "room-less history"), ("chat.lobbyist", "another room"),
               ("chat.lobby", "lobby history 2")]
    for event, text in history:
        assert server.insert(frank, event, {"from": "frank", "text": text}).status == 200
    context = browser.new_context()
    dora = open_tab(context, site, server, "dora", "password-dora", room="lobby")
    # Eve's room comes from the page's URL (?room=), as a shared link would give it.
    eve = open_tab(context, site, server, "eve", "password-eve", None, "&room=kitchen")
    dora.wait_for_text("lobby history 2", timeout=5)
    eve.wait_for_text("kitchen history", timeout=5)

    dora.send("hello lobby")
    dora.wait_for_text("hello lobby", timeout=2)
    eve.send("hello kitchen")
    eve.wait_for_text("hello kitchen", timeout=2)
    for event, text in [("chat", "room-less live"), ("chat.kitchen", "kitchen live"),
                        ("chat.lobby.sub", "a sub-room"), ("chat.lobby", "lobby end"),
                        ("chat.kitchen", "kitchen end")]:
        assert server.insert(frank, event, {"from": "frank", "text": text}).status == 200
    # Each stream is in id order: once its last message is shown, anything else sent
    # before it has arrived too.
    dora.wait_for_text("lobby end", timeout=2)
    eve.wait_for_text("kitchen end", timeout=2)
    check_list(dora, ["lobby history", "lobby history 2", "hello lobby", "lobby end"],
               event="chat.lobby")
    check_list(eve, ["kitchen history", "hello kitchen", "kitchen live", "kitchen end"],
               event="chat.kitchen")
    for tab, room in ((dora, "lobby"), (eve, "kitchen")):
        assert tab.page.get_attribute("#status", "data-state") == "live"
        assert f"in room {room}" in tab.page.text_content("#status")
    context.close()


def test_wrong_password_shows_the_error(browser, site, server):
    assert server.create_user("erin", "password-erin").status == 200
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{site}/?api=http://127.0.0.1:{server.port}")
    page.fill("#login [name=username]", "erin")
    page.fill("#login [name=password]", "not her password")
    page.click("#login button")
    page.wait_for_function("document.querySelector('#error').textContent !== ''", timeout=5000)
    assert page.is_visible("#login") and not page.is_visible("#room")
    assert page.get_attribute("#status", "data-state") == "signed-out"
    context.close()

