#!/usr/bin/env bash
# Instructions per message (device + driver), from valgrind's callgrind: one process (embedded
# daemon, two guests), blocking completions and no device polling so no spin loop is counted;
# runs N and 2N round trips and divides the difference by the N extra round trips (2 messages
# each), which cancels set-up. Deterministic for one binary: a regression figure, not latency.
#   scripts/callgrind.sh [SIZE] [N] [PAIRS]     (defaults 8, 2000, none)
# With PAIRS (a list like 1,2,4,8; or PAIRS=... in the environment) it runs `vfabric scale`
# instead, once per pair count P: P pairs ping-pong at once, N and 2N round trips each, and the
# difference is divided by the P*N*2 extra messages, so instructions per message can be
# compared across pair counts (they should not grow with P). PHASE=rate counts one-way
# streaming messages (windows of 64, acknowledged) instead of ping-pong round trips.
# OP=send|write|read|fadd (without PAIRS) counts one-way operations instead of ping-pong
# messages: `vfabric bw --op send|write|read` or `vfabric atomic --op fadd`, windows of 64,
# N and 2N operations, the difference divided by N.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vfabric-cli
size=${1:-8}
n=${2:-2000}
pairs=${3:-${PAIRS:-}}
phase=${PHASE:-pingpong}
out=$(mktemp -d)
collected() { # log file: the total instruction count callgrind printed
    grep -E "Collected" "$1" | awk '{print $NF}' | tr -d ','
}
run() {
    VFABRIC_SPIN_US=0 valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1" \
        target/release/vfabric pingpong --mode block --poll-us 0 --sizes "$size" \
        --iters "$1" --fixed-iters --warmup 0 --quiet >/dev/null 2>"$out/log.$1"
    collected "$out/log.$1"
}
run_scale() { # pairs iterations
    local p=$1 it=$2 iters_opt
    case $phase in
    pingpong) iters_opt=(--pp-iters "$it") ;;
    rate) iters_opt=(--rate-iters "$it" --window 64) ;;
    *)
        echo "callgrind: PHASE must be pingpong or rate" >&2
        exit 2
        ;;
    esac
    # Generous timeout: valgrind runs the threads one at a time, far slower than natively.
    VFABRIC_SPIN_US=0 valgrind --tool=callgrind --callgrind-out-file="$out/cg.$p.$it" \
        target/release/vfabric scale --pairs "$p" --phases "$phase" --msg-size "$size" \
        "${iters_opt[@]}" --mode block --poll-us 0 --warmup 0 --timeout-s 900 --quiet \
        >/dev/null 2>"$out/log.$p.$it"
    collected "$out/log.$p.$it"
}
run_op() { # iterations: one-way operations of kind $OP
    local cmd=bw
    [ "$OP" = fadd ] && cmd=atomic
    VFABRIC_SPIN_US=0 valgrind --tool=callgrind --callgrind-out-file="$out/cg.op.$1" \
        target/release/vfabric "$cmd" --op "$OP" --mode block --poll-us 0 --sizes "$size" \
        --iters "$1" --fixed-iters --warmup 0 --quiet >/dev/null 2>"$out/log.op.$1"
    collected "$out/log.op.$1"
}
if [ -z "$pairs" ] && [ -n "${OP:-}" ]; then
    n=$(((n + 63) / 64 * 64)) # whole windows of 64
    a=$(run_op "$n")
    b=$(run_op $((2 * n)))
    echo "callgrind: $OP, size $size B: $a instructions for $n operations, $b for $((2 * n)); $(((b - a) / n)) instructions per operation (device + both drivers)"
    exit 0
fi
if [ -z "$pairs" ]; then
    a=$(run "$n")
    b=$(run $((2 * n)))
    per_msg=$(((b - a) / (2 * n)))
    echo "callgrind: size $size B: $a instructions for $n round trips, $b for $((2 * n)); $per_msg instructions per message (device + both drivers)"
    exit 0
fi
if [ "$phase" = rate ]; then
    n=$(((n + 63) / 64 * 64)) # whole windows, so 2N is exactly twice the messages of N
    per_unit=1                # messages per counted iteration
else
    per_unit=2
fi
for p in ${pairs//,/ }; do
    a=$(run_scale "$p" "$n")
    b=$(run_scale "$p" $((2 * n)))
    msgs=$((p * n * per_unit))
    echo "callgrind: $phase, size $size B, $p pairs: $a instructions for $n iterations per pair, $b for $((2 * n)); $(((b - a) / msgs)) instructions per message (device + all drivers)"
done
