#!/usr/bin/env python3
"""Turns a bench/run.py results.json into BENCHMARKS.md and SVG charts (stdlib only).

    python3 bench/report.py target/bench/latest/results.json --out BENCHMARKS.md --charts bench/charts

Where a comparison ran in several interleaved rounds, the table shows the best round of each
target (highest req/s, or lowest p99 for latency runs): on a shared machine the best round is
the least disturbed one. The `bench/analysis.md` file, written by hand after looking at a run,
is appended as the "Analysis" section when present.
"""

import argparse
import html
import json
import math
import os

COLORS = {"direct": "#7f7f7f", "ours": "#e6550d", "nginx": "#31a354", "haproxy": "#756bb1",
          "floor": "#3182bd", "hop": "#bdbdbd",
          "ours-info": "#fdae6b", "conversion": "#e6550d", "stream direct": "#7f7f7f"}
NAMES = {"direct": "direct to mock", "ours": "openai-stream-proxy", "nginx": "nginx",
         "haproxy": "HAProxy", "ours-info": "openai-stream-proxy (RUST_LOG=info)",
         "floor": "hyper floor (reference)",
         "hop": "direct, mock on the proxy's core (control)"}
PROXIES = ["ours", "nginx", "haproxy"]
# The hyper floor is shown beside the proxies where it was measured, never judged by a target.
REFERENCES = ["floor"]


# ---------------------------------------------------------------------------------------
# formatting

def us(v):
    if v is None:
        return "–"
    if abs(v) >= 10000:
        return f"{v / 1000:.1f} ms"
    if abs(v) >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.0f} µs"


def us1(v):
    """Microseconds with one decimal below 100 µs, where single microseconds matter."""
    if v is None:
        return "–"
    return f"{v:.1f} µs" if abs(v) < 100 else us(v)


