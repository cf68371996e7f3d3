// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several hosts: the daemons of one fabric reach each other through the host's own libfabric
//! (`--uplink PROVIDER`, `tcp;ofi_rxm` by default), never a home-made transport.
//!
//! Membership: each daemon opens one RDM endpoint bound to `--listen`, resolves its configured
//! peers (`--peer ID=ADDR[:PORT]`), and greets them with HELLO until they answer; a HELLO is
//! admitted only from a configured peer's own address claiming that peer's id on our fabric
//! (anything else is refused and logged). Guests see the reachable hosts through QUERY_CAPS
//! (`REMOTE_HOSTS`).
//!
//! Data: guest requests for another host (messages, RMA, atomics) come from the fabric through
//! the `remote::Outbox`; they are sent as DATA chunks (or by rendezvous) and completed with the
//! target's REPLY (with the bytes a read or fetching atomic returns), or with `HostUnreach` when
//! the target is lost. DATA from a peer is reassembled and handed to the fabric
//! (`Fabric::accept_remote`, `accept_remote_rma`); the verdict goes back as REPLY.
//!
//! Threads: the [`Worker`] (endpoint and all wire state) is shared under one lock
//! ([`SharedWorker`]). The uplink thread drives it in turns (and alone for greetings, timeouts
//! and shutdown); a device thread that queued requests in its pass over the rings drives it
//! itself when the pass ends, if the lock is free ([`remote::Outbox::assist`]), so a request
//! leaves without waking the uplink thread.

mod fi;
pub mod peers;
mod pull;
pub(crate) mod rdv;
pub(crate) mod remote;
mod svc;
mod tcp;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

pub use fi::FiError;
pub use peers::{RemoteHost, RemoteHosts};

use vfabric_proto::{FabricAddr, Opcode, Status};

use crate::fabric::{Fabric, Incoming, Notify};
use fi::{Info, RdmEndpoint};
use peers::{Peer, PeerSet};
use remote::{Outbound, Outbox};
use wire::{Message, MAX_CHUNK, MAX_MESSAGE, MAX_REPLY_CHUNK};

/// Default uplink port.
pub const DEFAULT_PORT: u16 = 9229;
/// Default libfabric provider of the uplink.
pub const DEFAULT_PROVIDER: &str = "tcp;ofi_rxm";

/// Receive buffers kept posted.
const RECV_BUFFERS: usize = 16;
/// How often an unanswered peer is greeted again, and an answered one kept alive.
const HELLO_INTERVAL: Duration = Duration::from_millis(300);
/// How long the uplink thread keeps polling after its last traffic before it sleeps.
const BUSY_POLL: Duration = Duration::from_millis(2);
/// Longest sleep of an idle uplink thread (its HELLOs and peer timeouts run on wake-ups), and
/// the longest while its own sends are in flight (a provider whose wait fd does not signal
/// send progress still makes it).
const MAX_SLEEP: Duration = Duration::from_millis(10);
const MAX_SLEEP_SENDING: Duration = Duration::from_millis(1);
/// Context values of sends (receives use their buffer index).
const SEND_CONTEXT: u64 = 1 << 32;

/// Uplink settings (`[uplink]` and `[[peers]]` in the TOML file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkConfig {
    /// libfabric provider name (`fi_info -p`), e.g. `tcp;ofi_rxm`, `verbs;ofi_rxm`.
    pub provider: String,
    /// Our uplink address, `HOST[:PORT]`.
    pub listen: String,
    /// Peers of the same fabric: `(host id, HOST[:PORT])`.
    pub peers: Vec<(u16, String)>,
    /// A peer silent this long is reported down.
    pub peer_timeout: Duration,
}

impl UplinkConfig {
    pub fn new(provider: &str, listen: &str) -> Self {
        Self {
            provider: provider.into(),
            listen: listen.into(),
            peers: Vec::new(),
            peer_timeout: Duration::from_secs(3),
        }
    }

    /// Check the settings; `host_id` is this host's id.
    pub fn validate(&self, host_id: u16) -> Result<(), String> {
        split_addr(&self.listen)?;
        let mut seen = std::collections::BTreeSet::new();
        for (id, addr) in &self.peers {
            split_addr(addr).map_err(|e| format!("peer {id}: {e}"))?;
            if *id == host_id {
                return Err(format!("peer {id} has this host's own id"));
            }
            if !seen.insert(*id) {
                return Err(format!("peer {id} is given twice"));
            }
        }
        if self.peer_timeout < HELLO_INTERVAL * 2 {
            return Err(format!(
                "peer timeout must be at least {:?}",
                HELLO_INTERVAL * 2
            ));
        }
        Ok(())
    }
}

/// Parse `ID=HOST[:PORT]`.
pub fn parse_peer(s: &str) -> Result<(u16, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?}: expected ID=HOST[:PORT]"))?;
    let id: u16 = id
        .trim()
        .parse()
        .map_err(|e| format!("peer {s:?}: host id: {e} (0..=65535)"))?;
    split_addr(addr.trim()).map_err(|e| format!("peer {s:?}: {e}"))?;
    Ok((id, addr.trim().to_string()))
}

/// `HOST[:PORT]` → (host, port); IPv6 literals in brackets (`[fd00::1]:9229`).
pub fn split_addr(s: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| Err(format!("address {s:?}: {why}"));
    if s.is_empty() {
        return bad("empty");
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, tail)) = rest.split_once(']') else {
            return bad("unclosed '['");
        };
        match tail.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if tail.is_empty() => (h, None),
            None => return bad("junk after ']'"),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').expect("one colon");
        (h, Some(p))
    } else {
        (s, None)
    };
    if host.is_empty() {
        return bad("no host");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return bad("port must be 1..=65535"),
            Ok(p) => p,
        },
        None => DEFAULT_PORT,
    };
    Ok((host.to_string(), port))
}

/// The outbound form of a guest's SVC_RESOLVE for `service` on peer `host`.
pub(crate) fn svc_resolve(
    host: u16,
    service: u16,
    dev: usize,
    port: crate::fabric::Port,
    req: crate::chain::Req,
) -> Outbound {
    Outbound::SvcResolve(Box::new(svc::Resolve {
        host,
        service,
        dev,
        port,
        req,
    }))
}

/// The running uplink: stopped and joined on drop.
pub struct Uplink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Our uplink address as the provider names it (for logs and tests).
    pub name: String,
}

