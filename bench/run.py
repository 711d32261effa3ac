"""Run the benchmark and write docs/bench/results.md, results.png and results.json.

    python bench/run.py --quick          # short smoke run (about a minute per server)
    python bench/run.py                  # the full run (5,000 subscribers, 10,000 idle streams)
    python bench/run.py --servers broker,nchan --scenarios fanout,memory

Every server is started fresh on a free loopback port, alone (one at a time), and the same
client drives all of them in the same run, so the ratios between them are what to read.
See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Self

import loadgen
from loadgen import Channel, PublishPlan, percentile
from servers import ALL_SERVERS, PG_SERVERS, Broker, Server, nginx_version, server_factories

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["fanout", "latency", "memory", "inserts", "connects", "scopes", "restart",
             "steady"]
# The permission groups of the scopes scenario: different scopes, but each may read "bench".
SCOPE_GROUPS = [["bench:get"], ["b*:get"], ["*:get"], ["bench:get", "news:get"]]
SPAWN = mp.get_context("spawn")


@dataclass
class Settings:
    """Sizes and bounds of one run. Every loop below is bounded by a count and a time."""

    fanout_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    fanout_deliveries: int = 1_000_000  # events per size = this / subscribers
    fanout_publishers: int = 16  # concurrent keep-alive publisher connections
    fanout_max_seconds: float = 30.0  # publishing stops after this, whatever the count
    latency_subscribers: int = 1000
    latency_rate: float = 200.0
    latency_seconds: float = 10.0
    steady_subscribers: int = 10_000  # one large tenant, one publisher at a steady rate,
    steady_rate: float = 10.0  # and meanwhile a request timed on another connection
    steady_seconds: float = 10.0
    steady_request_rate: float = 50.0
    memory_sizes: list[int] = field(default_factory=lambda: [5000, 10000])
    insert_publishers: list[int] = field(default_factory=lambda: [1, 16, 64])
    insert_seconds: float = 5.0
    connect_total: int = 10_000
    connect_concurrency: int = 16
    connect_sync: int = 100
    connect_max_seconds: float = 20.0
    restart_subscribers: int = 10_000
    restart_rate: float = 10.0  # events/s of the one publisher, through the restart
    restart_after: float = 2.0  # seconds of publishing before the restart
    restart_publish_seconds: float = 8.0
    restart_gate: int = 1000  # reconnect handshakes in flight (the listen backlog is 2048)
    probes: int = 32  # subscribers per run that record the latency of every frame
    # Subscriber processes (each holds at most ~19,000 streams). Two, so that the client can
    # use what the server leaves of both cores: one Python process reading one frame per recv
    # (nchan writes every event separately) tops out near 300k frames/s.
    sub_procs: int = 2
    connect_gate: int = 100  # stream handshakes in flight while subscribers connect
    drain_stall: float = 5.0  # give up waiting for deliveries after this long without progress
    drain_timeout: float = 120.0
    pad: int = 48  # bytes of padding in each event's data (the event is about 100 bytes)
    scopes_subscribers: int = 1000  # spread over the SCOPE_GROUPS
    scopes_deliveries: int = 5_000_000  # per run: long enough for a stable rate
    scopes_rounds: int = 3  # fresh servers with --enforce_scopes off, then on, this many times


QUICK = Settings(fanout_sizes=[100, 1000], fanout_deliveries=100_000, fanout_max_seconds=10,
                 latency_seconds=3, steady_subscribers=2000, steady_seconds=3,
                 memory_sizes=[1000, 2000], insert_seconds=2,
                 connect_total=300, connect_max_seconds=5, drain_timeout=30,
                 scopes_deliveries=500_000, scopes_rounds=1, restart_subscribers=1000)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# -- client processes ---------------------------------------------------------------------------
def spawn(target: Callable, *args: object) -> tuple[mp.process.BaseProcess, object]:
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def run_process(target: Callable, *args: object, timeout: float = 300.0) -> dict:
    """Run a one-shot client process and return the dict it sends back."""
    proc, conn = spawn(target, *args)
    try:
        if not conn.poll(timeout):
            raise TimeoutError(f"{target.__name__} gave no result in {timeout:.0f}s")
        return conn.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


class Subscribers:
    """`total` SSE streams held by `settings.sub_procs` processes."""

    def __init__(self, channel: Channel | tuple[Channel, ...], total: int, settings: Settings,
                 probes: int) -> None:
        procs = max(1, min(settings.sub_procs, total))
        shares = [total // procs + (i < total % procs) for i in range(procs)]
        gate = max(1, settings.connect_gate // procs)
        self.children = [spawn(loadgen.subscriber_main, channel, share,
                               round(probes * share / total), gate) for share in shares]
        timeout = 60 + total / 50
        self.ready = {"connected": 0, "failed": 0, "errors": {}, "connect_seconds": 0.0}
        for _, conn in self.children:
            if not conn.poll(timeout):
                self.close()
                raise TimeoutError("subscribers did not connect in time")
            part = conn.recv()
            self.ready["connected"] += part["connected"]
            self.ready["failed"] += part["failed"]
            self.ready["connect_seconds"] = max(self.ready["connect_seconds"],
                                                part["connect_seconds"])
            for error, count in part["errors"].items():
                self.ready["errors"][error] = self.ready["errors"].get(error, 0) + count

    def ask(self, command: str) -> list:
        for _, conn in self.children:
            conn.send(command)
        return [conn.recv() for _, conn in self.children]

    def received(self) -> int:
        return sum(count for count, _ in self.ask("count"))

    def wait_for(self, expected: int, settings: Settings) -> int:
        """Poll until `expected` frames arrived, progress stalls, or the drain timeout."""
        deadline = time.monotonic() + settings.drain_timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            got = self.received()
            if got >= expected:
                return got
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > settings.drain_stall:
                return got
            time.sleep(0.05)
        return self.received()

    def collect(self) -> dict:
        parts = self.ask("collect")
        return {"received": sum(p["received"] for p in parts),
                "min_per_stream": min(p["min_per_stream"] for p in parts),
                "closed_by_server": sum(p["closed_by_server"] for p in parts),
                "last_frame": max(p["last_frame"] for p in parts),
                "samples": [s for p in parts for s in p["samples"]],
                "cpu": sum(p["cpu"] for p in parts), "loop": parts[0]["loop"]}

    def close(self) -> None:
        for proc, conn in self.children:
            try:
                conn.send("close")
                conn.poll(10) and conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- scenarios ----------------------------------------------------------------------------------
def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def fanout(server: Server, subscribers: int, events: int, rate: float, settings: Settings,
           channels: tuple[Channel, tuple[Channel, ...]] | None = None) -> dict:
    """Publish `events` to `subscribers` streams of one tenant; deliveries/s, latency, loss.
    `channels`: the publisher's, and those the streams take turns with (one by default)."""
    channel, streams = channels or (server.new_channel(),) * 2
    with Subscribers(streams, subscribers, settings, settings.probes) as subs:
        subs.ask("reset")
        cpu_before = server.cpu_seconds()
        plan = PublishPlan(channel, events, settings.fanout_publishers, rate,
                           settings.fanout_max_seconds, settings.pad)
        pub = run_process(loadgen.publisher_main, plan)
        expected = pub["accepted"] * subs.ready["connected"]
        subs.wait_for(expected, settings)
        got = subs.collect()
        server_cpu = server.cpu_seconds() - cpu_before
    return summarize_fanout(subs.ready, pub, got, expected, server_cpu)


