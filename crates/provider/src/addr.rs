// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Standard addressing: host names, IP addresses and services, as libfabric's socket-based
//! providers take them.
//!
//! A host address names a host of the fabric: every address of this machine (an interface
//! address, the loopback network, `::1`, the unspecified address) names the local host. A
//! service names the endpoint bound to it in the host's service table (the device's
//! SVC_BIND / SVC_RESOLVE, docs/spec.md §6.8.10), like a port on tcp. Endpoints created from an
//! `fi_info` of a socket format bind their source service (or any free one) when enabled;
//! `fi_av_insert`, `fi_av_insertsvc` and `fi_connect` resolve (host, service) through the
//! device when called, so a client may ask for the server's address before the server binds.
//!
//! Formats: the native one (`FI_FORMAT_UNSPEC`, the 16-byte device address), `FI_SOCKADDR_IN`,
//! `FI_SOCKADDR_IN6`, `FI_SOCKADDR` (either, by `sa_family`) and `FI_ADDR_STR`
//! (`fi_sockaddr_in://IP:PORT`, `fi_sockaddr_in6://[IP]:PORT` or `vfab://…`, NUL-terminated).

use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use vfabric::{fi, FabricAddr};

use crate::sys;

/// An address in one of the provider's formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A device endpoint address.
    Native(FabricAddr),
    /// A host and a service (port); service 0 means "any" (a source address only).
    Host(SocketAddr),
}

/// Address formats the provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Native,
    In,
    In6,
    /// `FI_SOCKADDR`: either socket family (answers name the concrete one).
    Sockaddr,
    Str,
}

impl Format {
    pub fn from_fi(f: u32) -> Option<Format> {
        match f {
            sys::FI_FORMAT_UNSPEC => Some(Format::Native),
            sys::FI_SOCKADDR_IN => Some(Format::In),
            sys::FI_SOCKADDR_IN6 => Some(Format::In6),
            sys::FI_SOCKADDR => Some(Format::Sockaddr),
            sys::FI_ADDR_STR => Some(Format::Str),
            _ => None,
        }
    }

    pub fn to_fi(self) -> u32 {
        match self {
            Format::Native => sys::FI_FORMAT_UNSPEC,
            Format::In => sys::FI_SOCKADDR_IN,
            Format::In6 => sys::FI_SOCKADDR_IN6,
            Format::Sockaddr => sys::FI_SOCKADDR,
            Format::Str => sys::FI_ADDR_STR,
        }
    }

    /// Whether addresses of this format name hosts and services.
    pub fn is_host(self) -> bool {
        self != Format::Native
    }

    /// The concrete format an answer gives for `a` when `self` was asked for.
    pub fn concrete_for(self, a: &Addr) -> Format {
        match (self, a) {
            (Format::Sockaddr | Format::Native, Addr::Host(s)) if s.is_ipv6() => Format::In6,
            (Format::Sockaddr | Format::Native, Addr::Host(_)) => Format::In,
            (f, _) => f,
        }
    }
}

const SIN_LEN: usize = std::mem::size_of::<libc::sockaddr_in>();
const SIN6_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();

/// Bytes of `a` in format `f` (`None`: `a` cannot be written in `f`).
pub fn encode(f: Format, a: &Addr) -> Option<Vec<u8>> {
    match (f, a) {
        (Format::Native, Addr::Native(n)) => Some(n.to_bytes().to_vec()),
        (Format::Str, a) => {
            let mut v = to_string(a).into_bytes();
            v.push(0);
            Some(v)
        }
        (Format::In | Format::Sockaddr, Addr::Host(SocketAddr::V4(s))) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = s.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(s.ip().octets());
            Some(pod_bytes(&sin))
        }
        (Format::In6 | Format::Sockaddr, Addr::Host(SocketAddr::V6(s))) => {
            // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = s.port().to_be();
            sin6.sin6_addr.s6_addr = s.ip().octets();
            sin6.sin6_flowinfo = s.flowinfo();
            sin6.sin6_scope_id = s.scope_id();
            Some(pod_bytes(&sin6))
        }
        // An IPv4 host asked for in IPv6: its mapped form.
        (Format::In6, Addr::Host(SocketAddr::V4(s))) => encode(
            Format::In6,
            &Addr::Host(SocketAddr::new(
                IpAddr::V6(s.ip().to_ipv6_mapped()),
                s.port(),
            )),
        ),
        _ => None,
    }
}