impl Uplink {
    /// Open the endpoint (errors here stop the daemon from starting: a configured uplink that
    /// cannot open is a configuration error) and start the uplink thread.
    pub(crate) fn start(
        cfg: &UplinkConfig,
        fabric_id: u32,
        host_id: u16,
        num_devices: u16,
        fabric: Arc<Fabric>,
    ) -> Result<Self, String> {
        let (host, port) = split_addr(&cfg.listen)?;
        // With RMA (rendezvous) if the provider grants it, else messages only (also when
        // VFABRIC_UPLINK_RMA=0: the tests run the chunked path and mixed hosts with it).
        let want_rma = std::env::var("VFABRIC_UPLINK_RMA").map_or(true, |v| v != "0");
        let info = Info::rdm(&cfg.provider, &host, &port.to_string(), true, want_rma)
            .or_else(|_| Info::rdm(&cfg.provider, &host, &port.to_string(), true, false))
            .map_err(|e| {
                format!(
                    "uplink provider {:?} at {}: {e} (is the address one of this host's?)",
                    cfg.provider, cfg.listen
                )
            })?;
        let ep = RdmEndpoint::open(&info).map_err(|e| format!("uplink endpoint: {e}"))?;
        let name = ep.name().map(|n| hex(&n)).unwrap_or_default();
        info!(
            provider = %info.describe(),
            listen = %cfg.listen,
            peers = cfg.peers.len(),
            "uplink open"
        );
        if ep.rma() && !ep.writes_revocable() {
            info!(
                provider = %info.describe(),
                "uplink: large receives, RMA writes and read answers go through daemon buffers (this provider's late writes into guest memory could not be cut off)"
            );
        }
        let set = PeerSet {
            peers: cfg
                .peers
                .iter()
                .map(|(id, a)| Peer::new(*id, a.clone()))
                .collect(),
            fabric_id,
            host_id,
            timeout: cfg.peer_timeout,
        };
        let now = Instant::now();
        let hosts = fabric.remote_hosts();
        let outbox = fabric.outbox();
        set.publish(&hosts, now);
        // Request ids differ between starts, so a late REPLY meant for our previous life
        // matches nothing.
        let epoch = epoch();
        outbox.first_req_id(epoch);
        outbox.set_hosts(set.peers.iter().map(|p| (p.host_id, false)));
        let stop = Arc::new(AtomicBool::new(false));
        info!(
            rma = ep.rma(),
            "uplink data path (rma: large data by rendezvous)"
        );
        let worker = Worker {
            rdv: rdv::Rendezvous::default(),
            ep,
            provider: cfg.provider.clone(),
            set,
            hosts,
            outbox,
            fabric,
            num_devices,
            epoch,
            bufs: (0..RECV_BUFFERS).map(|_| vec![0u8; MAX_MESSAGE]).collect(),
            sends: HashMap::new(),
            next_send: 0,
            backlog: VecDeque::new(),
            probes: HashMap::new(),
            asked: HashMap::new(),
            partial: HashMap::new(),
            reply_partial: HashMap::new(),
            svc: svc::Queries::default(),
            notify: Notify::default(),
            stop: stop.clone(),
            was_up: vec![false; cfg.peers.len()],
            last_publish: Instant::now(),
        };
        let shared: SharedWorker = Arc::new(std::sync::Mutex::new(Some(worker)));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vfabric-uplink".into())
            .spawn(move || run(shared, stop_flag))
            .map_err(|e| format!("uplink thread: {e}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            name,
        })
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A value that differs between two starts of a daemon.
fn epoch() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()) << 48
}

/// Sends handed to the provider and not completed yet, at most.
const MAX_SENDS: usize = 256;

/// A wire message waiting for room at the provider.
struct Outgoing {
    host: u16,
    dest: u64,
    bytes: Vec<u8>,
    /// The guest request a DATA message carries (failed if the message cannot go).
    req_id: Option<u64>,
}

/// A message handed to the provider: its bytes stay here until the send completes.
struct InFlight {
    _bytes: Vec<u8>,
    req_id: Option<u64>,
}

/// Why a DATA or REPLY is not acted on.
enum Stale {
    /// The sender is a known peer, down in our view: what it sent is stale.
    Down,
    /// The sender is not an introduced peer (logged).
    Refused(String),
}

/// A message from a peer of which some chunks arrived.
struct Partial {
    req_id: u64,
    /// Its description with `offset` 0 (every chunk must carry the same).
    desc: wire::Data,
    bytes: Vec<u8>,
    /// Refused already (its sender has its verdict): later chunks are only counted.
    refused: bool,
    got: u64,
}

pub(crate) struct Worker {
    /// Rendezvous buffers and registrations: declared (so dropped) before the endpoint.
    rdv: rdv::Rendezvous,
    ep: RdmEndpoint,
    provider: String,
    set: PeerSet,
    hosts: Arc<RemoteHosts>,
    outbox: Arc<Outbox>,
    fabric: Arc<Fabric>,
    num_devices: u16,
    epoch: u64,
    bufs: Vec<Vec<u8>>,
    /// Messages in flight, by send context.
    sends: HashMap<u64, InFlight>,
    next_send: u64,
    /// Wire messages waiting for room, in order (per peer order is kept).
    backlog: VecDeque<Outgoing>,
    /// ADDR_QUERY probes for directed receives (no guest request waits on them): the endpoint
    /// asked about, by request id.
    probes: HashMap<u64, FabricAddr>,
    /// When each ADDR_QUERY still unanswered (probe or guest ADDR_CHECK) went out: one
    /// unanswered past the peer timeout fails (a guest's check) or is forgotten (a probe).
    asked: HashMap<u64, Instant>,
    /// Per peer, the message whose chunks are arriving.
    partial: HashMap<u16, Partial>,
    /// Per peer, the read reply whose chunks are arriving: (request id, bytes so far).
    reply_partial: HashMap<u16, (u64, Vec<u8>)>,
    /// Service queries to other hosts waiting for their answer.
    svc: svc::Queries,
    notify: Notify,
    stop: Arc<AtomicBool>,
    /// Per peer, whether it was up at the last turn (transitions are logged and acted on).
    was_up: Vec<bool>,
    /// When the peers' state was last published to the fabric.
    last_publish: Instant,
}

/// What the uplink thread does after a turn.
enum Next {
    /// It found work: another turn at once.
    Again,
    /// Quiet for less than [`BUSY_POLL`]: another turn after yielding the CPU.
    Yield,
    /// Sleep in the kernel on the provider's wait fd and the outbox's eventfd (the lock on
    /// the worker released) for at most this long.
    Sleep { cq: i32, ev: i32, max: Duration },
    /// A provider without a wait fd: a short condvar wait on the outbox.
    Wait,
}

/// The uplink's state: the uplink thread holds it for each of its turns, and a device thread
/// that queued a request for another host posts it itself when the lock is free
/// ([`remote::Outbox::assist`]), so that a request does not wait for the uplink thread to be
/// woken and scheduled. `None` once the uplink thread stopped.
pub(crate) type SharedWorker = Arc<std::sync::Mutex<Option<Worker>>>;

