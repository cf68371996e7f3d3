#!/usr/bin/env bash
# Bounded fuzzing of the protocol parsers with cargo fuzz (libFuzzer).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
set -euo pipefail
cd "$(dirname "$0")/../crates/proto/fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs=${1:-60}
for target in request_parser caps_parser; do
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs"
done
