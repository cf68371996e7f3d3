#!/usr/bin/env bash
# Write + commit latency and commit bandwidth: the same C program (scripts/pmem_commit_bench.c)
# through libfabric's tcp provider (FI_RMA_PMEM on MSG endpoints over 127.0.0.1) and through the
# vfabric provider (one vfabricd, one device, RDM), each against the local msync floor; then
# `vfabric pmem bench` (the Rust API, with and without a target commit handler). Files in
# $DIR (default /tmp). Prints the results; docs/perf.md records a run.
#
#   scripts/pmem-compare.sh                 # ITERS=200
#   ITERS=500 SIZES="8 4096 1048576" DIR=/mnt/pmem scripts/pmem-compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-200}
SIZES=${SIZES:-"8 64 4096 65536 1048576"}
DIR=${DIR:-/tmp}
cargo build --release -q -p vfabric-cli -p vfabric-device -p vfabric-provider
scripts/provider-link.sh release
OUT=$(mktemp -d /tmp/vfabric-pmem.XXXXXX)
cc -O2 -Wall -Wextra -Werror -o "$OUT/pmem_commit_bench" scripts/pmem_commit_bench.c -lfabric

echo "== libfabric tcp (FI_COMMIT_COMPLETE flushes CPU caches of the mapping only)"
timeout 300 "$OUT/pmem_commit_bench" tcp "$DIR/pmem-bench-tcp.$$" "$ITERS" $SIZES

echo "== vfabric provider (the device msyncs the range: durable on the file's disk)"
timeout 60 target/release/vfabricd --socket-dir "$OUT" --devices 1 --log-level warn &
d=$!
for _ in $(seq 100); do [ -S "$OUT/vfabric0.sock" ] && break; sleep 0.05; done
FI_PROVIDER_PATH="$PWD/target/release/prov" VFABRIC_DEVICES="$OUT/vfabric0.sock" \
    timeout 300 "$OUT/pmem_commit_bench" vfabric "$DIR/pmem-bench-vf.$$" "$ITERS" $SIZES
kill "$d" 2>/dev/null || true
wait "$d" 2>/dev/null || true

echo "== vfabric pmem bench (Rust API; handled = with a target commit handler)"
timeout 600 target/release/vfabric pmem bench --file "$DIR/pmem-bench-rs.$$" \
    --sizes "$(echo $SIZES | tr ' ' ',')" --iters "$ITERS"
rm -f "$DIR/pmem-bench-tcp.$$" "$DIR/pmem-bench-vf.$$" "$DIR/pmem-bench-rs.$$"
rm -rf "$OUT"
