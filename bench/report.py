"""Turn the results dict of bench/run.py into results.md (tables) and results.png (chart)."""

from __future__ import annotations

from pathlib import Path

# The servers broker's ratios are computed against: the peers, and broker-base (broker run
# from another checkout, e.g. today's code) when it ran.
PEERS = ("broker-base", "starlette", "nchan")
BASE = "broker-base"


def fmt(value: object, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}×"


def statuses(counts: dict | None) -> str:
    """{200: 5} -> "200 ×5" (JSON turns the keys into strings; -1 is a connection error)."""
    if not counts:
        return "—"
    return ", ".join(f"{'error' if str(k) == '-1' else k} ×{n}" for k, n in counts.items())


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def reference(results: dict) -> str | None:
    """The broker variant the ratios are computed for: the default one when it ran."""
    brokers = [s for s in results["servers"] if s.startswith("broker")]
    return "broker" if "broker" in brokers else (brokers[0] if brokers else None)


def peers(results: dict) -> list[str]:
    return [s for s in results["servers"] if s in PEERS]


def side_by_side(results: dict, section: dict, metric: str, label: str) -> str:
    """Rows: the scenario parameter; columns: every server's `metric`, then broker ÷ peer."""
    servers, ref = results["servers"], reference(results)
    header = [label, *servers] + [f"{ref} ÷ {peer}" for peer in peers(results) if ref]
    rows = []
    for key, by_server in section.items():
        values = [by_server.get(s, {}).get(metric) for s in servers]
        ref_value = by_server.get(ref, {}).get(metric) if ref else None
        ratios = [ratio(ref_value, by_server.get(p, {}).get(metric)) for p in peers(results)]
        rows.append([key_label(key), *values, *(ratios if ref else [])])
    return table(header, rows)


def from_earlier(results: dict, scenario: str) -> str:
    """A note when a scenario's numbers were merged in from an earlier run (run.py --merge)."""
    ran_at = results.get("ran_at", {}).get(scenario)
    if ran_at and ran_at != results["machine"]["date"]:
        return f"*From an earlier run, on {ran_at}.*\n"
    return ""


def machine_section(results: dict) -> str:
    m = results["machine"]
    loops = ", ".join(f"{name}: {loop}" for name, loop in results["loops"].items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"- CPU: {m['cpu']}, {m['cores']} cores; Linux {m['kernel']}; Python {m['python']}\n"
            f"- Event loops: client {m['client_loop']}; servers: {loops or '—'}\n"
            f"- Disk: a 128-byte write + fsync takes {m.get('fsync_ms', '—')} ms in "
            f"{m.get('tmpdir', '—')}, where the servers' files are\n"
            f"- Load average before / after: {m['load_average']} / "
            f"{m.get('load_average_after', '—')} (a shared machine: other work ran meanwhile)\n"
            f"- Versions: {versions}\n"
            + (f"- broker flags added: `{results['broker_args']}`\n"
               if results.get("broker_args") else ""))


def fanout_section(results: dict) -> str:
    section = results["fanout"]
    if not section:
        return ""
    s = results["settings"]
    out = ["## 1. Fan-out: deliveries/s to N subscribers of one tenant\n",
           from_earlier(results, "fanout"),
           (f"Events published as fast as the server accepts them over {s['fanout_publishers']} "
            f"keep-alive connections, {s['fanout_deliveries']:,} deliveries per size "
            f"(events = that ÷ N). Deliveries/s (higher is better):\n"),
           side_by_side(results, section, "deliveries_per_s", "subscribers"),
           "\nPublish-to-receive latency p99 in ms (lower is better):\n",
           side_by_side(results, section, "p99_ms", "subscribers"), "\nDetails:\n"]
    out.append(details(section, "subscribers"))
    return "\n".join(out)


