// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Ping-pong and bandwidth engines shared by `vfabric pingpong`, `vfabric bw` and `vfabric demo`.
//!
//! Two sides, each one endpoint on its own domain (device). The server writes its address to an
//! address file; the client reads it and introduces itself with a first message carrying its own
//! address, so the two processes need nothing else in common.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vfabric::{
    AddressVector, BindFlags, CompletionQueue, CqAttr, CqEntry, Domain, DomainAttr, Endpoint,
    EpAttr, FabricAddr, FiAddr, SharedBuf, Status, WaitMode,
};

use crate::CliError;

/// Polls between `sched_yield`s while waiting (the guests may share a core with each other).
const YIELD_EVERY: u32 = 1;
/// Empty polls between clock reads (timeout checks) while busy-polling a CQ.
const CLOCK_EVERY: u32 = 1024;
/// Completions read per call while draining a window.
const READ_BATCH: usize = 64;

/// How a side waits for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Busy-poll the CQ (`fi_cq_read` in a loop, yielding now and then).
    Poll,
    /// `fi_cq_sread` with the driver's adaptive spin-then-block.
    Adaptive,
    /// `fi_cq_sread` with no spinning: every wait blocks on the call eventfd.
    Block,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pingpong,
    Bw,
    /// One-sided RMA write bandwidth (`bw --op write`).
    #[serde(rename = "bw-write")]
    BwWrite,
    /// One-sided RMA read bandwidth (`bw --op read`).
    #[serde(rename = "bw-read")]
    BwRead,
    /// Fetch-and-add rate on 64-bit words (`atomic --op fadd`).
    #[serde(rename = "atomic-fadd")]
    AtomicFetchAdd,
    /// Non-fetching add rate (`atomic --op add`).
    #[serde(rename = "atomic-add")]
    AtomicAdd,
}

impl Kind {
    /// One-sided kinds: the server registers a region and stays passive.
    pub fn is_rma(self) -> bool {
        !matches!(self, Kind::Pingpong | Kind::Bw)
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Pingpong => "pingpong",
            Kind::Bw => "bw",
            Kind::BwWrite => "bw-write",
            Kind::BwRead => "bw-read",
            Kind::AtomicFetchAdd => "atomic-fadd",
            Kind::AtomicAdd => "atomic-add",
        }
    }
}

/// Entries of each side's CQs: a window's operations are all outstanding before their
/// completions are read, so a window may not exceed it (libfabric: no CQ overrun).
pub const CQ_SIZE: usize = 1024;

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct RunParams {
    pub sizes: Vec<usize>,
    /// Iterations at the smallest size; scaled down for large sizes unless `fixed_iters`.
    pub iters: usize,
    pub fixed_iters: bool,
    pub warmup: usize,
    pub window: usize,
    pub mode: Mode,
    pub verify: bool,
    pub progress: bool,
    pub timeout: Duration,
    /// Pin both guest threads of an in-process pair to this CPU.
    pub guest_cpu: Option<usize>,
}

