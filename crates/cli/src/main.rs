// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric`: device information, benchmarks and the demo for virtio-fabric.

mod bench;
mod demo;
mod info;
mod pmem;
mod report;
mod scale;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use bench::{Kind, Mode, RunParams};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Driver(#[from] vfabric::Error),
    #[error(transparent)]
    Device(#[from] vfabric_device::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(String),
}

#[derive(Parser, Debug)]
#[command(
    name = "vfabric",
    version,
    about = "virtio-fabric: device info, benchmarks (latency, bandwidth, scaling, head-of-line) and demo"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List devices, features, capabilities and vendor attributes (like fi_info).
    Info(info::InfoArgs),
    /// Latency: ping-pong between two guests.
    Pingpong(BenchArgs),
    /// Bandwidth: windows of messages one way, acknowledged per window (`--op send`), or of
    /// one-sided RMA writes or reads into a region of the server (`--op write|read`).
    Bw(BenchArgs),
    /// Atomic rate: windows of 64-bit SUM atomics on the server's region (`--op fadd|add`;
    /// `--sizes` in bytes of 64-bit words per request, default 8).
    Atomic(BenchArgs),
    /// An embedded daemon and two guests: pingpong and bandwidth, a results table.
    Demo(demo::DemoArgs),
    /// Scaling: an embedded daemon with 2N devices and N guest pairs for each N of --pairs,
    /// all pairs at once: aggregate message rate and bandwidth, per-pair ping-pong latency.
    Scale(scale::ScaleArgs),
    /// Head-of-line blocking: pair 1's ping-pong latency alone, then while pair 2 streams
    /// large RMA writes through the same device; reports the ratio.
    Hol(scale::HolArgs),
    /// Persistent memory: a persistent-region target (`pmem target`) and the write + commit
    /// latency benchmark against a local msync (`pmem bench`).
    Pmem(pmem::PmemArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Device of this side: a socket path, or pci:DDDD:BB:DD.F inside a guest. Without it,
    /// runs both sides in this process on an embedded daemon.
    #[arg(long)]
    device: Option<vfabric::DeviceLocator>,
    /// Act as the server (writes its address to --addr-file and answers).
    #[arg(long)]
    server: bool,
    /// File through which the server publishes its address to the client.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Message sizes: a list like 8,64,4k,1m or "all" (8 B to 4 MiB, powers of 4 and 2).
    #[arg(long, default_value = "all")]
    sizes: String,
    /// Iterations at small sizes (scaled down above 64 KiB).
    #[arg(long, default_value_t = 10000)]
    iters: usize,
    /// Use exactly --iters at every size.
    #[arg(long)]
    fixed_iters: bool,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Messages in flight per window (bw; at most the CQ size, 1024).
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[arg(long, value_enum, default_value_t = Mode::Poll)]
    mode: Mode,
    /// Check every received byte.
    #[arg(long)]
    verify: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Give up on a wait after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Embedded daemon only: its data-plane poll budget in µs (0 = wake on kicks only).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Operation: bw: send (default), write, read; atomic: fadd (default), add.
    #[arg(long)]
    op: Option<String>,
}

impl BenchArgs {
    /// The benchmark kind of subcommand `base` with `--op`.
    fn kind(&self, base: Kind) -> Result<Kind, CliError> {
        let op = self.op.as_deref();
        Ok(match (base, op) {
            (Kind::Pingpong, None | Some("send")) => Kind::Pingpong,
            (Kind::Bw, None | Some("send")) => Kind::Bw,
            (Kind::Bw, Some("write")) => Kind::BwWrite,
            (Kind::Bw, Some("read")) => Kind::BwRead,
            (Kind::AtomicFetchAdd, None | Some("fadd")) => Kind::AtomicFetchAdd,
            (Kind::AtomicFetchAdd, Some("add")) => Kind::AtomicAdd,
            (_, Some(o)) => {
                return Err(CliError::Usage(format!(
                    "--op {o} is not valid for {}",
                    base.label()
                )))
            }
            (k, None) => k,
        })
    }
}

impl BenchArgs {
    fn params(&self) -> Result<RunParams, CliError> {
        Ok(RunParams {
            sizes: parse_sizes(&self.sizes)?,
            iters: self.iters,
            fixed_iters: self.fixed_iters,
            warmup: self.warmup,
            window: self.window,
            mode: self.mode,
            verify: self.verify,
            progress: !self.quiet && !self.json,
            timeout: Duration::from_secs(self.timeout_s),
            // In-process pairs follow the demo's placement; cross-process runs are placed with
            // taskset by the caller.
            guest_cpu: if self.device.is_none() {
                demo::placement().1
            } else {
                None
            },
        })
    }
}

/// `all` or a comma-separated list with optional k/m suffixes (powers of 1024).
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, CliError> {
    if s == "all" {
        return Ok(vec![
            8,
            64,
            256,
            1024,
            4096,
            16 << 10,
            64 << 10,
            256 << 10,
            1 << 20,
            4 << 20,
        ]);
    }
    s.split(',')
        .map(|t| {
            let t = t.trim().to_ascii_lowercase();
            let (num, mul) = match t.strip_suffix('m') {
                Some(n) => (n.to_string(), 1 << 20),
                None => match t.strip_suffix('k') {
                    Some(n) => (n.to_string(), 1 << 10),
                    None => (t.clone(), 1),
                },
            };
            num.parse::<usize>()
                .map(|n| n * mul)
                .map_err(|_| CliError::Usage(format!("bad size {t:?}")))
        })
        .collect()
}

fn run_bench(kind: Kind, args: &BenchArgs) -> Result<(), CliError> {
    let kind = args.kind(kind)?;
    let mut params = args.params()?;
    if matches!(kind, Kind::AtomicFetchAdd | Kind::AtomicAdd) && args.sizes == "all" {
        params.sizes = vec![8];
    }
    let results = match &args.device {
        Some(dev) => {
            let addr_file = args
                .addr_file
                .clone()
                .ok_or_else(|| CliError::Usage("--device needs --addr-file".into()))?;
            bench::run_side(kind, dev, &addr_file, args.server, &params)?
        }
        None => {
            let daemon = demo::embedded_daemon(2, args.poll_us)?;
            let paths = daemon.socket_paths().to_vec();
            let r = bench::run_pair(kind, paths[0].clone(), paths[1].clone(), &params);
            daemon.shutdown();
            r?
        }
    };
    if args.server && args.device.is_some() {
        return Ok(());
    }
    if args.json {
        println!("{}", report::json(kind, args.mode, &results));
    } else {
        print!("{}", report::table(kind, args.mode, &results));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let r = match &cli.command {
        Command::Info(a) => info::run(a),
        Command::Pingpong(a) => run_bench(Kind::Pingpong, a),
        Command::Bw(a) => run_bench(Kind::Bw, a),
        Command::Atomic(a) => run_bench(Kind::AtomicFetchAdd, a),
        Command::Demo(a) => demo::run(a),
        Command::Scale(a) => scale::run_scale(a),
        Command::Hol(a) => scale::run_hol(a),
        Command::Pmem(a) => pmem::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfabric: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes("8,4k,1m").unwrap(), vec![8, 4096, 1 << 20]);
        assert_eq!(parse_sizes("all").unwrap().last(), Some(&(4 << 20)));
        assert!(parse_sizes("8,x").is_err());
    }
}
