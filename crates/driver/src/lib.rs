// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric`: the userspace driver of virtio-fabric.
//!
//! The driver reaches a device through a [`transport`]: as a vhost-user *frontend* in a host
//! process (like DPDK's virtio-user: one memfd shared with the device daemon `vfabricd`), or as
//! a userspace virtio-pci driver inside a guest (like DPDK's virtio PCI driver). Either way it
//! lays split virtqueues out in memory the device reaches and drives them itself. On top of the
//! rings it exposes a libfabric-shaped API:
//!
//! ```text
//! getinfo(&Hints) -> Vec<Info>
//! Fabric::open(&info) -> Fabric -> domain(&info) -> Domain
//! Domain -> alloc_buffer / cq_open / av_open / endpoint
//! Domain -> set_hmem_copy / register_hmem -> HmemRegion (device memory: Iov::hmem)
//! Endpoint -> bind_cq / bind_av / enable -> send*/recv*/tsend*/trecv*/..msg/cancel
//! Endpoint -> batch -> Batch (many posts, one device notification)
//! CompletionQueue -> read / read_into / readerr / sread / sread_into
//! ```
//!
//! Module map: [`memory`] (the region, its device addresses, allocator, bounce pool,
//! [`SharedBuf`]), `ring` (driver side of the split ring, EVENT_IDX), [`transport`] (the
//! `Transport` trait; vhost-user frontend; userspace virtio-pci), `request` (what a request in
//! flight carries: the opaque record the virtqueue keeps), `virtqueue`
//! (a ring plus its request slots and in-flight table), `control` (control-queue requests),
//! [`info`] (`getinfo`), [`domain`], [`endpoint`], [`cq`], [`av`], [`rma`] (memory registration,
//! RMA, atomics and remote-access events), [`pmem`] (persistent-memory regions), `external`
//! (sharing memory outside the domain's shared region with the device), [`hmem`] (device
//! memory through the application's [`HmemCopy`]), `lock` (the data path's spin lock).
//!
//! Contexts are plain `u64`s so a C provider can pass `void *context` through unchanged; flags
//! use libfabric's bit values ([`fi`]) so they can be passed through too.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use vfabric::{BindFlags, CqAttr, Domain, DomainAttr, EpAttr, Error, WaitMode};
//!
//! # fn main() -> vfabric::Result<()> {
//! // A domain straight from a socket path or "pci:0000:00:04.0" inside a guest
//! // (or: getinfo(&Hints) -> Fabric::open -> domain).
//! let domain = Domain::open("/run/vfabric/vfabric0.sock", DomainAttr::default())?;
//! let cq = domain.cq_open(CqAttr { size: 1024, wait: WaitMode::Blocking })?;
//! let av = domain.av_open()?;
//! let ep = domain.endpoint(EpAttr::default())?;
//! ep.bind_cq(&cq, BindFlags::BOTH)?;
//! ep.bind_av(&av)?;
//! ep.enable()?;
//!
//! // Exchange addresses out of band: print ours, parse the peer's.
//! println!("my address: {}", ep.name()); // vfab://5eed.1.0/3.1
//! let peer = av.insert_str("vfab://5eed.1.1/0.1")?; // or av.insert(FabricAddr) / insert_bytes
//!
//! let buf = domain.alloc_buffer(4096)?; // zero-copy buffer in the shared region
//! ep.recv_buf(&buf, 0..4096, 1)?;
//! ep.send(b"hello", peer, 2)?; // copied at post time
//!
//! let mut entries = Vec::new();
//! // Polled: read() drives progress and never blocks.
//! match cq.read(&mut entries, 16) {
//!     Ok(_) | Err(Error::Again) => {}
//!     Err(Error::Avail) => println!("{:?}", cq.readerr()),
//!     Err(e) => return Err(e),
//! }
//! // Blocking (CQ opened with WaitMode::Blocking): sread() sleeps on the call eventfds.
//! cq.sread(&mut entries, 16, Some(Duration::from_secs(1)))?;
//! # Ok(())
//! # }
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

use std::io;

pub use vfabric_proto as proto;
pub use vfabric_proto::{CapEntry, CapValue, FabricAddr, Status};

