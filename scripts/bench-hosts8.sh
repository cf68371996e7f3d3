#!/usr/bin/env bash
# Eight hosts, all to all (issue 9's 8-host run): eight network namespaces on one bridge, each a
# "host" running its own vfabricd with an uplink over tcp;ofi_rxm, a guest on every host, every
# guest sending to every other one message of 64 B, 4 KiB, 20000 B and 64 KiB per round, every
# byte checked at its receiver. It is the test `eight_hosts_all_to_all_with_verification` of
# tests/hosts.rs in a release build with more rounds; one test thread drives all eight guests
# (posting, sending, polling and verifying), so the figure is a floor of what the daemons carry.
# Prints the median aggregate throughput (verified bytes received by all guests per second) of
# RUNS runs. Needs root (ip netns); the test removes its namespaces, also on failure.
#
#   scripts/bench-hosts8.sh                # RUNS=5 ROUNDS=100
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vfabric-device -p vfabric-cli
cargo test --release -q --test hosts --no-run

RUNS=${RUNS:-5}
ROUNDS=${ROUNDS:-100}
OUT=$(mktemp /tmp/vfabric-hosts8.XXXXXX)
for _ in $(seq "$RUNS"); do
    HOSTS8_ROUNDS=$ROUNDS cargo test --release -q --test hosts -- \
        eight_hosts_all_to_all_with_verification --exact --nocapture 2>&1 |
        grep "8 hosts all-to-all" | tee -a "$OUT"
done
python3 - "$OUT" "$RUNS" "$ROUNDS" <<'PY'
import re, statistics, sys
rates = [float(m.group(1)) for l in open(sys.argv[1]) if (m := re.search(r"([0-9.]+) MB/s aggregate", l))]
if len(rates) != int(sys.argv[2]):
    sys.exit(f"bench-hosts8: {len(rates)} of {sys.argv[2]} runs finished")
print(f"\nEight hosts all-to-all, {sys.argv[3]} rounds, medians of {sys.argv[2]} runs: "
      f"{statistics.median(rates):.1f} MB/s aggregate (runs: {', '.join(f'{r:.1f}' for r in rates)}), no errors")
PY
rm -f "$OUT"
