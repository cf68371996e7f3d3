// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric pmem`: persistent memory (spec §6.17).
//!
//! * `vfabric pmem target`: register a file as a persistent region on a device and wait (the
//!   target side of the crash-consistency test, which kills it with SIGKILL).
//! * `vfabric pmem bench`: write + commit latency (also with a target commit handler, spec
//!   §6.17.3) against a local `msync` of the same range,
//!   with an embedded daemon and two guests in this process.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use vfabric::{
    fi, AddressVector, BindFlags, CompletionQueue, CqAttr, Domain, DomainAttr, Endpoint, EpAttr,
    Error, FiAddr, Iov, RmaIov, RmaMsg, WaitMode,
};

use crate::bench::size_label;
use crate::CliError;

#[derive(Args, Debug)]
pub struct PmemArgs {
    #[command(subcommand)]
    command: PmemCommand,
}

#[derive(Subcommand, Debug)]
enum PmemCommand {
    /// Register `--len` bytes of `--file` (created or extended as needed) as a persistent region
    /// on `--device`, write `<endpoint address> <region base> <key>` to `--addr-file`, then wait
    /// until killed (or `--timeout-s`).
    Target(TargetArgs),
    /// Write + commit latency (FI_COMMIT_COMPLETE, and write + FI_SAVE) per size against a local
    /// `msync` of the same range; medians.
    Bench(PmemBenchArgs),
}

#[derive(Args, Debug)]
pub struct TargetArgs {
    #[arg(long)]
    device: PathBuf,
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value_t = 1 << 20)]
    len: usize,
    #[arg(long)]
    addr_file: PathBuf,
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Install a target commit handler (accepting every commit) before registering, so
    /// commits to the region wait for it (spec §6.17.3).
    #[arg(long)]
    commit_handler: bool,
    /// Drive the domain's progress while waiting (without it a handler never runs).
    #[arg(long)]
    progress: bool,
}

#[derive(Args, Debug)]
pub struct PmemBenchArgs {
    /// File for the persistent region (default: a file in the temporary directory).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Sizes (bytes; k/m suffixes), comma separated.
    #[arg(long, default_value = "8,64,4k,64k,1m")]
    sizes: String,
    /// Iterations per size.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PmemArgs) -> Result<(), CliError> {
    match &args.command {
        PmemCommand::Target(a) => target(a),
        PmemCommand::Bench(a) => bench(a),
    }
}

struct Side {
    ep: Endpoint,
    tx: CompletionQueue,
    _rx: CompletionQueue,
    av: AddressVector,
}

fn side(domain: &Domain) -> Result<Side, CliError> {
    let cq = || {
        domain.cq_open(CqAttr {
            size: 256,
            wait: WaitMode::None,
        })
    };
    let (tx, rx) = (cq()?, cq()?);
    let av = domain.av_open()?;
    let ep = domain.endpoint(EpAttr::default())?;
    ep.bind_cq(&tx, BindFlags::TRANSMIT)?;
    ep.bind_cq(&rx, BindFlags::RECV)?;
    ep.bind_av(&av)?;
    ep.enable()?;
    Ok(Side {
        ep,
        tx,
        _rx: rx,
        av,
    })
}

fn open_file(path: &Path, len: usize) -> Result<std::fs::File, CliError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if f.metadata()?.len() < len as u64 {
        f.set_len(len as u64)?;
    }
    Ok(f)
}

fn target(a: &TargetArgs) -> Result<(), CliError> {
    // With Yama's ptrace_scope 1 the daemon may reach this process's memory only if allowed
    // (cross-memory attach, spec §6.8.4); without Yama this fails harmlessly.
    // SAFETY: prctl(PR_SET_PTRACER) takes integers only.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    let domain = Domain::open(&a.device, DomainAttr::default())?;
    let s = side(&domain)?;
    let file = open_file(&a.file, a.len)?;
    if a.commit_handler {
        domain.set_commit_handler(Some(std::sync::Arc::new(|_: &vfabric::CommitEvent| 0)));
    }
    let region = domain.register_pmem(&file, 0, a.len, fi::REMOTE_READ | fi::REMOTE_WRITE)?;
    let tmp = a.addr_file.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("{} {} {}\n", s.ep.name(), region.base(), region.key()),
    )?;
    std::fs::rename(&tmp, &a.addr_file)?;
    let until = Instant::now() + Duration::from_secs(a.timeout_s);
    while Instant::now() < until {
        if a.progress {
            domain.progress()?;
            std::thread::sleep(Duration::from_millis(1));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(region);
    Ok(())
}

/// Wait for one completion on `cq` (bounded).
fn wait(cq: &CompletionQueue) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut v = Vec::new();
    loop {
        match cq.read(&mut v, 1) {
            Ok(_) => return Ok(()),
            Err(Error::Again) => {}
            Err(Error::Avail) => {
                return Err(CliError::Run(crate::bench::describe_error(cq.readerr())))
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            return Err(CliError::Run("timed out waiting for a completion".into()));
        }
        std::thread::yield_now();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Row {
    size: usize,
    commit_us: f64,
    save_us: f64,
    write_us: f64,
    msync_us: f64,
    /// Write, then a commit waiting for a target commit handler (spec §6.17.3).
    handled_us: f64,
}

fn bench(a: &PmemBenchArgs) -> Result<(), CliError> {
    let sizes = crate::parse_sizes(&a.sizes)?;
    let max = sizes.iter().copied().max().unwrap_or(8);
    let daemon = crate::demo::embedded_daemon(2, vfabric_device::Config::new(Vec::new()).poll_us)?;
    let paths = daemon.socket_paths().to_vec();
    let r = bench_on(&paths, a, &sizes, max);
    daemon.shutdown();
    let rows = r?;
    if a.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"size\":{},\"write_commit_us\":{:.2},\"write_save_us\":{:.2},\
                     \"write_handled_commit_us\":{:.2},\"write_us\":{:.2},\
                     \"local_msync_us\":{:.2}}}",
                    r.size, r.commit_us, r.save_us, r.handled_us, r.write_us, r.msync_us
                )
            })
            .collect();
        println!(
            "{{\"iters\":{},\"results\":[{}]}}",
            a.iters,
            items.join(",")
        );
    } else {
        println!(
            "{:>8}  {:>16}  {:>16}  {:>18}  {:>12}  {:>14}",
            "size",
            "write+commit us",
            "write+save us",
            "write+handled us",
            "write us",
            "local msync us"
        );
        for r in &rows {
            println!(
                "{:>8}  {:>16.2}  {:>16.2}  {:>18.2}  {:>12.2}  {:>14.2}",
                size_label(r.size),
                r.commit_us,
                r.save_us,
                r.handled_us,
                r.write_us,
                r.msync_us
            );
        }
        println!("(medians of {} iterations)", a.iters);
    }
    Ok(())
}

