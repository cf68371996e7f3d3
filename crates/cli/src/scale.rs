// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric scale` and `vfabric hol`: many guest pairs on one embedded daemon (issue 7).
//!
//! `scale` starts, for each pair count N, a daemon with 2N devices and 2N guests (one driver
//! instance and one thread each, placed like the demo) and measures with all pairs at once: the
//! aggregate small-message streaming rate, the aggregate bandwidth at 64 KiB and every pair's
//! ping-pong latency. `hol` measures head-of-line blocking: pair 1's ping-pong latency alone,
//! then while pair 2 streams large RMA writes through the same device.
//!
//! Every loop is bounded by a count and by a deadline, and a guest that fails makes the others
//! give up, so a misbehaving device produces an error, never a hang.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::ProgressBar;
use serde::Serialize;
use vfabric::{CompletionQueue, CqEntry, FiAddr};

use crate::bench::{progress_bar, size_label, Mode, RunParams, Side};
use crate::{demo, parse_sizes, CliError};

/// Largest pair count (two devices and two threads per pair).
const MAX_PAIRS: usize = 32;
/// Longest single block in `sread`, so a blocked guest notices another's failure.
const BLOCK_SLICE: Duration = Duration::from_millis(50);
/// Ping-pong round trips between progress-bar updates (keeps the bar off the measured path).
const PP_PROGRESS_EVERY: usize = 64;
/// Count bound of the head-of-line load (its deadline normally ends it first).
const LOAD_MAX_WRITES: usize = 1 << 24;
/// Completion contexts (only for debugging: the benchmarks never look at them).
const CTX_DATA: u64 = 20;
const CTX_ACK: u64 = 21;
const CTX_PP_RECV: u64 = 22;
const CTX_PP_SEND: u64 = 23;
const CTX_LOAD: u64 = 24;
/// Error text of a guest that gave up because another one failed (not the root cause).
const ABORTED: &str = "another guest failed";

/// Options shared by `scale` and `hol`.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// How the measuring guests wait for completions.
    #[arg(long, value_enum, default_value_t = Mode::Poll)]
    mode: Mode,
    /// Embedded daemon's data-plane poll budget in µs (0 = wake on kicks only).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Untimed messages (streaming) or round trips (ping-pong) per pair before each measurement.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Fail when one measurement has not finished after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Print JSON lines (one per measurement, the format of scripts/bench_report.py's input).
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// One measurement of `vfabric scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Aggregate streaming rate of --msg-size messages.
    Rate,
    /// Aggregate streaming bandwidth of --bw-size messages.
    Bw,
    /// Ping-pong latency of --msg-size messages, every pair at once.
    Pingpong,
}

