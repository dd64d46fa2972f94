#!/usr/bin/env bash
# The benchmark suite of issue 5: installs its tools, builds the release binaries, measures
# every comparison in one run on 127.0.0.1, and writes BENCHMARKS.md + bench/charts/*.svg.
#
#   bench/run.sh            # full run (~8-9 minutes of measurement on 2 cores)
#   bench/run.sh --quick    # ~2 minute smoke run (writes target/bench/BENCHMARKS.quick.md)
#   bench/run.sh --no-callgrind
#   bench/run.sh --nice -10      # on a busy shared machine: priority for the benchmark processes
#   bench/run.sh --report-only   # regenerate the report from target/bench/latest
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0; REPORT_ONLY=0; PASS=()
while [ $# -gt 0 ]; do
  arg="$1"; shift
  case "$arg" in
    --quick) QUICK=1; PASS+=("$arg") ;;
    --no-callgrind) PASS+=("$arg") ;;
    --nice) PASS+=("--nice" "$1"); shift ;;
    --report-only) REPORT_ONLY=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$REPORT_ONLY" = 0 ]; then
  # 1. Tools (idempotent: apt-get only runs when one is missing). Debian's policy-rc.d keeps
  #    the packaged nginx/haproxy services from starting; the suite runs its own instances.
  need=()
  command -v nginx   >/dev/null || need+=(nginx-light)
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v wrk     >/dev/null || need+=(wrk)
  command -v taskset >/dev/null || need+=(util-linux)
  command -v perf    >/dev/null || need+=(linux-perf)
  if [ "$QUICK" = 0 ]; then command -v valgrind >/dev/null || need+=(valgrind); fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
    # Packaged services may have started on installs without a policy-rc.d: stop them.
    $SUDO service nginx stop >/dev/null 2>&1 || true
    $SUDO service haproxy stop >/dev/null 2>&1 || true
  fi

  # 2. Build (release profile: LTO, one codegen unit), examples and the Criterion bench.
  t0=$(date +%s)
  cargo build --release --bin openai-stream-proxy --example bench_upstream --example bench_load --example hyper_floor
  cargo bench --bench aggregate --no-run
  echo "build: $(( $(date +%s) - t0 )) s"

  # 3. Enough file descriptors for 5000 streams / WebSocket sessions per process.
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

  # 4. Measure (bounded: every step has its own time limit).
  timeout 900 python3 bench/run.py "${PASS[@]}"
fi

# 5. Report.
if [ "$QUICK" = 1 ]; then
  python3 bench/report.py target/bench/latest/results.json --out target/bench/BENCHMARKS.quick.md --charts target/bench/charts
else
  python3 bench/report.py target/bench/latest/results.json --out BENCHMARKS.md --charts bench/charts
fi
