// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several hosts: the daemons of one fabric reach each other through the host's own libfabric
//! (`--uplink PROVIDER`, `tcp;ofi_rxm` by default), never a home-made transport.
//!
//! Today the uplink does membership and discovery: each daemon opens one RDM endpoint bound to
//! `--listen`, resolves its configured peers (`--peer ID=ADDR[:PORT]`), and greets them with
//! HELLO until they answer; a HELLO is admitted only from a configured peer's own address
//! claiming that peer's id on our fabric (anything else is refused and logged). Guests see the
//! reachable hosts through QUERY_CAPS (`REMOTE_HOSTS`). Guest traffic to another host is not
//! carried yet: such a request completes with AddrNotAvail, as any address that names no
//! endpoint here.

mod fi;
pub mod peers;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

pub use fi::FiError;
pub use peers::{RemoteHost, RemoteHosts};

use fi::{Info, RdmEndpoint};
use peers::{Peer, PeerSet};
use wire::{Message, MAX_MESSAGE};

/// Default uplink port.
pub const DEFAULT_PORT: u16 = 9229;
/// Default libfabric provider of the uplink.
pub const DEFAULT_PROVIDER: &str = "tcp;ofi_rxm";

/// Receive buffers kept posted.
const RECV_BUFFERS: usize = 16;
/// How often an unanswered peer is greeted again, and an answered one kept alive.
const HELLO_INTERVAL: Duration = Duration::from_millis(300);
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
    pub fn start(
        cfg: &UplinkConfig,
        fabric_id: u32,
        host_id: u16,
        num_devices: u16,
        hosts: Arc<RemoteHosts>,
    ) -> Result<Self, String> {
        let (host, port) = split_addr(&cfg.listen)?;
        let info = Info::rdm(&cfg.provider, &host, &port.to_string(), true).map_err(|e| {
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
        set.publish(&hosts, Instant::now());
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            ep,
            provider: cfg.provider.clone(),
            set,
            hosts,
            num_devices,
            epoch: epoch(),
            bufs: (0..RECV_BUFFERS).map(|_| vec![0u8; MAX_MESSAGE]).collect(),
            sends: Vec::new(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("vfabric-uplink".into())
            .spawn(move || worker.run())
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

struct Worker {
    ep: RdmEndpoint,
    provider: String,
    set: PeerSet,
    hosts: Arc<RemoteHosts>,
    num_devices: u16,
    epoch: u64,
    bufs: Vec<Vec<u8>>,
    /// Messages in flight (kept until their send completes): (context, bytes).
    sends: Vec<(u64, Vec<u8>)>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self) {
        for i in 0..self.bufs.len() {
            self.repost(i);
        }
        let mut next_send = 0u64;
        let mut was_up: Vec<bool> = vec![false; self.set.peers.len()];
        while !self.stop.load(Ordering::Acquire) {
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
                self.set.peers[i].last_hello = Some(now);
                next_send += 1;
                self.send(dest, self.hello(false), SEND_CONTEXT + next_send);
            }
            let mut idle = true;
            for _ in 0..64 {
                match self.ep.poll() {
                    Ok(None) => break,
                    Ok(Some(c)) => {
                        idle = false;
                        self.completion(c, &mut next_send);
                    }
                    Err((ctx, e)) => {
                        idle = false;
                        self.failed(ctx, e);
                    }
                }
            }
            let now = Instant::now();
            for (i, p) in self.set.peers.iter().enumerate() {
                let up = p.is_up(now, self.set.timeout);
                if up != was_up[i] {
                    if up {
                        info!(host = p.host_id, devices = p.num_devices, addr = %p.addr, "uplink peer up");
                    } else {
                        warn!(host = p.host_id, addr = %p.addr, "uplink peer down (no answer within {:?})", self.set.timeout);
                    }
                    was_up[i] = up;
                }
            }
            self.set.publish(&self.hosts, now);
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn hello(&self, ack: bool) -> Vec<u8> {
        Message::Hello {
            ack,
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            num_devices: self.num_devices,
            epoch: self.epoch,
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
            match Info::rdm(&self.provider, &host, &port.to_string(), false)
                .and_then(|i| {
                    i.dest_addr().ok_or(FiError {
                        call: "fi_getinfo dest_addr",
                        errno: 61,
                    })
                })
                .and_then(|a| self.ep.insert(&a))
            {
                Ok(a) => {
                    debug!(host = p.host_id, addr = %p.addr, fi_addr = a, "uplink peer resolved");
                    p.fi_addr = Some(a);
                    p.last_hello = None;
                }
                Err(e) => {
                    debug!(host = p.host_id, addr = %p.addr, "uplink peer does not resolve yet: {e}")
                }
            }
        }
    }

    fn send(&mut self, dest: u64, msg: Vec<u8>, ctx: u64) {
        // Bounded: a peer that never completes our sends cannot make us hoard buffers.
        if self.sends.len() >= 256 {
            return;
        }
        self.sends.push((ctx, msg));
        let buf = &self.sends.last().expect("just pushed").1;
        // SAFETY: the buffer stays in `self.sends` (a Vec's heap data does not move when the
        // outer Vec reallocates) until its completion removes it.
        if let Err(e) = unsafe { self.ep.send(buf, dest, ctx) } {
            debug!("uplink send: {e}");
            self.sends.pop();
        }
    }

    fn repost(&mut self, i: usize) {
        // SAFETY: buffer `i` is owned by the worker, not touched until its completion, and
        // the worker outlives the endpoint's use of it (the endpoint is dropped with it).
        if let Err(e) = unsafe { self.ep.post_recv(&mut self.bufs[i], i as u64) } {
            warn!("uplink: cannot post a receive: {e}");
        }
    }

    fn completion(&mut self, c: fi::Completion, next_send: &mut u64) {
        if c.context >= SEND_CONTEXT {
            self.sends.retain(|(ctx, _)| *ctx != c.context);
            return;
        }
        let i = c.context as usize;
        if i >= self.bufs.len() {
            return;
        }
        let len = c.len.min(MAX_MESSAGE);
        let parsed = Message::parse(&self.bufs[i][..len]);
        self.repost(i);
        match parsed {
            Err(e) => warn!(src = c.src, "uplink: refusing a malformed message: {e}"),
            Ok(Message::Hello {
                ack,
                fabric_id,
                host_id,
                num_devices,
                epoch,
            }) => match self.set.admit(c.src, fabric_id, host_id) {
                Err(why) => warn!("uplink: refusing a host: {why}"),
                Ok(peer) => {
                    if peer.epoch.is_some_and(|e| e != epoch) {
                        info!(host = host_id, "uplink peer restarted");
                    }
                    peer.epoch = Some(epoch);
                    peer.num_devices = num_devices;
                    peer.last_heard = Some(Instant::now());
                    if !ack {
                        let dest = c.src;
                        *next_send += 1;
                        let reply = self.hello(true);
                        self.send(dest, reply, SEND_CONTEXT + *next_send);
                    }
                }
            },
        }
    }

    fn failed(&mut self, ctx: u64, e: FiError) {
        if ctx >= SEND_CONTEXT {
            self.sends.retain(|(c, _)| *c != ctx);
            debug!("uplink send failed: {e}");
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
