// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Membership: the configured peer set, what each peer said about itself, and the snapshot of
//! reachable hosts the fabric reports to guests (QUERY_CAPS `REMOTE_HOSTS`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One remote host as guests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteHost {
    pub host_id: u16,
    /// Devices it serves (0 until it introduced itself).
    pub num_devices: u16,
    /// It answered within the peer timeout.
    pub up: bool,
    /// Its configured uplink address.
    pub addr: String,
}

/// The reachable-hosts table, shared between the uplink thread (writer) and the fabric
/// (QUERY_CAPS answers).
#[derive(Debug, Default)]
pub struct RemoteHosts(Mutex<Vec<RemoteHost>>);

impl RemoteHosts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn snapshot(&self) -> Vec<RemoteHost> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, hosts: Vec<RemoteHost>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = hosts;
    }
}

/// What the uplink knows of one configured peer.
pub(super) struct Peer {
    pub host_id: u16,
    pub addr: String,
    /// Its fi_addr in the uplink AV (None while its address does not resolve).
    pub fi_addr: Option<u64>,
    /// Its IP address, when the provider's addresses are IP socket addresses.
    pub ip: Option<std::net::IpAddr>,
    pub num_devices: u16,
    /// Its HELLO's `wire::caps` bits.
    pub caps: u32,
    pub epoch: Option<u64>,
    pub last_heard: Option<Instant>,
    /// When we last sent it a HELLO.
    pub last_hello: Option<Instant>,
}

impl Peer {
    pub fn new(host_id: u16, addr: String) -> Self {
        Self {
            host_id,
            addr,
            fi_addr: None,
            ip: None,
            num_devices: 0,
            caps: 0,
            epoch: None,
            last_heard: None,
            last_hello: None,
        }
    }

    pub fn is_up(&self, now: Instant, timeout: Duration) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < timeout)
    }
}

/// Why a HELLO was refused (logged; the sender gets no answer).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it belongs to fabric {theirs:x}, this host to fabric {ours:x}")]
    OtherFabric { theirs: u32, ours: u32 },
    #[error("host id {0} is not in the configured peer set")]
    NotAPeer(u16),
    #[error("it claims host id {claimed}, which is this host's own id")]
    OwnId { claimed: u16 },
    #[error("it claims host id {claimed} but comes from {from}")]
    WrongAddress { claimed: u16, from: String },
}

/// The peer set: check a HELLO's claims against the configuration and the address it came
/// from.
pub(super) struct PeerSet {
    pub peers: Vec<Peer>,
    pub fabric_id: u32,
    pub host_id: u16,
    pub timeout: Duration,
}

impl PeerSet {
    /// The peer a HELLO from `src` (its fi_addr, or NOTAVAIL when not in our AV) that claims
    /// `(fabric_id, host_id)` is, if its claims hold.
    pub fn admit(&mut self, src: u64, fabric_id: u32, host_id: u16) -> Result<&mut Peer, Refusal> {
        if fabric_id != self.fabric_id {
            return Err(Refusal::OtherFabric {
                theirs: fabric_id,
                ours: self.fabric_id,
            });
        }
        if host_id == self.host_id {
            return Err(Refusal::OwnId { claimed: host_id });
        }
        let from = self
            .peers
            .iter()
            .find(|p| p.fi_addr == Some(src))
            .map(|p| format!("the address of host {} ({})", p.host_id, p.addr))
            .unwrap_or_else(|| "an address outside the peer set".into());
        let Some(peer) = self.peers.iter_mut().find(|p| p.host_id == host_id) else {
            return Err(Refusal::NotAPeer(host_id));
        };
        // The claimed id must come from that peer's own configured address.
        if peer.fi_addr != Some(src) {
            return Err(Refusal::WrongAddress {
                claimed: host_id,
                from,
            });
        }
        Ok(peer)
    }

    /// Publish the current view to guests.
    pub fn publish(&self, to: &RemoteHosts, now: Instant) {
        to.publish(
            self.peers
                .iter()
                .map(|p| RemoteHost {
                    host_id: p.host_id,
                    num_devices: p.num_devices,
                    up: p.is_up(now, self.timeout),
                    addr: p.addr.clone(),
                })
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> PeerSet {
        let mut a = Peer::new(2, "10.0.0.2:9229".into());
        a.fi_addr = Some(0);
        let mut b = Peer::new(3, "10.0.0.3:9229".into());
        b.fi_addr = Some(1);
        PeerSet {
            peers: vec![a, b],
            fabric_id: 0x5eed,
            host_id: 1,
            timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn claims_are_checked_against_configuration_and_source() {
        let mut s = set();
        assert_eq!(s.admit(0, 0x5eed, 2).map(|p| p.host_id), Ok(2));
        assert_eq!(s.admit(1, 0x5eed, 3).map(|p| p.host_id), Ok(3));
        assert!(matches!(
            s.admit(0, 0xbad, 2),
            Err(Refusal::OtherFabric { .. })
        ));
        assert_eq!(
            s.admit(0, 0x5eed, 1).err(),
            Some(Refusal::OwnId { claimed: 1 })
        );
        assert_eq!(
            s.admit(u64::MAX, 0x5eed, 9).err(),
            Some(Refusal::NotAPeer(9))
        );
        // Host 3's address claiming to be host 2, and a stranger claiming host 2.
        assert!(matches!(
            s.admit(1, 0x5eed, 2),
            Err(Refusal::WrongAddress { claimed: 2, .. })
        ));
        assert!(matches!(
            s.admit(u64::MAX, 0x5eed, 2),
            Err(Refusal::WrongAddress { claimed: 2, .. })
        ));
    }
}