def details(section: dict, label: str, fixed_rate: bool = False) -> str:
    """Every row of a fan-out-like section; `fixed_rate` adds how much of the rate was kept
    and the p99 counted from when each event was due."""
    header = [label, "server", "events", "published/s", "deliveries/s", "p50 ms", "p99 ms",
              "lost", "server CPU %", "subscriber CPU %", "connect s"]
    header += ["rate kept", "p99 from due ms"] if fixed_rate else []
    rows = []
    for key, by_server in section.items():
        for name, r in by_server.items():
            rows.append([key_label(key), name, r["events"],
                         r["published_per_s"], r["deliveries_per_s"], r["p50_ms"], r["p99_ms"],
                         r["lost"], r["server_cpu_pct"], r["subscriber_cpu_pct"],
                         r["connect_seconds"]])
            if fixed_rate:
                rows[-1] += [kept(r["published_per_s"], float(key)), r.get("p99_from_due_ms")]
    return table(header, rows)


def kept(published: float, rate: float) -> str:
    """Published/s as a share of the rate; flagged when the publisher fell behind."""
    share = published / rate if rate else 0
    return f"{share:.0%}" + (" ⚠ behind" if share < 0.95 else "")


def key_label(key: str) -> object:
    """A section key for a table: "1000" -> 1000 (shown 1,000), "1000 filtered" -> "1,000
    filtered", anything else as it is."""
    first, _, rest = key.partition(" ")
    if not first.isdigit():
        return key
    return f"{int(first):,} {rest}" if rest else int(first)


def latency_by_rate(results: dict) -> dict:
    """{rate: {server: row}}; results of runs before the rates were settable held one rate's
    {server: row} (settings latency_rate), which --merge may bring in."""
    section = results.get("latency") or {}
    if any("p99_ms" in row for row in section.values()):
        return {f"{results['settings'].get('latency_rate', 200):g}": section}
    return section


def latency_section(results: dict) -> str:
    section = latency_by_rate(results)
    if not section:
        return ""
    s = results["settings"]
    publishers = sorted({row.get("publishers", s["fanout_publishers"])
                         for by_server in section.values() for row in by_server.values()})
    return "\n".join([
        (f"## 2. Latency at a fixed rate to {s['latency_subscribers']:,} subscribers "
         f"({s['latency_seconds']:.0f} s per rate)\n"),
        from_earlier(results, "latency"),
        (f"Events published at each rate over {' or '.join(map(str, publishers))} keep-alive "
         "publisher connection(s) (`--latency-publishers`); a server that cannot keep up "
         "shows it as published/s below the rate (\"rate kept\" below 95% is flagged: its "
         "latencies then come from a lighter load than the others') and as growing latency. "
         "The latency is counted from when the request was written; \"p99 from due\" counts "
         "it from when the event was due by the schedule, so it includes the wait of the "
         "events a publisher behind its schedule sent late. p50 in ms (lower is better):\n"),
        side_by_side(results, section, "p50_ms", "events/s"),
        "\np99 in ms (lower is better):\n",
        side_by_side(results, section, "p99_ms", "events/s"),
        "\nDetails:\n", details(section, "events/s", fixed_rate=True)])


def steady_section(results: dict) -> str:
    section = results.get("steady")
    if not section:
        return ""
    s = results["settings"]
    rows = [[name, r["subscribers"], r["events"], r["published_per_s"], r["p50_ms"], r["p99_ms"],
             r["lost"], r["requests"], r["request_p50_ms"], r["request_p99_ms"],
             r["request_max_ms"], r["server_cpu_pct"]] for name, r in section.items()]
    return "\n".join([
        (f"## 8. A large tenant at a steady rate: {s['steady_rate']:.0f} events/s to "
         f"{s['steady_subscribers']:,} subscribers ({s['steady_seconds']:.0f} s)\n"),
        from_earlier(results, "steady"),
        (f"One publisher; meanwhile another connection sends {s['steady_request_rate']:.0f} "
         "requests/s (broker: `GET /verify` with a Bearer JWT; nchan: `GET /`, a static "
         "answer; the Starlette peer has no such route and answers 404) and times each: "
         "how long any other request waits behind a fan-out.\n"),
        table(["server", "subscribers", "events", "published/s", "delivery p50 ms",
               "delivery p99 ms", "lost", "requests", "request p50 ms", "request p99 ms",
               "request max ms", "server CPU %"], rows)])


