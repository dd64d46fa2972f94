#!/usr/bin/env bash
# Soak test: steady mixed load through the release proxy on 127.0.0.1 for a fixed time, with
# its RSS and open file descriptors sampled; stops by itself.
#
#   bench/soak.sh                     # 10 minutes at 200 starts/s
#   bench/soak.sh --duration 60       # a short run
#   bench/soak.sh --rate 100 --sample-every 2 --out target/soak-100
#   bench/soak.sh --duration 120 --out target/soak-ws -- --only websocket_session
#                                     # after --: passed to soak_load (see its --help)
#   bench/soak.sh --report-only       # redo soak.svg and summary.md from the files in --out
#
# Mock upstream: examples/bench_upstream.rs. Load: examples/soak_load.rs (conversions, passthrough
# streams/paced streams/uploads/GETs over HTTP/1.1 keep-alive, fresh connections and HTTP/2,
# WebSocket sessions, a few clients hanging up mid-stream; every answer checked byte for byte).
# Writes into --out (default target/soak): samples.csv, result.json, soak.svg (RSS and fds
# over time), summary.md, proxy.log. Exit status 0 only when the verdict is PASS.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=600; RATE=200; EVERY=5; OUT=target/soak; EXTRA=(); REPORT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --sample-every) EVERY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --report-only) REPORT_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$DURATION" in ''|*[!0-9]*) echo "--duration takes whole seconds" >&2; exit 2 ;; esac

