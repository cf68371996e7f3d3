#!/usr/bin/env bash
# Side-by-side benchmark: vfabric (two guests on one vfabricd) against libfabric's own providers
# (fi_pingpong -p shm -e rdm, the same with FI_SHM_DISABLE_CMA=1, fi_pingpong -p tcp -e msg), same
# sizes, each side pinned with taskset, medians of RUNS runs; then vfabric's own scaling (N guest
# pairs on one daemon) and head-of-line runs, which have no libfabric-bin counterpart; writes
# docs/perf.md.
#
#   scripts/bench-compare.sh            # RUNS=3
#   RUNS=5 SIZES="8 64 4096 65536 1048576" scripts/bench-compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vfabric-cli -p vfabric-device -p vfabric-provider
scripts/provider-link.sh release

RUNS=${RUNS:-3}
SIZES=${SIZES:-"8 64 1024 4096 65536 1048576 4194304"}
OUT=$(mktemp -d /tmp/vfabric-bench.XXXXXX)
RAW="$OUT/raw.jsonl"
: > "$RAW"
VFABRIC=target/release/vfabric
VFABRICD=target/release/vfabricd
PORT=47700

iters_for() { # iterations scale with size so every run takes about a second
    local s=$1
    if ((s <= 4096)); then echo 20000; elif ((s <= 65536)); then echo 5000; elif ((s <= 1048576)); then echo 1000; else echo 300; fi
}

fi_run() { # label provider ep size iters [env...]
    local label=$1 prov=$2 ep=$3 size=$4 iters=$5
    shift 5
    PORT=$((PORT + 1))
    env "$@" timeout 60 taskset -c 0 fi_pingpong -p "$prov" -e "$ep" -I "$iters" -S "$size" -B "$PORT" >"$OUT/srv.txt" 2>&1 &
    local srv=$!
    sleep 0.3
    if env "$@" ${CLIENT_ENV:-} timeout 60 taskset -c 1 fi_pingpong -p "$prov" -e "$ep" -I "$iters" -S "$size" -P "$PORT" 127.0.0.1 >"$OUT/cli.txt" 2>&1; then
        # bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec
        # fi_pingpong prints sizes as 64, 1k, 4m, ...
        awk -v l="$label" -v s="$size" 'NF >= 8 && $1 ~ /^[0-9]+[km]?$/ {
                n = $1 + 0; if ($1 ~ /k$/) n *= 1024; if ($1 ~ /m$/) n *= 1048576
                if (n == s) printf "{\"bench\":\"%s\",\"size\":%s,\"one_way_us\":%s,\"mb_s\":%s}\n", l, s, $7, $6
            }' "$OUT/cli.txt" >>"$RAW"
    else
        echo "bench: $label size $size failed: $(tail -2 "$OUT/cli.txt" | tr '\n' ' ')" >&2
    fi
    wait "$srv" 2>/dev/null || true
}

vfp_run() { # label ep size iters: fi_pingpong -p vfabric (libvfabric-fi.so), one device per side
    local dir="$OUT/vfp-$1-$3-$run"
    mkdir -p "$dir"
    timeout 120 taskset -c 0,1 "$VFABRICD" --socket-dir "$dir" --devices 2 --log-level warn &
    local d=$!
    for _ in $(seq 100); do [ -S "$dir/vfabric1.sock" ] && break; sleep 0.05; done
    CLIENT_ENV="VFABRIC_DEVICES=$dir/vfabric1.sock" fi_run "$1" vfabric "$2" "$3" "$4" \
        FI_PROVIDER_PATH="$PWD/target/release/prov" VFABRIC_DEVICES="$dir/vfabric0.sock"
    kill "$d" 2>/dev/null || true
    wait "$d" 2>/dev/null || true
}