#[derive(Args, Debug, Clone)]
pub struct ScaleArgs {
    /// Pair counts, each on a fresh embedded daemon with two devices per pair.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pairs: Vec<usize>,
    /// Measurements to make for every pair count, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rate,bw,pingpong"
    )]
    phases: Vec<Phase>,
    /// Message size of the rate and ping-pong measurements (bytes, k/m suffixes).
    #[arg(long, default_value = "8")]
    msg_size: String,
    /// Message size of the bandwidth measurement.
    #[arg(long, default_value = "64k")]
    bw_size: String,
    /// Messages each pair streams for the rate.
    #[arg(long, default_value_t = 20000)]
    rate_iters: usize,
    /// Messages each pair streams for the bandwidth.
    #[arg(long, default_value_t = 5000)]
    bw_iters: usize,
    /// Round trips each pair makes for the latency.
    #[arg(long, default_value_t = 5000)]
    pp_iters: usize,
    /// Messages in flight per pair while streaming (acknowledged per window, as `vfabric bw`).
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
pub struct HolArgs {
    /// Message size of the latency pair's ping-pong.
    #[arg(long, default_value = "8")]
    msg_size: String,
    /// Round trips of the latency pair, alone and again under load.
    #[arg(long, default_value_t = 5000)]
    pp_iters: usize,
    /// Size of the load pair's RMA writes.
    #[arg(long, default_value = "4m")]
    load_size: String,
    /// RMA writes the load pair keeps in flight (reposted as each completes).
    #[arg(long, default_value_t = 8)]
    load_window: usize,
    /// How the load pair waits for completions (default: --mode, as `bw --op write` would).
    /// `block` takes the load's spinning off the CPU the latency guests share, but its kicks
    /// then reach the device's per-device threads rather than the poller.
    #[arg(long, value_enum)]
    load_mode: Option<Mode>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Exactly one size from a `--*-size` option.
fn one_size(s: &str, what: &str) -> Result<usize, CliError> {
    match parse_sizes(s)?.as_slice() {
        [n] => Ok(*n),
        _ => Err(CliError::Usage(format!("{what} takes one size, got {s:?}"))),
    }
}

/// Validated parameters of a `scale` run.
#[derive(Clone, Debug)]
struct Plan {
    phases: Vec<Phase>,
    msg_size: usize,
    bw_size: usize,
    rate_iters: usize,
    bw_iters: usize,
    pp_iters: usize,
    window: usize,
    warmup: usize,
    mode: Mode,
    timeout: Duration,
}

impl ScaleArgs {
    fn plan(&self) -> Result<Plan, CliError> {
        if self.pairs.is_empty() || self.pairs.iter().any(|&n| n == 0 || n > MAX_PAIRS) {
            return Err(CliError::Usage(format!(
                "--pairs takes counts from 1 to {MAX_PAIRS}"
            )));
        }
        for (i, p) in self.phases.iter().enumerate() {
            if self.phases[..i].contains(p) {
                return Err(CliError::Usage(format!("--phases lists {p:?} twice")));
            }
        }
        if self.rate_iters == 0 || self.bw_iters == 0 || self.pp_iters == 0 || self.window == 0 {
            return Err(CliError::Usage(
                "iteration counts and --window must be at least 1".into(),
            ));
        }
        Ok(Plan {
            phases: self.phases.clone(),
            msg_size: one_size(&self.msg_size, "--msg-size")?,
            bw_size: one_size(&self.bw_size, "--bw-size")?,
            rate_iters: self.rate_iters,
            bw_iters: self.bw_iters,
            pp_iters: self.pp_iters,
            window: self.window,
            warmup: self.common.warmup,
            mode: self.common.mode,
            timeout: Duration::from_secs(self.common.timeout_s.max(1)),
        })
    }
}

/// `Side::open` parameters: only the mode and timeout matter there.
fn side_params(mode: Mode, timeout: Duration) -> RunParams {
    RunParams {
        sizes: Vec::new(),
        iters: 0,
        fixed_iters: true,
        warmup: 0,
        window: 1,
        mode,
        verify: false,
        progress: false,
        timeout,
        guest_cpu: None,
    }
}

/// Blocking waits spin first by default; fix the budget to 0 as `pingpong --mode block` does.
/// Done once, before any thread of ours exists.
fn prepare_spin(modes: &[Mode]) {
    if modes.contains(&Mode::Block) && std::env::var_os(vfabric::cq::SPIN_ENV).is_none() {
        std::env::set_var(vfabric::cq::SPIN_ENV, "0");
    }
}

/// A start line for the measuring guests: all pairs begin their timed part together. Bounded:
/// gives up at the deadline or when another guest failed.
struct Gate {
    parties: usize,
    arrived: Mutex<usize>,
    cv: Condvar,
}

impl Gate {
    fn new(parties: usize) -> Self {
        Self {
            parties,
            arrived: Mutex::new(0),
            cv: Condvar::new(),
        }
    }

