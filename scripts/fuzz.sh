#!/usr/bin/env bash
# Bounded fuzzing with cargo fuzz (libFuzzer):
#   - the protocol parsers (crates/proto/fuzz: request_parser, caps_parser),
#   - the device itself (crates/device/fuzz: chain_image = descriptor chains against a guest
#     memory image; vhost_user_session = a fuzzed frontend's session of vhost-user calls,
#     memory writes and requests).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# A crash leaves its input in <crate>/fuzz/artifacts/<target>/; keep it as a regression test
# (crates/device/src/fuzzing.rs runs the device entry points in the unit tests).
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs=${1:-60}
run() {
    local dir=$1 target=$2
    mkdir -p "$dir/corpus/$target"
    (cd "$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
}
for target in request_parser caps_parser; do
    run "$root/crates/proto/fuzz" "$target"
done
for target in chain_image vhost_user_session; do
    run "$root/crates/device/fuzz" "$target"
done