fn lock_worker(w: &SharedWorker) -> std::sync::MutexGuard<'_, Option<Worker>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The uplink thread's body: turns of the worker until stopped, then its shutdown.
fn run(shared: SharedWorker, stop: Arc<AtomicBool>) {
    let Some(outbox) = lock_worker(&shared).as_mut().map(|w| {
        w.begin();
        w.outbox.clone()
    }) else {
        return;
    };
    outbox.set_driver(Some(shared.clone()));
    let mut last_busy = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let next = {
            // A device thread driving the endpoint now does this thread's work: yield to it
            // rather than sleep on the lock (and be woken when it lets go).
            let mut g = match shared.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::yield_now();
                    continue;
                }
            };
            let Some(w) = g.as_mut() else { break };
            let idle = w.turn();
            if !idle || !w.backlog.is_empty() {
                last_busy = Instant::now();
            }
            if !idle {
                Next::Again
            } else if last_busy.elapsed() < BUSY_POLL {
                Next::Yield
            } else {
                w.sleep_plan()
            }
        };
        match next {
            Next::Again => {}
            Next::Yield => std::thread::yield_now(),
            Next::Wait => outbox.wait(Duration::from_millis(1)),
            Next::Sleep { cq, ev, max } => {
                let mut fds = [
                    libc::pollfd {
                        fd: cq,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: ev,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: max.as_nanos() as libc::c_long,
                };
                // SAFETY: two valid pollfds, a valid timespec, no signal mask. The fds stay
                // open: the endpoint and the outbox outlive this thread's loop.
                let _ = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
                outbox.sleep_end();
            }
        }
    }
    // No device thread drives the endpoint any more; the worker shuts down on this thread.
    outbox.set_driver(None);
    let worker = lock_worker(&shared).take();
    if let Some(w) = worker {
        w.shutdown();
    }
}

impl Worker {
    /// Post the receive buffers.
    fn begin(&mut self) {
        for i in 0..self.bufs.len() {
            self.repost(i);
        }
    }

    /// One turn of the uplink thread: greetings, requests from the fabric, completions,
    /// peer state, timeouts. Returns whether it found nothing to do.
    fn turn(&mut self) -> bool {
        let now = Instant::now();
        self.resolve_peers();
        // Greet every resolved peer on its interval (keepalive once it answered).
        for i in 0..self.set.peers.len() {
            let p = &self.set.peers[i];
            let (Some(dest), due) = (
                p.fi_addr,
                p.last_hello
                    .is_none_or(|t| now.duration_since(t) >= HELLO_INTERVAL),
            ) else {
                continue;
            };
            if !due {
                continue;
            }
            if !self.was_up[i] {
                self.abort_stuck(i);
            }
            self.set.peers[i].last_hello = Some(now);
            self.send_now(dest, self.hello(false));
        }
        let mut idle = self.take_outbox();
        self.rdv_retry();
        self.flush_backlog();
        idle &= !self.poll_cq();
        // Verdicts on what just arrived leave in this turn, not the next.
        if !idle {
            self.flush_backlog();
        }
        let now = Instant::now();
        self.hear_busy_links(now);
        let mut lost = Vec::new();
        let mut changed = false;
        for (p, was) in self.set.peers.iter().zip(self.was_up.iter_mut()) {
            let up = p.is_up(now, self.set.timeout);
            if up != *was {
                changed = true;
                if up {
                    info!(host = p.host_id, devices = p.num_devices, addr = %p.addr, "uplink peer up");
                } else {
                    warn!(host = p.host_id, addr = %p.addr, "uplink peer down (no answer within {:?})", self.set.timeout);
                    lost.push(p.host_id);
                }
                *was = up;
            }
        }
        // The views of who is up change on a transition; republished on an interval too
        // (a peer's device count), not on every turn of a busy loop.
        if changed || now.duration_since(self.last_publish) >= HELLO_INTERVAL {
            self.last_publish = now;
            self.rdv_sweep();
            self.set.publish(&self.hosts, now);
            self.outbox.set_hosts(
                self.set
                    .peers
                    .iter()
                    .map(|p| (p.host_id, p.is_up(now, self.set.timeout))),
            );
        }
        for host in lost {
            self.host_lost(host);
        }
        self.expire_queries(now);
        self.svc_expire(None, false);
        // Requests fenced behind ones that completed here may start now.
        self.fabric.remote_unfence(&mut self.notify);
        self.notify.flush();
        idle
    }

    /// Read the completions there are (at most a bounded number, so a busy link does not
    /// starve the rest of a turn); whether there were any.
    fn poll_cq(&mut self) -> bool {
        let mut any = false;
        for _ in 0..64 {
            match self.ep.poll() {
                Ok(None) => break,
                Ok(Some(c)) => {
                    any = true;
                    self.completion(c);
                }
                Err((ctx, e)) => {
                    any = true;
                    self.failed(ctx, e);
                }
            }
        }
        any
    }

