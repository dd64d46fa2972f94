#!/usr/bin/env bash
# Runs the whole test suite: the Rust unit and integration tests, then the end-to-end suite
# driven by the official OpenAI SDKs for Python and Node (each installed locally by its own script).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked
bash scripts/lint-packaging.sh
cargo test --locked --all-targets
# `--all-targets` skips doctests: the crate-level embedding example is compiled here.
cargo test --locked --doc
# The benchmark suite's syscall-trace analysis (bench/residence.py) on a made-up trace.
python3 bench/residence.py --self-test
bash scripts/sdk-e2e.sh
bash scripts/node-e2e.sh
