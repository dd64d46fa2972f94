#!/usr/bin/env bash
# End-to-end suite driven by the official openai Node SDK (tests/node/).
#
# Installs tests/node/package-lock.json into tests/node/node_modules with `npm ci` (only when the
# lock file or package.json changed since the last install: a stamp in node_modules records
# them), builds the proxy with `cargo build` unless OSP_BINARY names one, then runs
# `node --test` on tests/node/*.test.mjs. Fails when no test ran.
#
#   bash scripts/node-e2e.sh                               # everything
#   bash scripts/node-e2e.sh --test-name-pattern=synthetic # extra arguments go to node --test
#
# Environment: NODE (default node, >= 20), NPM (default npm), PYTHON (default python3, >= 3.9;
# runs tests/sdk/mock_upstream.py), OSP_BINARY (skip the build and test this binary),
# OSP_FIXTURES_DIR (default ../shared/fixtures; tests needing it skip when absent).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Relative paths in the environment mean the caller's directory; the tests run elsewhere.
for var in OSP_BINARY OSP_FIXTURES_DIR; do
    if [[ -n "${!var:-}" && "${!var}" != /* ]]; then
        export "$var=$PWD/${!var}"
    fi
done
cd "$repo"

node="${NODE:-node}"
npm="${NPM:-npm}"
python="${PYTHON:-python3}"
suite="$repo/tests/node"
modules="$suite/node_modules"
stamp="$modules/.osp-node-e2e.sha256"

if ! major="$("$node" -p 'process.versions.node.split(".")[0]' 2>/dev/null)" || [[ "$major" -lt 20 ]]; then
    echo "node-e2e: need Node.js >= 20 as \`$node\` (set NODE)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    echo "node-e2e: need Python >= 3.9 as \`$python\` for the mock upstream (set PYTHON)" >&2
    exit 1
fi

# The install is keyed by the lock file and package.json.
want="$(cat "$suite/package.json" "$suite/package-lock.json" | "$python" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$modules/openai/package.json" ]]; then
    echo "node-e2e: reusing $modules"
else
    echo "node-e2e: npm ci in tests/node"
    # The pinned openai 7.x declares engines node >= 22; it runs on Node 20 and npm only warns,
    # so do not let a user-level engine-strict setting turn that into a failure.
    (cd "$suite" && "$npm" ci --no-audit --no-fund --ignore-scripts --engine-strict=false)
    echo "$want" >"$stamp"
fi

if [[ -z "${OSP_BINARY:-}" ]]; then
    echo "node-e2e: cargo build"
    cargo build --quiet --bin openai-stream-proxy
    target_dir="${CARGO_TARGET_DIR:-$repo/target}"
    [[ "$target_dir" = /* ]] || target_dir="$repo/$target_dir"
    export OSP_BINARY="$target_dir/debug/openai-stream-proxy"
fi
echo "node-e2e: proxy binary $OSP_BINARY"

shopt -s nullglob
files=("$suite"/*.test.mjs)
shopt -u nullglob
if [[ ${#files[@]} -eq 0 ]]; then
    echo "node-e2e: FAILED: no tests/node/*.test.mjs" >&2
    exit 1
fi

tap="$(mktemp "${TMPDIR:-/tmp}/osp-node-e2e.XXXXXX")"
trap 'rm -f "$tap"' EXIT

status=0
(cd "$suite" && PYTHON="$python" "$node" --test \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$tap" \
    "$@" "${files[@]}") || status=$?

# "Ran" means passed, failed or cancelled: tests that were all skipped (or filtered out by a
# name pattern) do not count.
count() { sed -n "s/^# $1 \([0-9][0-9]*\)\$/\1/p" "$tap" | tail -n 1; }
passed="$(count pass)" failed="$(count fail)" cancelled="$(count cancelled)"
ran=$(( ${passed:-0} + ${failed:-0} + ${cancelled:-0} ))
if [[ "$ran" -eq 0 ]]; then
    echo "node-e2e: FAILED: node --test ran no tests" >&2
    exit 1
fi
exit "$status"