vf_run() { # label mode kind size iters daemon-cpus server-cpus client-cpus [--op OP]
    local label=$1 mode=$2 kind=$3 size=$4 iters=$5 dcpu=$6 scpu=$7 ccpu=$8
    shift 8
    local extra=("$@")
    local dir="$OUT/vf-$label-$size-$run"
    mkdir -p "$dir"
    rm -f "$dir/addr"
    timeout 120 taskset -c "$dcpu" "$VFABRICD" --socket-dir "$dir" --devices 2 --log-level warn &
    local d=$!
    for _ in $(seq 100); do [ -S "$dir/vfabric1.sock" ] && break; sleep 0.05; done
    timeout 60 taskset -c "$scpu" "$VFABRIC" "$kind" --device "$dir/vfabric0.sock" --server --addr-file "$dir/addr" \
        --sizes "$size" --iters "$iters" --mode "$mode" --quiet "${extra[@]}" >/dev/null 2>"$dir/srv.err" &
    local s=$!
    if timeout 60 taskset -c "$ccpu" "$VFABRIC" "$kind" --device "$dir/vfabric1.sock" --addr-file "$dir/addr" \
        --sizes "$size" --iters "$iters" --mode "$mode" --quiet --json "${extra[@]}" >"$dir/out.json" 2>"$dir/cli.err"; then
        python3 - "$label" "$dir/out.json" >>"$RAW" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
for r in json.load(open(path))["results"]:
    print(json.dumps({"bench": label, "size": r["size"], "one_way_us": r.get("one_way_us"), "mb_s": r.get("mb_s"),
                      "msg_rate": r.get("msg_rate")}))
PY
    else
        echo "bench: $label size $size failed: $(tail -2 "$dir/cli.err" | tr '\n' ' ')" >&2
        kill "$s" 2>/dev/null || true
    fi
    wait "$s" 2>/dev/null || true
    kill "$d" 2>/dev/null || true
    wait "$d" 2>/dev/null || true
}

vs_run() { # label args...: one in-process `vfabric` run (embedded daemon placed like the demo)
    # whose --json lines are raw lines already; kept even when a later pair count failed.
    local label=$1
    shift
    local f="$OUT/$label-$run"
    if ! timeout 300 "$VFABRIC" "$@" --json --quiet >"$f.jsonl" 2>"$f.err"; then
        echo "bench: $label failed: $(tail -2 "$f.err" | tr '\n' ' ')" >&2
    fi
    cat "$f.jsonl" >>"$RAW"
}

total=$((RUNS * ($(wc -w <<<"$SIZES") * 11 + 6)))
n=0
for run in $(seq "$RUNS"); do
    for size in $SIZES; do
        it=$(iters_for "$size")
        fi_run shm shm rdm "$size" "$it"
        fi_run shm-nocma shm rdm "$size" "$it" FI_SHM_DISABLE_CMA=1
        fi_run tcp tcp msg "$size" "$((it / 4 + 10))"
        vfp_run vfabric-fi-rdm rdm "$size" "$it" # the same fi_pingpong over our provider
        # Three parties on two cores: the device polls on cpu1, both guests share cpu0 (the
        # placement that measured best); "split" puts the guests on separate cores as
        # fi_pingpong's server and client are, with the daemon free to float.
        vf_run vfabric-poll poll pingpong "$size" "$it" 1 0 0
        vf_run vfabric-poll-split poll pingpong "$size" "$it" 0,1 0 1
        vf_run vfabric-block block pingpong "$size" "$((it / 10 + 10))" 1 0 1
        vf_run vfabric-bw poll bw "$size" "$it" 1 0 0
        vf_run vfabric-bw-block block bw "$size" "$((it / 4 + 10))" 1 0 1
        # One-sided RMA (Debian's libfabric-bin has no RMA benchmark to compare with: its
        # fi_pingpong is messaging only), same placement as vfabric-bw.
        vf_run vfabric-write poll bw "$size" "$it" 1 0 0 --op write
        vf_run vfabric-read poll bw "$size" "$it" 1 0 0 --op read
        n=$((n + 11))
        echo "bench: run $run size $size done ($n/$total)" >&2
    done
    # Atomic rate: 64-bit SUM with and without fetch, one word per request.
    vf_run vfabric-atomic-fadd poll atomic 8 20000 1 0 0 --op fadd
    vf_run vfabric-atomic-add poll atomic 8 20000 1 0 0 --op add
    # Scaling (issue 7): N = 1, 2, 4, 8 pairs at once, polled and blocking completions.
    vs_run scale-poll scale --pairs 1,2,4,8
    vs_run scale-block scale --pairs 1,2,4,8 --mode block
    # Head-of-line: pair 1's 8 B latency alone and while pair 2 streams 4 MiB RMA writes, the
    # load polled (on the device's poller) and blocking (kicked); the latter stalls for
    # milliseconds at times, hence fewer round trips and a longer timeout.
    vs_run hol-poll hol --pp-iters 5000
    vs_run hol-block hol --pp-iters 2000 --load-mode block --timeout-s 120
    n=$((n + 6))
    echo "bench: run $run scaling and head-of-line done ($n/$total)" >&2
done

python3 scripts/bench_report.py "$RAW" "RUNS=$RUNS SIZES=\"$SIZES\" scripts/bench-compare.sh" >docs/perf.md.new
if [ -f docs/perf.md ] && grep -q '^<!-- keep below -->' docs/perf.md; then
    sed -n '/^<!-- keep below -->/,$p' docs/perf.md >>docs/perf.md.new
fi
mv docs/perf.md.new docs/perf.md
echo "bench: wrote docs/perf.md (raw data in $RAW)"