pub mod av;
pub mod commit;
mod control;
pub mod cq;
pub mod device_id;
pub mod domain;
pub mod endpoint;
mod external;
pub mod hmem;
pub mod info;
mod lock;
pub mod memory;
pub mod pmem;
mod request;
mod ring;
pub mod rma;
mod syscall;
pub mod transport;
#[doc(hidden)]
pub mod uffd;
mod virtqueue;

pub use av::{AddressVector, FiAddr, FI_ADDR_NOTAVAIL, FI_ADDR_UNSPEC};
pub use commit::{CommitEvent, CommitHandler};
pub use cq::{CompletionQueue, CqAttr, CqEntry, CqErrEntry, WaitMode};
pub use device_id::{announced_device_id, configured_device_id};
pub use domain::{DeviceCounters, Domain, DomainAttr, DomainStats, Fabric};
pub use endpoint::INJECT_CALL;
pub use endpoint::{
    AtomicMsg, Batch, BindFlags, Endpoint, EpAttr, EpType, Iov, Msg, RmaIov, RmaMsg, TaggedMsg,
};
pub use hmem::{HmemCopy, HmemIface, HmemRegion};
pub use info::{getinfo, Hints, Info, Limits, DEFAULT_SOCKET_DIR, FABRIC_NAME};
pub use memory::SharedBuf;
pub use pmem::{PmemBacking, PmemRegion};
pub use rma::{Counter, MemoryRegion, MrAttr};
pub use transport::{DeviceLocator, PciAddress};

/// libfabric constants (values from `rdma/fabric.h`, `rdma/fi_errno.h`, libfabric 1.17) so the
/// C provider can pass flags and error numbers through unchanged.
pub mod fi {
    // ---- capabilities / operation flags / completion flags (one 64-bit namespace) ----
    pub const MSG: u64 = 1 << 1;
    pub const RMA: u64 = 1 << 2;
    pub const TAGGED: u64 = 1 << 3;
    pub const ATOMIC: u64 = 1 << 4;
    pub const READ: u64 = 1 << 8;
    pub const WRITE: u64 = 1 << 9;
    pub const RECV: u64 = 1 << 10;
    pub const SEND: u64 = 1 << 11;
    pub const TRANSMIT: u64 = SEND;
    pub const REMOTE_READ: u64 = 1 << 12;
    pub const REMOTE_WRITE: u64 = 1 << 13;
    pub const MULTI_RECV: u64 = 1 << 16;
    pub const REMOTE_CQ_DATA: u64 = 1 << 17;
    pub const MORE: u64 = 1 << 18;
    pub const PEEK: u64 = 1 << 19;
    pub const TRIGGER: u64 = 1 << 20;
    pub const FENCE: u64 = 1 << 21;
    pub const COMPLETION: u64 = 1 << 24;
    pub const INJECT: u64 = 1 << 25;
    pub const INJECT_COMPLETE: u64 = 1 << 26;
    pub const TRANSMIT_COMPLETE: u64 = 1 << 27;
    pub const DELIVERY_COMPLETE: u64 = 1 << 28;
    pub const COMMIT_COMPLETE: u64 = 1 << 30;
    /// The proposed `FI_SAVE` (`fi_writemsg` flag, ofiwg/libfabric#5874; in no release): the
    /// write moves no data and brings the named ranges to its completion level (spec §6.17).
    pub const SAVE: u64 = 1 << 32;
    pub const MATCH_COMPLETE: u64 = 1 << 31;
    pub const RMA_EVENT: u64 = 1 << 56;
    pub const RMA_PMEM: u64 = 1 << 49;
    pub const LOCAL_COMM: u64 = 1 << 51;
    pub const REMOTE_COMM: u64 = 1 << 52;
    pub const SOURCE: u64 = 1 << 57;
    pub const DIRECTED_RECV: u64 = 1 << 59;
    /// Tagged receive flag (shares its value with `DIRECTED_RECV`, as in libfabric).
    pub const CLAIM: u64 = 1 << 59;
    /// Tagged receive flag (shares its value with `FI_NAMED_RX_CTX`, as in libfabric).
    pub const DISCARD: u64 = 1 << 58;
    /// `fi_ep_bind` flag: only operations posted with `COMPLETION` generate success entries.
    pub const SELECTIVE_COMPLETION: u64 = 1 << 59;