def memory_section(results: dict) -> str:
    section = results["memory"]
    if not section:
        return ""
    header = ["streams", "server", "connected", "failed", "RSS before MiB", "RSS after MiB",
              "KiB per stream", "still open", "frames delivered (expected)", "publish"]
    rows = [[key_label(key), name, r["streams"], r["failed"],
             round(r["rss_before_kib"] / 1024, 1),
             round(r["rss_after_kib"] / 1024, 1), r["kib_per_stream"], r["held"],
             f"{r['event_delivered_to']:,} ({r.get('expected_deliveries', r['streams']):,})",
             statuses(r.get("publish_statuses"))]
            for key, by_server in section.items() for name, r in by_server.items()]
    return "\n".join([
        "## 3. Memory: resident set per idle stream (fresh server process)\n",
        from_earlier(results, "memory"),
        ("(RSS with N open streams − RSS before) ÷ N, VmRSS of all the server's processes. "
         "\"N filtered\": broker's streams opened with `?event=` filters, 10 distinct ones "
         "(`--memory-filtered`). KiB per stream (lower is better):\n"),
        side_by_side(results, section, "kib_per_stream", "streams"),
        memory_filtered_ratios(results, section), "\nDetails:\n",
        table(header, rows)])


def memory_filtered_ratios(results: dict, section: dict) -> str:
    """Filtered ÷ unfiltered KiB per idle stream, per server and size (issue 20: within 10%)."""
    rows = []
    for key, by_server in section.items():
        if key.endswith(" filtered"):
            plain = section.get(key.split()[0], {})
            for name, r in by_server.items():
                unfiltered = plain.get(name, {}).get("kib_per_stream")
                rows.append([int(key.split()[0]), name, unfiltered, r["kib_per_stream"],
                             ratio(r["kib_per_stream"], unfiltered)])
    if not rows:
        return ""
    return ("\nFiltered ÷ unfiltered streams, same run:\n\n"
            + table(["streams", "server", "unfiltered KiB", "filtered KiB",
                     "filtered ÷ unfiltered"], rows))


def inserts_section(results: dict) -> str:
    section = results["inserts"]
    if not section:
        return ""
    brokers = [s for s in results["servers"] if s.startswith("broker")]
    header = ["publishers", *(f"{b} {auth}" for b in brokers for auth in ("Bearer", "Basic")),
              *(f"{b} Basic ÷ Bearer" for b in brokers)]
    counts = sorted({int(key.split()[0]) for key in section})
    rows = []
    for count in counts:
        bearer, basic = section.get(f"{count} bearer", {}), section.get(f"{count} basic", {})
        cells: list[object] = [count]
        for b in brokers:
            cells += [bearer.get(b, {}).get("inserts_per_s"), basic.get(b, {}).get("inserts_per_s")]
        for b in brokers:
            cells.append(ratio(basic.get(b, {}).get("inserts_per_s"),
                               bearer.get(b, {}).get("inserts_per_s")))
        rows.append(cells)
    detail_rows = [[key, name, r["accepted"], r.get("seconds"), r["inserts_per_s"], r["p50_ms"],
                    r["p99_ms"], r.get("max_ms"), statuses(r["statuses"]), r.get("server_cpu_pct"), r["publisher_cpu_pct"]]
                   for key, by_server in section.items() for name, r in by_server.items()]
    return "\n".join([
        "## 4. Durable inserts/s (broker only)\n",
        from_earlier(results, "inserts"),
        ("Each publisher connection sends an insert and waits for its 200, which broker sends "
         "only after the event is committed to SQLite. The peers keep events in memory only "
         "(no durability at all), so they are not comparable here and not measured.\n"),
        table(header, rows), "\nDetails:\n",
        table(["publishers, auth", "server", "inserts", "seconds", "inserts/s", "p50 ms",
               "p99 ms", "max ms", "statuses", "server CPU %", "publisher CPU %"], detail_rows)])