fn pod_bytes<T>(v: &T) -> Vec<u8> {
    // SAFETY: `T` is a plain repr(C) socket address; viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// Decode `b` as an address of format `f` (`None`: malformed).
pub fn decode(f: Format, b: &[u8]) -> Option<Addr> {
    match f {
        Format::Native => {
            if b.len() != crate::info::ADDR_LEN {
                return None;
            }
            FabricAddr::from_bytes(b).ok().map(Addr::Native)
        }
        Format::Str => {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            parse_str(std::str::from_utf8(&b[..end]).ok()?)
        }
        Format::In | Format::In6 | Format::Sockaddr => {
            if b.len() < 2 {
                return None;
            }
            let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
            match family {
                libc::AF_INET if f != Format::In6 && b.len() >= SIN_LEN => {
                    // SAFETY: `b` holds at least a sockaddr_in; read unaligned.
                    let sin: libc::sockaddr_in =
                        unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
                    let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                    Some(Addr::Host(SocketAddr::new(
                        IpAddr::V4(ip),
                        u16::from_be(sin.sin_port),
                    )))
                }
                libc::AF_INET6 if f != Format::In && b.len() >= SIN6_LEN => {
                    // SAFETY: `b` holds at least a sockaddr_in6; read unaligned.
                    let sin6: libc::sockaddr_in6 =
                        unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
                    let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    Some(Addr::Host(SocketAddr::new(
                        IpAddr::V6(ip),
                        u16::from_be(sin6.sin6_port),
                    )))
                }
                _ => None,
            }
        }
    }
}

/// Length in bytes of the address at `p` in format `f` (for arrays of addresses, and for
/// `FI_ADDR_STR` the string with its NUL).
///
/// # Safety
/// `p` points to an address of format `f` (NUL-terminated for `FI_ADDR_STR`).
pub unsafe fn len_at(f: Format, p: *const c_void) -> usize {
    match f {
        Format::Native => crate::info::ADDR_LEN,
        Format::In => SIN_LEN,
        Format::In6 => SIN6_LEN,
        Format::Sockaddr => {
            // SAFETY: a sockaddr starts with its family.
            let fam = unsafe { std::ptr::read_unaligned(p.cast::<libc::sa_family_t>()) };
            if i32::from(fam) == libc::AF_INET6 {
                SIN6_LEN
            } else {
                SIN_LEN
            }
        }
        // SAFETY: NUL-terminated per the contract.
        Format::Str => (unsafe { libc::strlen(p.cast()) }) + 1,
    }
}

/// Printable form (`FI_ADDR_STR`, `fi_av_straddr`).
pub fn to_string(a: &Addr) -> String {
    match a {
        Addr::Native(n) => n.to_string(),
        Addr::Host(SocketAddr::V4(s)) => format!("fi_sockaddr_in://{}:{}", s.ip(), s.port()),
        Addr::Host(SocketAddr::V6(s)) => format!("fi_sockaddr_in6://[{}]:{}", s.ip(), s.port()),
    }
}

/// Parse an `FI_ADDR_STR` address.
pub fn parse_str(s: &str) -> Option<Addr> {
    let s = s.trim();
    if s.starts_with("vfab://") {
        return s.parse().ok().map(Addr::Native);
    }
    let rest = s
        .strip_prefix("fi_sockaddr_in6://")
        .or_else(|| s.strip_prefix("fi_sockaddr_in://"))
        .or_else(|| s.strip_prefix("fi_sockaddr://"))?;
    rest.parse::<SocketAddr>().ok().map(Addr::Host)
}

/// A service string: a number 0..=65535, or a name from the services database.
pub fn parse_service(s: &str) -> Option<u16> {
    if let Ok(n) = s.trim().parse::<u16>() {
        return Some(n);
    }
    let name = std::ffi::CString::new(s.trim()).ok()?;
    // SAFETY: NUL-terminated name; getservbyname returns NULL or a static entry.
    let e = unsafe { libc::getservbyname(name.as_ptr(), std::ptr::null()) };
    if e.is_null() {
        return None;
    }
    // SAFETY: non-NULL entry; s_port is in network order.
    Some(u16::from_be(unsafe { (*e).s_port } as u16))
}

/// Host addresses of `node` (a name or a numeric address) with `service`, IPv4 first.
pub fn lookup_host(node: &str, service: u16) -> Vec<SocketAddr> {
    let node = node.trim();
    let node = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    if let Ok(ip) = node.parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, service)];
    }
    let mut v: Vec<SocketAddr> = match (node, service).to_socket_addrs() {
        Ok(it) => it.collect(),
        Err(_) => Vec::new(),
    };
    v.sort_by_key(|a| a.is_ipv6());
    v.dedup();
    v
}