def summarize_fanout(ready: dict, pub: dict, got: dict, expected: int,
                     server_cpu: float) -> dict:
    sends = pub["send_times"]
    latencies = [t - sends[seq] for seq, t in got["samples"] if seq < len(sends)]
    last = got["last_frame"] or pub["finished"]  # no frame at all: the publishing time
    elapsed = max(last - pub["started"], 1e-9)
    publish_seconds = max(pub["finished"] - pub["started"], 1e-9)
    return {
        "subscribers": ready["connected"], "connect_failed": ready["failed"],
        "connect_errors": ready["errors"], "connect_seconds": round(ready["connect_seconds"], 2),
        "events": pub["accepted"], "publish_statuses": pub["statuses"],
        "published_per_s": round(pub["accepted"] / publish_seconds),
        "deliveries": got["received"], "expected": expected,
        "lost": max(0, expected - got["received"]),
        "deliveries_per_s": round(got["received"] / elapsed) if got["received"] else 0,
        "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=None)), "latency_samples": len(latencies),
        "closed_by_server": got["closed_by_server"],
        "seconds": round(elapsed, 2),
        "server_cpu_pct": round(100 * server_cpu / elapsed),
        "subscriber_cpu_pct": round(100 * got["cpu"] / elapsed),
        "publisher_cpu_pct": round(100 * pub["cpu"] / elapsed),
    }