def connects_section(results: dict) -> str:
    section = results["connects"]
    if not section:
        return ""
    s = results["settings"]
    rows = [[name, r["sync_events"], r["completed"], r["connects_per_s"], r["p50_ms"],
             r["p99_ms"], r["errors"] or "none", r["server_cpu_pct"], r["client_cpu_pct"]]
            for name, r in section.items()]
    return "\n".join([
        (f"## 5. New authenticated streams per second, each reading a sync of "
         f"{s['connect_sync']} latest values (broker only)\n"),
        from_earlier(results, "connects"),
        (f"{s['connect_concurrency']} connections in flight; each connects, sends `GET /sse` "
         "with a Bearer JWT, reads until it has the whole sync, and closes. The peers have no "
         "auth and no sync, so they are not measured.\n"),
        table(["server", "sync events", "streams", "connects/s", "p50 ms", "p99 ms", "errors",
               "server CPU %", "client CPU %"], rows)])


def scopes_section(results: dict) -> str:
    section = results.get("scopes")
    if not section:
        return ""
    rows = [[name, r["subscribers"], r["off"]["deliveries_per_s"], r["on"]["deliveries_per_s"],
             f"{r['on_vs_off']:.2f}×", f"{r['median_on_vs_off']:.2f}×", r["off"]["p99_ms"],
             r["on"]["p99_ms"], r["off"]["lost"] + r["on"]["lost"], len(r["runs"]["on"])]
            for name, r in section.items()]
    first = next(iter(section.values()))
    groups = ", ".join("`" + " ".join(scopes) + "`" for scopes in first["groups"])
    return "\n".join([
        "## 6. Fan-out with `--enforce_scopes`: subscribers in four permission groups\n",
        from_earlier(results, "scopes"),
        (f"One tenant, its subscribers spread over users with the scopes {groups} (each may "
         "read the published `bench` events, so both runs deliver the same frames); fresh "
         "servers without and with `--enforce_scopes`, alternately; the best run of each, "
         "and the ratio of the median runs.\n"),
        table(["server", "subscribers", "off deliveries/s", "on deliveries/s", "on ÷ off",
               "median on ÷ off", "off p99 ms", "on p99 ms", "lost", "rounds"], rows)])


def restart_section(results: dict) -> str:
    section = results.get("restart")
    if not section:
        return ""
    s = results["settings"]
    rows = [[name, r["subscribers"], r["restart_seconds"], r.get("streaming_p50_seconds"),
             r.get("streaming_p90_seconds"), r["all_streaming_seconds"],
             r["streaming"], r["events"], r["lost"], r["duplicated"],
             statuses(r["publish_statuses"])] for name, r in section.items()]
    return "\n".join([
        "## 7. Restart: every subscriber resumes at once (broker only)\n",
        from_earlier(results, "restart"),
        (f"{s['restart_subscribers']:,} subscribers of one tenant with {s['connect_sync']} "
         f"events of state; one publisher inserts {s['restart_rate']:.0f} events/s throughout; "
         "the server gets SIGTERM and is started again on the same database. The moment it "
         "accepts connections, every subscriber reconnects at once with Last-Event-ID, without "
         "EventSource's retry delay: the worst case. \"streaming\": "
         "seconds from the new process accepting connections to the response head of half, "
         "90% and all of the subscribers. Lost and duplicated count, per subscriber, the events of the log "
         "after the sync that it did not get, or got again or out of order.\n"),
        table(["server", "subscribers", "restart s", "half streaming s", "90% streaming s",
               "all streaming s", "streaming at the end",
               "events", "lost", "duplicated", "publisher statuses"], rows)])