    fn pass(&self, abort: &AtomicBool, deadline: Instant) -> Result<(), CliError> {
        // A poisoned lock only means another guest panicked; the count is still right.
        let mut n = self.arrived.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        if *n >= self.parties {
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            if *n >= self.parties {
                return Ok(());
            }
            if abort.load(Ordering::Acquire) {
                return Err(CliError::Run(ABORTED.into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CliError::Run(format!(
                    "start gate: {} of {} guests arrived in time",
                    *n, self.parties
                )));
            }
            // Short steps so an abort (which does not take the lock) is seen soon.
            let step = (deadline - now).min(Duration::from_millis(10));
            n = self
                .cv
                .wait_timeout(n, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// State every guest thread of one run shares.
struct Shared {
    /// One start gate per phase (scale) or for the load's start (hol).
    gates: Vec<Gate>,
    abort: AtomicBool,
    pb: ProgressBar,
    /// Head-of-line only: writes the load has completed, whether it should stop, whether it
    /// has stopped.
    load_done_writes: AtomicUsize,
    load_stop: AtomicBool,
    load_ended: AtomicBool,
}

impl Shared {
    fn new(gates: Vec<Gate>, pb: ProgressBar) -> Self {
        Self {
            gates,
            abort: AtomicBool::new(false),
            pb,
            load_done_writes: AtomicUsize::new(0),
            load_stop: AtomicBool::new(false),
            load_ended: AtomicBool::new(false),
        }
    }

    fn fail(&self) {
        self.abort.store(true, Ordering::Release);
        for g in &self.gates {
            g.cv.notify_all();
        }
    }

    fn check(&self) -> Result<(), CliError> {
        if self.abort.load(Ordering::Relaxed) {
            Err(CliError::Run(ABORTED.into()))
        } else {
            Ok(())
        }
    }
}

/// Run `f` on a guest thread pinned like the demo's guests; a failure or panic aborts the rest.
fn spawn_guest<T, F>(
    name: String,
    shared: &Arc<Shared>,
    f: F,
) -> Result<JoinHandle<Result<T, CliError>>, CliError>
where
    T: Send + 'static,
    F: FnOnce(&Shared) -> Result<T, CliError> + Send + 'static,
{
    let sh = shared.clone();
    let cpu = demo::placement().1;
    Ok(std::thread::Builder::new().name(name).spawn(move || {
        if let Some(cpu) = cpu {
            vfabric_device::pin_current_thread(cpu);
        }
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&sh)))
            .unwrap_or_else(|_| Err(CliError::Run("guest thread panicked".into())));
        if r.is_err() {
            sh.fail();
        }
        r
    })?)
}

fn is_aborted(e: &CliError) -> bool {
    matches!(e, CliError::Run(m) if m == ABORTED)
}

/// The first error that is not only a consequence of another guest's failure.
fn root_cause(errs: impl IntoIterator<Item = CliError>) -> Option<CliError> {
    errs.into_iter().reduce(|a, b| {
        if is_aborted(&a) && !is_aborted(&b) {
            b
        } else {
            a
        }
    })
}

/// Join guest threads (all of them, so none outlives the daemon); errors as `root_cause`.
fn join_all<T>(handles: Vec<JoinHandle<Result<T, CliError>>>) -> Result<Vec<T>, CliError> {
    let mut out = Vec::with_capacity(handles.len());
    let mut errs = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => errs.push(e),
            Err(_) => errs.push(CliError::Run("guest thread panicked".into())),
        }
    }
    match root_cause(errs) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// One completion from `cq`, or an error at `deadline` or when another guest failed. Polled
/// waits yield between polls like `bench` (guests share a core); blocking ones block in slices.
fn wait(
    cq: &CompletionQueue,
    mode: Mode,
    what: &str,
    deadline: Instant,
    sh: &Shared,
) -> Result<CqEntry, CliError> {
    let mut out = Vec::with_capacity(1);
    loop {
        let r = match mode {
            Mode::Poll => cq.read(&mut out, 1),
            Mode::Adaptive | Mode::Block => {
                let left = deadline.saturating_duration_since(Instant::now());
                cq.sread(&mut out, 1, Some(left.min(BLOCK_SLICE)))
            }
        };
        match r {
            Ok(_) => {
                if let Some(e) = out.pop() {
                    return Ok(e);
                }
            }
            Err(vfabric::Error::Again) | Err(vfabric::Error::Timeout) => {}
            Err(vfabric::Error::Avail) => {
                let e = cq.readerr();
                return Err(CliError::Run(format!(
                    "{what}: {}",
                    crate::bench::describe_error(e)
                )));
            }
            Err(e) => return Err(e.into()),
        }
        sh.check()?;
        if Instant::now() >= deadline {
            return Err(CliError::Run(format!(
                "{what}: no completion before the deadline (a measurement has --timeout-s)"
            )));
        }
        if mode == Mode::Poll {
            std::thread::yield_now();
        }
    }
}

/// [`wait`] for a completion that is usually there already (the ping-pong's send, read after
/// the reply arrived): a plain read first, the wait only if it found nothing.
fn wait_ready(
    cq: &CompletionQueue,
    mode: Mode,
    what: &str,
    deadline: Instant,
    sh: &Shared,
) -> Result<CqEntry, CliError> {
    let mut out = Vec::with_capacity(1);
    // On an error `wait` reads again and reports it (an error entry, a stopped domain).
    if cq.read(&mut out, 1).is_ok() {
        if let Some(e) = out.pop() {
            return Ok(e);
        }
    }
    wait(cq, mode, what, deadline, sh)
}

/// Timed part of one pair's streaming phase.
#[derive(Clone, Copy, Debug)]
struct Stream {
    msgs: usize,
    start: Instant,
    end: Instant,
}

/// Client of a streaming phase: windows of `window` sends, each acknowledged by the server
/// (the `vfabric bw` protocol). Warm-up windows run before the start gate.
#[allow(clippy::too_many_arguments)]
fn stream_client(
    side: &Side,
    peer: FiAddr,
    size: usize,
    iters: usize,
    plan: &Plan,
    gate: &Gate,
    sh: &Shared,
    deadline: Instant,
) -> Result<Stream, CliError> {
    let w = plan.window;
    let warm = plan.warmup.div_ceil(w);
    let windows = iters.div_ceil(w);
    let mut start = Instant::now();
    for i in 0..warm + windows {
        if i == warm {
            gate.pass(&sh.abort, deadline)?;
            start = Instant::now();
        }
        side.post_recv(0, CTX_ACK)?;
        for _ in 0..w {
            side.post_send(size, peer, CTX_DATA)?;
        }
        for _ in 0..w {
            wait(&side.tx_cq, plan.mode, "stream send", deadline, sh)?;
        }
        wait(&side.rx_cq, plan.mode, "stream ack", deadline, sh)?;
        if i >= warm {
            sh.pb.inc(w as u64);
        }
    }
    Ok(Stream {
        msgs: windows * w,
        start,
        end: Instant::now(),
    })
}

fn stream_server(
    side: &Side,
    peer: FiAddr,
    size: usize,
    iters: usize,
    plan: &Plan,
    sh: &Shared,
    deadline: Instant,
) -> Result<(), CliError> {
    let w = plan.window;
    let windows = plan.warmup.div_ceil(w) + iters.div_ceil(w);
    for _ in 0..w {
        side.post_recv(size, CTX_DATA)?;
    }
    for i in 0..windows {
        for _ in 0..w {
            wait(&side.rx_cq, plan.mode, "stream recv", deadline, sh)?;
        }
        if i + 1 < windows {
            for _ in 0..w {
                side.post_recv(size, CTX_DATA)?;
            }
        }
        side.post_send(0, peer, CTX_ACK)?;
        wait(&side.tx_cq, plan.mode, "stream ack send", deadline, sh)?;
    }
    Ok(())
}

/// Client of a ping-pong: one-way latency of every timed round trip (half of it), µs.
#[allow(clippy::too_many_arguments)]
fn pingpong_client(
    side: &Side,
    peer: FiAddr,
    size: usize,
    iters: usize,
    warmup: usize,
    mode: Mode,
    gate: Option<&Gate>,
    sh: &Shared,
    deadline: Instant,
) -> Result<Vec<f64>, CliError> {
    let mut one_way = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        if i == warmup {
            if let Some(g) = gate {
                g.pass(&sh.abort, deadline)?;
            }
        }
        let t = Instant::now();
        side.post_recv(size, CTX_PP_RECV)?;
        side.post_send(size, peer, CTX_PP_SEND)?;
        // The reply first, then the send's completion (written before the reply could be):
        // one sleep per round trip, as in `bench::pingpong_size`.
        wait(&side.rx_cq, mode, "pingpong recv", deadline, sh)?;
        wait_ready(&side.tx_cq, mode, "pingpong send", deadline, sh)?;
        if i >= warmup {
            one_way.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
            if one_way.len().is_multiple_of(PP_PROGRESS_EVERY) {
                sh.pb.inc(PP_PROGRESS_EVERY as u64);
            }
        }
    }
    Ok(one_way)
}

fn pingpong_server(
    side: &Side,
    peer: FiAddr,
    size: usize,
    rounds: usize,
    mode: Mode,
    sh: &Shared,
    deadline: Instant,
) -> Result<(), CliError> {
    side.post_recv(size, CTX_PP_RECV)?;
    for i in 0..rounds {
        wait(&side.rx_cq, mode, "pingpong recv", deadline, sh)?;
        // The previous reply's completion, written before this message could arrive.
        if i > 0 {
            wait_ready(&side.tx_cq, mode, "pingpong send", deadline, sh)?;
        }
        if i + 1 < rounds {
            side.post_recv(size, CTX_PP_RECV)?;
        }
        side.post_send(size, peer, CTX_PP_SEND)?;
    }
    if rounds > 0 {
        wait(&side.tx_cq, mode, "pingpong send", deadline, sh)?;
    }
    Ok(())
}

/// The `p`-quantile (0..=1) of `xs`, nearest rank; `None` when empty.
fn quantile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    v.get(i).copied()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// A guest and its peer's address in its address vector.
type Guest = (Side, FiAddr);

/// Two guests of one pair, each on its own device, knowing each other's address.
fn open_pair(
    server_dev: &std::path::Path,
    client_dev: &std::path::Path,
    max: (usize, usize),
    modes: (Mode, Mode),
    timeout: Duration,
) -> Result<(Guest, Guest), CliError> {
    let server = Side::open(server_dev, max.0, &side_params(modes.0, timeout))?;
    let client = Side::open(client_dev, max.1, &side_params(modes.1, timeout))?;
    let to_client = server.av.insert(client.name())?;
    let to_server = client.av.insert(server.name())?;
    Ok(((server, to_client), (client, to_server)))
}

/// What one pair's client measured.
#[derive(Default)]
struct PairOut {
    rate: Option<Stream>,
    bw: Option<Stream>,
    /// Median one-way ping-pong latency, µs.
    pp_median_us: Option<f64>,
}

/// One line of `vfabric scale` (and of scripts/bench-compare.sh's raw data).
#[derive(Debug, Serialize)]
struct ScaleRow {
    bench: &'static str,
    pairs: usize,
    mode: Mode,
    msg_size: usize,
    bw_size: usize,
    /// Messages of `msg_size` per second, all pairs streaming at once.
    msg_rate: Option<f64>,
    /// The slowest and fastest pair's own rate (fairness between pairs).
    pair_msg_rate_min: Option<f64>,
    pair_msg_rate_max: Option<f64>,
    /// 10^9 bytes per second of `bw_size` messages, all pairs streaming at once.
    bw_gb_s: Option<f64>,
    /// Median over pairs of each pair's median one-way ping-pong latency, µs.
    one_way_us: Option<f64>,
    /// The slowest pair's median one-way latency, µs.
    one_way_max_us: Option<f64>,
}

/// Aggregate over pairs: total messages over the span from the first start to the last end.
fn aggregate(streams: &[Stream]) -> Option<f64> {
    let start = streams.iter().map(|s| s.start).min()?;
    let end = streams.iter().map(|s| s.end).max()?;
    let msgs: usize = streams.iter().map(|s| s.msgs).sum();
    let secs = end.duration_since(start).as_secs_f64();
    (secs > 0.0).then(|| msgs as f64 / secs)
}

fn pair_rate(s: &Stream) -> f64 {
    s.msgs as f64 / s.end.duration_since(s.start).as_secs_f64().max(1e-9)
}

/// One pair count: a fresh daemon with `2 * n` devices, `n` pairs, every phase.
fn scale_once(n: usize, plan: &Plan, common: &CommonArgs) -> Result<ScaleRow, CliError> {
    let devices = u32::try_from(2 * n).map_err(|_| CliError::Usage("too many pairs".into()))?;
    let daemon = demo::embedded_daemon(devices, common.poll_us)?;
    let socks = daemon.socket_paths().to_vec();
    let r = scale_pairs(n, &socks, plan, common);
    daemon.shutdown();
    r
}

fn scale_pairs(
    n: usize,
    socks: &[std::path::PathBuf],
    plan: &Plan,
    common: &CommonArgs,
) -> Result<ScaleRow, CliError> {
    let max = plan.msg_size.max(plan.bw_size);
    let mut pairs = Vec::with_capacity(n);
    for p in 0..n {
        let (Some(s), Some(c)) = (socks.get(2 * p), socks.get(2 * p + 1)) else {
            return Err(CliError::Run(format!("daemon has no devices for pair {p}")));
        };
        pairs.push(open_pair(
            s,
            c,
            (max, max),
            (plan.mode, plan.mode),
            plan.timeout,
        )?);
    }
    let total: usize = plan
        .phases
        .iter()
        .map(|ph| match ph {
            Phase::Rate => plan.rate_iters.div_ceil(plan.window) * plan.window,
            Phase::Bw => plan.bw_iters.div_ceil(plan.window) * plan.window,
            Phase::Pingpong => plan.pp_iters - plan.pp_iters % PP_PROGRESS_EVERY,
        })
        .sum();
    let pb = progress_bar(
        common.quiet || common.json,
        (total * n) as u64,
        &format!("{n} pairs"),
    );
    let gates = plan.phases.iter().map(|_| Gate::new(n)).collect();
    let shared = Arc::new(Shared::new(gates, pb));
    let plan = Arc::new(plan.clone());
    let mut servers = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    let spawn = || -> Result<(), CliError> {
        for (p, ((server, to_client), (client, to_server))) in pairs.into_iter().enumerate() {
            let pl = plan.clone();
            servers.push(spawn_guest(format!("server-{p}"), &shared, move |sh| {
                for ph in &pl.phases {
                    let deadline = Instant::now() + pl.timeout;
                    match ph {
                        Phase::Rate => stream_server(
                            &server,
                            to_client,
                            pl.msg_size,
                            pl.rate_iters,
                            &pl,
                            sh,
                            deadline,
                        )?,
                        Phase::Bw => stream_server(
                            &server,
                            to_client,
                            pl.bw_size,
                            pl.bw_iters,
                            &pl,
                            sh,
                            deadline,
                        )?,
                        Phase::Pingpong => pingpong_server(
                            &server,
                            to_client,
                            pl.msg_size,
                            pl.warmup + pl.pp_iters,
                            pl.mode,
                            sh,
                            deadline,
                        )?,
                    }
                }
                Ok(())
            })?);
            let pl = plan.clone();
            clients.push(spawn_guest(format!("client-{p}"), &shared, move |sh| {
                let mut out = PairOut::default();
                for (i, ph) in pl.phases.iter().enumerate() {
                    let deadline = Instant::now() + pl.timeout;
                    let gate = &sh.gates[i];
                    match ph {
                        Phase::Rate => {
                            out.rate = Some(stream_client(
                                &client,
                                to_server,
                                pl.msg_size,
                                pl.rate_iters,
                                &pl,
                                gate,
                                sh,
                                deadline,
                            )?)
                        }
                        Phase::Bw => {
                            out.bw = Some(stream_client(
                                &client,
                                to_server,
                                pl.bw_size,
                                pl.bw_iters,
                                &pl,
                                gate,
                                sh,
                                deadline,
                            )?)
                        }
                        Phase::Pingpong => {
                            let s = pingpong_client(
                                &client,
                                to_server,
                                pl.msg_size,
                                pl.pp_iters,
                                pl.warmup,
                                pl.mode,
                                Some(gate),
                                sh,
                                deadline,
                            )?;
                            out.pp_median_us = quantile(&s, 0.5);
                        }
                    }
                }
                Ok(out)
            })?);
        }
        Ok(())
    };
    let spawned = spawn();
    if spawned.is_err() {
        // Release the guests already running (they would wait at the gates until the deadline).
        shared.fail();
    }
    // Clients first: they carry the measurements; a server's failure shows up in either.
    let clients = join_all(clients);
    let servers = join_all(servers);
    shared.pb.finish_and_clear();
    spawned?;
    let outs = clients?;
    servers?;

    let rates: Vec<Stream> = outs.iter().filter_map(|o| o.rate).collect();
    let bws: Vec<Stream> = outs.iter().filter_map(|o| o.bw).collect();
    let pp: Vec<f64> = outs.iter().filter_map(|o| o.pp_median_us).collect();
    let per_pair: Vec<f64> = rates.iter().map(pair_rate).collect();
    Ok(ScaleRow {
        bench: "vfabric-scale",
        pairs: n,
        mode: plan.mode,
        msg_size: plan.msg_size,
        bw_size: plan.bw_size,
        msg_rate: aggregate(&rates),
        pair_msg_rate_min: per_pair.iter().copied().reduce(f64::min),
        pair_msg_rate_max: per_pair.iter().copied().reduce(f64::max),
        bw_gb_s: aggregate(&bws).map(|r| r * plan.bw_size as f64 / 1e9),
        one_way_us: quantile(&pp, 0.5),
        one_way_max_us: pp.iter().copied().reduce(f64::max),
    })
}

fn placement_line() -> String {
    match demo::placement() {
        (Some(d), Some(g)) => format!(
            "device poller on cpu{d}, every guest on cpu{g} ({} CPUs)",
            demo::cpus()
        ),
        _ => "one CPU, everything shares it".into(),
    }
}

fn cell(x: Option<f64>, nd: usize) -> String {
    x.map_or("–".to_string(), |v| format!("{v:.nd$}"))
}

pub fn run_scale(args: &ScaleArgs) -> Result<(), CliError> {
    let plan = args.plan()?;
    prepare_spin(&[plan.mode]);
    let json = args.common.json;
    if !json {
        println!(
            "vfabric scale: embedded vfabricd with 2 devices per pair; {}; {:?} completions",
            placement_line(),
            plan.mode
        );
        println!(
            "{:>5} | {:>18} | {:>23} | {:>16} | {:>19} | {:>9}",
            "pairs",
            format!("{} msg/s, all", size_label(plan.msg_size)),
            "per pair min–max msg/s",
            format!("{} GB/s, all", size_label(plan.bw_size)),
            format!("{} one-way µs median", size_label(plan.msg_size)),
            "max µs"
        );
        println!("{}", "-".repeat(106));
    }
    for &n in &args.pairs {
        let row = scale_once(n, &plan, &args.common)?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&row).map_err(std::io::Error::from)?
            );
        } else {
            let spread = match (row.pair_msg_rate_min, row.pair_msg_rate_max) {
                (Some(a), Some(b)) => format!("{a:.0}–{b:.0}"),
                _ => "–".into(),
            };
            println!(
                "{:>5} | {:>18} | {:>23} | {:>16} | {:>19} | {:>9}",
                n,
                cell(row.msg_rate, 0),
                spread,
                cell(row.bw_gb_s, 2),
                cell(row.one_way_us, 2),
                cell(row.one_way_max_us, 2)
            );
        }
    }
    Ok(())
}

