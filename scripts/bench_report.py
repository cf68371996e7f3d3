#!/usr/bin/env python3
"""Turns the raw JSON lines of scripts/bench-compare.sh into the tables of docs/perf.md.

Every line is {"bench", "size", "one_way_us", "mb_s"}; repeated runs are reduced to medians and
the ratios vfabric/shm and vfabric/tcp are computed from the same invocation. Lines of
`vfabric scale --json` ("bench": "vfabric-scale", one per pair count) and `vfabric hol --json`
("bench": "vfabric-hol") keep their own fields and make the Scaling and Head-of-line tables."""
import datetime
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def size_label(s):
    if s >= 1 << 20 and s % (1 << 20) == 0:
        return f"{s >> 20} MiB"
    if s >= 1 << 10 and s % (1 << 10) == 0:
        return f"{s >> 10} KiB"
    return f"{s} B"


def main():
    raw, command = sys.argv[1], sys.argv[2]
    lat = defaultdict(list)
    bw = defaultdict(list)
    rate = defaultdict(list)
    scale = defaultdict(list)  # (mode, pairs) -> rows of vfabric scale
    hol = defaultdict(list)  # (mode, load_mode, size, load_size) -> rows of vfabric hol
    for line in open(raw):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r.get("bench") == "vfabric-scale":
            scale[(r["mode"], int(r["pairs"]))].append(r)
            continue
        if r.get("bench") == "vfabric-hol":
            hol[(r["mode"], r["load_mode"], int(r["size"]), int(r["load_size"]))].append(r)
            continue
        key = (r["bench"], int(r["size"]))
        lat[key].append(r.get("one_way_us"))
        bw[key].append(r.get("mb_s"))
        rate[key].append(r.get("msg_rate"))
    sizes = sorted({s for (b, s) in lat if not b.startswith("vfabric-atomic")})
    L = {k: median(v) for k, v in lat.items()}
    B = {k: median(v) for k, v in bw.items()}
    R = {k: median(v) for k, v in rate.items()}
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    runs = max((len(v) for v in lat.values()), default=0)
    out = []
    out.append("# virtio-fabric performance\n")
    out.append(f"Produced by `{command}` on {datetime.date.today()} ({platform.node()}, {cpu}, "
               f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores). "
               f"Medians of {runs} runs. fi_pingpong: server pinned to cpu0, client to cpu1 (`taskset`). "
               "vfabric needs a third party, the device: *polled* runs pin `vfabricd` to cpu1 and both "
               "guests to cpu0; *split* pins the guests to cpu0 and cpu1 with the daemon on either core; "
               "*blocking* pins the daemon to cpu1 and the guests to cpu0 and cpu1; `fi_pingpong -p vfabric` "
               "(the C provider, fi_pingpong's own malloc'd buffers, so bounced) pins its server to cpu0 and "
               "client to cpu1 like the other fi_pingpong runs, with the daemon on either core, and is compared "
               "with the Rust CLI's *split* placement (zero-copy shared buffers). "
               "Ratios are from the same invocation; absolute numbers move between runs on these noisy VMs.\n")
    out.append("## Latency, one way (µs; half the round trip)\n")
    out.append("| size | vfabric polled | vfabric polled, split | vfabric blocking | fi_pingpong -p vfabric | shm | shm no-CMA | tcp (msg) | polled/shm | polled/tcp | blocking/tcp | provider/Rust split |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        vp, vs, vb = L.get(("vfabric-poll", s)), L.get(("vfabric-poll-split", s)), L.get(("vfabric-block", s))
        vfp = L.get(("vfabric-fi-rdm", s))
        shm, nocma, tcp = L.get(("shm", s)), L.get(("shm-nocma", s)), L.get(("tcp", s))
        out.append(f"| {size_label(s)} | {fmt(vp)} | {fmt(vs)} | {fmt(vb)} | {fmt(vfp)} | {fmt(shm)} | {fmt(nocma)} | {fmt(tcp)} | "
                   f"{fmt(ratio(vp, shm))}× | {fmt(ratio(vp, tcp))}× | {fmt(ratio(vb, tcp))}× | {fmt(ratio(vfp, vs))}× |")
    out.append("\nLower is better; a ratio below 1 means vfabric is faster.\n")
    out.append("## Bandwidth (MB/s = 10^6 B/s)\n")
    out.append("vfabric `bw` streams a window of messages one way; `fi_pingpong` bandwidth is its "
               "ping-pong MB/s column (the only bandwidth figure Debian's `libfabric-bin` offers).\n")
    out.append("| size | vfabric bw polled | vfabric bw blocking | vfabric pingpong | shm | shm no-CMA | tcp | bw/shm no-CMA | bw/tcp |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        vb, vbb, vp = B.get(("vfabric-bw", s)), B.get(("vfabric-bw-block", s)), B.get(("vfabric-poll", s))
        shm, nocma, tcp = B.get(("shm", s)), B.get(("shm-nocma", s)), B.get(("tcp", s))
        out.append(f"| {size_label(s)} | {fmt(vb, 0)} | {fmt(vbb, 0)} | {fmt(vp, 0)} | {fmt(shm, 0)} | {fmt(nocma, 0)} | {fmt(tcp, 0)} | "
                   f"{fmt(ratio(vb, nocma))}× | {fmt(ratio(vb, tcp))}× |")
    out.append("\nHigher is better; a ratio above 1 means vfabric is faster.\n")
    out.append("## RMA (MB/s = 10^6 B/s)\n")
    out.append("One-sided `vfabric bw --op write|read`: windows of RMA writes/reads into a region the "
               "server registered, same placement as `vfabric bw`, side by side with vfabric messaging. "
               "Debian's `libfabric-bin` has no RMA benchmark (`fi_pingpong` is messaging only), so there "
               "is no shm/tcp column.\n")
    out.append("| size | RMA write | RMA read | messaging bw | write/bw | read/bw |")
    out.append("|---|---|---|---|---|---|")
    for s in sizes:
        w, rd, mb = B.get(("vfabric-write", s)), B.get(("vfabric-read", s)), B.get(("vfabric-bw", s))
        out.append(f"| {size_label(s)} | {fmt(w, 0)} | {fmt(rd, 0)} | {fmt(mb, 0)} | "
                   f"{fmt(ratio(w, mb))}× | {fmt(ratio(rd, mb))}× |")
    out.append("\n## Atomics\n")
    out.append("`vfabric atomic --op fadd|add`: windows of 64-bit FI_SUM atomics on one word of the "
               "server's region (fetching and not). No libfabric-bin counterpart.\n")
    out.append("| operation | ops/s | µs per op |")
    out.append("|---|---|---|")
    for label, name in (("vfabric-atomic-fadd", "fetch-add (FETCH_ATOMIC)"),
                        ("vfabric-atomic-add", "add (ATOMIC)")):
        out.append(f"| {name} | {fmt(R.get((label, 8)), 0)} | {fmt(L.get((label, 8)))} |")
    out.extend(scaling_table(scale))
    out.extend(hol_table(hol))
    print("\n".join(out))


def field(rows, name):
    """Median over runs of one field of JSON rows."""
    return median([r.get(name) for r in rows])


def scaling_table(scale):
    out = ["\n## Scaling\n"]
    if not scale:
        return out + ["No `vfabric scale` data in this run.\n"]
    any_row = next(iter(scale.values()))[0]
    msg, bws = size_label(any_row["msg_size"]), size_label(any_row["bw_size"])
    out.append("`vfabric scale`: for each N one embedded daemon with 2N devices and N guest pairs (a "
               "driver instance and a thread per guest; the device poller on cpu1, every guest on cpu0, "
               f"as in the demo), all pairs at once. Rate: {msg} messages streamed in acknowledged "
               "windows of 64, summed over pairs (first start to last end); bandwidth: the same with "
               f"{bws} messages; latency: each pair's median one-way {msg} ping-pong, then the median "
               "and the slowest over pairs. With two cores every guest shares cpu0, so polled guests "
               "(which yield while they wait) take turns and their latency grows with N from CPU "
               "sharing alone; blocking guests sleep instead. Instructions per message against N: "
               "`scripts/callgrind.sh 8 200 1,2,4,8`.\n")
    out.append(f"| completions | pairs | {msg} msg/s, all pairs | per pair | vs 1 pair | "
               f"{bws} GB/s, all pairs | {msg} one-way µs, median pair | slowest pair µs |")
    out.append("|---|---|---|---|---|---|---|---|")
    for mode in sorted({m for m, _ in scale}, key=lambda m: (m != "poll", m)):
        base = field(scale.get((mode, 1), []), "msg_rate")
        for pairs in sorted(p for m, p in scale if m == mode):
            rows = scale[(mode, pairs)]
            r = field(rows, "msg_rate")
            out.append(f"| {mode} | {pairs} | {fmt(r, 0)} | {fmt(None if r is None else r / pairs, 0)} | "
                       f"{fmt(ratio(r, base))}× | {fmt(field(rows, 'bw_gb_s'))} | "
                       f"{fmt(field(rows, 'one_way_us'))} | {fmt(field(rows, 'one_way_max_us'))} |")
    return out


def hol_table(hol):
    out = ["\n## Head-of-line\n"]
    if not hol:
        return out + ["No `vfabric hol` data in this run.\n"]
    out.append("`vfabric hol`: pair 1 (devices 0 and 1) measures its one-way ping-pong latency alone, "
               "then while pair 2 (devices 2 and 3, same daemon) keeps RMA writes in flight into a "
               "registered region of its peer. Ratio: loaded/alone median, per run, median over runs "
               "(issue 7's target: at most 1.5). p99, mean and the slowest round trip show the stalls "
               "a median hides. *load completions* is how pair 2 waits: polled keeps its requests on "
               "the device's poller; blocking sends kicks.\n")
    out.append("| pair 1 | load | load completions | alone µs | loaded µs | ratio | ≤ 1.5 | p99 alone µs | "
               "p99 loaded µs | mean loaded µs | slowest loaded µs | load GB/s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, load_mode, size, load_size), rows in sorted(hol.items()):
        rt = field(rows, "ratio")
        ok = "–" if rt is None else ("met" if rt <= 1.5 else "**not met**")
        out.append(f"| {size_label(size)} {mode} | {size_label(load_size)} writes | {load_mode} | "
                   f"{fmt(field(rows, 'alone_us'))} | {fmt(field(rows, 'loaded_us'))} | {fmt(rt)}× | {ok} | "
                   f"{fmt(field(rows, 'alone_p99_us'))} | {fmt(field(rows, 'loaded_p99_us'))} | "
                   f"{fmt(field(rows, 'loaded_mean_us'))} | {fmt(field(rows, 'loaded_max_us'), 0)} | "
                   f"{fmt(field(rows, 'load_gb_s'))} |")
    return out


if __name__ == "__main__":
    main()