impl RunParams {
    /// Iterations for `size`: about the same bytes per size, never below 20.
    pub fn iters_for(&self, size: usize) -> usize {
        if self.fixed_iters {
            return self.iters.max(1);
        }
        let scale = (size / 65536).max(1);
        (self.iters / scale).max(20)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    pub size: usize,
    pub iters: usize,
    /// Half the mean round trip (pingpong) or mean time per message (bw), µs.
    pub one_way_us: f64,
    /// 10^6 bytes per second.
    pub mb_s: f64,
    /// Messages per second (one direction).
    pub msg_rate: f64,
    pub verified: bool,
}

/// One side: a domain, an endpoint, its CQs and AV, and its buffers.
pub struct Side {
    pub domain: Domain,
    pub ep: Endpoint,
    pub(crate) tx_cq: CompletionQueue,
    pub(crate) rx_cq: CompletionQueue,
    pub(crate) av: AddressVector,
    pub(crate) sbuf: SharedBuf,
    pub(crate) rbuf: SharedBuf,
    mode: Mode,
    timeout: Duration,
    /// The one peer, once known: receives are directed at it, so they fail (`PeerGone`) as
    /// soon as its device disconnects instead of waiting out the timeout.
    peer: FiAddr,
}

impl Side {
    pub fn open(
        device: impl Into<vfabric::DeviceLocator>,
        max_size: usize,
        params: &RunParams,
    ) -> Result<Self, CliError> {
        if params.mode == Mode::Block && std::env::var_os(vfabric::cq::SPIN_ENV).is_none() {
            std::env::set_var(vfabric::cq::SPIN_ENV, "0");
        }
        let buf_len = max_size.max(64);
        // Two buffers of the largest size, bounce room and rings.
        let mem = (2 * buf_len + (32 << 20)).next_power_of_two();
        let domain = Domain::open(
            device,
            DomainAttr {
                mem_bytes: mem.max(vfabric::memory::default_mem_bytes()),
                ..DomainAttr::default()
            },
        )?;
        let wait = if params.mode == Mode::Poll {
            WaitMode::None
        } else {
            WaitMode::Blocking
        };
        let tx_cq = domain.cq_open(CqAttr {
            size: CQ_SIZE,
            wait,
        })?;
        let rx_cq = domain.cq_open(CqAttr {
            size: CQ_SIZE,
            wait,
        })?;
        let av = domain.av_open()?;
        let ep = domain.endpoint(EpAttr::default())?;
        ep.bind_cq(&tx_cq, BindFlags::TRANSMIT)?;
        ep.bind_cq(&rx_cq, BindFlags::RECV)?;
        ep.bind_av(&av)?;
        ep.enable()?;
        let sbuf = domain.alloc_buffer(buf_len)?;
        let rbuf = domain.alloc_buffer(buf_len)?;
        Ok(Self {
            domain,
            ep,
            tx_cq,
            rx_cq,
            av,
            sbuf,
            rbuf,
            mode: params.mode,
            timeout: params.timeout,
            peer: vfabric::FI_ADDR_UNSPEC,
        })
    }

    pub fn name(&self) -> FabricAddr {
        self.ep.name()
    }

    /// Wait for one completion on `cq`; returns its length (bytes received or sent). Inline:
    /// in the ping-pong it is the whole wait.
    #[inline(always)]
    fn wait(&self, cq: &CompletionQueue, what: &str) -> Result<usize, CliError> {
        let mut one = [CqEntry::default()];
        self.read_some(cq, &mut one, what)?;
        Ok(one[0].len)
    }

    /// [`Side::wait`] for a completion that is usually there already (the ping-pong's send,
    /// read after the reply arrived): a plain read (`fi_cq_read`) first, the wait only if it
    /// found nothing. Reads into the caller's `one` (the ping-pong's, reused: no entry to build
    /// and drop per wait).
    #[inline(always)]
    fn wait_ready(
        &self,
        cq: &CompletionQueue,
        one: &mut [CqEntry; 1],
        what: &str,
    ) -> Result<usize, CliError> {
        match cq.read_into(one) {
            Ok(_) => return Ok(one[0].len),
            Err(vfabric::Error::Again) => {}
            Err(e) => return Err(self.read_error(cq, e, what)),
        }
        self.read_some(cq, one, what)?;
        Ok(one[0].len)
    }

    /// Wait for a receive of `size` bytes on `cq`, into the caller's `one` (as
    /// [`Side::wait_ready`]); a shorter or longer one is an error. Inline: it is the
    /// ping-pong's wait (no call frame of its own around `sread_into`'s).
    #[inline(always)]
    fn wait_recv(
        &self,
        cq: &CompletionQueue,
        size: usize,
        one: &mut [CqEntry; 1],
        what: &str,
    ) -> Result<(), CliError> {
        self.read_some(cq, one, what)?;
        let len = one[0].len;
        if len != size {
            return Err(CliError::Run(format!(
                "{what}: received {len} bytes, expected {size}"
            )));
        }
        Ok(())
    }

