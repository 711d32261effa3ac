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
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any, Self

import loadgen
from loadgen import Channel, PublishPlan, expected_frames, percentile
from servers import (
    ALL_SERVERS,
    BASE_SERVER,
    PG_SERVERS,
    Broker,
    Server,
    base_checkout,
    nginx_version,
    server_factories,
)

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["fanout", "latency", "memory", "inserts", "connects", "scopes", "restart",
             "steady", "filters"]
# What a run without --scenarios does: all but `filters` (stream filters, issue 20), which
# is on request until the server has them, so the published results keep their shape.
DEFAULT_SCENARIOS = [s for s in SCENARIOS if s != "filters"]
# The permission groups of the scopes scenario: different scopes, but each may read "bench".
SCOPE_GROUPS = [["bench:get"], ["b*:get"], ["*:get"], ["bench:get", "news:get"]]
# The stream filters of issue 20 (`GET /sse?event=...`): events cycle over 20 names, and 10
# distinct filters, exact names and prefixes, each match two of them and every name is matched
# by one filter, so every event goes to a tenth of the subscribers.
FILTER_NAMES = tuple(f"f{i:02d}" for i in range(20))
FILTERS = (*((f"f{2 * i:02d}", f"f{2 * i + 1:02d}") for i in range(8)), ("f16", "f17*"),
           ("f18*", "f19*"))
# The filters scenario's kinds of run with subscribers: 1,000 unfiltered, 1,000 filtered, and
# "tenth", 100 unfiltered, which get as many frames per event as the filtered ones.
FILTER_MODES = ("unfiltered", "filtered", "tenth")
SPAWN = mp.get_context("spawn")


@dataclass
class Settings:
    """Sizes and bounds of one run. Every loop below is bounded by a count and a time."""

    fanout_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000])
    fanout_deliveries: int = 1_000_000  # events per size = this / subscribers
    fanout_publishers: int = 16  # concurrent keep-alive publisher connections
    fanout_max_seconds: float = 30.0  # publishing stops after this, whatever the count
    latency_subscribers: int = 1000
    latency_rates: list[float] = field(default_factory=lambda: [200.0])  # one row each
    latency_publishers: int = 0  # publisher connections at a fixed rate; 0: fanout_publishers
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
    filter_subscribers: int = 1000  # spread evenly over the FILTERS, or all unfiltered
    # Publish rates of the filters scenario, one comparison each; 0 is the publishers' flood.
    filter_rates: list[float] = field(default_factory=lambda: [50.0, 0.0])
    filter_seconds: float = 10.0  # at a fixed rate: rate x this events, one publisher
    filter_deliveries: int = 2_000_000  # flood: unfiltered deliveries; events = this / subs
    filter_rounds: int = 3  # fresh servers unfiltered, then filtered, this many times
    memory_filtered: bool = False  # memory: also streams opened with the FILTERS (broker)


