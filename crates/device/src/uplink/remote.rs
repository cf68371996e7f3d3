// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam between the fabric and the uplink thread: guest requests for another host go out
//! through the [`Outbox`], and so do the verdicts on requests that arrived from another host
//! and were held until a receive matched them.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use vfabric_proto::Status;

use super::wire;
use crate::chain::Req;
use crate::fabric::Port;

/// Requests to other hosts queued or waiting for their REPLY, at most.
pub(crate) const MAX_INFLIGHT: usize = 1024;
/// Bytes of requests to other hosts queued or waiting for their REPLY, at most (a single
/// larger request is let through alone).
pub(crate) const MAX_INFLIGHT_BYTES: u64 = 64 << 20;

/// A guest's send to an endpoint of another host, with what completes it later: the sender's
/// port and chain (exactly as a held send carries them).
pub(crate) struct RemoteSend {
    pub host: u16,
    pub dev: usize,
    pub port: Port,
    pub req: Req,
    /// The DATA description (its `req_id` and `offset` are filled in by the uplink).
    pub desc: wire::Data,
    /// The request's bytes: a send's payload; an RMA request's ranges and, for a write,
    /// the bytes to write.
    pub payload: Vec<u8>,
    /// Bytes the request moves (a send's length, an RMA transfer's total), as reserved.
    pub len: u64,
}

pub(crate) enum Outbound {
    Send(Box<RemoteSend>),
    /// The verdict on request `req_id` of `host` (held here until now), with the bytes it
    /// returns (a refused commit's handler value; else none).
    Reply {
        host: u16,
        req_id: u64,
        status: Status,
        bytes: Vec<u8>,
    },
}

/// Whether a request of `opcode` gets bytes back with its verdict (RMA read, fetching
/// atomics).
pub(crate) fn returns_bytes(opcode: vfabric_proto::Opcode) -> bool {
    use vfabric_proto::Opcode::*;
    matches!(opcode, RmaRead | FetchAtomic | CompareAtomic)
}

/// Bytes a verdict of `status` on a request of `opcode` moving `len` bytes carries: a read's
/// bytes on success; a FLUSH refused by the target's commit handler, the handler's value (8
/// bytes); nothing else.
pub(crate) fn reply_len(opcode: vfabric_proto::Opcode, status: Status, len: u64) -> u64 {
    match (opcode, status) {
        (op, Status::Ok) if returns_bytes(op) => len,
        (vfabric_proto::Opcode::Flush, Status::CommitRefused) => 8,
        _ => 0,
    }
}

/// Whose requests to which host: `(device, endpoint, host)` (FENCE waits on it).
pub(crate) type EpKey = (usize, u32, u16);

#[derive(Default)]
struct State {
    /// An uplink runs: other hosts' addresses lead somewhere.
    enabled: bool,
    /// Configured peers and whether each is up now.
    hosts: HashMap<u16, bool>,
    queue: VecDeque<Outbound>,
    inflight: usize,
    inflight_bytes: u64,
    /// Requests in flight per endpoint and host.
    by_ep: HashMap<EpKey, usize>,
}