    /// `FI_ORDER_SAS`.
    pub const ORDER_SAS: u64 = 1 << 8;

    // ---- error numbers (positive; libfabric returns them negated) ----
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EINVAL: i32 = 22;
    pub const ENOSYS: i32 = 38;
    pub const ENOMSG: i32 = 42;
    pub const ENODATA: i32 = 61;
    pub const EMSGSIZE: i32 = 90;
    pub const EADDRINUSE: i32 = 98;
    pub const EADDRNOTAVAIL: i32 = 99;
    pub const ESHUTDOWN: i32 = 108;
    pub const ETIMEDOUT: i32 = 110;
    pub const EHOSTUNREACH: i32 = 113;
    pub const ECANCELED: i32 = 125;
    // libfabric's own numbers (`rdma/fi_errno.h`, FI_ERRNO_OFFSET = 256).
    pub const EOTHER: i32 = 256;
    pub const ETOOSMALL: i32 = 257;
    pub const EOPBADSTATE: i32 = 258;
    pub const EAVAIL: i32 = 259;
    pub const EBADFLAGS: i32 = 260;
    pub const ENOCQ: i32 = 263;
    pub const ETRUNC: i32 = 265;
    pub const ENOKEY: i32 = 266;
    pub const ENOAV: i32 = 267;
}

/// libfabric errno (positive) for a completion status, as docs/spec.md §6.7 maps them.
/// `NoResources` maps to `ENOMEM` here (control requests); data requests report `EAGAIN`
/// (see [`data_status_errno`]).
pub fn status_errno(status: Status) -> i32 {
    match status {
        Status::Ok => 0,
        Status::Invalid => fi::EINVAL,
        Status::Unsupported => fi::ENOSYS,
        Status::BadEndpoint => fi::EBADF,
        Status::AddrNotAvail => fi::EADDRNOTAVAIL,
        Status::Truncated => fi::ETRUNC,
        Status::Canceled => fi::ECANCELED,
        Status::Access => fi::EACCES,
        Status::NoResources => fi::ENOMEM,
        Status::Fault => fi::EFAULT,
        Status::PeerGone => fi::EHOSTUNREACH,
        Status::NoMessage => fi::ENOMSG,
        Status::TooLarge => fi::EMSGSIZE,
        Status::KeyInUse => fi::ENOKEY,
        Status::BadChain => fi::EIO,
        Status::HostUnreach => fi::EHOSTUNREACH,
        Status::CommitRefused => fi::EIO,
        Status::TimedOut => fi::ETIMEDOUT,
        Status::AddrInUse => fi::EADDRINUSE,
    }
}

/// libfabric errno of a *data* request's completion status (`NoResources` is transient there:
/// `EAGAIN`).
pub fn data_status_errno(status: Status) -> i32 {
    match status {
        Status::NoResources => fi::EAGAIN,
        s => status_errno(s),
    }
}

/// Driver errors. [`Error::errno`] gives the libfabric error number.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Resource temporarily unavailable (ring full, bounce memory exhausted, CQ empty):
    /// `-FI_EAGAIN`. Drive progress (read a CQ) and retry.
    #[error("resource temporarily unavailable, try again")]
    Again,
    /// An error completion is at the head of the CQ: call `readerr` (`-FI_EAVAIL`).
    #[error("error completion available")]
    Avail,
    #[error("timed out")]
    Timeout,
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The object is not in a state that allows the call (e.g. posting before `enable`,
    /// binding after it): `-FI_EOPBADSTATE`.
    #[error("operation not permitted in the current state: {0}")]
    BadState(String),
    /// No CQ bound for the direction of the operation: `-FI_ENOCQ`.
    #[error("no completion queue bound for this operation")]
    NoCq,
    /// No AV bound to the endpoint: `-FI_ENOAV`.
    #[error("no address vector bound to the endpoint")]
    NoAv,
    /// The device completed a request with a non-OK status.
    #[error("device: {0}")]
    Device(Status),
    /// Nothing matched (e.g. `getinfo` found no device fitting the hints).
    #[error("no data available")]
    NoData,
    /// Nothing to act on (e.g. `cancel` found no request with that context).
    #[error("not found: {0}")]
    NotFound(String),
    #[error("buffer too small: {needed} bytes needed")]
    TooSmall { needed: usize },
    #[error("message of {len} bytes exceeds max_msg_size {max}")]
    TooLarge { len: usize, max: u64 },
    #[error("shared memory region too small ({requested} bytes requested): raise VFABRIC_MEM_MB")]
    OutOfMemory { requested: usize },
    #[error("transport: {0}")]
    Transport(String),
    /// The device serves another guest (one guest per device): it did not take this
    /// connection within `waited`. `-FI_EBUSY`.
    #[error(
        "device {} is busy: it serves another guest (one guest per device socket) and did not \
         accept this one within {waited:?}",
        path.display()
    )]
    Busy {
        path: std::path::PathBuf,
        waited: std::time::Duration,
    },
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The object (or the device connection) is closed.
    #[error("closed")]
    Closed,
    /// The address belongs to another fabric than the device's: it names no endpoint here,
    /// whatever its host, device and endpoint numbers (`-FI_EADDRNOTAVAIL`).
    #[error("address {addr} belongs to fabric {:x}, this device is on fabric {ours:x}", addr.fabric())]
    ForeignFabric { addr: FabricAddr, ours: u32 },
}