def steady(server: Server, settings: Settings) -> dict:
    """One publisher at a steady rate to a large tenant, and meanwhile another connection's
    request (broker: `GET /verify`) timed: what every other request waits behind a fan-out."""
    channel = server.new_channel()
    with Subscribers(channel, settings.steady_subscribers, settings, settings.probes) as subs:
        subs.ask("reset")
        cpu_before = server.cpu_seconds()
        events = int(settings.steady_rate * settings.steady_seconds)
        plan = PublishPlan(channel, events, 1, settings.steady_rate,
                           settings.steady_seconds + 30, settings.pad)
        requester, answer = spawn(loadgen.requester_main, channel,
                                  settings.steady_request_rate, settings.steady_seconds)
        pub = run_process(loadgen.publisher_main, plan)
        timed = answer.recv() if answer.poll(settings.steady_seconds + 60) else {}
        requester.join(10)
        expected = pub["accepted"] * subs.ready["connected"]
        subs.wait_for(expected, settings)
        got = subs.collect()
        server_cpu = server.cpu_seconds() - cpu_before
    row = summarize_fanout(subs.ready, pub, got, expected, server_cpu)
    row.update({"requests": timed.get("requests", 0), "request_statuses": timed.get("statuses"),
                "request_p50_ms": ms(timed.get("p50")), "request_p99_ms": ms(timed.get("p99")),
                "request_max_ms": ms(timed.get("max"))})
    return row


def memory(factory: Callable[[], Server], streams: int, settings: Settings) -> dict:
    """RSS per idle stream on a fresh server; then one event must reach every stream."""
    server = factory().start()
    try:
        channel = server.new_channel()
        with Subscribers(channel, 1, settings, 0):  # warm the stream code path once
            time.sleep(0.2)
        time.sleep(0.5)
        before = server.rss_kib()
        with Subscribers(channel, streams, settings, 0) as subs:
            time.sleep(1.0)
            after = server.rss_kib()
            subs.ask("reset")
            pub = run_process(loadgen.publisher_main, PublishPlan(channel, 1, 1, pad=settings.pad))
            delivered = subs.wait_for(streams, settings)
            held = subs.ready["connected"] - subs.collect()["closed_by_server"]
        connected = subs.ready["connected"]
        return {"streams": connected, "failed": subs.ready["failed"],
                "connect_errors": subs.ready["errors"],
                "connect_seconds": round(subs.ready["connect_seconds"], 2),
                "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_stream": round((after - before) / max(connected, 1), 2),
                "held": held, "event_delivered_to": delivered if pub["accepted"] else 0,
                "publish_statuses": pub["statuses"]}
    finally:
        server.stop()


