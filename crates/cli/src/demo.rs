// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric demo`: an embedded `vfabricd` with two devices and two guests (threads of this
//! process, each a vhost-user frontend with its own shared memory) exchanging data.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use vfabric_device::{Config, DaemonHandle};

use crate::bench::{self, size_label, Kind, Mode, RunParams, SizeResult};
use crate::CliError;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Message sizes (as for pingpong).
    #[arg(long, default_value = "8,64,1k,4k,64k,1m,4m")]
    sizes: String,
    /// Iterations at small sizes.
    #[arg(long, default_value_t = 5000)]
    iters: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Start a daemon with `devices` devices whose sockets live in a fresh temporary directory.
/// CPUs of this machine (the demo's placement follows it).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Placement for an in-process run: on two or more CPUs the device's poller gets the last CPU
/// to itself and both guests share CPU 0 (measured best on 2-vCPU machines: three busy parties
/// on two cores otherwise fight over both).
pub fn placement() -> (Option<usize>, Option<usize>) {
    let n = cpus();
    if n >= 2 {
        (Some(n - 1), Some(0))
    } else {
        (None, None)
    }
}

pub fn embedded_daemon(devices: u32, poll_us: u64) -> Result<DaemonHandle, CliError> {
    let dir: PathBuf = std::env::temp_dir().join(format!("vfabric-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = Config::new(Config::socket_dir_paths(&dir, devices));
    config.poll_us = poll_us;
    config.poller_cpu = placement().0;
    Ok(vfabric_device::start(config)?)
}

fn find(rs: &[SizeResult], size: usize) -> Option<&SizeResult> {
    rs.iter().find(|r| r.size == size)
}

pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    let sizes = crate::parse_sizes(&args.sizes)?;
    let daemon = embedded_daemon(2, Config::new(Vec::new()).poll_us)?;
    let socks = daemon.socket_paths().to_vec();
    let params = |mode: Mode, iters: usize, verify: bool| RunParams {
        sizes: sizes.clone(),
        iters,
        fixed_iters: verify,
        warmup: if verify { 0 } else { 50 },
        window: 64,
        mode,
        verify,
        progress: !args.json,
        timeout: Duration::from_secs(30),
        guest_cpu: placement().1,
    };
    let (s, c) = (socks[0].clone(), socks[1].clone());
    if !args.json {
        println!(
            "vfabric demo: embedded vfabricd with 2 devices ({}, {}); guest A on device 0, guest B on device 1",
            s.display(),
            c.display()
        );
        match placement() {
            (Some(d), Some(g)) => println!(
                "placement: device poller on cpu{d}, both guests on cpu{g} ({} CPUs)",
                cpus()
            ),
            _ => println!("placement: one CPU, everything shares it"),
        }
    }
    // First every byte is checked (few iterations: checking costs more than moving), then the
    // timed runs move the same sizes unchecked.
    let checked_pp = bench::run_pair(
        Kind::Pingpong,
        s.clone(),
        c.clone(),
        &params(Mode::Poll, 20, true),
    )?;
    let checked_bw = bench::run_pair(
        Kind::Bw,
        s.clone(),
        c.clone(),
        &params(Mode::Poll, 128, true),
    )?;
    let verified = |size: usize| {
        find(&checked_pp, size).is_some_and(|r| r.verified)
            && find(&checked_bw, size).is_some_and(|r| r.verified)
    };
    let ping_poll = bench::run_pair(
        Kind::Pingpong,
        s.clone(),
        c.clone(),
        &params(Mode::Poll, args.iters, false),
    )?;
    let ping_block = bench::run_pair(
        Kind::Pingpong,
        s.clone(),
        c.clone(),
        &params(Mode::Block, (args.iters / 5).max(20), false),
    )?;
    let bw = bench::run_pair(Kind::Bw, s, c, &params(Mode::Poll, args.iters, false))?;
    let stats = daemon.stats();
    daemon.shutdown();

    if args.json {
        let v = serde_json::json!({
            "pingpong_poll": ping_poll,
            "pingpong_blocking": ping_block,
            "bw_poll": bw,
            "devices": stats.devices.iter().map(|d| serde_json::json!({
                "socket": d.socket, "messages_sent": d.messages_sent,
                "messages_received": d.messages_received, "bytes_copied": d.bytes_copied,
                "bad_chains": d.bad_chains,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!();
    println!(
        "{:>8} | {:>16} | {:>19} | {:>14} | {:>12} | {:>8}",
        "size",
        "latency polled µs",
        "latency blocking µs",
        "bandwidth MB/s",
        "msgs/s (bw)",
        "verified"
    );
    println!("{}", "-".repeat(94));
    for &size in &sizes {
        let p = find(&ping_poll, size);
        let b = find(&ping_block, size);
        let w = find(&bw, size);
        let f = |x: Option<f64>, nd: usize| x.map_or("–".to_string(), |v| format!("{v:.nd$}"));
        println!(
            "{:>8} | {:>17} | {:>19} | {:>14} | {:>12} | {:>8}",
            size_label(size),
            f(p.map(|r| r.one_way_us), 2),
            f(b.map(|r| r.one_way_us), 2),
            f(w.map(|r| r.mb_s), 0),
            f(w.map(|r| r.msg_rate), 0),
            if verified(size) { "yes" } else { "no" }
        );
    }
    println!();
    println!("device counters (from vfabricd):");
    println!(
        "{:>14} | {:>13} | {:>17} | {:>14} | {:>10}",
        "device", "messages sent", "messages received", "bytes copied", "bad chains"
    );
    for d in &stats.devices {
        println!(
            "{:>14} | {:>13} | {:>17} | {:>14} | {:>10}",
            d.socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            d.messages_sent,
            d.messages_received,
            d.bytes_copied,
            d.bad_chains
        );
    }
    Ok(())
}