if [ "$REPORT_ONLY" = 0 ]; then
cargo build --release --bin openai-stream-proxy --example bench_upstream --example soak_load
REL=target/release
mkdir -p "$OUT"
rm -f "$OUT"/samples.csv "$OUT"/result.json "$OUT"/soak.svg "$OUT"/summary.md "$OUT"/*.log
# Room for every connection of the load (the proxy inherits the limit).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

MOCK_PID=""; PROXY_PID=""
cleanup() {
  # Only the processes this script started, by pid.
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  [ -n "$MOCK_PID" ] && kill "$MOCK_PID" 2>/dev/null || true
}
trap cleanup EXIT

# Waits (bounded) until file $1 contains a line matching $2.
wait_line() {
  for _ in $(seq 1 200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "no line matching '$2' in $1 within 10 s:" >&2; cat "$1" >&2; return 1
}

# 1. The mock upstream on an ephemeral port.
"$REL/examples/bench_upstream" --listen 127.0.0.1:0 --threads 1 2>"$OUT/mock.log" &
MOCK_PID=$!
wait_line "$OUT/mock.log" "listening on"
MOCK_ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$OUT/mock.log" | head -n 1)

# 2. The proxy (release build, default log level: one line per request) on a free port.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$OUT/config.json" <<EOF
{"rules": [{"listenPort": $PORT, "listenAddress": "127.0.0.1", "upstreamUrl": "http://$MOCK_ADDR"}]}
EOF
env -u RUST_LOG -u LOG_LEVEL -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy \
  "$REL/openai-stream-proxy" -c "$OUT/config.json" 2>"$OUT/proxy.log" &
PROXY_PID=$!
wait_line "$OUT/proxy.log" "proxy rule"
echo "soak: proxy pid $PROXY_PID on 127.0.0.1:$PORT, mock on $MOCK_ADDR, ${DURATION} s at ${RATE}/s"

# 3. The load (bounded: duration + the per-request limit + margin).
LOAD_STATUS=0
timeout $((DURATION + 120)) "$REL/examples/soak_load" --proxy "127.0.0.1:$PORT" --pid "$PROXY_PID" \
  --duration "$DURATION" --rate "$RATE" --sample-every "$EVERY" --out "$OUT" "${EXTRA[@]}" || LOAD_STATUS=$?

# 4. Graceful stop: exit 0 expected well within the 30 s drain.
kill -TERM "$PROXY_PID"
PROXY_STATUS=0
for _ in $(seq 1 350); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PROXY_PID" 2>/dev/null; then
  echo "the proxy did not exit within 35 s of SIGTERM" >&2; PROXY_STATUS=124
else
  wait "$PROXY_PID" || PROXY_STATUS=$?
fi
PROXY_PID=""
kill "$MOCK_PID" 2>/dev/null || true; wait "$MOCK_PID" 2>/dev/null || true; MOCK_PID=""
echo "$LOAD_STATUS $PROXY_STATUS" >"$OUT/exit_status"
fi
read -r LOAD_STATUS PROXY_STATUS <"$OUT/exit_status"

# 5. Chart and summary (Python standard library only).
python3 - "$OUT" "$LOAD_STATUS" "$PROXY_STATUS" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import csv, datetime, json, os, platform, sys

out, load_status, proxy_status, commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
result = json.load(open(os.path.join(out, "result.json")))
rows = list(csv.DictReader(open(os.path.join(out, "samples.csv"))))
for r in rows:
    for k in ("t_s",):
        r[k] = float(r[k])
    for k in ("rss_kib", "fds", "threads", "requests", "errors", "in_flight"):
        r[k] = int(r[k])
load = [r for r in rows if r["phase"] == "load"]
idle = [r for r in rows if r["phase"] == "idle"]
drained = [r for r in rows if r["phase"] == "drained"]
duration = float(result["duration_s"])
# The load starts right after the idle sample.
t0 = idle[-1]["t_s"] if idle else 0.0
# Warm-up: the first tenth of the run, at least 10 s and at most 60 s. The comparison
# windows: the tenth after warm-up against the last tenth (at least 10 s each).
warm = max(10.0, min(60.0, duration / 10))
window = max(10.0, duration / 10)
end_t = load[-1]["t_s"] if load else 0.0
first = [r for r in load if warm <= r["t_s"] - t0 < warm + window] or load[:1]
last = [r for r in load if r["t_s"] >= end_t - window] or load[-1:]
after_warm = [r for r in load if r["t_s"] - t0 >= warm] or load

def mean(xs, k):
    return sum(x[k] for x in xs) / len(xs) if xs else 0.0

def slope(xs, k):
    # Least squares, per minute.
    if len(xs) < 3:
        return 0.0
    mx = mean(xs, "t_s"); my = mean(xs, k)
    sxx = sum((x["t_s"] - mx) ** 2 for x in xs)
    return 60.0 * sum((x["t_s"] - mx) * (x[k] - my) for x in xs) / sxx if sxx else 0.0

rss_w, rss_e = mean(first, "rss_kib"), mean(last, "rss_kib")
fds_w, fds_e = mean(first, "fds"), mean(last, "fds")
rss_max = max((r["rss_kib"] for r in after_warm), default=0)
fds_max = max((r["fds"] for r in after_warm), default=0)
rss_ok = rss_e <= rss_w * 1.10 + 1024
fds_ok = fds_e <= fds_w * 1.10 + 8
errors = int(result["errors"])
verdict = "PASS" if (errors == 0 and rss_ok and fds_ok and load_status == 0 and proxy_status == 0) else "FAIL"

# --- SVG: RSS (MiB) and open fds against time, warm-up shaded.
W, H, L, R, T, B, GAP = 900, 520, 70, 20, 40, 45, 50
ph = (H - T - B - GAP) / 2
tmax = max((r["t_s"] for r in rows), default=1.0) or 1.0

def nice(v):
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if v / step <= 6:
            return step
    return 10 ** len(str(int(v)))

def panel(y0, key, scale, label, colour):
    vals = [r[key] / scale for r in rows]
    vmax = max(vals + [1.0]) * 1.15
    step = nice(vmax)
    vmax = step * (int(vmax / step) + 1)
    x = lambda t: L + (W - L - R) * t / tmax
    y = lambda v: y0 + ph - ph * v / vmax
    s = [f'<rect x="{L}" y="{y0}" width="{W-L-R}" height="{ph:.1f}" fill="none" stroke="#999"/>']
    s.append(f'<rect x="{x(t0):.1f}" y="{y0}" width="{x(t0 + warm) - x(t0):.1f}" height="{ph:.1f}" fill="#eee"/>')
    v = 0
    while v <= vmax:
        s.append(f'<line x1="{L}" x2="{W-R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        s.append(f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end" font-size="11">{v:g}</text>')
        v += step
    pts = " ".join(f"{x(r['t_s']):.1f},{y(r[key] / scale):.1f}" for r in rows)
    s.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
    for r in rows:
        if r["phase"] != "load":
            s.append(f'<circle cx="{x(r["t_s"]):.1f}" cy="{y(r[key] / scale):.1f}" r="3" fill="{colour}"/>')
    s.append(f'<text x="{L}" y="{y0-6}" font-size="13" font-weight="bold">{label}</text>')
    return s, x

svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
       f'<rect width="{W}" height="{H}" fill="white"/>']
a, x = panel(T, "rss_kib", 1024.0, "Proxy RSS (MiB)", "#1f77b4")
b, _ = panel(T + ph + GAP, "fds", 1.0, "Proxy open file descriptors", "#d62728")
svg += a + b
step = nice(tmax)
t = 0
while t <= tmax:
    svg.append(f'<text x="{x(t):.1f}" y="{H-B+16}" text-anchor="middle" font-size="11">{t:g}</text>')
    t += step
svg.append(f'<text x="{(L+W-R)/2}" y="{H-8}" text-anchor="middle" font-size="12">seconds (shaded: warm-up; dots: idle before the load and drained after it)</text>')
svg.append("</svg>")
open(os.path.join(out, "soak.svg"), "w").write("\n".join(svg) + "\n")

# --- Summary.
mib = lambda k: f"{k / 1024:.1f} MiB"
modes = result["modes"]
lines = [
    "# Soak",
    "",
    f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit `{commit}`, {platform.system()} "
    f"{platform.machine()}, {os.cpu_count()} CPUs; release proxy, mock `bench_upstream`, load `soak_load`, all on 127.0.0.1.",
    "",
    f"- Duration: {result['load_s']:.0f} s of load at {result['rate']:g} starts/s "
    f"(warm-up: first {warm:.0f} s; samples every {result['sample_every_s']:g} s).",
    f"- Requests: {result['requests']} ({result['http1_keep_alive']} HTTP/1.1 kept alive, "
    f"{result['http1_fresh_connection']} on fresh HTTP/1.1 connections, {result['http2']} HTTP/2; "
    f"{result['websocket_messages']} WebSocket messages).",
    f"- Errors: {errors} unexpected (skipped over the in-flight cap: {result['skipped_over_max_in_flight']}); "
    f"{modes['cancel_mid_stream']['ok']} clients hung up mid-stream on purpose.",
    f"- RSS: {mib(rss_w)} after warm-up, {mib(rss_e)} at the end (max {mib(rss_max)}; "
    f"trend after warm-up {slope(after_warm, 'rss_kib'):+.0f} KiB/min); idle before the load "
    f"{mib(idle[0]['rss_kib']) if idle else '-'}, drained {mib(drained[-1]['rss_kib']) if drained else '-'}.",
    f"- Open fds: {fds_w:.0f} after warm-up, {fds_e:.0f} at the end (max {fds_max}); idle before the "
    f"load {idle[0]['fds'] if idle else '-'}, drained {drained[-1]['fds'] if drained else '-'}.",
    f"- Proxy exit after SIGTERM: {proxy_status}.",
    f"- Verdict: **{verdict}** (zero errors; end-of-run means within 10% of the post-warm-up means, "
    f"+1 MiB RSS / +8 fds).",
    "",
    "| mode | group | ok | errors |",
    "|---|---|---:|---:|",
]
for name, m in modes.items():
    lines.append(f"| {name} | {m['group']} | {m['ok']} | {m['errors']} |")
for g in ("convert", "passthrough", "websocket"):
    m = result["groups"].get(g, {"ok": 0, "errors": 0})
    lines.append(f"| **{g}** | | **{m['ok']}** | **{m['errors']}** |")
if result["error_examples"]:
    lines += ["", "First errors:", ""] + [f"- `{e}`" for e in result["error_examples"][:10]]
lines += ["", "![RSS and open file descriptors over time](soak.svg)", ""]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines))
print("\n".join(lines))
print(f"soak: wrote {out}/summary.md, {out}/soak.svg, {out}/samples.csv")
sys.exit(0 if verdict == "PASS" else 1)
PY