def filters_section(results: dict) -> str:
    section = results.get("filters")
    if not section:
        return ""
    s = results["settings"]
    rows, runs = [], []
    for name, regimes in section.items():
        for regime, r in regimes.items():
            measured = [x for mode, xs in r["runs"].items() if mode != "alone" for x in xs]
            rows.append([regime, name, r["unfiltered_us"], r["filtered_us"],
                         ratio_of(r["filtered_vs_unfiltered"]),
                         ratio_of(r["median_filtered_vs_unfiltered"]), r.get("tenth_us"),
                         ratio_of(r.get("median_filtered_vs_tenth")), r["insert_us"],
                         r["net_unfiltered_us"], r["net_filtered_us"],
                         ratio_of(r["net_filtered_vs_unfiltered"]),
                         ratio_of(r["net_median_filtered_vs_unfiltered"]),
                         r["unfiltered_frames_per_read"], r["filtered_frames_per_read"],
                         sum(x["lost"] for x in measured), sum(x["extra"] for x in measured),
                         len(r["runs"]["filtered"])])
            runs += [[regime, name, x["mode"], x.get("subscribers"), x["events"], x["published_per_s"],
                      x.get("deliveries"), x.get("expected"), x.get("lost"), x.get("extra"),
                      x["server_cpu_s"], x.get("us_per_frame"), x.get("net_us_per_frame"),
                      x.get("us_per_event"), x.get("frames_per_read"), x.get("p50_ms"),
                      x.get("p99_ms")] for mode in r["runs"].values() for x in mode]
    first = next(iter(next(iter(section.values())).values()))
    filters = ", ".join("`" + "&".join(f"event={p}" for p in f) + "`" for f in first["filters"])
    return "\n".join([
        "## 9. Stream filters: server CPU per delivered frame, filtered ÷ unfiltered\n",
        from_earlier(results, "filters"),
        (f"{s['filter_subscribers']:,} subscribers of one tenant; events cycle over "
         f"{first['names']} names (`f00`…); the filtered runs spread the subscribers evenly "
         f"over {len(first['filters'])} filters ({filters}), so each gets a tenth of the "
         "events; the unfiltered runs get everything; \"tenth\" runs have a tenth as many "
         "unfiltered subscribers, so as many frames per event as the filtered ones (filtered "
         "÷ tenth is the cost of filtering itself); a fourth kind of run publishes the same "
         "with no subscriber (the inserts alone). Fresh servers, in turn; server CPU seconds "
         "÷ frames received, the cheapest run of each and the ratio of the cheapest and of "
         "the median runs; \"net\": the same without the inserts' own CPU (the median CPU "
         "per insert of the runs without subscribers times the run's events), which costs "
         "the same in both runs but is spread over a tenth as many frames when filtered. At "
         "a fixed rate (one publisher) every event goes out in writes of its own (frames "
         "per read ≈ 1); in the flood (the fan-out's publishers) an unfiltered write "
         "carries many events and a filtered one a tenth as many. Lost and extra: per "
         "stream, frames its filter lets through that did not arrive, and frames beyond "
         "them (a server that ignores `?event=` sends everything: all extra).\n"),
        table(["rate", "server", "unfiltered µs/frame", "filtered µs/frame",
               "filtered ÷ unfiltered", "median filtered ÷ unfiltered", "tenth µs/frame",
               "median filtered ÷ tenth", "µs per insert alone",
               "net unfiltered µs/frame", "net filtered µs/frame", "net filtered ÷ unfiltered",
               "net median filtered ÷ unfiltered", "unfiltered frames/read",
               "filtered frames/read", "lost", "extra", "rounds"], rows),
        "\nEvery run:\n",
        table(["rate", "server", "subscribers", "count", "events", "published/s", "frames",
               "expected", "lost", "extra", "server CPU s", "µs/frame", "net µs/frame",
               "µs/insert", "frames/read", "p50 ms", "p99 ms"], runs)])