/// The `vfabric hol` line.
#[derive(Debug, Serialize)]
struct HolRow {
    bench: &'static str,
    mode: Mode,
    size: usize,
    load_op: &'static str,
    load_size: usize,
    load_window: usize,
    load_mode: Mode,
    /// Median one-way latency of pair 1 alone and while pair 2 streams, µs.
    alone_us: f64,
    loaded_us: f64,
    /// loaded / alone (issue 7's target: at most 1.5).
    ratio: f64,
    alone_p99_us: f64,
    loaded_p99_us: f64,
    /// Means show what the medians hide: rare long stalls behind the load.
    alone_mean_us: f64,
    loaded_mean_us: f64,
    loaded_max_us: f64,
    /// The load's own throughput while it ran, 10^9 B/s.
    load_gb_s: f64,
}

/// The load: keep `window` RMA writes in flight into the target's region until told to stop.
/// Starts when the latency pair passes the gate, i.e. after its unloaded measurement.
#[allow(clippy::too_many_arguments)]
fn load_writer(
    side: &Side,
    peer: FiAddr,
    key: u64,
    base: u64,
    size: usize,
    window: usize,
    mode: Mode,
    timeout: Duration,
    sh: &Shared,
) -> Result<f64, CliError> {
    let r = (|| {
        // The unloaded measurement comes first: allow it a timeout of its own.
        sh.gates[0].pass(&sh.abort, Instant::now() + 2 * timeout)?;
        let deadline = Instant::now() + timeout;
        let start = Instant::now();
        let post = || {
            side.retry(|| {
                side.ep
                    .write_buf(&side.sbuf, 0..size, peer, base, key, CTX_LOAD)
            })
        };
        for _ in 0..window {
            post()?;
        }
        let mut in_flight = window;
        let mut done = 0usize;
        while done < LOAD_MAX_WRITES {
            wait(&side.tx_cq, mode, "load write", deadline, sh)?;
            in_flight -= 1;
            done += 1;
            sh.load_done_writes.store(done, Ordering::Release);
            if sh.load_stop.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CliError::Run(
                    "load: the latency pair did not finish within --timeout-s".into(),
                ));
            }
            post()?;
            in_flight += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        // Drain what is still in flight (bounded: `in_flight` completions, one deadline).
        let drain = Instant::now() + timeout;
        for _ in 0..in_flight {
            wait(&side.tx_cq, mode, "load drain", drain, sh)?;
        }
        Ok(done as f64 * size as f64 / secs.max(1e-9) / 1e9)
    })();
    sh.load_ended.store(true, Ordering::Release);
    r
}