QUICK = Settings(fanout_sizes=[100, 1000], fanout_deliveries=100_000, fanout_max_seconds=10,
                 latency_seconds=3, steady_subscribers=2000, steady_seconds=3,
                 memory_sizes=[1000, 2000], insert_seconds=2,
                 connect_total=300, connect_max_seconds=5, drain_timeout=30,
                 scopes_deliveries=500_000, scopes_rounds=1, restart_subscribers=1000,
                 filter_seconds=3, filter_deliveries=300_000, filter_rounds=1)


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
        channels = len(channel) if isinstance(channel, tuple) else 1
        self.ready: dict[str, Any] = {"connected": 0, "failed": 0, "errors": {},
                                      "connect_seconds": 0.0, "by_channel": [0] * channels}
        for _, conn in self.children:
            if not conn.poll(timeout):
                self.close()
                raise TimeoutError("subscribers did not connect in time")
            part = conn.recv()
            self.ready["connected"] += part["connected"]
            self.ready["failed"] += part["failed"]
            self.ready["connect_seconds"] = max(self.ready["connect_seconds"],
                                                part["connect_seconds"])
            for index, count in enumerate(part["by_channel"]):
                self.ready["by_channel"][index] += count
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
                "reads": sum(p["reads"] for p in parts),
                "counts_by_channel": [[c for p in parts for c in p["counts_by_channel"][k]]
                                      for k in range(len(self.ready["by_channel"]))],
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
           channels: tuple[Channel, tuple[Channel, ...]] | None = None,
           publishers: int = 0) -> dict:
    """Publish `events` to `subscribers` streams of one tenant; deliveries/s, latency, loss.
    `channels`: the publisher's, and those the streams take turns with (one by default);
    `publishers`: connections (default: settings.fanout_publishers)."""
    channel, streams = channels or (server.new_channel(),) * 2
    publishers = publishers or settings.fanout_publishers
    with Subscribers(streams, subscribers, settings, settings.probes) as subs:
        subs.ask("reset")
        cpu_before = server.cpu_seconds()
        plan = PublishPlan(channel, events, publishers, rate, settings.fanout_max_seconds,
                           settings.pad)
        pub = run_process(loadgen.publisher_main, plan)
        expected = pub["accepted"] * subs.ready["connected"]
        subs.wait_for(expected, settings)
        got = subs.collect()
        server_cpu = server.cpu_seconds() - cpu_before
    row = summarize_fanout(subs.ready, pub, got, expected, server_cpu, rate)
    row["publishers"] = publishers
    return row


def summarize_fanout(ready: dict, pub: dict, got: dict, expected: int,
                     server_cpu: float, rate: float = 0.0) -> dict:
    """`rate`: the publishing was at a fixed rate; then the latency is also measured from
    when each event was due (start + seq / rate), which counts the wait of the events that
    a publisher behind its schedule sent late (the latency from the send does not)."""
    sends = pub["send_times"]
    latencies = [t - sends[seq] for seq, t in got["samples"] if seq < len(sends)]
    from_due = [t - pub["started"] - seq / rate for seq, t in got["samples"]
                if seq < len(sends)] if rate else []
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
        "p99_from_due_ms": ms(percentile(from_due, 99)), "rate": rate,
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


def memory(factory: Callable[[], Server], streams: int, settings: Settings,
           filtered: bool = False) -> dict:
    """RSS per idle stream on a fresh server; then one event must reach every stream.
    `filtered` (broker): the streams take turns with the FILTERS, and one event of each of
    the FILTER_NAMES is published, of which every stream should get the ones it matches."""
    server = factory().start()
    try:
        channel = server.new_channel()
        streams_of = stream_channels(channel, filtered)
        with Subscribers(streams_of, 1, settings, 0):  # warm the stream code path once
            time.sleep(0.2)
        time.sleep(0.5)
        before = server.rss_kib()
        with Subscribers(streams_of, streams, settings, 0) as subs:
            time.sleep(1.0)
            after = server.rss_kib()
            subs.ask("reset")
            names = FILTER_NAMES if filtered else ()
            pub = run_process(loadgen.publisher_main, PublishPlan(
                channel, len(names) or 1, 1, pad=settings.pad, event_names=names))
            expected = expected_deliveries(subs.ready["by_channel"], filtered, pub)
            delivered = subs.wait_for(expected, settings)
            held = subs.ready["connected"] - subs.collect()["closed_by_server"]
        connected = subs.ready["connected"]
        return {"streams": connected, "failed": subs.ready["failed"],
                "connect_errors": subs.ready["errors"],
                "connect_seconds": round(subs.ready["connect_seconds"], 2),
                "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_stream": round((after - before) / max(connected, 1), 2),
                "held": held, "event_delivered_to": delivered if pub["accepted"] else 0,
                "expected_deliveries": expected, "filtered": filtered,
                "publish_statuses": pub["statuses"]}
    finally:
        server.stop()


def stream_channels(channel: Channel, filtered: bool) -> tuple[Channel, ...]:
    """The channels a tenant's streams take turns with: the plain stream, or one per filter
    of FILTERS (`/sse?event=a&event=b*`, same credentials)."""
    if not filtered:
        return (channel,)
    return tuple(replace(channel, sse_path="/sse?" + "&".join(f"event={p}" for p in patterns))
                 for patterns in FILTERS)