    /// A device thread's share of the work, right after it queued requests for another host
    /// (with the lock on the worker, taken without waiting): hand them to the provider now,
    /// which also makes its progress (the bytes leave in this call), and take the
    /// completions that are there. Whether the uplink thread must still look (the provider
    /// had no room for everything).
    pub(crate) fn assist(&mut self) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return true;
        }
        self.take_outbox();
        self.flush_backlog();
        if self.poll_cq() {
            self.flush_backlog();
        }
        self.fabric.remote_unfence(&mut self.notify);
        self.notify.flush();
        !self.backlog.is_empty()
    }

    /// Stopping: nothing leaves any more, and every guest request waiting here completes.
    fn shutdown(mut self) {
        let (queued, pending) = self.outbox.disable();
        for p in pending {
            self.fabric.complete_remote(
                p.dev,
                &p.port,
                &p.req,
                0,
                Status::HostUnreach,
                &[],
                &mut self.notify,
            );
        }
        for m in queued {
            if let Outbound::SvcResolve(r) = m {
                self.fabric.complete_svc_resolve(
                    r.dev,
                    &r.port,
                    &r.req,
                    Err(Status::HostUnreach),
                    &mut self.notify,
                );
            } else if let Outbound::Send(s) = m {
                self.outbox
                    .finished((s.dev, s.req.req.ep, s.host), s.charged);
                self.fabric.complete_remote(
                    s.dev,
                    &s.port,
                    &s.req,
                    0,
                    Status::HostUnreach,
                    &[],
                    &mut self.notify,
                );
            }
        }
        let hosts: Vec<u16> = self.set.peers.iter().map(|p| p.host_id).collect();
        for h in hosts {
            self.host_lost(h);
        }
        self.svc_expire(None, true);
        self.notify.flush();
    }

    /// How to wait for the next event when idle: sleep in the kernel until the provider has
    /// something for us, the fabric queued a request, or a bounded time passed. Traffic comes
    /// in bursts: the caller polls on (yielding the CPU) for a while after the last message
    /// first, so that a quiet link wakes at once for the next message.
    fn sleep_plan(&mut self) -> Next {
        let (Some(cq), Some(ev)) = (self.ep.wait_fd(), self.outbox.wake_fd()) else {
            return Next::Wait;
        };
        if !self.outbox.sleep_begin() {
            return Next::Again;
        }
        if !self.ep.try_wait() {
            self.outbox.sleep_end();
            return Next::Again;
        }
        let max = if self.sends.is_empty() && self.rdv.in_flight() == 0 {
            MAX_SLEEP
        } else {
            MAX_SLEEP_SENDING
        };
        Next::Sleep { cq, ev, max }
    }

    fn hello(&self, ack: bool) -> Vec<u8> {
        Message::Hello {
            ack,
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            num_devices: self.num_devices,
            epoch: self.epoch,
            caps: if self.ep.rma() { wire::caps::RMA } else { 0 },
        }
        .encode()
    }

    /// Resolve configured peers that have no fi_addr yet (a name that does not resolve now may
    /// later).
    fn resolve_peers(&mut self) {
        for p in self.set.peers.iter_mut().filter(|p| p.fi_addr.is_none()) {
            if p.last_hello.is_some_and(|t| t.elapsed() < HELLO_INTERVAL) {
                continue;
            }
            p.last_hello = Some(Instant::now());
            let Ok((host, port)) = split_addr(&p.addr) else {
                continue;
            };
            match Info::rdm(
                &self.provider,
                &host,
                &port.to_string(),
                false,
                self.ep.rma(),
            )
            .and_then(|i| {
                i.dest_addr().ok_or(FiError {
                    call: "fi_getinfo dest_addr",
                    errno: 61,
                })
            })
            .and_then(|a| Ok((self.ep.insert(&a)?, tcp::ip_of_provider_addr(&a))))
            {
                Ok((a, ip)) => {
                    debug!(host = p.host_id, addr = %p.addr, fi_addr = a, "uplink peer resolved");
                    p.fi_addr = Some(a);
                    p.ip = ip;
                    p.last_hello = None;
                }
                Err(e) => {
                    debug!(host = p.host_id, addr = %p.addr, "uplink peer does not resolve yet: {e}")
                }
            }
        }
    }

    /// A peer that is up but has not been heard from within the timeout is not lost while
    /// its connection still brings data: the link may be full of its bulk data (its answers to
    /// our large RMA reads are written into our sinks and complete nothing here until their
    /// replies, which wait behind them with its greetings). Its last data counts as hearing
    /// from it, as a completed operation does. A cable pulled brings nothing, a dead daemon's
    /// connection is reset, and a stopped one's kernel sends at most what it had queued.
    fn hear_busy_links(&mut self, now: Instant) {
        let timeout = self.set.timeout;
        for (p, &was) in self.set.peers.iter_mut().zip(self.was_up.iter()) {
            if !was || p.is_up(now, timeout) {
                continue;
            }
            let Some(ago) = p.ip.and_then(tcp::last_data_from) else {
                continue;
            };
            if ago < timeout {
                let heard = now.checked_sub(ago).unwrap_or(now);
                if p.last_heard.is_none_or(|t| t < heard) {
                    debug!(
                        host = p.host_id,
                        ago_ms = ago.as_millis() as u64,
                        "uplink: a busy link's data counts as hearing from its peer"
                    );
                    p.last_heard = Some(heard);
                }
            }
        }
    }

    /// Peer `i` is down (lost, or not up yet): its connections that the kernel sees stuck are
    /// aborted (see `tcp`), so that the provider connects again when it is back, not behind a
    /// retransmission backoff and what was queued before.
    fn abort_stuck(&mut self, i: usize) {
        let p = &self.set.peers[i];
        let Some(ip) = p.ip else { return };
        let done = tcp::abort_stuck(ip, HELLO_INTERVAL * 2);
        if done.stuck > 0 {
            info!(
                host = p.host_id,
                connections = done.stuck,
                "uplink: stuck connections to a host that is down aborted"
            );
        }
        if done.connecting > 0 {
            debug!(
                host = p.host_id,
                attempts = done.connecting,
                "uplink: unanswered connection attempts to a host that is down aborted"
            );
        }
    }

    /// The fi_addr of `host` if it is a peer that is up now.
    fn dest_of(&self, host: u16) -> Option<u64> {
        let now = Instant::now();
        self.set
            .peers
            .iter()
            .find(|p| p.host_id == host && p.is_up(now, self.set.timeout))
            .and_then(|p| p.fi_addr)
    }

    /// Hand `msg` to the provider now; `Err` gives it back when the provider has no room.
    fn post(&mut self, dest: u64, msg: Vec<u8>, req_id: Option<u64>) -> Result<(), Vec<u8>> {
        if self.sends.len() >= MAX_SENDS {
            return Err(msg);
        }
        self.next_send += 1;
        let ctx = SEND_CONTEXT + self.next_send;
        // SAFETY: the buffer moves into `self.sends` below (a Vec's heap data does not move
        // with it) and stays there until the send's completion removes it.
        match unsafe { self.ep.send(&msg, dest, ctx) } {
            Ok(()) => {
                self.sends.insert(
                    ctx,
                    InFlight {
                        _bytes: msg,
                        req_id,
                    },
                );
                Ok(())
            }
            Err(e) if e.is_again() => Err(msg),
            Err(e) => {
                debug!("uplink send: {e}");
                if let Some(id) = req_id {
                    self.complete_pending(id, None, Status::HostUnreach);
                }
                Ok(())
            }
        }
    }

    /// A HELLO: sent now or not at all (the next interval sends another).
    fn send_now(&mut self, dest: u64, msg: Vec<u8>) {
        let _ = self.post(dest, msg, None);
    }

    /// Send waiting wire messages, in order, while the provider takes them.
    fn flush_backlog(&mut self) {
        while let Some(o) = self.backlog.pop_front() {
            if let Err(bytes) = self.post(o.dest, o.bytes, o.req_id) {
                self.backlog.push_front(Outgoing { bytes, ..o });
                return;
            }
        }
    }

    /// Take the fabric's requests for other hosts into the backlog. Returns whether there
    /// were none.
    fn take_outbox(&mut self) -> bool {
        let queued = self.outbox.take();
        let idle = queued.is_empty();
        for m in queued {
            match m {
                Outbound::Send(s) => {
                    // The outbox gave it its id and entered it in the pending table.
                    let req_id = u64::from(s.desc.req_id);
                    let Some(dest) = self.dest_of(s.host) else {
                        self.complete_pending(req_id, None, Status::HostUnreach);
                        continue;
                    };
                    let mut desc = s.desc;
                    // Large data by rendezvous when both uplinks do RMA; else chunks.
                    let Some(s) = self.send_rdv(dest, req_id, s, desc) else {
                        continue;
                    };
                    let mut off = 0;
                    loop {
                        let end = (off + MAX_CHUNK).min(s.payload.len());
                        desc.offset = (off as u64).into();
                        let bytes = Message::Data {
                            fabric_id: self.set.fabric_id,
                            host_id: self.set.host_id,
                            desc,
                            chunk: &s.payload[off..end],
                        }
                        .encode();
                        self.backlog.push_back(Outgoing {
                            host: s.host,
                            dest,
                            bytes,
                            req_id: Some(req_id),
                        });
                        off = end;
                        if off >= s.payload.len() {
                            break;
                        }
                    }
                }
                Outbound::Reply {
                    host,
                    req_id,
                    status,
                    bytes,
                } => self.reply_owned(host, req_id, status, bytes),
                Outbound::AddrQuery { host, addr, req_id } => self.addr_query(host, addr, req_id),
                Outbound::Pull { host, req_id } => self.pull_out(host, req_id),
                Outbound::Cancel { host, req_id } => {
                    // Withdrawn: its rendezvous buffers go (a read of them now fails at the
                    // target, which drops the request as CANCEL says).
                    self.rdv_withdraw(req_id);
                    // A host that is down dropped what we sent it already.
                    if let Some(dest) = self.dest_of(host) {
                        let bytes = Message::Cancel {
                            fabric_id: self.set.fabric_id,
                            host_id: self.set.host_id,
                            req_id,
                        }
                        .encode();
                        self.queue_to(host, dest, bytes);
                    }
                }
                Outbound::EpGone {
                    addr,
                    whole_device,
                    closed,
                } => {
                    let bytes = Message::EpGone {
                        fabric_id: self.set.fabric_id,
                        host_id: self.set.host_id,
                        dev: addr.device(),
                        ep: if whole_device {
                            wire::EVERY_EP
                        } else {
                            addr.ep
                        },
                        generation: if whole_device { 0 } else { addr.generation },
                        closed,
                    }
                    .encode();
                    // Every peer that is up; one that is down learns nothing it needs (its
                    // receives directed here failed when it lost us).
                    let now = Instant::now();
                    let to: Vec<(u16, u64)> = self
                        .set
                        .peers
                        .iter()
                        .filter(|p| p.is_up(now, self.set.timeout))
                        .filter_map(|p| Some((p.host_id, p.fi_addr?)))
                        .collect();
                    for (host, dest) in to {
                        self.queue_to(host, dest, bytes.clone());
                    }
                }
                Outbound::SvcResolve(r) => self.svc_out(*r),
            }
        }
        idle
    }

    /// An empty `HOST_UNREACH` reply to `req_id` (the sender learns the request is lost).
    fn unreach_reply(&self, req_id: u64) -> Vec<u8> {
        Message::Reply {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            req_id,
            status: Status::HostUnreach,
            total_len: 0,
            offset: 0,
            chunk: &[],
        }
        .encode()
    }

    /// Queue our verdict on request `req_id` of `host`, with the bytes an RMA read read, in
    /// chunks (dropped if the host is down: it completed the request `HostUnreach` itself).
    fn reply(&mut self, host: u16, req_id: u64, status: Status, read: &[u8]) {
        self.reply_cow(host, req_id, status, std::borrow::Cow::Borrowed(read));
    }

    /// [`Worker::reply`] with bytes the caller gives up: an RMA read's sink is written from
    /// them, not from a copy.
    fn reply_owned(&mut self, host: u16, req_id: u64, status: Status, read: Vec<u8>) {
        self.reply_cow(host, req_id, status, std::borrow::Cow::Owned(read));
    }

    fn reply_cow(&mut self, host: u16, req_id: u64, status: Status, read: std::borrow::Cow<[u8]>) {
        if status != Status::Ok {
            // Pulled bytes that will not reach the fabric: their receive is matched again.
            self.fabric.pull_failed(host, req_id, &mut self.notify);
        }
        let Some(dest) = self.dest_of(host) else {
            return;
        };
        let Err(read) = self.reply_to_sink(host, dest, req_id, status, read) else {
            return;
        };
        let mut off = 0;
        loop {
            let end = (off + MAX_REPLY_CHUNK).min(read.len());
            let bytes = Message::Reply {
                fabric_id: self.set.fabric_id,
                host_id: self.set.host_id,
                req_id,
                status,
                total_len: read.len() as u64,
                offset: off as u64,
                chunk: &read[off..end],
            }
            .encode();
            self.backlog.push_back(Outgoing {
                host,
                dest,
                bytes,
                req_id: None,
            });
            off = end;
            if off >= read.len() {
                break;
            }
        }
    }

    /// Complete guest request `req_id` (if still pending, and from `host` if given).
    fn complete_pending(&mut self, req_id: u64, host: Option<u16>, status: Status) {
        self.complete_pending_with(req_id, host, status, &[]);
    }

    /// [`Worker::complete_pending`] with the bytes an RMA read brought back: exactly the
    /// length asked, or the request fails `Invalid` (the peer broke the protocol).
    fn complete_pending_with(
        &mut self,
        req_id: u64,
        host: Option<u16>,
        mut status: Status,
        read: &[u8],
    ) {
        // A verdict from a host for a request we sent another is not taken; nor one for a
        // request its guest withdrew (its endpoint closed: it completed CANCELED then).
        let Some(p) = self.outbox.take_pending(req_id, host) else {
            // A withdrawn request's answer: its target reads its source no more.
            self.rdv_answered(req_id, host);
            debug!(req_id, ?host, "uplink: a verdict for no request of ours");
            return;
        };
        self.rdv_forget(req_id);
        let want = remote::reply_len(p.req.req.opcode, status, p.len);
        if read.len() as u64 != want {
            warn!(
                req_id,
                got = read.len(),
                want,
                "uplink: a reply with the wrong bytes"
            );
            status = Status::Invalid;
        }
        self.fabric.complete_remote(
            p.dev,
            &p.port,
            &p.req,
            p.len,
            status,
            read,
            &mut self.notify,
        );
    }

    /// `host` is down or restarted: our requests to it complete `HostUnreach`, what it sent
    /// us and nobody took yet is dropped.
    fn host_lost(&mut self, host: u16) {
        let lost = self.outbox.take_pending_of(host);
        let failed = lost.len();
        for p in lost {
            self.fabric.complete_remote(
                p.dev,
                &p.port,
                &p.req,
                p.len,
                Status::HostUnreach,
                &[],
                &mut self.notify,
            );
        }
        // What we knew of its endpoints is void; receives directed at them fail below.
        let probes = &mut self.probes;
        self.asked
            .retain(|id, _| probes.get(id).is_none_or(|a| a.host() != host));
        probes.retain(|_, a| a.host() != host);
        self.outbox.forget(|a| a.host() == host);
        self.backlog.retain(|o| o.host != host);
        self.reply_partial.remove(&host);
        self.svc_expire(Some(host), false);
        let mut dropped = self.fabric.purge_remote(host, &mut self.notify);
        if let Some(p) = self.partial.remove(&host).filter(|p| !p.refused) {
            dropped.push(p.req_id);
        }
        dropped.extend(self.rdv_host_lost(host));
        // The lost host may not have seen *us* go (a one-way loss): it still waits for verdicts
        // on what it sent. They go out straight to its address; if it did see us go, it drops
        // them as stale, and a restarted host knows none of the request ids.
        let dest = self
            .set
            .peers
            .iter()
            .find(|p| p.host_id == host)
            .and_then(|p| p.fi_addr);
        if let Some(dest) = dest {
            for req_id in &dropped {
                let bytes = self.unreach_reply(*req_id);
                self.backlog.push_back(Outgoing {
                    host,
                    dest,
                    bytes,
                    req_id: None,
                });
            }
        }
        if failed + dropped.len() > 0 {
            warn!(
                host,
                failed,
                dropped = dropped.len(),
                "uplink: requests to a lost host failed, its requests dropped"
            );
        }
    }

    fn repost(&mut self, i: usize) {
        // SAFETY: buffer `i` is owned by the worker, not touched until its completion, and
        // the worker outlives the endpoint's use of it (the endpoint is dropped with it).
        if let Err(e) = unsafe { self.ep.post_recv(&mut self.bufs[i], i as u64) } {
            warn!("uplink: cannot post a receive: {e}");
        }
    }

    fn completion(&mut self, c: fi::Completion) {
        if c.context >= rdv::RMA_CONTEXT {
            return self.rdv_completion(c.context, None);
        }
        if c.context >= SEND_CONTEXT {
            self.sends.remove(&c.context);
            return;
        }
        let i = c.context as usize;
        if i >= self.bufs.len() {
            return;
        }
        // Out of the table while we read it (its heap bytes stay put); reposted after.
        let buf = std::mem::take(&mut self.bufs[i]);
        let len = c.len.min(buf.len());
        match Message::parse(&buf[..len]) {
            Err(e) => warn!(src = c.src, "uplink: refusing a malformed message: {e}"),
            Ok(m) => self.message(c.src, m),
        }
        self.bufs[i] = buf;
        self.repost(i);
    }

    fn message(&mut self, src: u64, m: Message<'_>) {
        match m {
            Message::Hello {
                ack,
                fabric_id,
                host_id,
                num_devices,
                epoch,
                caps,
            } => {
                let restarted = match self.set.admit(src, fabric_id, host_id) {
                    Err(why) => return warn!("uplink: refusing a host: {why}"),
                    Ok(peer) => peer.epoch.is_some_and(|e| e != epoch),
                };
                if restarted {
                    info!(host = host_id, "uplink peer restarted");
                    // Whatever we had in flight with its previous life is lost.
                    self.host_lost(host_id);
                }
                if let Ok(peer) = self.set.admit(src, fabric_id, host_id) {
                    peer.epoch = Some(epoch);
                    peer.num_devices = num_devices;
                    peer.caps = caps;
                    peer.last_heard = Some(Instant::now());
                }
                if !ack {
                    let reply = self.hello(true);
                    self.send_now(src, reply);
                }
            }
            Message::Data {
                fabric_id,
                host_id,
                desc,
                chunk,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => self.chunk(host_id, desc, chunk),
                Err(Stale::Down) => {
                    if u64::from(desc.offset) == 0 {
                        self.stale_data(host_id, src, desc.req_id.into());
                    }
                }
                Err(Stale::Refused(why)) => warn!("uplink: refusing data: {why}"),
            },
            Message::Reply {
                fabric_id,
                host_id,
                req_id,
                status,
                total_len,
                offset,
                chunk,
            } => {
                if !self.reply_introduced(src, fabric_id, host_id) {
                    return;
                }
                if total_len == 0 {
                    return self.complete_pending(req_id, Some(host_id), status);
                }
                self.reply_chunk(host_id, req_id, status, total_len, offset, chunk);
            }
            Message::Rdv(m) => self.rdv_message(src, m),
            Message::SvcQuery {
                fabric_id,
                host_id,
                req_id,
                service,
            } => self.svc_query_in(src, fabric_id, host_id, req_id, service),
            Message::SvcAnswer {
                fabric_id,
                host_id,
                req_id,
                found,
            } => self.svc_answer_in(src, fabric_id, host_id, req_id, found),
            Message::Cancel {
                fabric_id,
                host_id,
                req_id,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => {
                    // A rendezvous not delivered yet is dropped here (answered once no read
                    // of it is in flight); else the fabric drops it if it still holds it.
                    // Either way the sender hears CANCELED: it may keep the source of a
                    // zero-copy rendezvous registered until then.
                    let in_rdv = self.rdv_cancel(host_id, req_id);
                    self.fabric
                        .withdraw_remote(host_id, req_id, &mut self.notify);
                    if !in_rdv {
                        self.reply(host_id, req_id, Status::Canceled, &[]);
                    }
                }
                Err(Stale::Down) => debug!("uplink: a stale cancel dropped"),
                Err(Stale::Refused(why)) => warn!("uplink: refusing a cancel: {why}"),
            },
            Message::Pull {
                fabric_id,
                host_id,
                req_id,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => self.pull_in(host_id, req_id),
                Err(Stale::Down) => debug!("uplink: a stale PULL dropped"),
                Err(Stale::Refused(why)) => warn!("uplink: refusing a PULL: {why}"),
            },
            Message::EpGone {
                fabric_id,
                host_id,
                dev,
                ep,
                generation,
                closed,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => {
                    let node = FabricAddr::node_of(fabric_id, host_id, dev);
                    let one = (ep != wire::EVERY_EP).then_some((ep, generation));
                    self.fabric
                        .remote_ep_gone(node, one, closed, &mut self.notify);
                }
                Err(Stale::Down) => debug!("uplink: a stale EP_GONE dropped"),
                Err(Stale::Refused(why)) => warn!("uplink: refusing EP_GONE: {why}"),
            },
            Message::AddrQuery {
                fabric_id,
                host_id,
                req_id,
                dev,
                ep,
                generation,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => {
                    // One of our endpoints; the answer goes after everything we sent the
                    // asker before, and before its EP_GONE if it closes later.
                    let node = FabricAddr::node_of(fabric_id, self.set.host_id, dev);
                    let open = self
                        .fabric
                        .endpoint_open(FabricAddr::new(node, ep, generation));
                    let bytes = Message::AddrAnswer {
                        fabric_id: self.set.fabric_id,
                        host_id: self.set.host_id,
                        req_id,
                        open,
                    }
                    .encode();
                    if let Some(dest) = self.dest_of(host_id) {
                        self.queue_to(host_id, dest, bytes);
                    }
                }
                Err(Stale::Down) => debug!("uplink: a stale ADDR_QUERY dropped"),
                Err(Stale::Refused(why)) => warn!("uplink: refusing ADDR_QUERY: {why}"),
            },
            Message::AddrAnswer {
                fabric_id,
                host_id,
                req_id,
                open,
            } => match self.introduced(src, fabric_id, host_id) {
                Ok(()) => self.addr_answer(host_id, req_id, open),
                Err(Stale::Down) => debug!("uplink: a stale ADDR_ANSWER dropped"),
                Err(Stale::Refused(why)) => warn!("uplink: refusing ADDR_ANSWER: {why}"),
            },
        }
    }

    /// Queue a wire message for `host` at `dest` (after everything queued for it before).
    fn queue_to(&mut self, host: u16, dest: u64, bytes: Vec<u8>) {
        self.backlog.push_back(Outgoing {
            host,
            dest,
            bytes,
            req_id: None,
        });
    }

    /// Ask `host` about its endpoint `addr`: for a guest's ADDR_CHECK (`req_id` pending), or a
    /// probe for receives directed at it (`req_id` 0).
    fn addr_query(&mut self, host: u16, addr: FabricAddr, req_id: u64) {
        let Some(dest) = self.dest_of(host) else {
            if req_id != 0 {
                return self.complete_pending(req_id, None, Status::HostUnreach);
            }
            // Down: receives directed at it cannot be satisfied (as when it was lost).
            self.fabric.remote_ep_gone(
                addr.node,
                Some((addr.ep, addr.generation)),
                false,
                &mut self.notify,
            );
            return;
        };
        let id = if req_id != 0 {
            req_id
        } else {
            // Probe ids come from the same counter as requests' (never 0).
            let id = self.outbox.probe_id();
            self.probes.insert(id, addr);
            id
        };
        self.asked.insert(id, Instant::now());
        let bytes = Message::AddrQuery {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            req_id: id,
            dev: addr.device(),
            ep: addr.ep,
            generation: addr.generation,
        }
        .encode();
        self.queue_to(host, dest, bytes);
    }

    /// ADDR_QUERYs unanswered for longer than the peer timeout (a host that answers
    /// keepalives but not these): a guest's ADDR_CHECK completes `HostUnreach`, a probe is
    /// forgotten (a later directed receive asks again).
    fn expire_queries(&mut self, now: Instant) {
        let timeout = self.set.timeout;
        if self.asked.is_empty() {
            return;
        }
        let late: Vec<u64> = self
            .asked
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.asked.remove(&id);
            match self.probes.remove(&id) {
                Some(addr) => self.outbox.forget(|a| a == addr),
                None => self.complete_pending(id, None, Status::HostUnreach),
            }
        }
    }

    /// `host` answered query `req_id`: whether its endpoint is open.
    fn addr_answer(&mut self, host: u16, req_id: u64, open: bool) {
        self.asked.remove(&req_id);
        let probe = match self.probes.get(&req_id) {
            Some(a) if a.host() == host => self.probes.remove(&req_id),
            _ => None,
        };
        let addr = probe.or_else(|| {
            let mut a = None;
            self.outbox.pending_is(req_id, host, |p| {
                if p.req.req.opcode == Opcode::AddrCheck {
                    a = Some(p.req.req.peer);
                }
                true
            });
            a
        });
        let Some(addr) = addr else {
            return debug!(host, req_id, "uplink: an answer to no query of ours");
        };
        if open {
            self.outbox.known_open(addr);
        } else {
            self.fabric.remote_ep_gone(
                addr.node,
                Some((addr.ep, addr.generation)),
                false,
                &mut self.notify,
            );
        }
        if probe.is_none() {
            let status = if open {
                Status::Ok
            } else {
                Status::AddrNotAvail
            };
            self.complete_pending(req_id, Some(host), status);
        }
    }

    /// Data from a host we consider down: its sender may still count on a verdict (it did
    /// not see us go down): tell it, once per request, straight to the address it came from.
    fn stale_data(&mut self, host: u16, src: u64, req_id: u64) {
        debug!(host, "uplink: stale data from a host that was down");
        let bytes = self.unreach_reply(req_id);
        self.backlog.push_back(Outgoing {
            host,
            dest: src,
            bytes,
            req_id: None,
        });
    }

    /// A message from `host` whose chunks were still arriving was cut short by another (the
    /// wire keeps order): it is refused.
    fn abandon_partial(&mut self, host: u16) {
        if let Some(old) = self.partial.remove(&host) {
            if !old.refused {
                self.reply(host, old.req_id, Status::Invalid, &[]);
            }
        }
    }

    /// Most bytes one incoming request may carry: a message, or an RMA request's ranges and
    /// bytes.
    fn max_incoming(&self) -> u64 {
        self.fabric.limits().max_msg_size
            + u64::from(wire::MAX_RANGES) * vfabric_proto::RMA_IOV_LEN as u64
    }

    /// One chunk of a read's reply from `host`: the whole reply completes the request. Only
    /// a pending read of that host, asking exactly `total` bytes, collects one.
    fn reply_chunk(
        &mut self,
        host: u16,
        req_id: u64,
        status: Status,
        total: u64,
        offset: u64,
        chunk: &[u8],
    ) {
        let expected = self.outbox.pending_is(req_id, host, |p| {
            remote::reply_len(p.req.req.opcode, status, p.len) == total
        });
        if offset == 0 {
            // A reply left incomplete (the wire keeps order): its request fails.
            if let Some((old, _)) = self.reply_partial.remove(&host) {
                self.complete_pending(old, Some(host), Status::Invalid);
            }
            if !expected && !self.outbox.pending_is(req_id, host, |_| true) {
                // Withdrawn meanwhile (its endpoint closed): its data goes nowhere.
                return debug!(host, req_id, "uplink: read data for a withdrawn request");
            }
            if !expected {
                warn!(host, req_id, total, "uplink: read data for no such read");
                return self.complete_pending(req_id, Some(host), Status::Invalid);
            }
            if chunk.len() as u64 == total {
                return self.complete_pending_with(req_id, Some(host), status, chunk);
            }
            self.reply_partial.insert(host, (req_id, chunk.to_vec()));
            return;
        }
        let fits = self
            .reply_partial
            .get(&host)
            .is_some_and(|(id, b)| *id == req_id && b.len() as u64 == offset);
        if !fits && !self.outbox.pending_is(req_id, host, |_| true) {
            return debug!(host, req_id, "uplink: read data for a withdrawn request");
        }
        if !fits {
            warn!(host, req_id, offset, "uplink: a reply chunk out of order");
            if let Some((old, _)) = self.reply_partial.remove(&host) {
                self.complete_pending(old, Some(host), Status::Invalid);
            }
            return self.complete_pending(req_id, Some(host), Status::Invalid);
        }
        let Some((_, bytes)) = self.reply_partial.get_mut(&host) else {
            return;
        };
        bytes.extend_from_slice(chunk);
        if (bytes.len() as u64) < total {
            return;
        }
        if let Some((id, bytes)) = self.reply_partial.remove(&host) {
            self.complete_pending_with(id, Some(host), status, &bytes);
        }
    }

    /// [`Worker::introduced`] for a REPLY (plain or rendezvous): whether to act on it; a
    /// stale or refused one is logged here.
    fn reply_introduced(&mut self, src: u64, fabric_id: u32, host_id: u16) -> bool {
        match self.introduced(src, fabric_id, host_id) {
            Ok(()) => true,
            Err(Stale::Down) => {
                debug!("uplink: a stale reply dropped");
                false
            }
            Err(Stale::Refused(why)) => {
                warn!("uplink: refusing a reply: {why}");
                false
            }
        }
    }

    /// Data and replies are taken only from a peer that introduced itself (HELLO) from its
    /// own address and is up: after a peer was declared down (its requests failed, its held
    /// messages dropped), what it sent before is stale and not acted on, until its next HELLO
    /// (which the wire delivers after that stale data).
    fn introduced(&mut self, src: u64, fabric_id: u32, host_id: u16) -> Result<(), Stale> {
        let timeout = self.set.timeout;
        match self.set.admit(src, fabric_id, host_id) {
            Err(why) => Err(Stale::Refused(why.to_string())),
            Ok(p) if p.epoch.is_none() => Err(Stale::Refused(format!(
                "host {host_id} did not introduce itself"
            ))),
            Ok(p) if !p.is_up(Instant::now(), timeout) => Err(Stale::Down),
            Ok(p) => {
                // Any message from a peer that is up proves it alive: a link busy with bulk
                // data may hold its HELLOs back past the timeout.
                p.last_heard = Some(Instant::now());
                Ok(())
            }
        }
    }

    /// An RMA operation with `host` completed: it is alive (a link full of read data may hold
    /// its HELLOs back past the timeout). A peer already declared down is not revived by
    /// this; only its HELLO does that.
    pub(super) fn heard_from(&mut self, host: u16) {
        let now = Instant::now();
        let timeout = self.set.timeout;
        if let Some(p) = self
            .set
            .peers
            .iter_mut()
            .find(|p| p.host_id == host && p.is_up(now, timeout))
        {
            p.last_heard = Some(now);
        }
    }

    /// One chunk of a message from `host`: a whole message goes to the fabric.
    fn chunk(&mut self, host: u16, desc: wire::Data, chunk: &[u8]) {
        let req_id = u64::from(desc.req_id);
        let (offset, total) = (u64::from(desc.offset), u64::from(desc.total_len));
        let mut same = desc;
        same.offset = 0.into();
        if offset == 0 {
            self.abandon_partial(host);
            let refused = total > self.max_incoming();
            if refused {
                self.reply(host, req_id, Status::TooLarge, &[]);
            }
            if chunk.len() as u64 == total {
                if !refused {
                    self.inbound(host, req_id, desc, chunk.to_vec());
                }
                return;
            }
            self.partial.insert(
                host,
                Partial {
                    req_id,
                    desc: same,
                    bytes: if refused { Vec::new() } else { chunk.to_vec() },
                    refused,
                    got: chunk.len() as u64,
                },
            );
            return;
        }
        let fits = self
            .partial
            .get(&host)
            .is_some_and(|p| p.req_id == req_id && p.desc == same && p.got == offset);
        if !fits {
            warn!(
                host,
                req_id, offset, "uplink: a chunk out of order, message refused"
            );
            if let Some(old) = self.partial.remove(&host) {
                if !old.refused {
                    self.reply(host, old.req_id, Status::Invalid, &[]);
                }
            }
            if self.partial.get(&host).is_none_or(|p| p.req_id != req_id) {
                self.reply(host, req_id, Status::Invalid, &[]);
            }
            return;
        }
        let Some(p) = self.partial.get_mut(&host) else {
            return;
        };
        p.got += chunk.len() as u64;
        if !p.refused {
            p.bytes.extend_from_slice(chunk);
        }
        if p.got < total {
            return;
        }
        let Some(p) = self.partial.remove(&host) else {
            return;
        };
        if !p.refused {
            self.inbound(host, p.req_id, p.desc, p.bytes);
        }
    }

    fn deliver(&mut self, host: u16, req_id: u64, desc: wire::Data, bytes: Vec<u8>) {
        let rma = u32::from(desc.count) != 0;
        let incoming = Incoming {
            host,
            req_id,
            desc,
            bytes,
        };
        if rma {
            // A large read answered straight from guest memory: its verdict follows the write.
            if self.reply_from_guest(host, req_id, &incoming) {
                return;
            }
            // None: a commit waits for the target's handler; its verdict comes as an
            // Outbound::Reply.
            if let Some((status, read)) = self.fabric.accept_remote_rma(incoming, &mut self.notify)
            {
                self.reply_owned(host, req_id, status, read);
            }
        } else if let Some(status) = self.fabric.accept_remote(incoming, &mut self.notify) {
            self.reply(host, req_id, status, &[]);
        }
    }

    fn failed(&mut self, ctx: u64, e: FiError) {
        if ctx >= rdv::RMA_CONTEXT {
            return self.rdv_completion(ctx, Some(e));
        }
        if ctx >= SEND_CONTEXT {
            if let Some(InFlight {
                req_id: Some(id), ..
            }) = self.sends.remove(&ctx)
            {
                debug!("uplink send of request {id} failed: {e}");
                self.complete_pending(id, None, Status::HostUnreach);
            } else {
                debug!("uplink send failed: {e}");
            }
        } else if (ctx as usize) < self.bufs.len() {
            debug!("uplink receive failed: {e}");
            self.repost(ctx as usize);
        } else {
            debug!("uplink: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_peers_parse() {
        assert_eq!(
            split_addr("10.0.0.1"),
            Ok(("10.0.0.1".into(), DEFAULT_PORT))
        );
        assert_eq!(split_addr("10.0.0.1:77"), Ok(("10.0.0.1".into(), 77)));
        assert_eq!(split_addr("[fd00::1]:77"), Ok(("fd00::1".into(), 77)));
        assert_eq!(split_addr("fd00::1"), Ok(("fd00::1".into(), DEFAULT_PORT)));
        assert!(split_addr("10.0.0.1:0").is_err());
        assert!(split_addr("10.0.0.1:x").is_err());
        assert!(split_addr(":5").is_err());
        assert!(split_addr("[fd00::1").is_err());
        assert_eq!(parse_peer("2=10.0.0.2:9"), Ok((2, "10.0.0.2:9".into())));
        assert!(parse_peer("10.0.0.2").is_err());
        assert!(parse_peer("70000=10.0.0.2").is_err());
        let mut c = UplinkConfig::new(DEFAULT_PROVIDER, "10.0.0.1");
        c.peers = vec![(2, "10.0.0.2".into()), (3, "10.0.0.3".into())];
        assert!(c.validate(1).is_ok());
        assert!(c.validate(2).is_err(), "a peer with our own id");
        c.peers.push((2, "10.0.0.4".into()));
        assert!(c.validate(1).is_err(), "a peer id twice");
    }
}