/// Whether `ip` is an address of this machine (so it names the local host of the fabric).
pub fn is_local(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    interface_addrs().contains(&ip)
}

/// The fabric host an IP address names on the device of `info`: a host's uplink address
/// (QUERY_CAPS `HOST_ADDRS`) names that host, any other address of this machine the local host.
pub fn host_of(info: &vfabric::Info, ip: IpAddr) -> Option<u16> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if let Some(e) = info.host_addrs.iter().find(|e| e.addr == ip) {
        return Some(e.host_id);
    }
    is_local(ip).then_some((info.node_addr >> 16) as u16)
}

/// What the devices this process probed or opened said about their fabric's hosts, by fabric
/// id: this host's id and the `HOST_ADDRS` entries (empty on one host). Names of endpoints of
/// other hosts (`fi_getpeer`, a CONNREQ's `dest_addr`) and of our own endpoints, as other
/// hosts must read them, come from here.
static HOSTS: std::sync::Mutex<Vec<(u32, u16, Vec<vfabric::proto::caps::HostAddrEntry>)>> =
    std::sync::Mutex::new(Vec::new());

/// Remember the hosts of `info`'s fabric (called for every device probed or opened).
pub fn note_hosts(info: &vfabric::Info) {
    note(
        (info.node_addr >> 32) as u32,
        (info.node_addr >> 16) as u16,
        info.host_addrs.clone(),
    );
}

fn note(fabric: u32, host: u16, entries: Vec<vfabric::proto::caps::HostAddrEntry>) {
    let mut g = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    g.retain(|(f, _, _)| *f != fabric);
    g.push((fabric, host, entries));
}