def num(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def kib(v):
    if v is None:
        return "–"
    if v >= 10 * 1024:
        return f"{v / 1024:.1f} MiB"
    return f"{v:,.0f} KiB"


def table(headers, rows, align=None):
    align = align or (["l"] + ["r"] * (len(headers) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def hop_note(hop, direct, metric, q):
    """The target-table note for the no-proxy control: what the cross-core hop alone added."""
    if not (hop and direct):
        return ""
    return f"the hop alone, no proxy: {us(hop[metric][q] - direct[metric][q])}"


def unheld(run, rate):
    """Why an open-loop run did not hold its offered `rate`, or "" when it did: it dropped
    requests, failed some, fell short of the rate or queued past 10 ms at p99. Such a run
    measured queueing, not added latency. `bench/run.py`'s ramp uses the same test."""
    why = []
    if run.get("dropped"):
        why.append(f"{num(run['dropped'])} dropped")
    if run.get("errors"):
        why.append(f"{num(run['errors'])} errors")
    if run.get("achieved_rps", 0) < 0.97 * rate:
        why.append(f"{num(run.get('achieved_rps'))} req/s achieved")
    if run["latency_us"]["p99"] > 10000:
        why.append(f"p99 {us(run['latency_us']['p99'])}")
    return ", ".join(why)


def best(runs, key, lowest=False):
    """The best run per target: highest `key` (or lowest)."""
    out = {}
    for r in runs:
        t = r["target"]
        v = key(r)
        if v is None:
            continue
        if t not in out or (v < key(out[t]) if lowest else v > key(out[t])):
            out[t] = r
    return out


def spread(runs, target, key):
    vals = [key(r) for r in runs if r["target"] == target and key(r) is not None]
    if len(vals) < 2:
        return ""
    return f"{min(vals):,.0f}–{max(vals):,.0f}"


# ---------------------------------------------------------------------------------------
# SVG charts

def esc(s):
    return html.escape(str(s), quote=True)


def svg_bars(path, title, categories, series, unit, log=False):
    """Grouped horizontal bars: one group per category, one bar per series."""
    names = [n for n in series if any(v is not None for v in series[n])]
    bar_h, gap = 14, 10
    left, right, top = 240, 110, 46
    group_h = bar_h * len(names) + gap
    height = top + group_h * len(categories) + 40
    width = 820
    vmax = max((v for n in names for v in series[n] if v), default=1)
    plot_w = width - left - right

    def scale(v):
        if log:
            return plot_w * math.log10(max(v, 1)) / math.log10(max(vmax, 10))
        return plot_w * v / vmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{esc(title)}</text>']
    for i, n in enumerate(names):
        x = left + i * 170
        out.append(f'<rect x="{x}" y="30" width="10" height="10" fill="{COLORS.get(n, "#333")}"/>'
                   f'<text x="{x + 14}" y="39">{esc(NAMES.get(n, n))}</text>')
    for ci, cat in enumerate(categories):
        y0 = top + ci * group_h
        out.append(f'<text x="{left - 8}" y="{y0 + group_h / 2}" text-anchor="end" '
                   f'dominant-baseline="middle">{esc(cat)}</text>')
        for si, n in enumerate(names):
            v = series[n][ci]
            if v is None:
                continue
            y = y0 + si * bar_h
            w = max(1, scale(v))
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                       f'fill="{COLORS.get(n, "#333")}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}" font-size="11">'
                       f'{esc(f"{v:,.0f}")} {esc(unit)}</text>')
    out.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{height - 36}" stroke="#333"/>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def svg_percentiles(path, title, curves, unit="µs"):
    """Latency by percentile on a 'nines' axis (50, 90, 99, 99.9, 99.99), log-scale values."""
    width, height = 820, 420
    left, right, top, bottom = 80, 200, 40, 50
    pw, ph = width - left - right, height - top - bottom

    def xpos(p):
        p = min(p, 99.99)
        return left + pw * (-math.log10(max(1e-4, 1 - p / 100.0))) / 4.0

    vals = [v for c in curves.values() for p, v in c if v and v > 0 and p >= 50 - 1e-9]
    if not vals:
        return
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))
    if hi <= lo:
        hi = lo * 10

    def ypos(v):
        v = max(v, lo)
        return top + ph - ph * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{(left + width - right) / 2}" y="22" text-anchor="middle" font-size="15" '
           f'font-weight="bold">{esc(title)}</text>']
    for p in [0, 90, 99, 99.9, 99.99]:
        x = xpos(p)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#ddd"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">p{p if p else 0:g}</text>')
    x50 = xpos(50)
    out.append(f'<text x="{x50:.1f}" y="{top + ph + 16}" text-anchor="middle">p50</text>'
               f'<line x1="{x50:.1f}" y1="{top}" x2="{x50:.1f}" y2="{top + ph}" stroke="#ddd"/>')
    e = math.log10(lo)
    while e <= math.log10(hi) + 1e-9:
        v = 10 ** e
        y = ypos(v)
        label = us(v) if unit == "µs" else f"{v:g} {unit}"
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>')
        e += 1
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">percentile</text>')
    for i, (name, pts) in enumerate(curves.items()):
        pts = [(p, v) for p, v in pts if v and v > 0]
        color = COLORS.get(name.split(" ")[0], "#333")
        if "(" in name and name.split(" ")[0] in COLORS:
            color = COLORS.get(name.split(" ")[0])
        conv, shared = "conversion" in name, "shared" in name
        dash = {(False, False): "", (True, False): ' stroke-dasharray="8,3"',
                (False, True): ' stroke-dasharray="2,2"', (True, True): ' stroke-dasharray="8,3,2,3"'}[(conv, shared)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{xpos(p):.1f},{ypos(v):.1f}" for j, (p, v) in enumerate(pts))
        out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        ly = top + 10 + i * 18
        out.append(f'<line x1="{width - right + 10}" y1="{ly}" x2="{width - right + 30}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{width - right + 34}" y="{ly + 4}">{esc(NAMES.get(name, name))}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


# ---------------------------------------------------------------------------------------
# the report

class Report:
    def __init__(self, results, charts_dir, out_path):
        self.r = results
        self.s = results["sections"]
        self.meta = results["meta"]
        self.charts = charts_dir
        self.out_dir = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(charts_dir, exist_ok=True)
        self.targets = []  # (target, measured, met, bound)
        self.lines = []

    def chart(self, name):
        return os.path.relpath(os.path.join(self.charts, name), self.out_dir)

    def add(self, *lines):
        self.lines.extend(lines)

    def target(self, name, measured, met, note=""):
        self.targets.append((name, measured, "met" if met else ("**missed**" if met is False else "not measured"), note))

    # -- sections --------------------------------------------------------------------------

    def passthrough(self):
        sec = self.s.get("passthrough")
        if not sec:
            return
        self.add("## 1. Passthrough: streaming SSE through each proxy",
                 "",
                 f"`wrk -t1 -c{sec['conns']}` for {sec['duration_s']} s per run, `stream: true` Chat "
                 "Completions requests answered by the mock with a whole SSE stream of N content "
                 "deltas (plus role, finish, usage chunks and `[DONE]`). Best of "
                 f"{sec['rounds']} interleaved rounds for 20 events, one round for the larger streams. "
                 "*proxy CPU* is the proxy process's own CPU time (user + system) per request, "
                 "from `/proc`; it does not depend on which side was the bottleneck. "
                 "*foreign CPU* is what other processes on the shared machine used meanwhile "
                 "(% of one core). *hyper floor (reference)* is `examples/hyper_floor.rs`: hyper's "
                 "HTTP/1.1 server and `client::conn::http1` with a pool of a few lines and nothing else "
                 "(no routing, header policy, timeouts, metrics or logs), what any relay built on hyper "
                 "costs at least; it shows how much of the gap to nginx and HAProxy is hyper's own.", "")
        sizes = sorted({r["events"] for r in sec["runs"]})
        shown = ["direct"] + PROXIES + [t for t in REFERENCES if any(r["target"] == t for r in sec["runs"])]
        rps_series = {t: [] for t in shown}
        for ev in sizes:
            runs = [r for r in sec["runs"] if r["events"] == ev]
            b = best(runs, lambda r: r["rps"])
            ours = b.get("ours")
            rows = []
            for t in shown:
                r = b.get(t)
                rps_series[t].append(r["rps"] if r else None)
                if not r:
                    continue
                rows.append([NAMES[t], num(r["rps"]), ratio(ours["rps"], r["rps"]) if ours and t != "ours" else "",
                             us(r["latency_us"]["p50"]), us(r["latency_us"]["p99"]),
                             num(r.get("proxy_cpu_us_per_req"), 1) if t != "direct" else "",
                             num(r["mean_bytes"]), num(r["errors_total"]), f"{r['foreign_cpu_pct']:.0f}%",
                             spread(runs, t, lambda x: x["rps"])])
            self.add(f"**{ev} events** (response ≈ {num(ours['mean_bytes'] if ours else 0)} bytes)", "",
                     table(["target", "req/s", "ours ÷ this", "p50", "p99", "proxy CPU µs/req",
                            "bytes/resp", "errors", "foreign CPU", "req/s all rounds"], rows), "")
        svg_bars(os.path.join(self.charts, "passthrough_rps.svg"),
                 f"Passthrough throughput (req/s, {sec['conns']} connections)",
                 [f"{e} events" for e in sizes], rps_series, "req/s")
        runs20 = [r for r in sec["runs"] if r["events"] == 20]
        b = best(runs20, lambda r: r["rps"])
        svg_percentiles(os.path.join(self.charts, "passthrough_latency.svg"),
                        f"Passthrough latency, 20 events, {sec['conns']} connections (wrk)",
                        {t: b[t]["latency_us"]["cdf"] for t in shown if t in b})
        self.add(f"![passthrough throughput]({self.chart('passthrough_rps.svg')})", "",
                 f"![passthrough latency]({self.chart('passthrough_latency.svg')})", "")
        # targets
        o, n, h, f = b.get("ours"), b.get("nginx"), b.get("haproxy"), b.get("floor")
        if o and n and h:
            floor_note = (f"; the hyper floor: {ratio(f['rps'], n['rps'])} nginx, {ratio(f['rps'], h['rps'])} HAProxy, "
                          f"{num(f.get('proxy_cpu_us_per_req'), 1)} µs" if f else "")
            self.target("Passthrough throughput ≥ nginx's and HAProxy's (20 events, c=64)",
                        f"{ratio(o['rps'], n['rps'])} nginx, {ratio(o['rps'], h['rps'])} HAProxy",
                        o["rps"] >= n["rps"] and o["rps"] >= h["rps"],
                        f"proxy CPU/request: ours {num(o.get('proxy_cpu_us_per_req'), 1)} µs, nginx "
                        f"{num(n.get('proxy_cpu_us_per_req'), 1)} µs, HAProxy {num(h.get('proxy_cpu_us_per_req'), 1)} µs"
                        + floor_note)
            self.target("Passthrough p99 no worse than nginx's and HAProxy's (20 events, c=64)",
                        f"{us(o['latency_us']['p99'])} vs {us(n['latency_us']['p99'])} / {us(h['latency_us']['p99'])}",
                        o["latency_us"]["p99"] <= max(n["latency_us"]["p99"], 1) and
                        o["latency_us"]["p99"] <= max(h["latency_us"]["p99"], 1))

        lg = self.s.get("logging")
        if lg:
            rows = []
            for r in lg["runs"]:
                rows.append([NAMES.get(r["target"], r["target"]), num(r["rps"]), us(r["latency_us"]["p99"]),
                             num(r.get("proxy_cpu_us_per_req"), 1), us(r["c1_latency_us"]["p50"]),
                             us(r["c1_latency_us"]["p99"])])
            self.add("**Logging cost** (one access-log line per request at `info`, written to a file):", "",
                     table(["proxy", "req/s (c=64)", "p99 (c=64)", "proxy CPU µs/req", "p50 (c=1)", "p99 (c=1)"], rows), "")

    def conversion(self):
        sec = self.s.get("conversion")
        if not sec:
            return
        self.add("## 2. Conversion: non-streaming requests aggregated by the proxy", "",
                 "The proxy receives a non-streaming request, asks the mock for the stream, "
                 "aggregates it and answers one JSON body; the baseline is the same streaming "
                 "request sent directly to the mock. Max load: `wrk -t1 -c64`, best round.", "")
        rows = []
        for api, ev in [("chat", 20), ("chat", 2000), ("responses", 20)]:
            runs = [r for r in sec["max_runs"] if r["api"] == api and r["events"] == ev]
            b = best(runs, lambda r: r["rps"])
            d, o = b.get("direct"), b.get("ours")
            if not (d and o):
                continue
            rows.append([f"{api}, {ev} events", num(d["rps"]), num(o["rps"]), ratio(o["rps"], d["rps"]),
                         us(o["latency_us"]["p50"]), us(o["latency_us"]["p99"]),
                         num(o.get("proxy_cpu_us_per_req"), 1), num(o["mean_bytes"]), num(o["errors_total"])])
        self.add(table(["stream", "direct stream req/s", "conversion req/s", "conversion ÷ direct",
                        "conversion p50", "conversion p99", "proxy CPU µs/req", "JSON bytes", "errors"], rows), "")
        half = sec.get("half_runs", [])
        if not half:
            return
        rates = {"split": sec["half_rate"], "shared": sec.get("half_rate_shared", sec["half_rate"])}

        def pick(layout, target):
            """The round with the lowest p99 among those that held the rate (else among all)."""
            # Runs from before layouts existed carry none: they are split runs.
            runs = [r for r in half if r.get("layout", "split") == layout and r["target"] == target]
            valid = [r for r in runs if not unheld(r, rates[layout])]
            chosen = best(valid or runs, lambda r: r["latency_us"]["p99"], lowest=True)
            return chosen.get(target)

        def ramp_text(layout):
            steps = [r for r in sec.get("open_loop_ramp", []) if r.get("layout", "split") == layout]
            return ", ".join(f"{num(r['offered_rps'])}{' (try 2)' if r.get('attempt') else ''} "
                             f"{'held' if r['held'] else 'not held'} (p99 {us(r['p99_us'])})"
                             for r in steps)

        def basis(layout):
            key = "open_loop_max_rps" + ("_shared" if layout == "shared" else "")
            if key not in sec:
                if "median_rps_ours" in sec:
                    return f"half of the median round's {num(sec['median_rps_ours'])} req/s"
                return "half of the best round"
            suffix = "_shared" if layout == "shared" else ""
            if not sec.get("open_loop_held" + suffix, True):
                held = "no ramp step held, so the first step's rate"
            elif sec.get("open_loop_capped" + suffix):
                held = "every ramp step held, so the open-loop maximum is at least this"
            else:
                held = "the highest open-loop rate the conversion held"
            return f"half of {num(sec[key])} req/s, {held}; ramp: {ramp_text(layout)}"

        layouts = ["split"] + (["shared"] if any(r.get("layout") == "shared" for r in half) else [])
        self.add("**At half of the conversion's max load** (open loop, `bench_load open`, 20 events, "
                 "best round by p99 among those that held the rate). Max load is the highest rate "
                 "the conversion holds open loop, found by a ramp of 2-second steps at rising "
                 f"fractions of the closed-loop median ({num(sec.get('median_rps_ours'))} req/s): at "
                 "64 connections one wake-up serves many ready requests, while open-loop arrivals "
                 "each pay their own, so half of the closed-loop maximum is at or past saturation for "
                 "every relay, the direct path included. *split*: the proxy on its own core; the "
                 "control row sends the direct stream to the mock moved onto the proxy's core, the "
                 "cross-core hop every proxied request makes, with no proxy. *shared*: the proxy on "
                 "the load generator's and mock's core, as in the c=1 step (no cross-core wake-ups, "
                 "but one core for all three, so a lower maximum).", "")
        for layout in layouts:
            d, o = pick(layout, "direct"), pick(layout, "ours")
            h = pick(layout, "hop") if layout == "split" else None
            if not (d and o):
                continue
            rate = rates[layout]
            add50 = o["latency_us"]["p50"] - d["latency_us"]["p50"]
            add99 = o["latency_us"]["p99"] - d["latency_us"]["p99"]
            paths = [("direct stream", d)] + ([(NAMES["hop"], h)] if h else []) + [("conversion (ours)", o)]
            self.add(f"*{layout}*, {num(rate)} req/s offered ({basis(layout)}):", "",
                     table(["path", "achieved req/s", "p50", "p90", "p99", "p99.9", "dropped", "errors"],
                           [[n, num(r["achieved_rps"]), us(r["latency_us"]["p50"]), us(r["latency_us"]["p90"]),
                             us(r["latency_us"]["p99"]), us(r["latency_us"]["p999"]), num(r.get("dropped")),
                             num(r["errors"])] for n, r in paths]), "",
                     f"Added by the conversion: **p50 {us(add50)}, p99 {us(add99)}**." +
                     (f" Added by the hop alone: p50 {us(h['latency_us']['p50'] - d['latency_us']['p50'])}, "
                      f"p99 {us(h['latency_us']['p99'] - d['latency_us']['p99'])}." if h else ""), "")
            if layout == "split":
                svg_percentiles(os.path.join(self.charts, "conversion_latency.svg"),
                                f"Conversion vs direct streaming at {num(rate)} req/s (open loop)",
                                {"direct": d["latency_us"]["cdf"], "ours (conversion)": o["latency_us"]["cdf"]})
                self.add(f"![conversion latency]({self.chart('conversion_latency.svg')})", "")
            problems = "; ".join(f"{name} did not hold the rate ({why})" for name, why in
                                 [("the conversion", unheld(o, rate)), ("the direct stream", unheld(d, rate))]
                                 if why)
            note = "; ".join(p for p in [problems, hop_note(h, d, "latency_us", "p50") if h else ""] if p)
            note99 = "; ".join(p for p in [problems, hop_note(h, d, "latency_us", "p99") if h else ""] if p)
            label = f" ({layout})" if len(layouts) > 1 else ""
            self.target(f"Conversion adds ≤ 150 µs p50 at half of max load{label}", us(add50),
                        add50 <= 150 and not problems, note)
            self.target(f"Conversion adds ≤ 1 ms p99 at half of max load{label}", us(add99),
                        add99 <= 1000 and not problems, note99)

    def criterion(self):
        sec = self.s.get("criterion")
        if not sec:
            return
        self.add("## 3. Aggregation cost in isolation (Criterion)", "",
                 "`cargo bench --bench aggregate` (`benches/aggregate.rs`): the real `SseParser` + "
                 "`Accumulator` over whole streams, next to `serde_json` parsing the same events' "
                 "`data` payloads once: into `serde_json::Value` (the floor the target is judged "
                 "against) and into `IgnoredAny` (tokenising only, a stricter floor). Throughputs are "
                 "MB/s of SSE input (10⁶ bytes) for all three, so ratios compare the same work. The "
                 "crate's `serde_json` features (`preserve_order`, `arbitrary_precision`) apply to "
                 "the floors too." + ("" if sec.get("fixtures_present") else
                                      " *The captured fixtures were absent: only synthetic streams ran.*"), "")
        rows = []
        cats, ser = [], {"ours": [], "direct": [], "nginx": []}
        worst = None
        for g, r in sec["groups"].items():
            a, v, ig = r["aggregate"]["mb_s"], r["serde_value"]["mb_s"], r["serde_ignored"]["mb_s"]
            rows.append([g, r["streams"], num(r["sse_bytes"]), r["events"], num(r["body_bytes"]),
                         num(a), num(v), num(ig), f"{a / v:.2f}×", f"{a / ig:.2f}×"])
            cats.append(g)
            ser["ours"].append(a)
            ser["direct"].append(v)
            ser["nginx"].append(ig)
            worst = min(worst, a / v) if worst is not None else a / v
        self.add(table(["input", "streams", "SSE bytes", "events", "body bytes", "aggregate MB/s",
                        "serde Value MB/s", "serde IgnoredAny MB/s", "aggregate ÷ Value", "aggregate ÷ IgnoredAny"],
                       rows), "")
        # Reuse the bar chart with readable names.
        names = {"ours": "aggregate", "direct": "serde Value", "nginx": "serde IgnoredAny"}
        saved = dict(NAMES)
        NAMES.update(names)
        svg_bars(os.path.join(self.charts, "aggregation_mbps.svg"), "Aggregation throughput (MB/s of SSE)",
                 cats, ser, "MB/s")
        NAMES.clear()
        NAMES.update(saved)
        self.add(f"![aggregation throughput]({self.chart('aggregation_mbps.svg')})", "")
        if worst is not None:
            self.target("Aggregation ≥ 50% of the serde_json parse floor (Value)", f"worst input {worst:.2f}×",
                        worst >= 0.5)

    def memory(self):
        sec = self.s.get("memory")
        if not sec:
            return
        self.add("## 4. Memory", "")
        idle = sec.get("idle_rss_kib")
        rows = [["idle, pinned to one core (1 tokio worker)", kib(idle)],
                ["idle, unpinned (2 tokio workers)", kib(sec.get("idle_rss_unpinned_kib"))],
                ["after one conversion", kib(sec.get("rss_after_one_conversion_kib"))]]
        ag = sec.get("aggregations")
        if ag:
            total_kib = ag["response_bytes_total"] / 1024
            bound = 3 * total_kib + (idle or 0)
            peak = max(ag["rss_peak_sampled_kib"], ag["hwm_after_kib"])
            rows += [[f"peak during {ag['requests']} concurrent aggregations (VmHWM)", kib(peak)],
                     ["sum of those responses (JSON bodies)", kib(total_kib)],
                     ["sum of the upstream streams (SSE bytes)", kib(ag["sse_bytes_per_stream"] * ag["completed"] / 1024)],
                     ["target bound: 3 × responses + idle", kib(bound)]]
        self.add(table(["proxy (ours)", "RSS"], rows), "")
        if ag:
            self.add(f"The {ag['requests']} requests each aggregate 400 deltas of 256 bytes "
                     f"(≈{num(ag['response_bytes_mean'] / 1024, 0)} KiB JSON, ≈{num(ag['sse_bytes_per_stream'] / 1024, 0)} KiB "
                     f"of SSE); the mock paces each stream over ~1 s so they overlap (mock's peak of "
                     f"concurrent streams: {ag.get('mock_peak_concurrent')}); {ag['completed']} completed, "
                     f"p50 {us(ag['latency_us']['p50'])}, max {us(ag['latency_us']['max'])}.", "")
        ws = sec.get("websocket", [])
        if ws:
            rows = []
            for r in ws:
                rows.append([NAMES[r["target"]], num(r["open"]), num(r["failed"]), kib(r["rss_before_kib"]),
                             kib(r["rss_open_kib"]), f"{r['rss_per_session_bytes'] / 1024:.1f} KiB",
                             us(r["echo_latency_us"]["p50"])])
            self.add(f"**Idle WebSocket sessions** (fresh instance of each proxy, one core; each session "
                     f"exchanges one message with the mock's echo and then stays open; RSS summed over the "
                     f"proxy's processes):", "",
                     table(["proxy", "sessions open", "failed", "RSS before", "RSS with all open",
                            "RSS per session", "echo p50"], rows), "")
        if idle is not None:
            self.target("Idle RSS ≤ 10 MiB", kib(idle), idle <= 10 * 1024)
        o = next((r for r in ws if r["target"] == "ours"), None)
        if o:
            self.target(f"≤ 32 KiB RSS per idle WebSocket session ({num(o['open'])} open)",
                        f"{o['rss_per_session_bytes'] / 1024:.1f} KiB", o["rss_per_session_bytes"] <= 32 * 1024)
        if ag:
            self.target(f"Peak RSS with {ag['requests']} aggregations ≤ 3 × responses + idle",
                        f"{kib(peak)} vs bound {kib(bound)} ({peak / bound:.2f} of it)",
                        peak <= bound and ag["completed"] == ag["requests"])

    def startup(self):
        rows = self.s.get("startup")
        if not rows:
            return
        self.add("## 5. Start-up time to listening", "",
                 "`bench_load startup`: spawn the process, poll `connect()` every 100 µs until the port "
                 "accepts, kill it; repeated. nginx runs with `master_process off` here, HAProxy with `-db`.", "",
                 table(["proxy", "runs", "min", "p50", "max"],
                       [[NAMES[r["target"]], r["runs"] - r["failures"], us(r["startup_us"]["min"]),
                         us(r["startup_us"]["p50"]), us(r["startup_us"]["max"])] for r in rows]), "")
        o = next((r for r in rows if r["target"] == "ours"), None)
        if o:
            self.target("Start-up to listening ≤ 50 ms", f"p50 {us(o['startup_us']['p50'])}, max {us(o['startup_us']['max'])}",
                        o["startup_us"]["max"] <= 50000)

    def gateway(self):
        c1 = self.s.get("c1")
        st = self.s.get("streaming")
        if not (c1 or st or self.s.get("residence")):
            return
        self.add("## 6. Gateway methodology: added latency, time to first token, inter-frame latency, concurrent streams", "")
        if c1:
            self.add("**Concurrency 1** (`bench_load closed -c 1`, 20-event stream; best round by p99). "
                     "*split*: the proxy on its own core, so each of the four hops wakes a process on the other "
                     "core; *shared*: the proxy moved onto the client's and mock's core for the run, which "
                     "removes the cross-core wake-ups (on this VM a large, proxy-independent cost). The "
                     "control row (split only) sends the requests straight to the mock moved onto the "
                     "proxy's core: the cross-core hop with no proxy at all.", "")
            curves = {}
            for layout in ["split", "shared"]:
                runs = [r for r in c1["runs"] if r.get("layout", "split") == layout]
                if not runs:
                    continue
                keyed = [dict(r, target=r["target"] + ("-conv" if r["kind"] == "conversion" else "")) for r in runs]
                b = best(keyed, lambda r: r["latency_us"]["p99"], lowest=True)
                d = b.get("direct")
                rows = []
                for t in ["direct", "hop", "ours", "nginx", "haproxy", "floor", "ours-conv"]:
                    r = b.get(t)
                    if not r:
                        continue
                    name = "openai-stream-proxy, conversion" if t == "ours-conv" else NAMES[t]
                    rows.append([name, us(r["latency_us"]["p50"]), us(r["latency_us"]["p99"]),
                                 us(r["latency_us"]["p50"] - d["latency_us"]["p50"]) if d and t != "direct" else "",
                                 us(r["latency_us"]["p99"] - d["latency_us"]["p99"]) if d and t != "direct" else "",
                                 num(r.get("proxy_cpu_us_per_req"), 1) if t not in ("direct", "hop") else "",
                                 f"{r['foreign_cpu_pct']:.0f}%"])
                    if layout == "split" or t in ("direct", "ours", "ours-conv"):
                        curves[f"{t} ({layout})"] = r["latency_us"]["cdf"]
                self.add(f"*{layout}*:", "", table(["path", "p50", "p99", "added p50", "added p99",
                                                    "proxy CPU µs/req", "foreign CPU"], rows), "")
                h = b.get("hop")
                hop = hop_note(h, d, "latency_us", "p99")
                if d and b.get("ours"):
                    add = b["ours"]["latency_us"]["p99"] - d["latency_us"]["p99"]
                    self.target(f"Added latency at c=1 ≤ 100 µs p99, passthrough ({layout})", us(add), add <= 100, hop)
                if d and b.get("ours-conv"):
                    add = b["ours-conv"]["latency_us"]["p99"] - d["latency_us"]["p99"]
                    self.target(f"Added latency at c=1 ≤ 150 µs p99, conversion of 20 events ({layout})", us(add), add <= 150, hop)
            svg_percentiles(os.path.join(self.charts, "c1_latency.svg"), "Latency at concurrency 1, 20-event stream",
                            {k.replace("-conv", " conversion"): v for k, v in curves.items()})
            self.add(f"![latency at concurrency 1]({self.chart('c1_latency.svg')})", "")
        if st:
            self.add(f"**Paced streams** (the mock sends the role chunk at once, then 64 deltas every 20 ms, "
                     f"then finish/usage/`[DONE]`; {st['paced_streams']} concurrent streams started over 0.5 s; "
                     "TTFT columns from each path's best round by TTFT p99, the others from its best round "
                     "by event-delay p99). *TTFT* is the time from sending the request to the "
                     "first event (the role chunk, sent without delay, so the figure is the path's own "
                     "latency); *event delay* is the one-way delay of each delta, from the mock's clock "
                     "reading just before the write (`x_ts`) to the client's read: the inter-frame latency "
                     "the path adds, free of the mock's timer jitter. The control row streams straight "
                     "from the mock moved onto the proxy's core: the cross-core hop with no proxy.", "")
            b = best(st["runs"], lambda r: r["event_delay_us"]["p99"], lowest=True)
            # TTFT from its own best round: one round's slow connection setup says nothing
            # about the relaying of the other's events, nor the reverse.
            bt = best(st["runs"], lambda r: r["ttft_us"]["p99"], lowest=True)
            d, dt = b.get("direct"), bt.get("direct")
            rows = []
            for t in ["direct", "hop"] + PROXIES + REFERENCES:
                r, rt = b.get(t), bt.get(t)
                if not (r and rt):
                    continue
                rows.append([NAMES[t], us(rt["ttft_us"]["p50"]), us(rt["ttft_us"]["p99"]),
                             us(rt["ttft_us"]["p99"] - dt["ttft_us"]["p99"]) if dt and t != "direct" else "",
                             us(r["event_delay_us"]["p50"]), us(r["event_delay_us"]["p99"]),
                             us(r["event_delay_us"]["p99"] - d["event_delay_us"]["p99"]) if d and t != "direct" else "",
                             us(r["max_gap_per_stream_us"]["max"]), f"{r['stalled']}/{r['streams']}",
                             num(r.get("proxy_cpu_us_per_req"), 2) if t not in ("direct", "hop") else "",
                             f"{r['foreign_cpu_pct']:.0f}%"])
            self.add(table(["path", "TTFT p50", "TTFT p99", "added TTFT p99", "event delay p50",
                            "event delay p99", "added event delay p99", "largest gap", "stalled",
                            "proxy CPU µs/event", "foreign CPU"], rows), "")
            svg_percentiles(os.path.join(self.charts, "stream_event_delay.svg"),
                            f"Per-event one-way delay, {st['paced_streams']} paced streams",
                            {t: b[t]["event_delay_us"]["cdf"] for t in ["direct"] + PROXIES if t in b})
            self.add(f"![event delay]({self.chart('stream_event_delay.svg')})", "")
            o, ot = b.get("ours"), bt.get("ours")
            if d and o and dt and ot:
                add_ttft = ot["ttft_us"]["p99"] - dt["ttft_us"]["p99"]
                add_ev = o["event_delay_us"]["p99"] - d["event_delay_us"]["p99"]
                h = b.get("hop")
                self.target("Added time-to-first-token ≤ 200 µs p99", us(add_ttft), add_ttft <= 200,
                            hop_note(bt.get("hop"), dt, "ttft_us", "p99"))
                self.target("Added inter-frame latency ≤ 5 µs p99", us(add_ev), add_ev <= 5,
                            hop_note(h, d, "event_delay_us", "p99"))
            self.residence()
            sweep = st.get("sweep", [])
            if sweep:
                rows = []
                for r in sweep:
                    rows.append([NAMES[r["target"]], num(r["streams"]), num(r.get("mock_peak_concurrent")),
                                 num(r["completed"]), num(r["failed"]), num(r["stalled"]),
                                 us(r["max_gap_per_stream_us"]["p99"]), us(r["max_gap_per_stream_us"]["max"]),
                                 us(r["ttft_us"]["p99"]), us(r["event_delay_us"]["p99"]),
                                 num(r.get("proxy_cpu_us_per_req"), 2) if r["target"] != "direct" else "",
                                 f"{r['foreign_cpu_pct']:.0f}%"])
                self.add("**Concurrent paced streams without a stall** (a stall: a gap of more than 10 × 20 ms "
                         "between two events of a stream; starts spread over 1 s; for this sweep each stream "
                         "carries 150 deltas (3 s) so that all of them overlap even when a path is slow to "
                         "open them; *mock peak* is how many streams the mock had open at once, the "
                         "concurrency actually reached):", "",
                         table(["path", "streams", "mock peak", "completed", "failed", "stalled",
                                "largest gap p99", "largest gap", "TTFT p99", "event delay p99",
                                "proxy CPU µs/event", "foreign CPU"], rows), "")

                def sustained(r):
                    return (r["failed"] == 0 and r["stalled"] == 0 and
                            (r.get("mock_peak_concurrent") or 0) >= 0.9 * r["streams"])
                ok = [r["streams"] for r in sweep if r["target"] == "ours" and sustained(r)]
                top = max(ok) if ok else 0
                tried = sorted(r["streams"] for r in sweep if r["target"] == "ours")
                self.target("≥ 5000 concurrent paced streams without a stall",
                            f"{num(top)} sustained (tried {', '.join(num(x) for x in tried)})" if ok
                            else f"none of {', '.join(num(x) for x in tried)} sustained", top >= 5000)
        else:
            self.residence()

    def residence(self):
        res = self.s.get("residence")
        if not res:
            return
        streams = next((r["streams"] for r in res.values() if "streams" in r), None)
        self.add(f"**Time each relay holds a frame** (`bench/residence.py`): one more paced run of "
                 f"{num(streams)} streams per relay, with `perf record -e raw_syscalls:sys_enter,"
                 "raw_syscalls:sys_exit` attached to it (perf itself on the other core). A frame is "
                 "timed from the return of the read that takes it off the upstream socket to the start "
                 "of the write that hands it to the client's socket: what the relay adds to each frame "
                 "once the kernel has delivered it, free of the VM's wake-ups that dominate the event "
                 "delay above. Response heads are left out. *own code* leaves out the time spent inside "
                 "other syscalls meanwhile (a relay that reads every ready socket before writing any "
                 "holds the first frame during the others' syscalls). Tracing every syscall slows each "
                 "one, so these figures are upper bounds; the event delay column is that of the traced "
                 "run. *frames* below *events*: events that reached the relay in one read, or that it "
                 "wrote in one.", "")
        rows = []
        for t in PROXIES + REFERENCES:
            r = res.get(t)
            if not r:
                continue
            if "error" in r:
                rows.append([NAMES[t], "failed: " + r["error"][:120]] + [""] * 8)
                continue
            w, u = r["read_to_write_us"], r["user_us"]
            rows.append([NAMES[t], f"{num(w['frames'])} / {num(r.get('events'))}", us1(w["p50"]),
                         us1(w["p90"]), us1(w["p99"]), us1(w["p999"]), us1(u.get("p50")), us1(u.get("p99")),
                         num(r.get("lost")), us(r["event_delay_us"]["p99"])])
        self.add(table(["relay", "frames / events", "read → write p50", "p90", "p99", "p99.9",
                        "own code p50", "own code p99", "perf events lost", "event delay p99 (traced)"],
                       rows), "")
        o = res.get("ours")
        if o and "error" not in o:
            others = ", ".join(f"{NAMES[t]} {us1(res[t]['read_to_write_us']['p99'])}"
                               for t in ["nginx", "haproxy", "floor"] if t in res and "error" not in res[t])
            p99 = o["read_to_write_us"]["p99"]
            self.target("Added inter-frame latency ≤ 5 µs p99, inside the relay (read → write)",
                        f"{us1(p99)} (p50 {us1(o['read_to_write_us']['p50'])})", p99 <= 5, others)

    def callgrind(self):
        rows = self.s.get("callgrind")
        if not rows or isinstance(rows, dict):
            return
        self.add("## Instructions per request (callgrind)", "",
                 "Each proxy under `valgrind --tool=callgrind` (user-space instructions only; the kernel's "
                 "share of the work is not counted), counters zeroed after a warm-up, then 20-event "
                 "passthrough requests at concurrency 1 for a fixed time:", "")
        t = [[NAMES.get(r["target"], r["target"]), num(r.get("requests")), num(r.get("instructions_per_request")),
              r.get("error") or r.get("note", "")] for r in rows]
        self.add(table(["proxy", "requests", "instructions / request", "note"], t), "")
        ours = next((r for r in rows if r["target"] == "ours" and r.get("instructions_per_request")), None)
        for other in ("nginx", "haproxy", "floor"):
            o = next((r for r in rows if r["target"] == other and r.get("instructions_per_request")), None)
            if ours and o:
                self.add(f"- ours ÷ {NAMES[other]}: {ours['instructions_per_request'] / o['instructions_per_request']:.2f}×")
        self.add("")

    def render(self, analysis, reliability=None):
        m = self.meta
        self.passthrough()
        self.conversion()
        self.criterion()
        self.memory()
        self.startup()
        self.gateway()
        self.callgrind()
        head = ["# Benchmarks", "",
                "Generated by `bench/run.sh` (issue 5) from "
                f"`{m.get('run_dir')}/results.json`{' — **quick smoke run**' if m.get('quick') else ''}. "
                "Run it again with:", "",
                "```sh", "bench/run.sh            # full suite, ~10 minutes on 2 cores (after the first build)",
                "bench/run.sh --quick    # ~2-minute smoke run", "```", "",
                "Everything runs on 127.0.0.1 against one mock upstream (`examples/bench_upstream.rs`), "
                "with `wrk` and `examples/bench_load.rs` as clients. The load generator and the mock are "
                "pinned to CPU 0, the proxy under test to CPU 1 (`taskset`); every proxy gets that one "
                "core: ours (one CPU, so tokio's current-thread scheduler; the hyper floor keeps the multi-thread one, "
                "on which it is faster), "
                "nginx `worker_processes 1`, HAProxy "
                "`nbthread 1`; configs in `bench/`. Ours runs with `RUST_LOG=warn` (no access-log "
                "line), nginx with `access_log off`, HAProxy without logging. **The machine is shared "
                "and noisy** (other builds and tests were running during this run: see the *foreign "
                "CPU* columns), so compare ratios within one table rather than absolute numbers.", "",
                "## Machine and versions", "",
                table(["", ""], [["date", m.get("date")], ["CPU", f"{m.get('cpu')}, {m.get('cores')} cores"],
                                 ["memory", f"{m.get('mem_gib')} GiB"], ["OS / kernel", f"{m.get('os')} / {m.get('kernel')}"],
                                 ["rustc", m.get("rustc")], ["openai-stream-proxy", m.get("proxy_rev")],
                                 ["nginx", m.get("nginx")], ["HAProxy", m.get("haproxy")], ["wrk", m.get("wrk")],
                                 ["load average at start / end", f"{' '.join(m.get('loadavg_start', []))} / "
                                                                  f"{' '.join(m.get('loadavg_end', []))}"],
                                 ["suite run time", f"{m.get('total_seconds')} s"]], align=["l", "l"]), ""]
        if m.get("errors"):
            head += ["**Steps that failed in this run:** " +
                     "; ".join(f"{k}: {v}" for k, v in m["errors"].items()), ""]
        tgt = ["## Targets", "", table(["target", "measured", "status", "note"],
                                       [list(t) for t in self.targets], align=["l", "l", "l", "l"]), ""]
        out = head + tgt + self.lines
        if analysis:
            out += ["## Analysis", "", analysis.strip(), ""]
        if reliability:
            out += [reliability.strip(), ""]
        return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--charts", default="bench/charts")
    ap.add_argument("--analysis", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis.md"))
    ap.add_argument("--reliability",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability.md"),
                    help="hand-kept soak, fuzzing and fault-handling section appended after the analysis")
    args = ap.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    analysis = None
    if os.path.exists(args.analysis):
        with open(args.analysis) as f:
            analysis = f.read()
    reliability = None
    if os.path.exists(args.reliability):
        with open(args.reliability) as f:
            reliability = f.read()
    text = Report(results, args.charts, args.out).render(analysis, reliability)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} and charts in {args.charts}")


if __name__ == "__main__":
    main()
