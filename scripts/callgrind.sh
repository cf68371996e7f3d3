#!/usr/bin/env bash
# Instructions per message (device + driver), from valgrind's callgrind: one process (embedded
# daemon, two guests), blocking completions and no device polling so no spin loop is counted;
# runs N and 2N round trips and divides the difference by the N extra round trips (2 messages
# each), which cancels set-up. Deterministic for one binary: a regression figure, not latency.
#   scripts/callgrind.sh [SIZE] [N]     (defaults 8 and 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vfabric-cli
size=${1:-8}
n=${2:-2000}
out=$(mktemp -d)
run() {
    VFABRIC_SPIN_US=0 valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1" \
        target/release/vfabric pingpong --mode block --poll-us 0 --sizes "$size" \
        --iters "$1" --fixed-iters --warmup 0 --quiet >/dev/null 2>"$out/log.$1"
    grep -E "Collected" "$out/log.$1" | awk '{print $NF}' | tr -d ','
}
a=$(run "$n")
b=$(run $((2 * n)))
per_msg=$(( (b - a) / (2 * n) ))
echo "callgrind: size $size B: $a instructions for $n round trips, $b for $((2 * n)); $per_msg instructions per message (device + both drivers)"
