#!/usr/bin/env bash
# Several hosts, side by side (issue 9's benchmark): two network namespaces joined by veth
# pairs on a bridge, each a "host" running its own vfabricd with an uplink over the host's
# libfabric (tcp;ofi_rxm); a guest on each host (the `vfabric` CLI on that host's device)
# runs pingpong and bw across, `fi_pingpong -p vfabric -e rdm` runs between the two hosts over
# the provider (the client naming the server by its IP address), and
# `fi_pingpong -p "tcp;ofi_rxm" -e rdm` runs directly between the same two namespaces. Prints
# markdown tables (medians of RUNS runs, ratios). Needs root (ip netns). Namespaces are
# removed on exit, also on failure.
#
#   scripts/bench-hosts.sh                 # RUNS=3 SIZES="8 4096 65536 1048576"
#   BENCHES="fi_vfabric tcp" scripts/bench-hosts.sh   # a subset (vfabric fi_vfabric tcp)
#   BW_ARGS="--op read" BENCHES=vfabric scripts/bench-hosts.sh   # `vfabric bw` of RMA reads
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release -q -p vfabric-cli -p vfabric-device -p vfabric-provider
    scripts/provider-link.sh release
fi

RUNS=${RUNS:-3}
SIZES=${SIZES:-"8 4096 65536 1048576"}
BENCHES=${BENCHES:-"vfabric fi_vfabric tcp"}
VFABRIC=${VFABRIC:-$PWD/target/release/vfabric}
VFABRICD=${VFABRICD:-$PWD/target/release/vfabricd}
TAG=vfb$$
OUT=$(mktemp -d /tmp/vfabric-hosts.XXXXXX)
RAW="$OUT/raw.jsonl"
: >"$RAW"
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${TAG}h0" "${TAG}h1" "${TAG}sw"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

ip netns add "${TAG}sw"
ip -n "${TAG}sw" link add br0 type bridge
ip -n "${TAG}sw" link set br0 up
for i in 0 1; do
    ns="${TAG}h$i"
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name "p$i" netns "${TAG}sw"
    ip -n "${TAG}sw" link set "p$i" master br0
    ip -n "${TAG}sw" link set "p$i" up
    ip -n "$ns" addr add "10.78.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done

for i in 0 1; do
    j=$((1 - i))
    mkdir -p "$OUT/host$i"
    ip netns exec "${TAG}h$i" "$VFABRICD" --socket-dir "$OUT/host$i" --devices 1 --log-level warn \
        --fabric-id 0xbe4c --host-id $((i + 1)) --uplink "tcp;ofi_rxm" --listen "10.78.0.$((i + 1))" \
        --peer "$((j + 1))=10.78.0.$((j + 1))" ${VFABRICD_ARGS:-} >"$OUT/host$i.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 200); do
    if "$VFABRIC" info --device "$OUT/host0/vfabric0.sock" 2>/dev/null | grep -q "remote hosts: 2 (1 device, up)"; then
        break
    fi
    sleep 0.05
done

iters_for() {
    local s=$1
    if ((s <= 4096)); then echo 2000; elif ((s <= 65536)); then echo 500; else echo 100; fi
}

vf_run() { # kind size iters run
    local kind=$1 size=$2 iters=$3 run=$4 addr="$OUT/addr-$1-$2-$4"
    local extra=()
    if [ "$kind" = bw ]; then read -r -a extra <<<"${BW_ARGS:-}"; fi
    timeout 120 "$VFABRIC" "$kind" "${extra[@]}" --device "$OUT/host0/vfabric0.sock" --server --addr-file "$addr" \
        --sizes "$size" --iters "$iters" --mode poll --quiet --verify >/dev/null 2>"$OUT/srv.err" &
    local s=$!
    if timeout 120 "$VFABRIC" "$kind" "${extra[@]}" --device "$OUT/host1/vfabric0.sock" --addr-file "$addr" \
        --sizes "$size" --iters "$iters" --mode poll --quiet --json --verify >"$OUT/out.json" 2>"$OUT/cli.err"; then
        python3 - "vfabric $kind" "$OUT/out.json" >>"$RAW" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
for r in json.load(open(path))["results"]:
    print(json.dumps({"bench": label, "size": r["size"], "one_way_us": r.get("one_way_us"), "mb_s": r.get("mb_s")}))
PY
    else
        echo "bench-hosts: vfabric $kind size $size failed: $(tail -2 "$OUT/cli.err" | tr '\n' ' ')" >&2
        kill "$s" 2>/dev/null || true
    fi
    wait "$s" 2>/dev/null || true
}

fi_run() { # size iters run
    local size=$1 iters=$2 port=$((47800 + $3))
    timeout 120 ip netns exec "${TAG}h0" fi_pingpong -p "tcp;ofi_rxm" -e rdm -I "$iters" -S "$size" -B "$port" \
        >"$OUT/fsrv.txt" 2>&1 &
    local s=$!
    sleep 0.5
    if timeout 120 ip netns exec "${TAG}h1" fi_pingpong -p "tcp;ofi_rxm" -e rdm -I "$iters" -S "$size" -P "$port" \
        10.78.0.1 >"$OUT/fcli.txt" 2>&1; then
        awk -v s="$size" 'NF >= 8 && $1 ~ /^[0-9]+[km]?$/ {
                n = $1 + 0; if ($1 ~ /k$/) n *= 1024; if ($1 ~ /m$/) n *= 1048576
                if (n == s) printf "{\"bench\":\"fi_pingpong tcp;ofi_rxm\",\"size\":%s,\"one_way_us\":%s,\"mb_s\":%s}\n", s, $7, $6
            }' "$OUT/fcli.txt" >>"$RAW"
    else
        echo "bench-hosts: fi_pingpong size $size failed: $(tail -2 "$OUT/fcli.txt" | tr '\n' ' ')" >&2
    fi
    wait "$s" 2>/dev/null || true
}

