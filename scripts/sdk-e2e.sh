#!/usr/bin/env bash
# End-to-end suite driven by the official openai Python SDK (tests/sdk/).
#
# Creates (or reuses) a venv at target/sdk-venv with tests/sdk/requirements.txt, builds the proxy
# with `cargo build` unless OSP_BINARY names one, then runs pytest on tests/sdk.
#
#   bash scripts/sdk-e2e.sh            # everything
#   bash scripts/sdk-e2e.sh -k chat    # extra arguments go to pytest
#
# Environment: PYTHON (default python3, >= 3.9), OSP_BINARY (skip the build and test this
# binary), OSP_FIXTURES_DIR (default ../shared/fixtures; tests needing it skip when absent).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
requirements="tests/sdk/requirements.txt"
venv="$repo/target/sdk-venv"
stamp="$venv/.requirements.sha256"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    echo "sdk-e2e: need Python >= 3.9 as \`$python\` (set PYTHON)" >&2
    exit 1
fi

# The venv is keyed by the interpreter version and the requirements file.
want="$("$python" - "$requirements" <<'EOF'
import hashlib, sys
h = hashlib.sha256(sys.version.encode())
with open(sys.argv[1], "rb") as f:
    h.update(f.read())
print(h.hexdigest())
EOF
)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
    && "$venv/bin/python" -c 'import openai, pytest' >/dev/null 2>&1; then
    echo "sdk-e2e: reusing $venv"
else
    echo "sdk-e2e: creating $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        --timeout 60 --retries 3 -r "$requirements"
    echo "$want" >"$stamp"
fi

if [[ -z "${OSP_BINARY:-}" ]]; then
    echo "sdk-e2e: cargo build"
    cargo build --quiet --bin openai-stream-proxy
    target_dir="${CARGO_TARGET_DIR:-$repo/target}"
    [[ "$target_dir" = /* ]] || target_dir="$repo/$target_dir"
    export OSP_BINARY="$target_dir/debug/openai-stream-proxy"
fi
echo "sdk-e2e: proxy binary $OSP_BINARY"

status=0
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest tests/sdk -q -rsxX -p no:cacheprovider "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "sdk-e2e: FAILED: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