def ratio_of(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def base_section(results: dict) -> str:
    """broker ÷ broker-base on every metric both ran: the new code against the old, same run."""
    if not {"broker", BASE} <= set(results["servers"]):
        return ""
    rows = []
    for label, by_server, metric, better in base_metrics(results):
        new, old = by_server.get("broker", {}).get(metric), by_server.get(BASE, {}).get(metric)
        if new is not None or old is not None:
            rows.append([label, new, old, ratio(new, old), better])
    base = results.get("base") or {}
    return "\n".join([
        f"## broker ÷ {BASE}: this checkout against {base.get('describe') or 'another'}\n",
        (f"`{BASE}` is broker run from that checkout's code on the same event loop and flags; "
         "both ran in this run, one after the other. Compare the ratio with its spread "
         "between runs (the noise) before calling it a change.\n"),
        table(["metric", "broker", BASE, f"broker ÷ {BASE}", "better"], rows)])


def base_metrics(results: dict) -> list[tuple[str, dict, str, str]]:
    """(label, {server: row}, metric, which way is better) for the base comparison."""
    out = []
    for size, by_server in results["fanout"].items():
        out += [(f"fan-out {int(size):,} subs: deliveries/s", by_server, "deliveries_per_s",
                 "higher"), (f"fan-out {int(size):,} subs: p99 ms", by_server, "p99_ms", "lower")]
    for rate, by_server in latency_by_rate(results).items():
        out += [(f"{rate} events/s: p{pct} ms", by_server, f"p{pct}_ms", "lower")
                for pct in (50, 99)]
    steady = results.get("steady") or {}
    out += [("steady rate: delivery p99 ms", steady, "p99_ms", "lower"),
            ("steady rate: other request p99 ms", steady, "request_p99_ms", "lower")]
    out += [(f"memory {key}: KiB per idle stream", by_server, "kib_per_stream", "lower")
            for key, by_server in results["memory"].items()]
    out += [(f"inserts/s, {key}", by_server, "inserts_per_s", "higher")
            for key, by_server in results["inserts"].items()]
    out += [("connects/s", results["connects"], "connects_per_s", "higher"),
            ("connects p99 ms", results["connects"], "p99_ms", "lower")]
    restart = results.get("restart") or {}
    out += [(f"restart: {what} streaming s", restart, metric, "lower") for what, metric in
            (("half", "streaming_p50_seconds"), ("90%", "streaming_p90_seconds"),
             ("all", "all_streaming_seconds"))]
    out += [("restart: lost + duplicated", {name: {"v": r["lost"] + r["duplicated"]}
                                            for name, r in restart.items()}, "v", "0")]
    scopes = results.get("scopes") or {}
    out += [(f"scopes {mode}: deliveries/s", {n: r[mode] for n, r in scopes.items()},
             "deliveries_per_s", "higher") for mode in ("off", "on")]
    filters = results.get("filters") or {}
    for regime in dict.fromkeys(regime for regimes in filters.values() for regime in regimes):
        by_server = {n: r[regime] for n, r in filters.items() if regime in r}
        out += [(f"filters {regime}: {label}", by_server, metric, "lower")
                for label, metric in (("unfiltered µs/frame", "unfiltered_us"),
                                      ("filtered µs/frame", "filtered_us"),
                                      ("tenth µs/frame", "tenth_us"),
                                      ("µs per insert alone", "insert_us"))]
    return out


def headline(results: dict) -> str:
    """The numbers the issue's targets are stated in, with the ratios."""
    ref = reference(results)
    if not ref:
        return ""
    rows = []
    for size, by_server in results["fanout"].items():
        rows.append(headline_row(results, f"fan-out deliveries/s, {int(size):,} subscribers",
                                 by_server, "deliveries_per_s"))
        rows.append(headline_row(results, f"fan-out p99 ms, {int(size):,} subscribers "
                                 "(lower is better)", by_server, "p99_ms"))
    for rate, by_server in latency_by_rate(results).items():
        for pct in (50, 99):
            rows.append(headline_row(results, f"p{pct} ms at {rate} events/s (lower is better)",
                                     by_server, f"p{pct}_ms"))
    if results.get("steady"):
        rows.append(headline_row(results, "steady rate, large tenant: delivery p99 ms",
                                 results["steady"], "p99_ms"))
        rows.append(headline_row(results, "steady rate, large tenant: other request p99 ms",
                                 results["steady"], "request_p99_ms"))
    for size, by_server in results["memory"].items():
        rows.append(headline_row(results, f"KiB per idle stream, {fmt(key_label(size))} streams "
                                 "(lower is better)", by_server, "kib_per_stream"))
    if not rows:
        return ""
    header = ["metric", ref, *peers(results), *(f"{ref} ÷ {p}" for p in peers(results))]
    return "## Headline\n\n" + table(header, rows) + "\n"


def headline_row(results: dict, label: str, by_server: dict, metric: str) -> list[object]:
    ref = reference(results)
    ref_value = by_server.get(ref, {}).get(metric)
    values = [by_server.get(peer, {}).get(metric) for peer in peers(results)]
    return [label, ref_value, *values, *(ratio(ref_value, v) for v in values)]


def markdown(results: dict) -> str:
    kind = "quick smoke run (small sizes)" if results["quick"] else "full run"
    parts = [
        "# Benchmark results\n",
        (f"A {kind} of `python bench/run.py{' --quick' if results['quick'] else ''}` on "
         f"{results['machine']['date']}, {results['seconds']} s in all. Client and servers share "
         "the same cores, so read the ratios between servers of this one run rather than the "
         "absolute numbers. How each scenario works: bench/README.md.\n"),
        "## Machine\n", machine_section(results), headline(results), fanout_section(results),
        latency_section(results), memory_section(results), inserts_section(results),
        connects_section(results), scopes_section(results), restart_section(results),
        steady_section(results), filters_section(results), base_section(results)]
    return "\n".join(part for part in parts if part).rstrip() + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    grouped_bars(axes[0][0], results["fanout"], "deliveries_per_s", results["servers"],
                 "Fan-out: deliveries/s", "subscribers", log=True)
    grouped_bars(axes[0][1], results["fanout"], "p99_ms", results["servers"],
                 "Fan-out: p99 latency (ms)", "subscribers", log=True)
    s = results["settings"]
    grouped_bars(axes[0][2], latency_by_rate(results), "p99_ms", results["servers"],
                 f"Fixed rate to {s['latency_subscribers']:,}: p99 latency (ms)", "events/s",
                 log=True)
    grouped_bars(axes[1][0], results["memory"], "kib_per_stream", results["servers"],
                 "Memory: KiB per idle stream", "streams")
    inserts_bars(axes[1][1], results)
    connects = {"": results["connects"]} if results["connects"] else {}
    grouped_bars(axes[1][2], connects, "connects_per_s", results["servers"],
                 f"Connects/s with a sync of {s['connect_sync']}", "")
    m = results["machine"]
    fig.suptitle(f"broker benchmark ({'quick' if results['quick'] else 'full'}), "
                 f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grouped_bars(ax, section: dict, metric: str, servers: list[str], title: str,
                 xlabel: str, log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    keys = list(section)
    present = [s for s in servers if any(s in section[k] for k in keys)]
    if not keys or not present:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(present)
    for i, name in enumerate(present):
        values = [section[k].get(name, {}).get(metric) or 0 for k in keys]
        xs = [x + i * width for x in range(len(keys))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([x + width * (len(present) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"{int(k):,}" if k.isdigit() else k for k in keys])
    ax.set_xlabel(xlabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def inserts_bars(ax, results: dict) -> None:
    section = results["inserts"]
    by_count: dict[str, dict] = {}
    for key, by_server in section.items():
        count, auth = key.split()
        for name, r in by_server.items():
            by_count.setdefault(count, {})[f"{name} {auth}"] = r
    series = sorted({name for row in by_count.values() for name in row})
    grouped_bars(ax, by_count, "inserts_per_s", series, "Durable inserts/s", "publishers")