fn bench_on(
    paths: &[PathBuf],
    a: &PmemBenchArgs,
    sizes: &[usize],
    max: usize,
) -> Result<Vec<Row>, CliError> {
    let dt = Domain::open(&paths[0], DomainAttr::default())?;
    let di = Domain::open(&paths[1], DomainAttr::default())?;
    let t = side(&dt)?;
    let i = side(&di)?;
    let peer: FiAddr = i.av.insert(t.ep.name())?;
    let path = a.file.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("vfabric-pmem-bench-{}", std::process::id()))
    });
    let file = open_file(&path, max)?;
    let region = dt.register_pmem(&file, 0, max, fi::REMOTE_WRITE)?;
    // A second registration of the file, with a target commit handler that accepts.
    dt.set_commit_handler(Some(std::sync::Arc::new(|_: &vfabric::CommitEvent| 0)));
    let handled = dt.register_pmem(&file, 0, max, fi::REMOTE_WRITE)?;
    dt.set_commit_handler(None);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rows = std::thread::scope(|s| {
        // The target application's progress, which runs the handler.
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let _ = dt.progress();
                std::thread::yield_now();
            }
        });
        let r = bench_sizes(a, sizes, max, &i, peer, &region, &handled);
        stop.store(true, std::sync::atomic::Ordering::Release);
        r
    })?;
    drop(handled);
    drop(region);
    if a.file.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(rows)
}

fn bench_sizes(
    a: &PmemBenchArgs,
    sizes: &[usize],
    max: usize,
    i: &Side,
    peer: FiAddr,
    region: &vfabric::PmemRegion,
    handled: &vfabric::PmemRegion,
) -> Result<Vec<Row>, CliError> {
    let src = vec![0x5au8; max];
    let iters = a.iters.max(1);
    let mut rows = Vec::new();
    for &size in sizes {
        let range = [RmaIov {
            addr: region.base(),
            len: size as u64,
            key: region.key(),
        }];
        let msg = RmaMsg {
            iov: &[Iov::bytes(&src[..size])],
            addr: peer,
            rma_iov: &range,
            context: 0,
            data: 0,
        };
        let mut commit = Vec::with_capacity(iters);
        let mut save = Vec::with_capacity(iters);
        let mut write = Vec::with_capacity(iters);
        let mut msync = Vec::with_capacity(iters);
        let mut handled_us = Vec::with_capacity(iters);
        let hrange = [RmaIov {
            addr: handled.base(),
            len: size as u64,
            key: handled.key(),
        }];
        let hmsg = RmaMsg {
            iov: &[Iov::bytes(&src[..size])],
            addr: peer,
            rma_iov: &hrange,
            context: 0,
            data: 0,
        };
        for _ in 0..iters {
            let t0 = Instant::now();
            i.ep.writemsg(&msg, fi::COMMIT_COMPLETE)?;
            wait(&i.tx)?;
            commit.push(t0.elapsed().as_secs_f64() * 1e6);

            let t0 = Instant::now();
            i.ep.writemsg(&msg, 0)?;
            wait(&i.tx)?;
            write.push(t0.elapsed().as_secs_f64() * 1e6);
            i.ep.save(&range, peer, fi::COMMIT_COMPLETE, None, 0)?;
            wait(&i.tx)?;
            save.push(t0.elapsed().as_secs_f64() * 1e6);

            let t0 = Instant::now();
            i.ep.writemsg(&hmsg, 0)?;
            wait(&i.tx)?;
            i.ep.commit(&hrange, peer, 0, 0)?;
            wait(&i.tx)?;
            handled_us.push(t0.elapsed().as_secs_f64() * 1e6);

            // The floor: the same bytes stored locally and msync'ed.
            let t0 = Instant::now();
            region.write(0, &src[..size])?;
            region.msync(0, size)?;
            msync.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        rows.push(Row {
            size,
            commit_us: median(&mut commit),
            save_us: median(&mut save),
            write_us: median(&mut write),
            msync_us: median(&mut msync),
            handled_us: median(&mut handled_us),
        });
    }
    Ok(rows)
}
