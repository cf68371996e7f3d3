// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tables and JSON for benchmark results.

use std::fmt::Write;

use crate::bench::{size_label, Kind, Mode, SizeResult};

pub fn json(kind: Kind, mode: Mode, results: &[SizeResult]) -> String {
    serde_json::json!({ "kind": kind, "mode": mode, "results": results }).to_string()
}

pub fn table(kind: Kind, mode: Mode, results: &[SizeResult]) -> String {
    let mut s = String::new();
    let title = match kind {
        Kind::Pingpong => "pingpong",
        Kind::Bw => "bandwidth",
        Kind::BwWrite => "RMA write bandwidth",
        Kind::BwRead => "RMA read bandwidth",
        Kind::AtomicFetchAdd => "atomic fetch-add rate (64-bit SUM)",
        Kind::AtomicAdd => "atomic add rate (64-bit SUM, no fetch)",
    };
    let _ = writeln!(s, "{title} ({mode:?} completions)");
    let _ = writeln!(
        s,
        "{:>10} {:>9} {:>14} {:>12} {:>14} {:>8}",
        "size", "iters", "one-way µs", "MB/s", "msgs/s", "verified"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:>10} {:>9} {:>14.2} {:>12.1} {:>14.0} {:>8}",
            size_label(r.size),
            r.iters,
            r.one_way_us,
            r.mb_s,
            r.msg_rate,
            if r.verified { "yes" } else { "no" }
        );
    }
    s
}