pub fn run_hol(args: &HolArgs) -> Result<(), CliError> {
    let common = &args.common;
    let size = one_size(&args.msg_size, "--msg-size")?;
    let load_size = one_size(&args.load_size, "--load-size")?;
    if args.pp_iters == 0 || args.load_window == 0 || load_size == 0 {
        return Err(CliError::Usage(
            "--pp-iters, --load-window and --load-size must be at least 1".into(),
        ));
    }
    let mode = common.mode;
    let load_mode = args.load_mode.unwrap_or(mode);
    let timeout = Duration::from_secs(common.timeout_s.max(1));
    prepare_spin(&[mode, load_mode]);
    let daemon = demo::embedded_daemon(4, common.poll_us)?;
    let socks = daemon.socket_paths().to_vec();
    let r = hol_pairs(args, &socks, (size, load_size), load_mode, timeout);
    daemon.shutdown();
    let row = r?;
    if common.json {
        println!(
            "{}",
            serde_json::to_string(&row).map_err(std::io::Error::from)?
        );
        return Ok(());
    }
    println!(
        "vfabric hol: embedded vfabricd, 4 devices; {}; pair 1 ping-pong {} ({:?}), pair 2 RMA writes of {} ({} in flight, {:?})",
        placement_line(),
        size_label(size),
        mode,
        size_label(load_size),
        args.load_window,
        load_mode
    );
    println!(
        "{:>28} | {:>17} | {:>10} | {:>10}",
        "pair 1", "one-way µs median", "p99 µs", "mean µs"
    );
    println!("{}", "-".repeat(74));
    println!(
        "{:>28} | {:>17.2} | {:>10.2} | {:>10.2}",
        "alone", row.alone_us, row.alone_p99_us, row.alone_mean_us
    );
    println!(
        "{:>28} | {:>17.2} | {:>10.2} | {:>10.2}",
        format!("while pair 2 writes {}", size_label(load_size)),
        row.loaded_us,
        row.loaded_p99_us,
        row.loaded_mean_us
    );
    println!(
        "ratio of medians loaded/alone {:.2} (target ≤ 1.5: {}); slowest loaded round trip {:.0} µs one way; pair 2 moved {:.2} GB/s meanwhile",
        row.ratio,
        if row.ratio <= 1.5 { "met" } else { "not met" },
        row.loaded_max_us,
        row.load_gb_s
    );
    Ok(())
}

