#!/usr/bin/env bash
# Host side of the VM-to-native check of tests/vm/guest-checks.sh: run next to
#   scripts/vm-test.sh --vms 2 --work WORK --append vfabric.native=1 \
#       --guest-script tests/vm/guest-checks.sh --bins BINS
# as  tests/vm/native-peer.sh WORK BINS/vf_exchange_test
# Once guest 1's QEMU is gone (it asks to be killed at once in this mode), device 1 of the
# daemon is free: this script takes it as a native vhost-user frontend, runs the
# vf_exchange_test server there, and hands its address to guest 0 through guest 0's mailbox
# FIFO. Exit status: the server's (0: every byte guest 0 sent, and its RMA, verified).
set -euo pipefail
work=${1:?usage: native-peer.sh WORK vf_exchange_test}
exe=${2:?usage: native-peer.sh WORK vf_exchange_test}
deadline=$(($(date +%s) + ${NATIVE_PEER_TIMEOUT:-400}))
until grep -q 'frontend disconnected dev=1' "$work/vfabricd.log" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "native-peer: guest 1 never left device 1" >&2; exit 1; }
    sleep 0.5
done
rm -f "$work/native.addr"
timeout 200 "$exe" server "$work/sock/vfabric1.sock" "$work/native.addr" >"$work/native.out" 2>&1 &
srv=$!
until [ -s "$work/native.addr" ]; do
    kill -0 "$srv" 2>/dev/null || { cat "$work/native.out" >&2; exit 1; }
    sleep 0.2
done
# The runner keeps the FIFO open read-write; one more writer is fine.
echo "native-addr $(tr ' ' , <"$work/native.addr")" >"$work/vm0.mbox"
wait "$srv"
rc=$?
cat "$work/native.out"
exit "$rc"
