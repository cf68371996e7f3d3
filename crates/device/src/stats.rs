// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-device counters (atomics updated by the device threads) and their public snapshots.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vfabric_proto::Status;

/// Number of `Status` codes (0..=16).
const NUM_STATUS: usize = Status::AddrInUse as usize + 1;

/// Live counters of one device.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub disconnects: AtomicU64,
    pub bad_chains: AtomicU64,
    pub ring_errors: AtomicU64,
    pub dgram_drops: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Ranges (and their bytes) made durable by the persistence primitive (§6.17).
    pub persisted_ranges: AtomicU64,
    pub persisted_bytes: AtomicU64,
    pub connected: AtomicBool,
    errors: [AtomicU64; NUM_STATUS],
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }

    /// Count a completion with raw status `status` (0 = Ok is not counted).
    pub fn completion(&self, status: u32) {
        if status != 0 {
            if let Some(c) = self.errors.get(status as usize) {
                Self::inc(c);
            }
        }
    }

    pub fn snapshot(&self, socket: PathBuf, node_addr: u64) -> DeviceStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let error_completions = self
            .errors
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = get(c);
                (n > 0)
                    .then(|| Status::from_u32(i as u32).map(|s| (s, n)))
                    .flatten()
            })
            .collect();
        DeviceStats {
            socket,
            node_addr,
            connected: self.connected.load(Ordering::Relaxed),
            messages_sent: get(&self.messages_sent),
            messages_received: get(&self.messages_received),
            bytes_copied: get(&self.bytes_copied),
            disconnects: get(&self.disconnects),
            bad_chains: get(&self.bad_chains),
            ring_errors: get(&self.ring_errors),
            dgram_drops: get(&self.dgram_drops),
            handshake_timeouts: get(&self.handshake_timeouts),
            persisted_ranges: get(&self.persisted_ranges),
            persisted_bytes: get(&self.persisted_bytes),
            error_completions,
        }
    }
}

/// Counters of one device at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device's vhost-user socket.
    pub socket: PathBuf,
    /// The device's node address on the fabric.
    pub node_addr: u64,
    /// A frontend is connected now.
    pub connected: bool,
    /// Sends completed `Ok` (eagerly buffered, matched, or dropped by a DGRAM endpoint).
    pub messages_sent: u64,
    /// Receives completed with a message (`Ok` or `Truncated`).
    pub messages_received: u64,
    /// Message bytes placed into this device's receive buffers.
    pub bytes_copied: u64,
    /// Frontends that disconnected (each connection counts once when it ends).
    pub disconnects: u64,
    /// Chains returned with used length 0 or completed `BadChain`.
    pub bad_chains: u64,
    /// Corrupt rings (the guest was disconnected).
    pub ring_errors: u64,
    /// Messages to this device's DGRAM endpoints dropped for lack of a posted receive.
    pub dgram_drops: u64,
    /// Frontends dropped for not starting a ring within the handshake deadline.
    pub handshake_timeouts: u64,
    /// Persistent-memory ranges made durable by pmem2's persist function, and their bytes.
    pub persisted_ranges: u64,
    pub persisted_bytes: u64,
    /// Completions with a non-`Ok` status, by status (only non-zero counts, by status code).
    pub error_completions: Vec<(Status, u64)>,
}

impl DeviceStats {
    /// Completions written with `status`.
    pub fn errors(&self, status: Status) -> u64 {
        self.error_completions
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }
}

/// Counters of every device of a daemon, in device order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub devices: Vec<DeviceStats>,
}