fn hol_pairs(
    args: &HolArgs,
    socks: &[std::path::PathBuf],
    (size, load_size): (usize, usize),
    load_mode: Mode,
    timeout: Duration,
) -> Result<HolRow, CliError> {
    let [d0, d1, d2, d3] = socks else {
        return Err(CliError::Run(format!(
            "expected 4 devices, the daemon has {}",
            socks.len()
        )));
    };
    let common = &args.common;
    let mode = common.mode;
    let ((lat_server, to_lat_client), (lat_client, to_lat_server)) =
        open_pair(d0, d1, (size, size), (mode, mode), timeout)?;
    let ((target, _), (loader, to_target)) = open_pair(
        d2,
        d3,
        (load_size, load_size),
        (load_mode, load_mode),
        timeout,
    )?;
    // One-sided: the device writes into the target's memory by itself, so the target needs no
    // thread; this one keeps it (and its region) alive until the load is over.
    let mr = target
        .domain
        .register(&target.rbuf, vfabric::fi::REMOTE_WRITE, None)?;
    let (key, base) = (mr.key(), mr.base());

    let rounds = common.warmup + args.pp_iters;
    let pb = progress_bar(
        common.quiet || common.json,
        (2 * (args.pp_iters - args.pp_iters % PP_PROGRESS_EVERY)) as u64,
        "hol",
    );
    // Gate 0: the latency client (done with its unloaded run) and the load start together.
    let shared = Arc::new(Shared::new(vec![Gate::new(2)], pb));
    let warmup = common.warmup;
    let iters = args.pp_iters;
    let server = spawn_guest("hol-server".into(), &shared, move |sh| {
        for _ in 0..2 {
            let deadline = Instant::now() + timeout;
            pingpong_server(&lat_server, to_lat_client, size, rounds, mode, sh, deadline)?;
        }
        Ok(())
    })?;
    let client = spawn_guest("hol-client".into(), &shared, move |sh| {
        let deadline = Instant::now() + timeout;
        let alone = pingpong_client(
            &lat_client,
            to_lat_server,
            size,
            iters,
            warmup,
            mode,
            None,
            sh,
            deadline,
        )?;
        let deadline = Instant::now() + timeout;
        sh.gates[0].pass(&sh.abort, deadline)?;
        // Measure only once the load runs (its first write completed, the rest queued).
        while sh.load_done_writes.load(Ordering::Acquire) == 0 {
            sh.check()?;
            if sh.load_ended.load(Ordering::Acquire) || Instant::now() >= deadline {
                return Err(CliError::Run("the load did not start".into()));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let loaded = pingpong_client(
            &lat_client,
            to_lat_server,
            size,
            iters,
            warmup,
            mode,
            None,
            sh,
            deadline,
        );
        let ended_early = sh.load_ended.load(Ordering::Acquire);
        sh.load_stop.store(true, Ordering::Release);
        let loaded = loaded?;
        if ended_early {
            return Err(CliError::Run(
                "the load stopped before the loaded measurement ended".into(),
            ));
        }
        Ok((alone, loaded))
    });
    // A guest that could not start makes the running ones give up, then they are joined.
    let client = match client {
        Ok(h) => h,
        Err(e) => {
            shared.fail();
            let _ = join_all(vec![server]);
            return Err(e);
        }
    };
    let load_window = args.load_window;
    let load = spawn_guest("hol-load".into(), &shared, move |sh| {
        load_writer(
            &loader,
            to_target,
            key,
            base,
            load_size,
            load_window,
            load_mode,
            timeout,
            sh,
        )
    });
    let load = match load {
        Ok(h) => h,
        Err(e) => {
            shared.fail();
            let _ = join_all(vec![client]);
            let _ = join_all(vec![server]);
            return Err(e);
        }
    };
    let lat = join_all(vec![client]);
    let srv = join_all(vec![server]);
    let ld = join_all(vec![load]);
    shared.pb.finish_and_clear();
    drop(mr);
    drop(target);
    // Root cause first: the latency pair's error, then the server's, then the load's.
    let (alone, loaded, load_gb_s) = match (lat, srv, ld) {
        (Ok(mut l), Ok(_), Ok(mut g)) => match (l.pop(), g.pop()) {
            (Some((alone, loaded)), Some(g)) => (alone, loaded, g),
            _ => return Err(CliError::Run("a guest returned nothing".into())),
        },
        (l, s, g) => {
            let errs = [l.err(), s.err(), g.err()].into_iter().flatten();
            return Err(root_cause(errs).unwrap_or(CliError::Run("a guest failed".into())));
        }
    };
    let q = |xs: &[f64], p| quantile(xs, p).unwrap_or(f64::NAN);
    let (a50, l50) = (q(&alone, 0.5), q(&loaded, 0.5));
    Ok(HolRow {
        bench: "vfabric-hol",
        mode,
        size,
        load_op: "write",
        load_size,
        load_window: args.load_window,
        load_mode,
        alone_us: a50,
        loaded_us: l50,
        ratio: l50 / a50,
        alone_p99_us: q(&alone, 0.99),
        loaded_p99_us: q(&loaded, 0.99),
        alone_mean_us: mean(&alone),
        loaded_mean_us: mean(&loaded),
        loaded_max_us: q(&loaded, 1.0),
        load_gb_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Scale {
        #[command(flatten)]
        a: ScaleArgs,
    }

    #[test]
    fn scale_args() {
        let s = Scale::try_parse_from(["x"]).expect("defaults parse");
        let p = s.a.plan().expect("defaults are valid");
        assert_eq!(s.a.pairs, vec![1, 2, 4, 8]);
        assert_eq!((p.msg_size, p.bw_size), (8, 64 << 10));
        assert_eq!(p.phases, vec![Phase::Rate, Phase::Bw, Phase::Pingpong]);
        let s =
            Scale::try_parse_from(["x", "--pairs", "3", "--phases", "pingpong"]).expect("parse");
        assert_eq!(
            (s.a.pairs.as_slice(), s.a.phases.as_slice()),
            (&[3][..], &[Phase::Pingpong][..])
        );
        for bad in [
            ["--pairs", "0"],
            ["--phases", "bw,bw"],
            ["--msg-size", "8,64"],
        ] {
            let s = Scale::try_parse_from(["x", bad[0], bad[1]]).expect("parse");
            assert!(s.a.plan().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), Some(3.0));
    }
}