def inserts(server: Server, publishers: int, auth: str, settings: Settings) -> dict:
    """Durable inserts/s: `publishers` keep-alive connections, each waiting for its 200."""
    channel = server.new_channel(auth)  # type: ignore[call-arg]
    plan = PublishPlan(channel, 1_000_000, publishers, 0, settings.insert_seconds, settings.pad,
                       record_sends=False)
    cpu_before = server.cpu_seconds()
    pub = run_process(loadgen.publisher_main, plan)
    seconds = max(pub["finished"] - pub["started"], 1e-9)
    server_cpu = server.cpu_seconds() - cpu_before
    return {"publishers": publishers, "auth": auth, "accepted": pub["accepted"],
            "statuses": pub["statuses"], "inserts_per_s": round(pub["accepted"] / seconds),
            "p50_ms": ms(pub["request_p50"]), "p99_ms": ms(pub["request_p99"]),
            "max_ms": ms(pub["request_max"]), "seconds": round(seconds, 2),
            "server_cpu_pct": round(100 * server_cpu / seconds),
            "publisher_cpu_pct": round(100 * pub["cpu"] / seconds)}


def connects(server: Server, settings: Settings) -> dict:
    """New authenticated streams per second, each reading a sync of `connect_sync` events."""
    channel = server.new_channel()
    plan = PublishPlan(channel, settings.connect_sync, 4, 0, 60, settings.pad,
                       record_sends=False, distinct_events=True)
    pub = run_process(loadgen.publisher_main, plan)
    cpu_before = server.cpu_seconds()
    storm = run_process(loadgen.storm_main, channel, settings.connect_total,
                        settings.connect_concurrency, pub["accepted"],
                        settings.connect_max_seconds)
    server_cpu = server.cpu_seconds() - cpu_before
    return {"sync_events": pub["accepted"], "completed": storm["completed"],
            "errors": storm["errors"], "connects_per_s": round(storm["connects_per_s"]),
            "p50_ms": ms(storm["p50"]), "p99_ms": ms(storm["p99"]),
            "server_cpu_pct": round(100 * server_cpu / storm["seconds"]),
            "client_cpu_pct": round(100 * storm["cpu"] / storm["seconds"])}


