// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kernel TCP connections under a provider that runs on them (`tcp;ofi_rxm`), looked at
//! only for a host that is lost.
//!
//! A connection whose peer went silent (a cable pulled) keeps what was queued on it, and the
//! kernel retransmits with a backoff that doubles up to two minutes: when the cable is back,
//! the next retransmission may be tens of seconds away, and the peer's greetings and new data
//! wait behind it and everything queued before. The provider keeps using that connection (it
//! does not know the peer was lost), and `fi_av_remove` with FI_AV_REMOVE_CLEANUP, the only
//! way to make `ofi_rxm` close it, crashes libfabric 1.17 with an operation in flight. So the
//! uplink aborts the socket in the kernel (`connect(AF_UNSPEC)`, the ABORT of RFC 793: queues
//! dropped, RST sent): the provider sees exactly what a peer that died produces, a reset
//! connection, fails its operations on it, and connects again on the next send. Likewise a
//! connection attempt to a lost host whose SYN was not answered is aborted rather than left
//! to the SYN backoff, so that the next greeting starts one with a fresh SYN.
//!
//! Only connections to the lost host's address (found in `/proc/self/net/tcp` and `tcp6`, which
//! name the peer of a connection attempt too) that the kernel itself sees stuck are touched:
//! data outstanding with no ACK for `silent`, or a SYN sent again. A link that is only slow
//! keeps its connection. Only this process's sockets are looked at (by their inode among its
//! descriptors); the provider opens and closes them only inside libfabric calls, which the
//! uplink makes under the lock it holds while it does this.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Connections aborted by [`abort_stuck`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Aborted {
    /// Established connections with data no ACK answered for the silence asked.
    pub stuck: usize,
    /// Connection attempts whose SYN went unanswered at least once.
    pub connecting: usize,
}

/// `TCP_ESTABLISHED` and `TCP_SYN_SENT` of the kernel's `tcp_states.h`.
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;

/// Abort this process's TCP connections to `ip` that the kernel sees stuck (see the module
/// documentation).
pub(super) fn abort_stuck(ip: IpAddr, silent: Duration) -> Aborted {
    let mut done = Aborted::default();
    let candidates: HashMap<u64, Connection> = own_connections(ip)
        .filter(|c| matches!(c.state, TCP_ESTABLISHED | TCP_SYN_SENT))
        .map(|c| (c.inode, c))
        .collect();
    if candidates.is_empty() {
        return done;
    }
    let silent_ms = u32::try_from(silent.as_millis()).unwrap_or(u32::MAX);
    for (fd, inode) in socket_fds() {
        let Some(conn) = candidates.get(&inode) else {
            continue;
        };
        let Some(info) = tcp_info(fd) else { continue };
        // Bytes queued, sent or not (a link that went down may hold them unsent), and no ACK
        // for the silence asked; or a SYN that had to be sent again.
        let kind = match info.tcpi_state {
            TCP_SYN_SENT if info.tcpi_retransmits > 0 => &mut done.connecting,
            TCP_ESTABLISHED if conn.queued > 0 && info.tcpi_last_ack_recv >= silent_ms => {
                &mut done.stuck
            }
            _ => continue,
        };
        if abort(fd) {
            *kind += 1;
        }
    }
    done
}

/// How long ago this process last received data on a TCP connection to `ip` (the least over
/// its established connections), if it has one. A link full of one peer's bulk data (an RMA
/// read's answer written into our sink, which completes nothing here until its reply) holds
/// that peer's greetings behind the data: its connection still receiving says it is alive.
pub(super) fn last_data_from(ip: IpAddr) -> Option<Duration> {
    let inodes: Vec<u64> = own_connections(ip)
        .filter(|c| c.state == TCP_ESTABLISHED)
        .map(|c| c.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    socket_fds()
        .filter(|(_, inode)| inodes.contains(inode))
        .filter_map(|(fd, _)| tcp_info(fd))
        .filter(|i| i.tcpi_state == TCP_ESTABLISHED)
        .map(|i| i.tcpi_last_data_recv)
        .min()
        .map(|ms| Duration::from_millis(ms.into()))
}

/// The connections to `ip` in this process's network namespace (`/proc/self/net/tcp`, `tcp6`).
fn own_connections(ip: IpAddr) -> impl Iterator<Item = Connection> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .into_iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(move |table| {
            table
                .lines()
                .skip(1)
                .filter_map(connection)
                .filter(|c| c.remote == ip)
                .collect::<Vec<_>>()
        })
}