/// The host address other hosts know `native`'s host by, in the family of `like` (IPv4
/// first), if its fabric has several hosts; `local` says whether that is this host.
fn uplink_ip(native: FabricAddr, like: Option<IpAddr>) -> Option<(IpAddr, bool)> {
    let g = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    let (_, this_host, entries) = g.iter().find(|(f, _, _)| *f == native.fabric())?;
    let local = native.host() == *this_host;
    let mut mine: Vec<IpAddr> = entries
        .iter()
        .filter(|e| e.host_id == native.host())
        .map(|e| e.addr)
        .collect();
    if mine.is_empty() && local && !entries.is_empty() {
        // Several hosts, but ours listens on no one address (`--listen 0.0.0.0`): any address
        // of this machine others can reach names it.
        mine = interface_addrs()
            .into_iter()
            .filter(|a| !a.is_loopback() && !a.is_unspecified() && !is_link_local(*a))
            .collect();
    }
    let v6 = matches!(like, Some(IpAddr::V6(_)));
    let ip = mine
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .or_else(|| mine.first())
        .copied()?;
    let ip = match ip {
        IpAddr::V4(v4) if v6 => IpAddr::V6(v4.to_ipv6_mapped()),
        ip => ip,
    };
    Some((ip, local))
}

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The host address endpoint `native`, bound to `service`, is named by: with several hosts,
/// its host's uplink address (an address that names the same host on every host of the
/// fabric: loopback names each reader's own host), unless it is one of ours and `like` (the
/// source address it was created with) names one interface of this machine; on one host,
/// [`local_name`].
pub fn name_of(like: Option<IpAddr>, native: FabricAddr, service: u16) -> SocketAddr {
    let specific = like.filter(|ip| !ip.is_unspecified() && !ip.is_loopback());
    match uplink_ip(native, like) {
        Some((_, true)) if specific.is_some() => local_name(like, service),
        Some((ip, _)) => SocketAddr::new(ip, service),
        None => local_name(like, service),
    }
}