def restart(server: Broker, settings: Settings) -> dict:
    """Subscribers with a sync of `connect_sync` events, a restart while one publisher
    inserts, and every subscriber resuming at once with Last-Event-ID."""
    channel = server.new_channel()
    tenant = server.tenant_name()
    run_process(loadgen.publisher_main, PublishPlan(
        channel, settings.connect_sync, 4, 0, 60, settings.pad, record_sends=False,
        distinct_events=True))
    seed_max = server.newest_id()
    total = settings.restart_subscribers
    procs = max(1, min(settings.sub_procs, total))
    shares = [total // procs + (i < total % procs) for i in range(procs)]
    children = [spawn(loadgen.resumer_main, channel, share, seed_max,
                      max(1, settings.restart_gate // procs)) for share in shares]
    try:
        for _, conn in children:
            if not conn.poll(60 + total / 50):
                raise TimeoutError("subscribers did not connect in time")
            conn.recv()
        publisher, pub_conn = spawn(loadgen.publisher_main, PublishPlan(
            channel, 1_000_000, 1, settings.restart_rate, settings.restart_publish_seconds,
            settings.pad, record_sends=False))
        time.sleep(settings.restart_after)
        ask(children, "down")
        stopped_at = time.monotonic()
        ready_at = server.restart()
        ask(children, "up")
        pub = pub_conn.recv() if pub_conn.poll(settings.restart_publish_seconds + 60) else {}
        publisher.join(10)
        expected = server.events_after(tenant, seed_max)
        deadline, received = time.monotonic() + settings.drain_timeout, 0
        while time.monotonic() < deadline and received < expected * total:
            received = sum(ask(children, "count")[i][0] for i in range(procs))
            time.sleep(0.1)
        streaming = sum(part[1] for part in ask(children, "count"))
        parts = ask(children, "collect")
    finally:
        for proc, conn in children:
            with contextlib.suppress(OSError, EOFError):
                conn.send("close")
                conn.poll(10) and conn.recv()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    counts = [count for part in parts for count in part["counts"]]
    back = [at - ready_at for part in parts for at in part["streaming_at"]]
    return {"subscribers": total, "sync_events": settings.connect_sync,
            "restart_seconds": round(ready_at - stopped_at, 2),
            "all_streaming_seconds": round(max(back), 2),
            "streaming_p50_seconds": round(percentile(back, 50) or 0, 2),
            "streaming_p90_seconds": round(percentile(back, 90) or 0, 2),
            "streaming": streaming, "resumed": sum(p["resumed"] for p in parts),
            "events": expected, "publish_statuses": pub.get("statuses"),
            "lost": sum(max(0, expected - count) for count in counts),
            "duplicated": sum(p["disorder"] for p in parts)
            + sum(max(0, count - expected) for count in counts)}


def ask(children: list, command: str) -> list:
    for _, conn in children:
        conn.send(command)
    return [conn.recv() for _, conn in children]


# -- driver -------------------------------------------------------------------------------------
@contextmanager
def profiled(server: Server, out_dir: str | None, name: str) -> Iterator[None]:
    """Record a py-spy flame graph of the server while the block runs (when asked to)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not out_dir or not server.name.startswith("broker") or not Path(py_spy).exists():
        yield
        return
    path = Path(out_dir) / f"{server.name}-{name}.svg"
    path.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pids()[0]), "-o", str(path),
                            "-r", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes the graph when interrupted
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
        log(f"  profile: {path}")


def run_server(name: str, factory: Callable[[], Server], scenarios: list[str],
               settings: Settings, results: dict, profile_dir: str | None = None) -> None:
    """Scenarios 1, 2, 4 and 5 on one server process (memory and scopes get fresh ones)."""
    wanted = [s for s in scenarios if s not in ("memory", "scopes")]
    if not wanted:
        return
    server = factory().start()
    results["loops"][name] = server.loop()
    try:
        if "fanout" in wanted:
            for size in settings.fanout_sizes:
                events = max(10, settings.fanout_deliveries // size)
                log(f"{name}: fan-out to {size} subscribers, {events} events")
                with profiled(server, profile_dir, f"fanout-{size}"):
                    row = fanout(server, size, events, 0, settings)
                results["fanout"].setdefault(str(size), {})[name] = row
                log(f"  {row['deliveries_per_s']:,} deliveries/s, p99 {row['p99_ms']} ms, "
                    f"lost {row['lost']}, server cpu {row['server_cpu_pct']}%, "
                    f"subscriber cpu {row['subscriber_cpu_pct']}%")
                time.sleep(1)
        if "latency" in wanted:
            events = int(settings.latency_rate * settings.latency_seconds)
            log(f"{name}: {settings.latency_rate:.0f} events/s to "
                f"{settings.latency_subscribers} subscribers")
            row = fanout(server, settings.latency_subscribers, events, settings.latency_rate,
                         settings)
            results["latency"][name] = row
            log(f"  p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, lost {row['lost']}")
            time.sleep(1)
        if "steady" in wanted:
            log(f"{name}: {settings.steady_rate:.0f} events/s to {settings.steady_subscribers:,} "
                f"subscribers, {settings.steady_request_rate:.0f} other requests/s")
            row = steady(server, settings)
            results["steady"][name] = row
            log(f"  delivery p99 {row['p99_ms']} ms, request p99 {row['request_p99_ms']} ms, "
                f"lost {row['lost']}")
            time.sleep(1)
        if server.durable and "inserts" in wanted:
            for auth in ("bearer", "basic"):
                for publishers in settings.insert_publishers:
                    log(f"{name}: durable inserts, {publishers} publishers, {auth}")
                    with profiled(server, profile_dir, f"inserts-{publishers}-{auth}"):
                        row = inserts(server, publishers, auth, settings)
                    results["inserts"].setdefault(f"{publishers} {auth}", {})[name] = row
                    log(f"  {row['inserts_per_s']:,} inserts/s, p99 {row['p99_ms']} ms, "
                        f"statuses {row['statuses']}")
        if server.durable and "connects" in wanted:
            log(f"{name}: connects with a sync of {settings.connect_sync} events")
            with profiled(server, profile_dir, "connects"):
                row = connects(server, settings)
            results["connects"][name] = row
            log(f"  {row['connects_per_s']:,} connects/s, p99 {row['p99_ms']} ms, "
                f"errors {row['errors']}")
        if server.durable and "restart" in wanted:
            log(f"{name}: restart with {settings.restart_subscribers:,} subscribers resuming")
            row = restart(server, settings)  # type: ignore[arg-type]
            results["restart"][name] = row
            log(f"  all streaming {row['all_streaming_seconds']} s after ready, "
                f"{row['streaming']:,} streaming, lost {row['lost']}, "
                f"duplicated {row['duplicated']}, {row['events']} events")
    finally:
        server.stop()


def run_memory(name: str, factory: Callable[[], Server], settings: Settings,
               results: dict) -> None:
    for size in settings.memory_sizes:
        log(f"{name}: memory with {size} idle streams (fresh process)")
        row = memory(factory, size, settings)
        results["memory"].setdefault(str(size), {})[name] = row
        log(f"  {row['kib_per_stream']} KiB per stream, failed {row['failed']}, "
            f"event delivered to {row['event_delivered_to']}")


def scopes(factory: Callable[[], Server], settings: Settings,
           profile_dir: str | None = None) -> dict:
    """Fan-out to subscribers of one tenant in the four SCOPE_GROUPS, on fresh servers with
    --enforce_scopes off and on, alternately; the best run of each, and on ÷ off of the
    best and of the median runs."""
    size = settings.scopes_subscribers
    events = max(10, settings.scopes_deliveries // size)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(settings.scopes_rounds):
        for mode, rows in runs.items():
            server = factory()
            assert isinstance(server, Broker)
            if mode == "on":
                server.extra_args = [*server.extra_args, "--enforce_scopes"]
            server.start()
            try:
                channels = server.scoped_channels(SCOPE_GROUPS)
                with profiled(server, profile_dir, f"scopes-{mode}"):
                    rows.append(fanout(server, size, events, 0, settings, channels))
            finally:
                server.stop()
            log(f"  enforcement {mode}: {rows[-1]['deliveries_per_s']:,} deliveries/s, "
                f"lost {rows[-1]['lost']}")
    rates = {mode: [row["deliveries_per_s"] for row in rows] for mode, rows in runs.items()}
    best = {mode: max(rows, key=lambda row: row["deliveries_per_s"])
            for mode, rows in runs.items()}
    return {"groups": SCOPE_GROUPS, "subscribers": size, **best, "runs": runs,
            "on_vs_off": round(max(rates["on"]) / max(max(rates["off"]), 1), 3),
            "median_on_vs_off": round(median(rates["on"]) / max(median(rates["off"]), 1), 3)}


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("uvloop", "starlette", "uvicorn", "sse-starlette", "h11"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["nginx"] = nginx_version()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "fsync_ms": fsync_ms(), "tmpdir": tempfile.gettempdir(),
            "python": platform.python_version(), "client_loop": client_loop(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def fsync_ms(count: int = 100) -> float:
    """Latency of a small write + fsync where the servers' files go (TMPDIR): it bounds
    how fast durable inserts can be acknowledged."""
    with tempfile.NamedTemporaryFile() as handle:
        started = time.perf_counter()
        for _ in range(count):
            handle.write(b"x" * 128)
            handle.flush()
            os.fsync(handle.fileno())
        return round((time.perf_counter() - started) / count * 1000, 3)


def client_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def merge_previous(results: dict, scenarios: list[str], previous_path: Path) -> None:
    """Take the scenarios that did not run now from an earlier results file."""
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    date = previous.get("ran_at", {})
    results.setdefault("ran_at", {})
    for scenario in SCENARIOS:
        if scenario not in scenarios and previous.get(scenario):
            results[scenario] = previous[scenario]
            results["ran_at"][scenario] = date.get(scenario, previous["machine"]["date"])
            for name in previous.get("servers", []):
                if name not in results["servers"]:
                    results["servers"].append(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="broker benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="short smoke run with small sizes")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help="comma-separated, from: " + ", ".join(ALL_SERVERS + PG_SERVERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from: " + ", ".join(SCENARIOS))
    parser.add_argument("--fanout-sizes", help="subscriber counts, e.g. 100,1000,5000")
    parser.add_argument("--memory-sizes", help="idle stream counts, e.g. 5000,10000")
    parser.add_argument("--sub-procs", type=int, help="subscriber processes (default 2)")
    parser.add_argument("--publishers", type=int,
                        help="concurrent publisher connections in fan-out (default 16)")
    parser.add_argument("--nchan-workers", type=int, default=0,
                        help="nginx worker processes (default: auto, one per core)")
    parser.add_argument("--broker-args", default="",
                        help='extra broker flags, e.g. --broker-args="--max_connections 20000"')
    parser.add_argument("--py-spy", metavar="DIR",
                        help="record a py-spy flame graph of broker for each fan-out, insert "
                             "and connect run into DIR (needs `pip install py-spy`, root or "
                             "ptrace rights)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the scenarios not run now from the results.json in --out "
                             "(each table notes the date of the run it comes from)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench"),
                        help="directory for results.md, results.png and results.json")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else Settings()
    if args.fanout_sizes:
        settings.fanout_sizes = [int(x) for x in args.fanout_sizes.split(",")]
    if args.memory_sizes:
        settings.memory_sizes = [int(x) for x in args.memory_sizes.split(",")]
    if args.sub_procs:
        settings.sub_procs = args.sub_procs
    if args.publishers:
        settings.fanout_publishers = args.publishers
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    loadgen.raise_fd_limit()
    factories = server_factories([s for s in args.servers.split(",") if s], args.nchan_workers,
                                 shlex.split(args.broker_args))
    machine_info = machine()
    results: dict = {"machine": machine_info, "settings": asdict(settings), "quick": args.quick,
                     "broker_args": args.broker_args,
                     "ran_at": {scenario: machine_info["date"] for scenario in scenarios},
                     "servers": list(factories), "loops": {},
                     **{scenario: {} for scenario in SCENARIOS}}
    log(f"servers: {', '.join(factories)}; scenarios: {', '.join(scenarios)}")
    started = time.monotonic()
    for name, factory in factories.items():
        run_server(name, factory, scenarios, settings, results, args.py_spy)
        if "memory" in scenarios:
            run_memory(name, factory, settings, results)
        if "scopes" in scenarios and name.startswith("broker"):
            log(f"{name}: fan-out to {settings.scopes_subscribers} subscribers in "
                f"{len(SCOPE_GROUPS)} permission groups, --enforce_scopes off vs on")
            results["scopes"][name] = scopes(factory, settings, args.py_spy)
            row = results["scopes"][name]
            log(f"  on ÷ off: {row['on_vs_off']:.2f} (best runs), "
                f"{row['median_on_vs_off']:.2f} (median runs)")
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started)
    if args.merge:
        merge_previous(results, scenarios, Path(args.out) / "results.json")
    import report  # matplotlib is imported only now, after the measurements

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.chart(results, out / "results.png")
    log(f"wrote {out / 'results.md'}, results.png and results.json in {results['seconds']}s")


if __name__ == "__main__":
    main()