/// This process's socket descriptors with their inodes.
fn socket_fds() -> impl Iterator<Item = (i32, u64)> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let link = std::fs::read_link(entry.path()).ok()?;
            let inode = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
}

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, PartialEq, Eq)]
struct Connection {
    remote: IpAddr,
    state: u8,
    /// Bytes written and not acknowledged (`tx_queue`), sent or not.
    queued: u64,
    inode: u64,
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`; addresses are the bytes of
/// the address in 32-bit words, each printed in hex as a native-endian integer.
fn connection(line: &str) -> Option<Connection> {
    let mut f = line.split_whitespace();
    let remote = f.nth(2)?.split(':').next()?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    let queued = u64::from_str_radix(f.next()?.split(':').next()?, 16).ok()?;
    let inode = f.nth(4)?.parse().ok()?;
    let word = |i: usize| {
        remote
            .get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let remote = match remote.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Ipv6Addr::from(b).to_canonical()
        }
        _ => return None,
    };
    Some(Connection {
        remote,
        state,
        queued,
        inode,
    })
}

/// The kernel's TCP state of socket `fd`.
fn tcp_info(fd: i32) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes (the kernel writes at most that much); a
    // descriptor closed meanwhile only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

/// `connect(AF_UNSPEC)`: the kernel drops the connection's queues and sends RST (the socket
/// keeps ECONNRESET for its owner's next call); then `shutdown(SHUT_RDWR)`, so that the
/// provider, which reads the socket when it polls readable, reads its end now (a send error
/// alone does not make it give the connection up).
fn abort(fd: i32) -> bool {
    // SAFETY: sockaddr is plain data; all zeroes with AF_UNSPEC is the documented way to
    // dissolve a socket's association.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: `sa` is a valid sockaddr of the length passed.
    let rc = unsafe {
        libc::connect(
            fd,
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    // SAFETY: plain call on a descriptor; on a socket that is not connected any more it
    // fails with ENOTCONN after marking both directions shut, which is what is wanted.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    rc == 0
}

/// The IP address in a provider address (`fi_getinfo`'s dest_addr: a `sockaddr_in` or
/// `sockaddr_in6` for providers on IP, something else for others).
pub(super) fn ip_of_provider_addr(addr: &[u8]) -> Option<IpAddr> {
    let family = i32::from(u16::from_ne_bytes([*addr.first()?, *addr.get(1)?]));
    match family {
        // sockaddr_in: family, port, then the 4 address bytes.
        libc::AF_INET => {
            let b: [u8; 4] = addr.get(4..8)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        // sockaddr_in6: family, port, flow info, then the 16 address bytes.
        libc::AF_INET6 => {
            let b: [u8; 16] = addr.get(8..24)?.try_into().ok()?;
            Some(Ipv6Addr::from(b).to_canonical())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_name_peer_state_and_inode() {
        let v4 = "   3: 0100000A:E76C 0200000A:2405 02 00000001:00000000 01:00000344 00000005     0        0 4327510 2 0000000000000000 1600 0 0 1 7";
        assert_eq!(
            connection(v4),
            Some(Connection {
                remote: "10.0.0.2".parse().unwrap(),
                state: TCP_SYN_SENT,
                queued: 1,
                inode: 4327510,
            })
        );
        // A v4-mapped peer of an AF_INET6 socket, and a plain v6 one.
        let mapped = "   0: 0000000000000000FFFF00000100000A:2405 0000000000000000FFFF00000200000A:C5FA 01 00001A2B:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            connection(mapped).map(|c| (c.remote, c.state, c.queued, c.inode)),
            Some(("10.0.0.2".parse().unwrap(), TCP_ESTABLISHED, 0x1a2b, 99))
        );
        let v6 = "   1: 00000000000000000000000000000000:2405 0000FDFD000000000000000001000000:C5FA 01 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            connection(v6).map(|c| c.remote),
            Some("fdfd::1".parse().unwrap())
        );
        assert_eq!(
            connection("  sl  local_address rem_address   st tx_queue"),
            None
        );
        assert_eq!(connection("0: 0100000A:1 0200:1 01 0 0 0 0 0 1"), None);
    }

    #[test]
    fn provider_addresses_give_their_ip() {
        let mut sin = vec![0u8; 16];
        sin[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sin[2..4].copy_from_slice(&9229u16.to_be_bytes());
        sin[4..8].copy_from_slice(&[10, 77, 0, 2]);
        assert_eq!(
            ip_of_provider_addr(&sin),
            Some("10.77.0.2".parse().unwrap())
        );
        let mut sin6 = vec![0u8; 28];
        sin6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        sin6[8..24].copy_from_slice(&"fd00::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(ip_of_provider_addr(&sin6), Some("fd00::7".parse().unwrap()));
        assert_eq!(ip_of_provider_addr(&sin[..6]), None);
        assert_eq!(ip_of_provider_addr(&[0u8; 16]), None);
        assert_eq!(ip_of_provider_addr(&[]), None);
    }
}