/// Shared by the fabric (producers: guest threads) and the uplink thread (consumer).
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    wake: Condvar,
    /// An eventfd that wakes the uplink thread from its sleep in the kernel (beside the
    /// provider's wait fd), made when the uplink first asks for it.
    wake_fd: OnceLock<Option<OwnedFd>>,
    /// The uplink thread sleeps on `wake_fd`: a push must write it.
    sleeping: AtomicBool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a send of `len` bytes to `host` may go out now: `AddrNotAvail` for a host that
    /// is not a peer (or no uplink), `HostUnreach` for a peer that is down, `NoResources`
    /// past the in-flight bounds. On success the request counts as in flight until
    /// [`Outbox::finished`].
    pub fn reserve(&self, key: EpKey, len: u64) -> Result<(), Status> {
        let host = key.2;
        let mut s = self.lock();
        match s.hosts.get(&host) {
            _ if !s.enabled => return Err(Status::AddrNotAvail),
            None => return Err(Status::AddrNotAvail),
            Some(false) => return Err(Status::HostUnreach),
            Some(true) => {}
        }
        if s.inflight >= MAX_INFLIGHT
            || (s.inflight > 0 && s.inflight_bytes.saturating_add(len) > MAX_INFLIGHT_BYTES)
        {
            return Err(Status::NoResources);
        }
        s.inflight += 1;
        s.inflight_bytes = s.inflight_bytes.saturating_add(len);
        *s.by_ep.entry(key).or_default() += 1;
        Ok(())
    }

    /// Whether requests of endpoint `key.1` of device `key.0` to host `key.2` are in flight.
    pub fn busy(&self, key: EpKey) -> bool {
        self.lock().by_ep.contains_key(&key)
    }

    /// Whether `host` is a peer of a running uplink.
    pub fn is_peer(&self, host: u16) -> bool {
        let s = self.lock();
        s.enabled && s.hosts.contains_key(&host)
    }

    /// A request reserved with `len` bytes completed (or never went out).
    pub fn finished(&self, key: EpKey, len: u64) {
        let mut s = self.lock();
        s.inflight = s.inflight.saturating_sub(1);
        s.inflight_bytes = s.inflight_bytes.saturating_sub(len);
        if let Some(c) = s.by_ep.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                s.by_ep.remove(&key);
            }
        }
    }

    pub fn push(&self, m: Outbound) {
        self.lock().queue.push_back(m);
        self.wake.notify_one();
        // After the queue's lock: an uplink that announced its sleep before we queued either
        // saw the message or is told here.
        if self.sleeping.load(Ordering::SeqCst) {
            if let Some(Some(fd)) = self.wake_fd.get() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writing 8 bytes from a live buffer to our own eventfd.
                let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        }
    }

    /// The eventfd that [`Outbox::push`] writes while the uplink sleeps (`None` if the
    /// kernel refused one: the uplink then polls).
    pub fn wake_fd(&self) -> Option<RawFd> {
        self.wake_fd
            .get_or_init(|| {
                // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
                let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .as_ref()
            .map(|f| f.as_raw_fd())
    }

    /// The uplink is about to sleep on [`Outbox::wake_fd`]: `false` (do not sleep) if
    /// something is queued already.
    pub fn sleep_begin(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.lock().queue.is_empty() {
            return true;
        }
        self.sleeping.store(false, Ordering::SeqCst);
        false
    }

    /// The uplink woke up: pushes need not write the eventfd any more (it is drained).
    pub fn sleep_end(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        if let Some(Some(fd)) = self.wake_fd.get() {
            let mut b = [0u8; 8];
            // SAFETY: reading at most 8 bytes into a live buffer from our non-blocking eventfd.
            let _ = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        }
    }

    /// Everything queued so far.
    pub fn take(&self) -> VecDeque<Outbound> {
        std::mem::take(&mut self.lock().queue)
    }

    /// Sleep until something is queued or `timeout` passed.
    pub fn wait(&self, timeout: Duration) {
        let s = self.lock();
        if s.queue.is_empty() {
            let _ = self.wake.wait_timeout(s, timeout);
        }
    }

    /// The uplink's view of its peers (called whenever it may have changed).
    pub fn set_hosts(&self, hosts: impl Iterator<Item = (u16, bool)>) {
        let mut s = self.lock();
        s.enabled = true;
        s.hosts.clear();
        s.hosts.extend(hosts);
    }

    /// The uplink stopped: nothing leaves any more.
    pub fn disable(&self) -> VecDeque<Outbound> {
        let mut s = self.lock();
        s.enabled = false;
        s.hosts.clear();
        std::mem::take(&mut s.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_peer_state_and_bounds() {
        const K2: EpKey = (0, 1, 2);
        let o = Outbox::default();
        assert_eq!(o.reserve(K2, 8), Err(Status::AddrNotAvail), "no uplink");
        o.set_hosts([(2, true), (3, false)].into_iter());
        assert_eq!(
            o.reserve((0, 1, 4), 8),
            Err(Status::AddrNotAvail),
            "not a peer"
        );
        assert_eq!(
            o.reserve((0, 1, 3), 8),
            Err(Status::HostUnreach),
            "peer down"
        );
        // One request larger than the byte bound goes alone.
        assert_eq!(o.reserve(K2, MAX_INFLIGHT_BYTES * 2), Ok(()));
        assert_eq!(o.reserve(K2, 8), Err(Status::NoResources));
        o.finished(K2, MAX_INFLIGHT_BYTES * 2);
        for _ in 0..MAX_INFLIGHT {
            assert_eq!(o.reserve(K2, 8), Ok(()));
        }
        assert_eq!(o.reserve(K2, 8), Err(Status::NoResources));
        o.finished(K2, 8);
        assert_eq!(o.reserve(K2, 8), Ok(()));
        assert!(o.busy(K2) && !o.busy((0, 2, 2)) && !o.busy((1, 1, 2)));
        for _ in 0..MAX_INFLIGHT {
            o.finished(K2, 8);
        }
        assert!(!o.busy(K2), "nothing in flight for the endpoint any more");
        o.disable();
        assert_eq!(o.reserve(K2, 8), Err(Status::AddrNotAvail));
    }

    #[test]
    fn a_push_wakes_a_sleeping_uplink_through_its_eventfd() {
        let o = Outbox::default();
        let fd = o.wake_fd().expect("eventfd");
        let readable = || {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no waiting.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        // Not sleeping: a push leaves the fd alone.
        o.push(Outbound::Reply {
            host: 2,
            req_id: 1,
            status: Status::Ok,
            bytes: Vec::new(),
        });
        assert!(!readable());
        assert!(!o.sleep_begin(), "something is queued: no sleep");
        assert_eq!(o.take().len(), 1);
        assert!(o.sleep_begin());
        assert!(!readable());
        o.push(Outbound::Reply {
            host: 2,
            req_id: 2,
            status: Status::Ok,
            bytes: Vec::new(),
        });
        assert!(readable(), "a push while asleep wakes");
        o.sleep_end();
        assert!(!readable(), "drained on waking");
    }
}
