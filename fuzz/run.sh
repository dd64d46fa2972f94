#!/usr/bin/env bash
# Runs fuzz targets one after another on stable Rust, SECONDS each (default 300), and prints
# libFuzzer's final numbers per target. Usage, from anywhere:
#   fuzz/run.sh [SECONDS] [TARGET...]        (no TARGET: all five)
# New inputs go to fuzz/corpus-run/TARGET (ignored by git); the committed seeds in
# fuzz/corpus/TARGET and, when present, the captured streams in ../shared/fixtures/captured are
# read too. Logs: fuzz/artifacts/TARGET.log; crashes: fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sse chat_accumulator responses_accumulator request_rewrite config)
captured=../shared/fixtures/captured
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-run/$t" fuzz/artifacts
    extra=()
    case $t in
        sse|chat_accumulator|responses_accumulator) [ -d "$captured" ] && extra=("$captured") ;;
    esac
    status=0
    cargo +stable fuzz run -s none "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" "${extra[@]}" -- \
        -max_total_time="$secs" -max_len=32768 -timeout=10 -print_final_stats=1 \
        > "fuzz/artifacts/$t.log" 2>&1 || status=$?
    echo "== $t (exit $status)"
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done|panicked at|^SUMMARY|^artifact_prefix|Test unit written' \
        "fuzz/artifacts/$t.log" || true
    [ $status -eq 0 ] || exit $status
done