/// The addresses of this machine's interfaces.
fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is an element of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-NULL ifa_addr starts with its family; for AF_INET/AF_INET6 it
            // is a whole sockaddr_in/sockaddr_in6.
            let fam = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if fam == libc::AF_INET {
                // SAFETY: as above.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::V4(Ipv4Addr::from(
                    sin.sin_addr.s_addr.to_ne_bytes(),
                )));
            } else if fam == libc::AF_INET6 {
                // SAFETY: as above.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The address an endpoint bound to `service` is named by, in the family of `like` (the
/// source address it was created with): that address if it names one interface, else the
/// loopback address of its family.
pub fn local_name(like: Option<IpAddr>, service: u16) -> SocketAddr {
    let ip = match like {
        Some(ip) if !ip.is_unspecified() => ip,
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    SocketAddr::new(ip, service)
}

/// The device endpoint `a` names, resolving a host address through `dom`'s device.
/// `-FI_EADDRNOTAVAIL` if the address names no host of the fabric or no endpoint is bound to
/// the service; `-FI_EHOSTUNREACH` if the host is another one that is down or does not answer
/// (its device is asked through the uplink, within the peer timeout).
pub fn resolve(dom: &vfabric::Domain, a: &Addr) -> Result<FabricAddr, i32> {
    match a {
        Addr::Native(n) => Ok(*n),
        Addr::Host(s) => {
            let info = dom.info();
            let Some(host_id) = host_of(info, s.ip()) else {
                return Err(fi::EADDRNOTAVAIL);
            };
            if s.port() == 0 {
                return Err(fi::EADDRNOTAVAIL);
            }
            let host = FabricAddr::node_of((info.node_addr >> 32) as u32, host_id, 0);
            match dom.resolve_service(host, s.port()) {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Err(fi::EADDRNOTAVAIL),
                Err(e) => Err(e.errno()),
            }
        }
    }
}

/// Copy `bytes` out to a consumer's (`addr`, `addrlen`) pair: `-FI_ETOOSMALL` with the length
/// needed if the buffer is short.
///
/// # Safety
/// `addrlen` valid; `addr` NULL or writable for `*addrlen` bytes.
pub unsafe fn copy_out(bytes: &[u8], addr: *mut c_void, addrlen: *mut usize) -> i32 {
    // SAFETY: per the contract.
    unsafe {
        let cap = *addrlen;
        *addrlen = bytes.len();
        if cap < bytes.len() || addr.is_null() {
            return -fi::ETOOSMALL;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), bytes.len());
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_roundtrip() {
        let v4 = Addr::Host("127.0.0.1:9228".parse().unwrap());
        let v6 = Addr::Host("[::1]:9229".parse().unwrap());
        let n = Addr::Native(FabricAddr::new(FabricAddr::node_of(5, 1, 2), 3, 4));
        for (f, a) in [
            (Format::In, v4),
            (Format::In6, v6),
            (Format::Sockaddr, v4),
            (Format::Sockaddr, v6),
            (Format::Str, v4),
            (Format::Str, v6),
            (Format::Str, n),
            (Format::Native, n),
        ] {
            let b = encode(f, &a).unwrap();
            assert_eq!(decode(f, &b), Some(a), "{f:?}");
        }
        assert_eq!(encode(Format::In, &v4).unwrap().len(), 16);
        assert_eq!(encode(Format::In6, &v6).unwrap().len(), 28);
        assert_eq!(to_string(&v6), "fi_sockaddr_in6://[::1]:9229");
        assert!(encode(Format::In, &v6).is_none());
        assert!(encode(Format::Native, &v4).is_none());
        // Malformed input decodes to nothing.
        assert_eq!(decode(Format::In, &[2]), None);
        assert_eq!(decode(Format::In, &encode(Format::In6, &v6).unwrap()), None);
        assert_eq!(decode(Format::Str, b"fi_sockaddr_in://nonsense\0"), None);
        assert_eq!(decode(Format::Native, &[0; 15]), None);
    }

    #[test]
    fn names_across_hosts_are_uplink_addresses() {
        use vfabric::proto::caps::HostAddrEntry;
        let (fabric, me, peer) = (0x7e57_u32, 1u16, 2u16);
        let ep = |host| FabricAddr::new(FabricAddr::node_of(fabric, host, 0), 3, 1);
        let v4 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // One host (no entries): the loopback address, or the interface asked for.
        note(fabric, me, Vec::new());
        assert_eq!(name_of(None, ep(me), 9), "127.0.0.1:9".parse().unwrap());
        assert_eq!(
            name_of(v4("192.0.2.7"), ep(me), 9),
            "192.0.2.7:9".parse().unwrap()
        );
        note(
            fabric,
            me,
            vec![
                HostAddrEntry {
                    host_id: me,
                    addr: "10.9.0.1".parse().unwrap(),
                },
                HostAddrEntry {
                    host_id: peer,
                    addr: "10.9.0.2".parse().unwrap(),
                },
            ],
        );
        // Several hosts: our endpoints by our uplink address (not loopback, which names each
        // reader's own host), unless created on one interface; a peer's by its.
        assert_eq!(name_of(None, ep(me), 9), "10.9.0.1:9".parse().unwrap());
        assert_eq!(
            name_of(v4("127.0.0.1"), ep(me), 9),
            "10.9.0.1:9".parse().unwrap()
        );
        assert_eq!(
            name_of(v4("192.0.2.7"), ep(me), 9),
            "192.0.2.7:9".parse().unwrap()
        );
        assert_eq!(
            name_of(v4("127.0.0.1"), ep(peer), 5),
            "10.9.0.2:5".parse().unwrap()
        );
        // In IPv6 form: the mapped address.
        let any6 = Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(
            name_of(any6, ep(peer), 5),
            "[::ffff:10.9.0.2]:5".parse().unwrap()
        );
        // Another fabric's endpoint: nothing known, the local rule.
        let other = FabricAddr::new(FabricAddr::node_of(fabric + 1, peer, 0), 3, 1);
        assert_eq!(name_of(None, other, 5), "127.0.0.1:5".parse().unwrap());
    }

    #[test]
    fn hosts_and_services() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("::1".parse().unwrap()));
        assert!(is_local("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_local("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_service("9228"), Some(9228));
        assert_eq!(parse_service("70000"), None);
        assert_eq!(lookup_host("[::1]", 5), vec!["[::1]:5".parse().unwrap()]);
        assert!(lookup_host("localhost", 5)
            .iter()
            .all(|a| is_local(a.ip()) && a.port() == 5));
    }
}