impl Error {
    /// libfabric error number (positive; the C face returns it negated).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Again => fi::EAGAIN,
            Error::Avail => fi::EAVAIL,
            Error::Timeout => fi::ETIMEDOUT,
            Error::Unsupported(_) => fi::ENOSYS,
            Error::InvalidArgument(_) => fi::EINVAL,
            Error::BadState(_) => fi::EOPBADSTATE,
            Error::NoCq => fi::ENOCQ,
            Error::NoAv => fi::ENOAV,
            Error::Device(s) => status_errno(*s),
            Error::NoData => fi::ENODATA,
            Error::NotFound(_) => fi::ENOENT,
            Error::TooSmall { .. } => fi::ETOOSMALL,
            Error::TooLarge { .. } => fi::EMSGSIZE,
            Error::OutOfMemory { .. } => fi::ENOMEM,
            Error::Transport(_) => fi::EIO,
            Error::Busy { .. } => fi::EBUSY,
            Error::Io(e) => e.raw_os_error().unwrap_or(fi::EIO),
            Error::Closed => fi::ESHUTDOWN,
            Error::ForeignFabric { .. } => fi::EADDRNOTAVAIL,
        }
    }
}

impl From<proto::ProtoError> for Error {
    fn from(e: proto::ProtoError) -> Self {
        Error::Transport(format!("protocol: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_objects_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Domain>();
        check::<Fabric>();
        check::<Endpoint>();
        check::<CompletionQueue>();
        check::<AddressVector>();
        check::<SharedBuf>();
        check::<Counter>();
        check::<MemoryRegion>();
        check::<Info>();
        check::<Error>();
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(status_errno(Status::Truncated), 265);
        assert_eq!(status_errno(Status::Canceled), 125);
        assert_eq!(status_errno(Status::Access), 13);
        assert_eq!(status_errno(Status::AddrNotAvail), 99);
        assert_eq!(status_errno(Status::PeerGone), 113);
        assert_eq!(status_errno(Status::NoMessage), 42);
        assert_eq!(status_errno(Status::TooLarge), 90);
        assert_eq!(status_errno(Status::Unsupported), 38);
        assert_eq!(status_errno(Status::Invalid), 22);
        assert_eq!(status_errno(Status::NoResources), 12);
        assert_eq!(data_status_errno(Status::NoResources), 11);
        assert_eq!(status_errno(Status::KeyInUse), 266);
        assert_eq!(status_errno(Status::BadChain), 5);
        assert_eq!(status_errno(Status::HostUnreach), 113);
        assert_eq!(Error::TooSmall { needed: 16 }.errno(), 257);
        assert_eq!(Error::BadState("x".into()).errno(), 258);
        assert_eq!(Error::NoCq.errno(), 263);
        assert_eq!(status_errno(Status::Fault), 14);
        assert_eq!(status_errno(Status::BadEndpoint), 9);
        assert_eq!(Error::Again.errno(), 11);
        assert_eq!(Error::Avail.errno(), 259);
        assert_eq!(Error::Device(Status::Truncated).errno(), 265);
    }
}