# fi_pingpong over the provider: each side in its host's namespace on its host's device; the
# client names the server by its IP address, which names host 1 (its uplink address).
fi_vf_run() { # size iters run
    local size=$1 iters=$2 port=$((47900 + $3))
    local env=(env FI_PROVIDER_PATH="$PWD/target/release/prov")
    timeout 120 ip netns exec "${TAG}h0" "${env[@]}" VFABRIC_DEVICES="$OUT/host0/vfabric0.sock" \
        fi_pingpong -p vfabric -e rdm -I "$iters" -S "$size" -B "$port" >"$OUT/vsrv.txt" 2>&1 &
    local s=$!
    sleep 0.5
    if timeout 120 ip netns exec "${TAG}h1" "${env[@]}" VFABRIC_DEVICES="$OUT/host1/vfabric0.sock" \
        fi_pingpong -p vfabric -e rdm -I "$iters" -S "$size" -P "$port" 10.78.0.1 >"$OUT/vcli.txt" 2>&1; then
        awk -v s="$size" 'NF >= 8 && $1 ~ /^[0-9]+[km]?$/ {
                n = $1 + 0; if ($1 ~ /k$/) n *= 1024; if ($1 ~ /m$/) n *= 1048576
                if (n == s) printf "{\"bench\":\"fi_pingpong vfabric\",\"size\":%s,\"one_way_us\":%s,\"mb_s\":%s}\n", s, $7, $6
            }' "$OUT/vcli.txt" >>"$RAW"
    else
        echo "bench-hosts: fi_pingpong -p vfabric size $size failed: $(tail -2 "$OUT/vcli.txt" | tr '\n' ' ')" >&2
    fi
    wait "$s" 2>/dev/null || true
}

has() { [[ " $BENCHES " == *" $1 "* ]]; }

for run in $(seq "$RUNS"); do
    for size in $SIZES; do
        it=$(iters_for "$size")
        if has vfabric; then
            vf_run pingpong "$size" "$it" "$run"
            vf_run bw "$size" "$it" "$run"
        fi
        if has fi_vfabric; then fi_vf_run "$size" "$it" "$run"; fi
        if has tcp; then fi_run "$size" "$it" "$run"; fi
    done
done

python3 - "$RAW" "$RUNS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(bench, size, key):
    v = [r[key] for r in rows if r["bench"] == bench and r["size"] == size and r.get(key)]
    return statistics.median(v) if v else None
sizes = sorted({r["size"] for r in rows})
print(f"Two hosts (network namespaces, veth + bridge), medians of {sys.argv[2]} runs:\n")
print("| size | vfabric pingpong one-way µs | tcp;ofi_rxm fi_pingpong one-way µs | ratio | vfabric bw MB/s | tcp;ofi_rxm MB/s | ratio |")
print("|---|---|---|---|---|---|---|")
fmt = lambda x: "—" if x is None else f"{x:.1f}"
for s in sizes:
    vl, tl = med("vfabric pingpong", s, "one_way_us"), med("fi_pingpong tcp;ofi_rxm", s, "one_way_us")
    vb, tb = med("vfabric bw", s, "mb_s"), med("fi_pingpong tcp;ofi_rxm", s, "mb_s")
    rl = f"{vl / tl:.2f}×" if vl and tl else "—"
    rb = f"{vb / tb:.2f}×" if vb and tb else "—"
    print(f"| {s} B | {fmt(vl)} | {fmt(tl)} | {rl} | {fmt(vb)} | {fmt(tb)} | {rb} |")
print("\nfi_pingpong -e rdm between the same two hosts, over the provider (`-p vfabric`, guest to")
print("guest through both daemons and their uplink) and directly (`-p \"tcp;ofi_rxm\"`):\n")
print("| size | vfabric one-way µs | tcp;ofi_rxm one-way µs | ratio | vfabric MB/s | tcp;ofi_rxm MB/s | ratio |")
print("|---|---|---|---|---|---|---|")
for s in sizes:
    vl, tl = med("fi_pingpong vfabric", s, "one_way_us"), med("fi_pingpong tcp;ofi_rxm", s, "one_way_us")
    vb, tb = med("fi_pingpong vfabric", s, "mb_s"), med("fi_pingpong tcp;ofi_rxm", s, "mb_s")
    rl = f"{vl / tl:.2f}×" if vl and tl else "—"
    rb = f"{vb / tb:.2f}×" if vb and tb else "—"
    print(f"| {s} B | {fmt(vl)} | {fmt(tl)} | {rl} | {fmt(vb)} | {fmt(tb)} | {rb} |")
PY