    /// Wait for `n` completions on `cq`, reading them in bulk through `scratch`.
    fn wait_n(
        &self,
        cq: &CompletionQueue,
        mut n: usize,
        scratch: &mut [CqEntry],
        what: &str,
    ) -> Result<(), CliError> {
        while n > 0 {
            let want = n.min(scratch.len());
            n -= self.read_some(cq, &mut scratch[..want], what)?;
        }
        Ok(())
    }

    /// Read at least one entry into `out` (up to its length), waiting as the mode says. No
    /// allocation; the clock is read only every `CLOCK_EVERY` empty polls (poll mode) — the
    /// blocking modes hand the timeout to `sread`. Inline: in the ping-pong it is the caller's
    /// whole wait.
    #[inline(always)]
    fn read_some(
        &self,
        cq: &CompletionQueue,
        out: &mut [CqEntry],
        what: &str,
    ) -> Result<usize, CliError> {
        if self.mode != Mode::Poll {
            // `sread` does the waiting (and keeps the timeout) itself.
            match cq.sread_into(out, Some(self.timeout)) {
                Ok(n) => return Ok(n),
                Err(vfabric::Error::Again) => {}
                Err(e) => return Err(self.read_error(cq, e, what)),
            }
        }
        let mut deadline = None;
        let mut polls = 0u32;
        loop {
            let r = match self.mode {
                Mode::Poll => cq.read_into(out),
                Mode::Adaptive | Mode::Block => cq.sread_into(out, Some(self.timeout)),
            };
            match r {
                Ok(n) => return Ok(n),
                Err(vfabric::Error::Again) => {}
                Err(e) => return Err(self.read_error(cq, e, what)),
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(CLOCK_EVERY) {
                let now = Instant::now();
                if now >= *deadline.get_or_insert(now + self.timeout) {
                    return Err(self.no_completion(what));
                }
            }
            if polls.is_multiple_of(YIELD_EVERY) {
                // Three parties share two cores: let the device thread and the peer run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The error of a read that returned neither entries nor `Again`.
    #[cold]
    fn read_error(&self, cq: &CompletionQueue, e: vfabric::Error, what: &str) -> CliError {
        match e {
            vfabric::Error::Timeout => self.no_completion(what),
            vfabric::Error::Avail => error_completion(what, cq.readerr()),
            e => e.into(),
        }
    }

    /// Receives from now on are directed at `peer`.
    pub(crate) fn set_peer(&mut self, peer: FiAddr) {
        self.peer = peer;
    }

    fn no_completion(&self, what: &str) -> CliError {
        CliError::Run(format!("{what}: no completion within {:?}", self.timeout))
    }

    /// Post with retry while the ring is full (driving progress meanwhile).
    pub(crate) fn retry<F: FnMut() -> vfabric::Result<()>>(
        &self,
        mut post: F,
    ) -> Result<(), CliError> {
        let mut deadline = None;
        loop {
            match post() {
                Ok(()) => return Ok(()),
                Err(vfabric::Error::Again) => {
                    self.domain.progress()?;
                    // The clock only once the ring is full.
                    let now = Instant::now();
                    if now >= *deadline.get_or_insert(now + self.timeout) {
                        return Err(CliError::Run("ring full for too long".into()));
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`Side::retry`] of [`Side::post_recv`]'s receive once it found the ring full: out of
    /// line, taking its arguments by value, so the post stores nothing for it beforehand.
    #[cold]
    #[inline(never)]
    fn retry_recv(&self, size: usize, ctx: u64) -> Result<(), CliError> {
        self.retry(|| self.ep.recv_buf_from(&self.rbuf, 0..size, self.peer, ctx))
    }

    /// [`Side::retry_recv`] for [`Side::post_send`].
    #[cold]
    #[inline(never)]
    fn retry_send(&self, size: usize, dest: FiAddr, ctx: u64) -> Result<(), CliError> {
        self.retry(|| self.ep.send_buf(&self.sbuf, 0..size, dest, ctx))
    }

    /// Post a receive of `size` bytes into `rbuf`. Inline, with the retry out of line: in the
    /// ping-pong this is the whole post.
    #[inline(always)]
    pub(crate) fn post_recv(&self, size: usize, ctx: u64) -> Result<(), CliError> {
        match self.ep.recv_buf_from(&self.rbuf, 0..size, self.peer, ctx) {
            Err(vfabric::Error::Again) => self.retry_recv(size, ctx),
            r => r.map_err(CliError::from),
        }
    }

    /// Post a send of `size` bytes from `sbuf` (inline, as [`Side::post_recv`]).
    #[inline(always)]
    pub(crate) fn post_send(&self, size: usize, dest: FiAddr, ctx: u64) -> Result<(), CliError> {
        match self.ep.send_buf(&self.sbuf, 0..size, dest, ctx) {
            Err(vfabric::Error::Again) => self.retry_send(size, dest, ctx),
            r => r.map_err(CliError::from),
        }
    }

    fn fill(&mut self, size: usize, seed: u64) {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(&mut unsafe { self.sbuf.as_mut_slice() }[..size], seed);
    }

    fn check(&self, size: usize, seed: u64) -> Result<(), CliError> {
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        let got = &unsafe { self.rbuf.as_slice() }[..size];
        let mut want = vec![0u8; size];
        fill_pattern(&mut want, seed);
        if got != want.as_slice() {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(CliError::Run(format!(
                "data mismatch at byte {at} of a {size}-byte message"
            )));
        }
        Ok(())
    }
}

/// The error for an error completion: a peer that disconnected is named as such.
fn error_completion(what: &str, e: Option<vfabric::CqErrEntry>) -> CliError {
    match e {
        Some(e) if matches!(e.status, Status::PeerGone | Status::AddrNotAvail) => {
            CliError::Run(format!(
                "{what}: peer device disconnected ({}, errno {})",
                e.status, e.err
            ))
        }
        other => CliError::Run(format!("{what}: {}", describe_error(other))),
    }
}

/// Refuse at once what cannot run: a window over the CQ size (`limits` = `None`: before the
/// device is known) or a size over the device's maximum message (or RMA transfer) size.
pub fn check_limits(
    kind: Kind,
    params: &RunParams,
    limits: Option<&vfabric::info::Limits>,
) -> Result<(), CliError> {
    if !matches!(kind, Kind::Pingpong) && params.window > CQ_SIZE {
        return Err(CliError::Run(format!(
            "--window {} exceeds the completion queue size {CQ_SIZE} (a window's completions \
             are all outstanding at once); use --window {CQ_SIZE} or less",
            params.window
        )));
    }
    let Some(limits) = limits else {
        return Ok(());
    };
    let (max, what) = match (kind.is_rma(), limits.max_rma_size) {
        (true, Some(m)) => (m, "maximum RMA transfer size (MAX_RMA_SIZE)"),
        _ => (limits.max_msg_size, "maximum message size (max_msg_size)"),
    };
    match params.sizes.iter().find(|&&s| s as u64 > max) {
        Some(&s) => Err(CliError::Run(format!(
            "size {} exceeds the device's {what} of {}",
            size_label(s),
            size_label(max as usize)
        ))),
        None => Ok(()),
    }
}

/// Deterministic pattern so both sides can verify without sending checksums.
/// An error completion in words (with a hint for the usual causes).
pub fn describe_error(e: Option<vfabric::CqErrEntry>) -> String {
    let Some(e) = e else {
        return "error completion (entry already taken)".into();
    };
    let hint = match e.status {
        vfabric::proto::Status::AddrNotAvail => {
            ": the peer's endpoint is not open (has the peer exited, or is it still waiting for \
             its device?)"
        }
        vfabric::proto::Status::PeerGone => ": the peer's guest disconnected",
        _ => "",
    };
    format!(
        "error completion: {}{hint} (errno {}, {} bytes done)",
        e.status, e.err, e.len
    )
}

pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Server side of the address exchange: publish our address, learn the client's.
fn server_handshake(side: &Side, addr_file: &Path) -> Result<FiAddr, CliError> {
    let tmp = addr_file.with_extension("tmp");
    std::fs::write(&tmp, side.name().to_string())?;
    std::fs::rename(&tmp, addr_file)?;
    side.post_recv(64, 1)?;
    let len = side.wait(&side.rx_cq, "hello")?;
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let text = String::from_utf8_lossy(&unsafe { side.rbuf.as_slice() }[..len]).into_owned();
    let addr: FabricAddr = text
        .trim()
        .parse()
        .map_err(|e| CliError::Run(format!("bad hello {text:?}: {e}")))?;
    side.av
        .insert(addr)
        .map_err(|e| CliError::Run(format!("peer address {addr}: {e}")))
}

/// Client side: read the server's address, introduce ourselves.
fn client_handshake(side: &mut Side, addr_file: &Path) -> Result<FiAddr, CliError> {
    let deadline = Instant::now() + side.timeout;
    let text = loop {
        match std::fs::read_to_string(addr_file) {
            Ok(t) if !t.trim().is_empty() => break t,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                return Err(CliError::Run(format!(
                    "no server address in {}",
                    addr_file.display()
                )))
            }
        }
    };
    let peer = side.av.insert_str(text.trim())?;
    let me = side.name().to_string();
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    (unsafe { side.sbuf.as_mut_slice() })[..me.len()].copy_from_slice(me.as_bytes());
    side.post_send(me.len(), peer, 1)?;
    side.wait(&side.tx_cq, "hello send")?;
    Ok(peer)
}

fn bar(params: &RunParams, total: u64, label: &str) -> ProgressBar {
    progress_bar(!params.progress, total, label)
}

/// The benchmarks' progress bar (`hidden`: none, for `--quiet` and JSON runs).
pub(crate) fn progress_bar(hidden: bool, total: u64, label: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

pub fn size_label(s: usize) -> String {
    if s >= 1 << 20 && s.is_multiple_of(1 << 20) {
        format!("{} MiB", s >> 20)
    } else if s >= 1 << 10 && s.is_multiple_of(1 << 10) {
        format!("{} KiB", s >> 10)
    } else {
        format!("{s} B")
    }
}

/// Run one side of `kind`. The client returns the measurements; the server returns them empty.
pub fn run_side(
    kind: Kind,
    device: &vfabric::DeviceLocator,
    addr_file: &Path,
    server: bool,
    params: &RunParams,
) -> Result<Vec<SizeResult>, CliError> {
    let max = params.sizes.iter().copied().max().unwrap_or(64);
    check_limits(kind, params, None)?;
    let mut side = Side::open(device, max, params)?;
    check_limits(kind, params, Some(&side.domain.info().limits))?;
    let peer = if server {
        server_handshake(&side, addr_file)?
    } else {
        client_handshake(&mut side, addr_file)?
    };
    side.set_peer(peer);
    let total: u64 = params
        .sizes
        .iter()
        .map(|&s| (params.iters_for(s) + params.warmup) as u64)
        .sum();
    let pb = bar(params, if server { 0 } else { total }, kind.label());
    if kind.is_rma() {
        let r = rma_side(kind, &mut side, peer, server, params, &pb);
        pb.finish_and_clear();
        return r;
    }
    let mut results = Vec::new();
    for &size in &params.sizes {
        pb.set_message(size_label(size));
        let r = match kind {
            Kind::Pingpong => pingpong_size(&mut side, peer, size, server, params, &pb)?,
            _ => bw_size(&mut side, peer, size, server, params, &pb)?,
        };
        if let Some(r) = r {
            results.push(r);
        }
    }
    pb.finish_and_clear();
    Ok(results)
}

fn pingpong_size(
    side: &mut Side,
    peer: FiAddr,
    size: usize,
    server: bool,
    params: &RunParams,
    pb: &ProgressBar,
) -> Result<Option<SizeResult>, CliError> {
    let iters = params.iters_for(size);
    let n = iters + params.warmup;
    let tick = !pb.is_hidden();
    let mut start = Instant::now();
    // The entry every wait of the loop reads into.
    let mut one = [CqEntry::default()];
    // Each side waits for the receive first and then reads the completion of its own send,
    // which the device wrote before the peer could answer (the server: before the next
    // message): one sleep per round trip, and one progress pass finds both completions.
    if server {
        side.post_recv(size, 2)?;
        for i in 0..n {
            side.wait_recv(&side.rx_cq, size, &mut one, "pingpong recv")?;
            if i > 0 {
                side.wait_ready(&side.tx_cq, &mut one, "pingpong send")?;
            }
            if params.verify {
                side.check(size, (size * 31 + i) as u64)?;
            }
            if i + 1 < n {
                side.post_recv(size, 2)?;
            }
            if params.verify {
                side.fill(size, (size * 37 + i) as u64);
            }
            side.post_send(size, peer, 3)?;
        }
        side.wait(&side.tx_cq, "pingpong send")?;
        return Ok(None);
    }
    for i in 0..n {
        if i == params.warmup {
            start = Instant::now();
        }
        side.post_recv(size, 2)?;
        if params.verify {
            side.fill(size, (size * 31 + i) as u64);
        }
        side.post_send(size, peer, 3)?;
        side.wait_recv(&side.rx_cq, size, &mut one, "pingpong recv")?;
        side.wait_ready(&side.tx_cq, &mut one, "pingpong send")?;
        if params.verify {
            side.check(size, (size * 37 + i) as u64)?;
        }
        if tick {
            pb.inc(1);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let one_way = secs / (2.0 * iters as f64);
    Ok(Some(SizeResult {
        size,
        iters,
        one_way_us: one_way * 1e6,
        mb_s: size as f64 / one_way / 1e6,
        msg_rate: 1.0 / one_way,
        verified: params.verify,
    }))
}

/// The client sends windows of `window` messages; the server answers each window with a short
/// acknowledgement after posting the receives of the next one.
fn bw_size(
    side: &mut Side,
    peer: FiAddr,
    size: usize,
    server: bool,
    params: &RunParams,
    pb: &ProgressBar,
) -> Result<Option<SizeResult>, CliError> {
    let iters = params.iters_for(size);
    let window = params.window.max(1);
    let windows_warm = params.warmup.div_ceil(window);
    let windows = iters.div_ceil(window) + windows_warm;
    let mut scratch = vec![CqEntry::default(); window.min(READ_BATCH)];
    if server {
        post_recv_window(side, size, window, 4)?;
        for w in 0..windows {
            side.wait_n(&side.rx_cq, window, &mut scratch, "bw recv")?;
            if params.verify {
                side.check(size, (size * 41 + w) as u64)?;
            }
            if w + 1 < windows {
                post_recv_window(side, size, window, 4)?;
            }
            side.post_send(0, peer, 5)?;
            side.wait(&side.tx_cq, "bw ack send")?;
        }
        return Ok(None);
    }
    let mut start = Instant::now();
    for w in 0..windows {
        if w == windows_warm {
            start = Instant::now();
        }
        side.post_recv(0, 6)?;
        if params.verify {
            side.fill(size, (size * 41 + w) as u64);
        }
        {
            // One doorbell for the window.
            let mut batch = side.ep.batch();
            for _ in 0..window {
                side.retry(|| batch.send_buf(&side.sbuf, 0..size, peer, 7))?;
            }
        }
        side.wait_n(&side.tx_cq, window, &mut scratch, "bw send")?;
        side.wait(&side.rx_cq, "bw ack")?;
        pb.inc(window as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let msgs = ((windows - windows_warm) * window) as f64;
    Ok(Some(SizeResult {
        size,
        iters: msgs as usize,
        one_way_us: secs / msgs * 1e6,
        mb_s: size as f64 * msgs / secs / 1e6,
        msg_rate: msgs / secs,
        verified: params.verify,
    }))
}

/// Post `window` receives of `size` bytes with one doorbell.
fn post_recv_window(side: &Side, size: usize, window: usize, ctx: u64) -> Result<(), CliError> {
    let mut batch = side.ep.batch();
    for _ in 0..window {
        side.retry(|| batch.recv_buf_from(&side.rbuf, 0..size, side.peer, ctx))?;
    }
    Ok(())
}

/// Both sides in this process, each on its own device of `sockets` (threads), for the demo.
pub fn run_pair(
    kind: Kind,
    server_dev: PathBuf,
    client_dev: PathBuf,
    params: &RunParams,
) -> Result<Vec<SizeResult>, CliError> {
    let dir = std::env::temp_dir().join(format!(
        "vfabric-pair-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join(format!("{}.addr", kind.label()));
    let _ = std::fs::remove_file(&addr_file);
    let server_params = RunParams {
        progress: false,
        ..params.clone()
    };
    let af = addr_file.clone();
    let cpu = params.guest_cpu;
    let server = std::thread::Builder::new()
        .name("guest-server".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                vfabric_device::pin_current_thread(cpu);
            }
            run_side(kind, &server_dev.into(), &af, true, &server_params)
        })?;
    if let Some(cpu) = cpu {
        vfabric_device::pin_current_thread(cpu);
    }
    let client = run_side(kind, &client_dev.into(), &addr_file, false, params);
    let server = server
        .join()
        .map_err(|_| CliError::Run("server thread panicked".into()))?;
    let _ = std::fs::remove_dir_all(&dir);
    server?;
    client
}

/// Pattern the RMA server puts in its region (read benchmarks verify against it).
const REGION_SEED: u64 = 0x5EED;

/// One-sided benchmarks. The server registers its receive buffer for remote read and write,
/// fills it with a known pattern, sends `key base` to the client and waits passively for the
/// client's "done". The client runs every size against that region.
fn rma_side(
    kind: Kind,
    side: &mut Side,
    peer: FiAddr,
    server: bool,
    params: &RunParams,
    pb: &ProgressBar,
) -> Result<Vec<SizeResult>, CliError> {
    if server {
        let len = side.rbuf.len();
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        fill_pattern(&mut unsafe { side.rbuf.as_mut_slice() }[..len], REGION_SEED);
        let mr = side.domain.register(
            &side.rbuf,
            vfabric::fi::REMOTE_READ | vfabric::fi::REMOTE_WRITE,
            None,
        )?;
        side.post_recv(64, 9)?;
        let info = format!("{} {}", mr.key(), mr.base());
        // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
        (unsafe { side.sbuf.as_mut_slice() })[..info.len()].copy_from_slice(info.as_bytes());
        side.post_send(info.len(), peer, 8)?;
        side.wait(&side.tx_cq, "region info send")?;
        // The client may run many sizes: wait up to one timeout per size.
        let mut left = params.sizes.len().max(1) + 1;
        loop {
            match side.wait(&side.rx_cq, "done") {
                Ok(_) => break,
                Err(CliError::Run(m)) if left > 1 && m.contains("no completion") => left -= 1,
                Err(e) => return Err(e),
            }
        }
        drop(mr);
        return Ok(Vec::new());
    }
    side.post_recv(64, 10)?;
    let len = side.wait(&side.rx_cq, "region info")?;
    // SAFETY: nothing writes the buffer while the slice lives: operations on it are not posted yet or have completed.
    let text = String::from_utf8_lossy(&unsafe { side.rbuf.as_slice() }[..len]).into_owned();
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(key)), Some(Ok(base))) = (it.next(), it.next()) else {
        return Err(CliError::Run(format!("bad region info {text:?}")));
    };
    let mut results = Vec::new();
    for &size in &params.sizes {
        pb.set_message(size_label(size));
        results.push(rma_size(kind, side, peer, key, base, size, params, pb)?);
    }
    side.post_send(0, peer, 11)?;
    side.wait(&side.tx_cq, "done send")?;
    Ok(results)
}

/// Windows of `window` one-sided operations of `size` bytes, all completions awaited per window.
#[allow(clippy::too_many_arguments)]
fn rma_size(
    kind: Kind,
    side: &mut Side,
    peer: FiAddr,
    key: u64,
    base: u64,
    size: usize,
    params: &RunParams,
    pb: &ProgressBar,
) -> Result<SizeResult, CliError> {
    let atomic = matches!(kind, Kind::AtomicFetchAdd | Kind::AtomicAdd);
    if atomic && (size == 0 || !size.is_multiple_of(8)) {
        return Err(CliError::Usage(format!(
            "atomic sizes are multiples of 8 bytes (64-bit words), got {size}"
        )));
    }
    let iters = params.iters_for(size);
    let window = params.window.max(1);
    // Fetch results land in slots of the receive buffer: keep the window within it.
    let window = if kind == Kind::AtomicFetchAdd {
        window.min((side.rbuf.len() / size).max(1))
    } else {
        window
    };
    let windows_warm = params.warmup.div_ceil(window);
    let windows = iters.div_ceil(window) + windows_warm;
    let one = 1u64.to_le_bytes().repeat(size / 8);
    let mut scratch = vec![CqEntry::default(); window.min(READ_BATCH)];
    let mut start = Instant::now();
    for w in 0..windows {
        if w == windows_warm {
            start = Instant::now();
        }
        if params.verify && kind == Kind::BwWrite {
            side.fill(size, (size * 43 + w) as u64);
        }
        // One doorbell per window.
        let mut batch = side.ep.batch();
        for i in 0..window {
            match kind {
                Kind::BwWrite => {
                    side.retry(|| batch.write_buf(&side.sbuf, 0..size, peer, base, key, 12))?
                }
                Kind::BwRead => {
                    side.retry(|| batch.read_buf(&side.rbuf, 0..size, peer, base, key, 13))?
                }
                _ => {
                    let m = vfabric::AtomicMsg {
                        operands: &one,
                        addr: peer,
                        remote_addr: base,
                        key,
                        datatype: vfabric::proto::datatype::UINT64,
                        op: vfabric::proto::atomic_op::SUM,
                        count: size / 8,
                        context: 14,
                    };
                    if kind == Kind::AtomicAdd {
                        side.retry(|| side.ep.atomic(&m))?
                    } else {
                        let res = [vfabric::Iov::shared(&side.rbuf, i * size..(i + 1) * size)];
                        side.retry(|| side.ep.fetch_atomic(&m, &res))?
                    }
                }
            }
        }
        drop(batch);
        side.wait_n(&side.tx_cq, window, &mut scratch, kind.label())?;
        if params.verify {
            match kind {
                Kind::BwRead => side.check(size, REGION_SEED)?,
                Kind::BwWrite => {
                    side.retry(|| side.ep.read_buf(&side.rbuf, 0..size, peer, base, key, 15))?;
                    side.wait(&side.tx_cq, "verify read")?;
                    side.check(size, (size * 43 + w) as u64)?;
                }
                _ => {}
            }
        }
        pb.inc(window as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = ((windows - windows_warm) * window) as f64;
    Ok(SizeResult {
        size,
        iters: ops as usize,
        one_way_us: secs / ops * 1e6,
        mb_s: size as f64 * ops / secs / 1e6,
        msg_rate: ops / secs,
        verified: params.verify && !atomic,
    })
}

#[cfg(test)]
mod describe_tests {
    use super::*;

    #[test]
    fn error_completions_are_described_in_words() {
        let e = vfabric::CqErrEntry {
            context: 7,
            flags: 0,
            len: 0,
            olen: 0,
            status: vfabric::proto::Status::AddrNotAvail,
            err: vfabric::fi::EADDRNOTAVAIL,
            prov_errno: 4,
            data: 0,
            tag: 0,
            src: None,
            buf: None,
        };
        let s = describe_error(Some(e));
        assert!(s.contains("address not available"), "{s}");
        assert!(s.contains("peer's endpoint is not open"), "{s}");
        assert!(!s.contains("CqErrEntry"), "{s}");
    }
}