def per_stream_expected(filtered: bool, pub: dict) -> list[int]:
    """Frames one stream of each channel of stream_channels() should get of what `pub`
    published: what its filter matches (all of it unfiltered)."""
    if not filtered:
        return [pub["accepted"]]
    return [expected_frames(patterns, pub["accepted_by_event"]) for patterns in FILTERS]


def expected_deliveries(by_channel: list[int], filtered: bool, pub: dict) -> int:
    """Frames all the connected streams should get, given how many hold each channel."""
    return sum(n * e for n, e in zip(by_channel, per_stream_expected(filtered, pub), strict=True))


def filter_plan(channel: Channel, rate: float, settings: Settings) -> PublishPlan:
    """What the filters scenario publishes: `rate` events/s for filter_seconds from one
    connection, or (rate 0) filter_deliveries ÷ filter_subscribers events flooded by the
    fan-out's publishers; the events cycle over FILTER_NAMES."""
    if rate:
        events, publishers = int(rate * settings.filter_seconds), 1
    else:
        events = max(10, settings.filter_deliveries // settings.filter_subscribers)
        publishers = settings.fanout_publishers
    return PublishPlan(channel, events, publishers, rate, settings.fanout_max_seconds,
                       settings.pad, event_names=FILTER_NAMES)


def publish_alone(server: Server, rate: float, settings: Settings) -> dict:
    """The filters scenario's publishing with no subscriber: the server CPU of the inserts
    alone, to take out of the runs' CPU per frame (see compare_filters)."""
    plan = filter_plan(server.new_channel(), rate, settings)
    cpu_before = server.cpu_seconds()
    pub = run_process(loadgen.publisher_main, plan)
    time.sleep(0.5)  # as the runs with subscribers do after their last frame
    server_cpu = server.cpu_seconds() - cpu_before
    return {"mode": "alone", "events": pub["accepted"], "publishers": plan.concurrency,
            "published_per_s": round(pub["accepted"] / max(pub["finished"] - pub["started"],
                                                            1e-9)),
            "server_cpu_s": round(server_cpu, 3),
            "us_per_event": round(1e6 * server_cpu / max(pub["accepted"], 1), 1)}


def filtered_fanout(server: Server, mode: str, rate: float, settings: Settings) -> dict:
    """One run of the filters scenario: events of filter_plan() to a fresh tenant's
    `filter_subscribers` streams, spread evenly over the FILTERS ("filtered") or all
    unfiltered ("unfiltered"), or to a tenth as many unfiltered streams ("tenth": as many
    frames per event as filtered, without filters). Server CPU per delivered frame; lost and
    extra frames counted per stream against its filter."""
    filtered = mode == "filtered"
    channel = server.new_channel()
    streams = stream_channels(channel, filtered)
    count = settings.filter_subscribers // (len(FILTERS) if mode == "tenth" else 1)
    with Subscribers(streams, count, settings, settings.probes) as subs:
        subs.ask("reset")
        cpu_before = server.cpu_seconds()
        plan = filter_plan(channel, rate, settings)
        pub = run_process(loadgen.publisher_main, plan)
        expected = expected_deliveries(subs.ready["by_channel"], filtered, pub)
        subs.wait_for(expected, settings)
        time.sleep(0.5)  # frames beyond the filter (a bug, or a server without filters)
        got = subs.collect()
        server_cpu = server.cpu_seconds() - cpu_before
    row = summarize_fanout(subs.ready, pub, got, expected, server_cpu)
    wanted = per_stream_expected(filtered, pub)
    counts = [(wanted[k], count) for k, part in enumerate(got["counts_by_channel"])
              for count in part]
    row.update({"mode": mode, "subscribers": count, "rate": rate,
                "publishers": plan.concurrency,
                "lost": sum(max(0, want - count) for want, count in counts),
                "extra": sum(max(0, count - want) for want, count in counts),
                "server_cpu_s": round(server_cpu, 3),
                "us_per_frame": round(1e6 * server_cpu / got["received"], 2)
                if got["received"] else None,
                "frames_per_read": round(got["received"] / max(got["reads"], 1), 2)})
    return row


def filters(factory: Callable[[], Server], settings: Settings,
            profile_dir: str | None = None) -> dict:
    """For each of the filter_rates: fresh servers with unfiltered subscribers, filtered
    ones, a tenth as many unfiltered ones and none (the inserts alone), in turn,
    filter_rounds times; compare_filters."""
    results = {}
    for rate in settings.filter_rates:
        runs: dict[str, list[dict]] = {mode: [] for mode in FILTER_MODES + ("alone",)}
        for _ in range(settings.filter_rounds):
            for mode, rows in runs.items():
                server = factory().start()
                try:
                    with profiled(server, profile_dir, f"filters-{mode}-{rate:g}"):
                        rows.append(publish_alone(server, rate, settings) if mode == "alone"
                                    else filtered_fanout(server, mode, rate, settings))
                finally:
                    server.stop()
                log_filter_run(rows[-1])
        results[f"{rate:g}/s" if rate else "flood"] = compare_filters(runs)
    return results


def log_filter_run(row: dict) -> None:
    if row["mode"] == "alone":
        log(f"  no subscriber: {row['us_per_event']} µs server CPU per insert, "
            f"{row['events']} events")
        return
    log(f"  {row['mode']} ({row['subscribers']:,}): {row['us_per_frame']} µs server CPU "
        "per frame, "
        f"{row['deliveries']:,} frames (expected {row['expected']:,}), lost {row['lost']}, "
        f"extra {row['extra']}, {row['frames_per_read']} frames per read")


def compare_filters(runs: dict[str, list[dict]]) -> dict:
    """The cheapest run of each kind and filtered ÷ unfiltered (and filtered ÷ tenth) of the
    cheapest and of the median runs, by server CPU per frame as measured ("gross") and
    without the inserts' own CPU ("net": the median CPU per event of the runs without
    subscribers, times the run's events, taken out). The inserts cost the same in every run
    but are spread over a tenth as many frames when filtered; net compares the delivery
    alone, and filtered ÷ tenth compares runs with as many frames per event."""
    per_event = median(row["server_cpu_s"] / max(row["events"], 1) for row in runs["alone"])
    for row in [row for mode in FILTER_MODES for row in runs[mode]]:
        net = row["server_cpu_s"] - per_event * row["events"]
        row["net_us_per_frame"] = round(1e6 * net / row["deliveries"], 2) \
            if row["deliveries"] else None
    out: dict = {"filters": [list(patterns) for patterns in FILTERS],
                 "names": len(FILTER_NAMES), "runs": runs,
                 "insert_us": round(per_event * 1e6, 1)}
    for metric, prefix in (("us_per_frame", ""), ("net_us_per_frame", "net_")):
        costs = {mode: [row[metric] for row in runs[mode] if row[metric]]
                 for mode in FILTER_MODES}
        for mode, values in costs.items():
            out[f"{prefix}{mode}_us"] = min(values) if values else None
        for peer in ("unfiltered", "tenth"):
            both = costs["filtered"] and costs[peer]
            out[f"{prefix}filtered_vs_{peer}"] = round(
                min(costs["filtered"]) / min(costs[peer]), 3) if both else None
            out[f"{prefix}median_filtered_vs_{peer}"] = round(
                median(costs["filtered"]) / median(costs[peer]), 3) if both else None
    for mode in FILTER_MODES:
        out[f"{mode}_frames_per_read"] = median(row["frames_per_read"] for row in runs[mode])
    return out


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
            publishers = settings.latency_publishers or settings.fanout_publishers
            for rate in settings.latency_rates:
                log(f"{name}: {rate:g} events/s to {settings.latency_subscribers} subscribers, "
                    f"{publishers} publisher connections")
                row = fanout(server, settings.latency_subscribers,
                             int(rate * settings.latency_seconds), rate, settings,
                             publishers=publishers)
                results["latency"].setdefault(f"{rate:g}", {})[name] = row
                log(f"  p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                    f"published {row['published_per_s']}/s, lost {row['lost']}")
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
    with_filters = settings.memory_filtered and name.startswith("broker")
    for size in settings.memory_sizes:
        for filtered in (False, True) if with_filters else (False,):
            kind = f"filtered ({len(FILTERS)} filters) " if filtered else ""
            log(f"{name}: memory with {size} idle {kind}streams (fresh process)")
            row = memory(factory, size, settings, filtered)
            results["memory"].setdefault(f"{size} filtered" if filtered else str(size),
                                         {})[name] = row
            log(f"  {row['kib_per_stream']} KiB per stream, failed {row['failed']}, "
                f"delivered {row['event_delivered_to']} (expected {row['expected_deliveries']})")


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
                        help="comma-separated, from: "
                             + ", ".join([*ALL_SERVERS, *PG_SERVERS, BASE_SERVER]))
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help="comma-separated, from: " + ", ".join(SCENARIOS))
    parser.add_argument("--fanout-sizes", help="subscriber counts, e.g. 100,1000,5000")
    parser.add_argument("--memory-sizes", help="idle stream counts, e.g. 5000,10000")
    parser.add_argument("--sub-procs", type=int, help="subscriber processes (default 2)")
    parser.add_argument("--publishers", type=int,
                        help="concurrent publisher connections in fan-out (default 16)")
    parser.add_argument("--latency-rates",
                        help="events/s of the latency scenario, one row each (default 200)")
    parser.add_argument("--latency-publishers", type=int,
                        help="publisher connections in the latency scenario (default: as "
                             "--publishers)")
    parser.add_argument("--filter-rates",
                        help="events/s of the filters scenario, 0 = the publishers' flood "
                             "(default 50,0)")
    parser.add_argument("--filter-rounds", type=int,
                        help="fresh servers unfiltered then filtered, per rate (default 3)")
    parser.add_argument("--memory-filtered", action="store_true",
                        help="memory: also idle broker streams opened with 10 filters")
    parser.add_argument("--base-ref", metavar="REF",
                        help="git ref of this repository that broker-base runs (exported to "
                             "a temporary directory)")
    parser.add_argument("--base-dir", metavar="DIR",
                        help="checkout that broker-base runs (instead of --base-ref)")
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
    if args.latency_rates:
        settings.latency_rates = [float(x) for x in args.latency_rates.split(",")]
    if args.latency_publishers:
        settings.latency_publishers = args.latency_publishers
    if args.filter_rates:
        settings.filter_rates = [float(x) for x in args.filter_rates.split(",")]
    if args.filter_rounds:
        settings.filter_rounds = args.filter_rounds
    settings.memory_filtered = args.memory_filtered
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    names = [s for s in args.servers.split(",") if s]
    if BASE_SERVER in names and not (args.base_ref or args.base_dir):
        sys.exit(f"{BASE_SERVER} needs --base-ref REF or --base-dir DIR")
    loadgen.raise_fd_limit()
    with base_checkout(args.base_ref, args.base_dir) as base:
        factories = server_factories(names, args.nchan_workers, shlex.split(args.broker_args),
                                     base.get("dir"))
        results = measure(args, settings, scenarios, factories)
        results["base"] = {"commit": base.get("commit"), "describe": base.get("describe")}
    write(results, args, scenarios)


def measure(args: argparse.Namespace, settings: Settings, scenarios: list[str],
            factories: dict[str, Callable[[], Server]]) -> dict:
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
        if "filters" in scenarios and name.startswith("broker"):
            log(f"{name}: {settings.filter_subscribers} subscribers in {len(FILTERS)} stream "
                f"filters vs unfiltered, events over {len(FILTER_NAMES)} names")
            results["filters"][name] = filters(factory, settings, args.py_spy)
            for regime, row in results["filters"][name].items():
                log(f"  {regime}: filtered ÷ unfiltered CPU per frame "
                    f"{row['filtered_vs_unfiltered']} (cheapest runs), "
                    f"{row['median_filtered_vs_unfiltered']} (median runs); without the "
                    f"inserts' own CPU {row['net_filtered_vs_unfiltered']}, "
                    f"{row['net_median_filtered_vs_unfiltered']}")
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started)
    return results


def write(results: dict, args: argparse.Namespace, scenarios: list[str]) -> None:
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
