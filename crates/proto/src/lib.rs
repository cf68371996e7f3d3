// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-fabric wire format, shared by the device (`vfabricd`) and the driver (`vfabric`).
//!
//! Everything here is specified in `docs/spec.md`. Wire structs are `#[repr(C)]` with explicit
//! little-endian fields ([`Le16`], [`Le32`], [`Le64`]) and implement [`ByteValued`] so both sides
//! read and write them straight from guest memory. Parsing never panics: it returns
//! [`ProtoError`].

use std::fmt;

pub use vm_memory::{ByteValued, Le16, Le32, Le64};

pub mod caps;
pub use caps::{CapEntry, CapValue, CapsBuilder, CapsParser};

/// Provisional virtio device ID of the fabric device (free range 50–63, PCI-expressible): the
/// id to register with the virtio technical committee, and the default of `vfabricd
/// --device-id` and of drivers ([`DEVICE_ID_ENV`]). See docs/spec.md §1.
pub const VIRTIO_ID_FABRIC: u32 = 56;

/// Stand-in device ID for running the device behind QEMU's generic vhost-user device:
/// QEMU 8.2–11.1 abort on a virtio id missing from their name table, 56 among them. 38 is
/// QEMU's "virtio-param-serv", which no Linux driver claims (PCI id 1af4:1066). Daemon and
/// drivers must then both be configured with it (`vfabricd --device-id 38`,
/// `VFABRIC_DEVICE_ID=38`).
pub const VIRTIO_ID_FABRIC_QEMU_STANDIN: u32 = 38;

/// Environment variable naming the virtio device id a driver binds to (decimal or 0x-hex,
/// 1..=[`MAX_PCI_VIRTIO_ID`]; default [`VIRTIO_ID_FABRIC`]).
pub const DEVICE_ID_ENV: &str = "VFABRIC_DEVICE_ID";

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;

/// Largest virtio device id a modern virtio-pci device can carry (PCI device ids
/// 0x1040..=0x107f).
pub const MAX_PCI_VIRTIO_ID: u32 = 0x3f;

/// The modern virtio-pci device id (`0x1040 + id`) of virtio device id `virtio_id`, `None`
/// if virtio-pci cannot express it.
pub fn virtio_pci_device_id(virtio_id: u32) -> Option<u16> {
    match virtio_id {
        1..=MAX_PCI_VIRTIO_ID => u16::try_from(0x1040 + virtio_id).ok(),
        _ => None,
    }
}

/// Parse a virtio device id as configured (`vfabricd --device-id`, [`DEVICE_ID_ENV`]):
/// decimal or 0x-hex, 1..=[`MAX_PCI_VIRTIO_ID`] (the ids virtio-pci can express).
pub fn parse_device_id(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    };
    match parsed {
        Ok(id) if virtio_pci_device_id(id).is_some() => Ok(id),
        _ => Err(format!(
            "virtio device id {s:?}: expected 1..={MAX_PCI_VIRTIO_ID} (decimal or 0x-hex; \
             virtio-pci ids end at 0x107f = 0x1040 + {MAX_PCI_VIRTIO_ID})"
        )),
    }
}

/// Vendor id this implementation reports by default (ASCII "VF").
pub const VENDOR_ID_VFABRIC: u32 = 0x5646;

// ---------------------------------------------------------------------------------------------
// Feature bits
// ---------------------------------------------------------------------------------------------

/// Untagged messages (SEND/RECV, SENDDATA). Always offered.
pub const VIRTIO_FABRIC_F_MSG: u32 = 0;
/// Tagged messages (TSEND/TRECV) with ignore bits, PEEK and CLAIM.
pub const VIRTIO_FABRIC_F_TAGGED: u32 = 1;
/// One-sided RMA (read, write, writedata) and memory registration with remote keys.
pub const VIRTIO_FABRIC_F_RMA: u32 = 2;
/// Remote atomics.
pub const VIRTIO_FABRIC_F_ATOMIC: u32 = 3;
/// RMA to persistent memory: FLUSH and COMMIT_COMPLETE.
pub const VIRTIO_FABRIC_F_RMA_PMEM: u32 = 4;
/// More than one queue pair (`num_queue_pairs` in config space is valid).
pub const VIRTIO_FABRIC_F_MQ: u32 = 5;
/// QUERY_CAPS may carry vendor-specific attributes.
pub const VIRTIO_FABRIC_F_VENDOR_CAPS: u32 = 6;
/// Remote CQ data (SENDDATA, WRITEDATA) is delivered to the target.
pub const VIRTIO_FABRIC_F_REMOTE_CQ_DATA: u32 = 7;
/// Plain receives (RECV, TRECV without PEEK/CLAIM/DISCARD, on RDM and MSG endpoints) may be
/// made available without a notification: the device may keep RX notifications suppressed
/// while it holds no unexpected message and takes such receives when it next needs them. The
/// driver notifies for every other RX request whatever the suppression says.
pub const VIRTIO_FABRIC_F_LAZY_RX: u32 = 8;

/// Generic virtio feature bits used by the fabric device.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// vhost-user: the backend speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Feature bit as mask.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Feature bits a driver MUST accept for the device to operate.
pub const REQUIRED_FEATURES: u64 = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_FABRIC_F_MSG);

/// Human-readable names of the feature bits (for `vfabric info`).
pub fn feature_names(features: u64) -> Vec<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_FABRIC_F_MSG, "MSG"),
        (VIRTIO_FABRIC_F_TAGGED, "TAGGED"),
        (VIRTIO_FABRIC_F_RMA, "RMA"),
        (VIRTIO_FABRIC_F_ATOMIC, "ATOMIC"),
        (VIRTIO_FABRIC_F_RMA_PMEM, "RMA_PMEM"),
        (VIRTIO_FABRIC_F_MQ, "MQ"),
        (VIRTIO_FABRIC_F_VENDOR_CAPS, "VENDOR_CAPS"),
        (VIRTIO_FABRIC_F_REMOTE_CQ_DATA, "REMOTE_CQ_DATA"),
        (VIRTIO_FABRIC_F_LAZY_RX, "LAZY_RX"),
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (
            VHOST_USER_F_PROTOCOL_FEATURES,
            "VHOST_USER_PROTOCOL_FEATURES",
        ),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| features & bit(*b) != 0)
        .map(|(_, n)| *n)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Config space
// ---------------------------------------------------------------------------------------------

/// Device configuration space (init-time parameters only). Little-endian, 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FabricConfig {
    /// Queue pairs (each a TX and an RX virtqueue) after the control queue.
    pub num_queue_pairs: Le32,
    /// Endpoints this device lets the driver open.
    pub max_endpoints: Le32,
    /// Memory regions this device lets the driver register.
    pub max_mrs: Le32,
    /// Largest ring size the device accepts for any virtqueue.
    pub max_queue_size: Le32,
    /// Largest message (or RMA transfer) in bytes.
    pub max_msg_size: Le64,
    /// Bytes the driver may pass with FLAG_INJECT (the device completes them at once).
    pub inject_size: Le32,
    /// PCI-style vendor id of the implementation behind the device.
    pub vendor_id: Le32,
    /// The device's node address on the fabric (endpoint addresses extend it).
    pub node_addr: Le64,
    /// Largest number of data descriptors in one request chain.
    pub max_sge: Le32,
    /// Identity of the fabric the device belongs to (also bits 63..32 of `node_addr`): addresses
    /// of another fabric never name an endpoint of this one.
    pub fabric_id: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (all fields naturally aligned, size 48).
unsafe impl ByteValued for FabricConfig {}

/// Virtqueue index of the control queue.
pub const CONTROL_QUEUE: u16 = 0;
/// Virtqueue index of the TX queue of queue pair `qp`.
pub const fn tx_queue(qp: u16) -> u16 {
    1 + 2 * qp
}
/// Virtqueue index of the RX queue of queue pair `qp`.
pub const fn rx_queue(qp: u16) -> u16 {
    2 + 2 * qp
}
/// Kind of a virtqueue by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    Control,
    Tx(u16),
    Rx(u16),
}
pub const fn queue_kind(index: u16) -> QueueKind {
    if index == CONTROL_QUEUE {
        QueueKind::Control
    } else if index % 2 == 1 {
        QueueKind::Tx((index - 1) / 2)
    } else {
        QueueKind::Rx((index - 2) / 2)
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// An endpoint's address on the fabric: 16 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireAddr {
    /// Node (device) address: fabric id in bits 63..32, host id in bits 31..16, device index in
    /// bits 15..0 ([`FabricAddr::node_of`]).
    pub node: Le64,
    /// Endpoint id within the device.
    pub ep: Le32,
    /// Generation of the endpoint id: a closed and reopened id never matches an old address.
    pub generation: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl ByteValued for WireAddr {}

/// Decoded endpoint address. Laid out as [`WireAddr`] (see [`Request`]).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FabricAddr {
    pub node: u64,
    pub ep: u32,
    pub generation: u32,
}

/// Length of an encoded address (`fi_getname` length).
pub const ADDR_LEN: usize = 16;

impl FabricAddr {
    pub const fn new(node: u64, ep: u32, generation: u32) -> Self {
        Self {
            node,
            ep,
            generation,
        }
    }
    /// Node address of device `device` of host `host` on fabric `fabric`.
    pub const fn node_of(fabric: u32, host: u16, device: u16) -> u64 {
        ((fabric as u64) << 32) | ((host as u64) << 16) | device as u64
    }
    /// The fabric this address belongs to.
    pub const fn fabric(&self) -> u32 {
        (self.node >> 32) as u32
    }
    pub const fn host(&self) -> u16 {
        (self.node >> 16) as u16
    }
    pub const fn device(&self) -> u16 {
        self.node as u16
    }
    pub fn to_wire(self) -> WireAddr {
        WireAddr {
            node: self.node.into(),
            ep: self.ep.into(),
            generation: self.generation.into(),
        }
    }
    pub fn from_wire(w: &WireAddr) -> Self {
        Self::new(w.node.into(), w.ep.into(), w.generation.into())
    }
    pub fn to_bytes(self) -> [u8; ADDR_LEN] {
        let mut b = [0u8; ADDR_LEN];
        b.copy_from_slice(self.to_wire().as_slice());
        b
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, ProtoError> {
        let w = WireAddr::from_slice(b.get(..ADDR_LEN).ok_or(ProtoError::Short {
            what: "address",
            need: ADDR_LEN,
            got: b.len(),
        })?)
        .ok_or(ProtoError::Short {
            what: "address",
            need: ADDR_LEN,
            got: b.len(),
        })?;
        Ok(Self::from_wire(w))
    }
}

/// Printable form: `vfab://FABRIC.HOST.DEVICE/EP.GEN` (all hex except EP and GEN in decimal).
impl fmt::Display for FabricAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vfab://{:x}.{:x}.{:x}/{}.{}",
            self.fabric(),
            self.host(),
            self.device(),
            self.ep,
            self.generation
        )
    }
}
impl fmt::Debug for FabricAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for FabricAddr {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = || ProtoError::BadAddress(s.to_string());
        let rest = s.strip_prefix("vfab://").ok_or_else(bad)?;
        let (node, ep) = rest.split_once('/').ok_or_else(bad)?;
        let mut parts = node.split('.');
        let (Some(fabric), Some(host), Some(dev), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (epid, gen) = ep.split_once('.').ok_or_else(bad)?;
        let fabric = u32::from_str_radix(fabric, 16).map_err(|_| bad())?;
        let host = u16::from_str_radix(host, 16).map_err(|_| bad())?;
        let dev = u16::from_str_radix(dev, 16).map_err(|_| bad())?;
        Ok(Self::new(
            Self::node_of(fabric, host, dev),
            epid.parse().map_err(|_| bad())?,
            gen.parse().map_err(|_| bad())?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Opcodes. Control opcodes are valid only on the control queue, TX opcodes only on a TX queue,
/// RX opcodes only on an RX queue.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    // control queue
    QueryCaps = 0x0001,
    EpOpen = 0x0002,
    EpClose = 0x0003,
    MrReg = 0x0004,
    MrDereg = 0x0005,
    Cancel = 0x0006,
    AddrCheck = 0x0007,
    /// The target driver's verdict on a commit event (spec §6.17.3).
    CommitReply = 0x0008,
    SvcBind = 0x0009,
    SvcResolve = 0x000a,
    // TX queue
    Send = 0x0101,
    TSend = 0x0102,
    RmaWrite = 0x0201,
    RmaRead = 0x0202,
    Atomic = 0x0301,
    FetchAtomic = 0x0302,
    CompareAtomic = 0x0303,
    Flush = 0x0401,
    // RX queue
    Recv = 0x0181,
    TRecv = 0x0182,
    MrEvent = 0x0183,
    /// Receives the commit events of regions registered with `mr_flags::COMMIT_EVENT`.
    CommitEvent = 0x0184,
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Self> {
        use Opcode::*;
        Some(match v {
            0x0001 => QueryCaps,
            0x0002 => EpOpen,
            0x0003 => EpClose,
            0x0004 => MrReg,
            0x0005 => MrDereg,
            0x0006 => Cancel,
            0x0007 => AddrCheck,
            0x0008 => CommitReply,
            0x0009 => SvcBind,
            0x000a => SvcResolve,
            0x0101 => Send,
            0x0102 => TSend,
            0x0201 => RmaWrite,
            0x0202 => RmaRead,
            0x0301 => Atomic,
            0x0302 => FetchAtomic,
            0x0303 => CompareAtomic,
            0x0401 => Flush,
            0x0181 => Recv,
            0x0182 => TRecv,
            0x0183 => MrEvent,
            0x0184 => CommitEvent,
            _ => return None,
        })
    }
    /// Which kind of queue may carry this opcode.
    pub const fn queue_class(self) -> QueueClass {
        match self as u16 {
            0x0001..=0x00ff => QueueClass::Control,
            0x0181..=0x01ff => QueueClass::Rx,
            _ => QueueClass::Tx,
        }
    }
    /// Feature bit that must be negotiated before this opcode is used.
    pub const fn required_feature(self) -> u32 {
        use Opcode::*;
        match self {
            TSend | TRecv => VIRTIO_FABRIC_F_TAGGED,
            MrReg | MrDereg | RmaWrite | RmaRead | MrEvent => VIRTIO_FABRIC_F_RMA,
            Atomic | FetchAtomic | CompareAtomic => VIRTIO_FABRIC_F_ATOMIC,
            Flush | CommitEvent | CommitReply => VIRTIO_FABRIC_F_RMA_PMEM,
            _ => VIRTIO_FABRIC_F_MSG,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueClass {
    Control,
    Tx,
    Rx,
}

/// What a device checks of an opcode, found by its wire value at once ([`OpInfo::of`]): a
/// header is checked with one table lookup instead of a `match` per property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpInfo {
    pub opcode: Opcode,
    /// [`Opcode::queue_class`].
    pub class: QueueClass,
    /// [`allowed_flags`].
    pub allowed: u64,
    /// [`Opcode::required_feature`], as a feature mask ([`bit`]).
    pub features: u64,
}

/// Every opcode.
const OPCODES: [Opcode; 22] = {
    use Opcode::*;
    [
        QueryCaps,
        EpOpen,
        EpClose,
        MrReg,
        MrDereg,
        Cancel,
        AddrCheck,
        CommitReply,
        SvcBind,
        SvcResolve,
        Send,
        TSend,
        RmaWrite,
        RmaRead,
        Atomic,
        FetchAtomic,
        CompareAtomic,
        Flush,
        Recv,
        TRecv,
        MrEvent,
        CommitEvent,
    ]
};

/// The slot of wire opcode `raw` in [`OP_SLOTS`]: opcodes are `0xHLL` with `H` (`raw >> 7`)
/// below 9 and `LL & 0x7f` below 16, so `(raw >> 7, raw & 0xf)` is a key of 144 values.
const fn op_slot(raw: u16) -> Option<usize> {
    if raw >> 7 < 9 && raw & 0x70 == 0 {
        Some(((raw >> 7) << 4 | (raw & 0xf)) as usize)
    } else {
        None
    }
}

/// [`OpInfo`] of each opcode by [`op_slot`] (`None`: no opcode): one load finds it.
static OP_BY_SLOT: [Option<OpInfo>; 144] = {
    let mut t: [Option<OpInfo>; 144] = [None; 144];
    let mut i = 0;
    while i < OPCODES.len() {
        let op = OPCODES[i];
        match op_slot(op as u16) {
            Some(s) if t[s].is_none() => {
                t[s] = Some(OpInfo {
                    opcode: op,
                    class: op.queue_class(),
                    allowed: allowed_flags(op),
                    features: bit(op.required_feature()),
                })
            }
            // Two opcodes in one slot, or one outside the key: the build fails.
            _ => panic!("opcode outside the slot key"),
        }
        i += 1;
    }
    t
};

impl OpInfo {
    /// The opcode with wire value `raw`, if there is one. (`op_slot` is one-to-one on the
    /// values it keys, so the opcode found has the wire value `raw`.)
    #[inline]
    pub fn of(raw: u16) -> Option<&'static OpInfo> {
        OP_BY_SLOT.get(op_slot(raw)?)?.as_ref()
    }
}

/// Request flags (`ReqHeader::flags`).
pub mod flags {
    /// Deliver `ReqHeader::data` as remote CQ data (SENDDATA / WRITEDATA).
    pub const REMOTE_CQ_DATA: u64 = 1 << 0;
    /// The payload was copied by the driver; the device may complete as soon as it holds it.
    pub const INJECT: u64 = 1 << 1;
    /// Complete once the device holds the data (libfabric FI_INJECT_COMPLETE).
    pub const INJECT_COMPLETE: u64 = 1 << 2;
    /// Complete once the target's device holds the data (FI_TRANSMIT_COMPLETE). Default.
    pub const TRANSMIT_COMPLETE: u64 = 1 << 3;
    /// Complete once the data is placed in the target buffer (FI_DELIVERY_COMPLETE).
    pub const DELIVERY_COMPLETE: u64 = 1 << 4;
    /// Complete once the data is durable at the target (FI_COMMIT_COMPLETE).
    pub const COMMIT_COMPLETE: u64 = 1 << 5;
    /// Start only after earlier requests of this endpoint to the same peer complete (FI_FENCE).
    pub const FENCE: u64 = 1 << 6;
    /// TRECV: report a matching unexpected message without consuming it (FI_PEEK).
    pub const PEEK: u64 = 1 << 7;
    /// TRECV: with PEEK, reserve the message for a later CLAIM; alone, receive a claimed message.
    pub const CLAIM: u64 = 1 << 8;
    /// TRECV with CLAIM: drop the claimed message instead of receiving it; with PEEK: drop the
    /// message the peek finds (FI_DISCARD).
    pub const DISCARD: u64 = 1 << 9;
    /// RECV: one buffer takes several messages (FI_MULTI_RECV).
    pub const MULTI_RECV: u64 = 1 << 10;
    /// RMA write that moves no data: save earlier writes to the region (proposed FI_SAVE).
    pub const SAVE: u64 = 1 << 11;
    /// RECV/TRECV: receive only from `ReqHeader::peer` (FI_DIRECTED_RECV).
    pub const DIRECTED: u64 = 1 << 12;

    /// All flags this version of the protocol defines.
    pub const ALL: u64 = (1 << 13) - 1;
    /// The completion levels; at most one may be set.
    pub const COMPLETION_LEVELS: u64 =
        INJECT_COMPLETE | TRANSMIT_COMPLETE | DELIVERY_COMPLETE | COMMIT_COMPLETE;
}

/// Fixed request header: the first, driver-readable, part of every request chain. 96 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqHeader {
    pub opcode: Le16,
    pub reserved0: Le16,
    /// Local endpoint the request acts for (ignored by QUERY_CAPS, EP_OPEN, MR_REG, MR_DEREG and
    /// ADDR_CHECK).
    pub ep: Le32,
    pub flags: Le64,
    /// Opaque driver value, echoed in the completion.
    pub cookie: Le64,
    /// Destination (TX), source filter with FLAG_DIRECTED (RX) or address to check (ADDR_CHECK).
    pub peer: WireAddr,
    pub tag: Le64,
    pub ignore: Le64,
    /// Remote CQ data, atomic operand, or opcode-specific parameter (CANCEL: cookie to cancel).
    pub data: Le64,
    pub remote_addr: Le64,
    pub remote_key: Le64,
    pub atomic_op: u8,
    pub datatype: u8,
    pub reserved1: Le16,
    /// Element count for atomics; RMA scatter entries otherwise.
    pub count: Le32,
    /// Compare operand for COMPARE_ATOMIC; access flags for MR_REG.
    pub compare: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (size 96, every field naturally aligned).
unsafe impl ByteValued for ReqHeader {}
pub const REQ_HEADER_LEN: usize = std::mem::size_of::<ReqHeader>();

/// Device-writable completion: the last descriptor of every request chain. 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// `Status` as u32.
    pub status: Le32,
    /// `comp_flags::*`.
    pub flags: Le32,
    /// The request's cookie.
    pub cookie: Le64,
    /// Bytes transferred (written to the receive buffer, or read).
    pub len: Le64,
    /// Remote CQ data (with comp_flags::REMOTE_CQ_DATA); EP_OPEN: the endpoint id.
    pub data: Le64,
    /// Tag of the received message.
    pub tag: Le64,
    /// Source of a received message; EP_OPEN: the endpoint's full address.
    pub src: WireAddr,
    /// With status TRUNCATED: bytes that did not fit (libfabric `olen`).
    pub olen: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl ByteValued for Completion {}
pub const COMPLETION_LEN: usize = std::mem::size_of::<Completion>();

/// Completion flags.
pub mod comp_flags {
    /// `Completion::data` holds remote CQ data.
    pub const REMOTE_CQ_DATA: u32 = 1 << 0;
    /// The completion is for a tagged receive.
    pub const TAGGED: u32 = 1 << 1;
    /// PEEK/CLAIM found a message; `len` and `tag` describe it.
    pub const CLAIMED: u32 = 1 << 2;
    /// MULTI_RECV: the buffer is released (FI_MULTI_RECV).
    pub const MULTI_RECV_DONE: u32 = 1 << 3;
    /// A RECV reports a remote write (writedata) instead of a message; an MR_EVENT reports
    /// remote writes to a region.
    pub const REMOTE_WRITE: u32 = 1 << 4;
    /// An MR_EVENT reports remote reads of a region.
    pub const REMOTE_READ: u32 = 1 << 5;
}

/// MR_REG registration flags (carried in `ReqHeader::compare`).
pub mod mr_flags {
    /// Target of RMA_READ and of fetching atomics' reads (FI_REMOTE_READ).
    pub const REMOTE_READ: u64 = 1 << 0;
    /// Target of RMA_WRITE and atomics (FI_REMOTE_WRITE).
    pub const REMOTE_WRITE: u64 = 1 << 1;
    /// Persistent memory region (FI_RMA_PMEM).
    pub const PMEM: u64 = 1 << 2;
    /// The device chooses the key (FI_MR_PROV_KEY).
    pub const PROV_KEY: u64 = 1 << 3;
    /// Remote accesses to the region are reported with MR_EVENT completions (FI_RMA_EVENT).
    pub const RMA_EVENT: u64 = 1 << 4;
    /// The segments are virtual addresses of the frontend process itself, which the device
    /// reaches by cross-memory attach rather than through guest memory. Only for a frontend
    /// whose address space is the guest address space (a userspace driver); spec §6.8.4.
    pub const PROCESS_MEMORY: u64 = 1 << 5;
    /// With PMEM: commits to the region wait for the target driver's verdict (a COMMIT_EVENT
    /// round trip, spec §6.17.3).
    pub const COMMIT_EVENT: u64 = 1 << 6;
    /// Every defined flag.
    pub const ALL: u64 = (1 << 7) - 1;
}

/// MR_REG payload element: one guest memory segment of a region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSeg {
    pub addr: Le64,
    pub len: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl ByteValued for MemSeg {}
pub const MEM_SEG_LEN: usize = std::mem::size_of::<MemSeg>();

/// RMA scatter entry (`struct virtio_fabric_rma_iov`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmaIov {
    pub addr: Le64,
    pub len: Le64,
    pub key: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding.
unsafe impl ByteValued for RmaIov {}
pub const RMA_IOV_LEN: usize = std::mem::size_of::<RmaIov>();

/// The record a COMMIT_EVENT's data area receives (spec §6.17.3): this header, then `count`
/// [`RmaIov`] ranges. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitEventRecord {
    /// The event's id: COMMIT_REPLY names it in `data`.
    pub event_id: Le64,
    /// The FLUSH's request flags (SAVE, COMMIT_COMPLETE, FENCE, REMOTE_CQ_DATA).
    pub flags: Le64,
    /// The initiator.
    pub initiator: WireAddr,
    /// The target endpoint (an endpoint ID of the driver's device).
    pub ep: Le32,
    /// Ranges after this header.
    pub count: Le32,
    /// Remote CQ data the FLUSH carried (with REMOTE_CQ_DATA), else 0.
    pub data: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (size 48, every field naturally aligned).
unsafe impl ByteValued for CommitEventRecord {}
pub const COMMIT_EVENT_RECORD_LEN: usize = std::mem::size_of::<CommitEventRecord>();

/// Smallest COMMIT_EVENT data area a device with `max_sge` accepts: a record with `max_sge`
/// ranges.
pub const fn commit_event_area_len(max_sge: u32) -> u64 {
    COMMIT_EVENT_RECORD_LEN as u64 + max_sge as u64 * RMA_IOV_LEN as u64
}

/// A commit event parsed from a COMMIT_EVENT data area (driver side; the device is trusted
/// no more than it must be: lengths are checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitEventMsg {
    pub event_id: u64,
    pub flags: u64,
    pub initiator: FabricAddr,
    pub ep: u32,
    pub data: u64,
    pub ranges: Vec<RmaIov>,
}

impl CommitEventMsg {
    /// Parse the first `len` bytes of a data area.
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        let short = |need| ProtoError::Short {
            what: "commit event",
            need,
            got: b.len(),
        };
        let h = b
            .get(..COMMIT_EVENT_RECORD_LEN)
            .and_then(CommitEventRecord::from_slice)
            .ok_or(short(COMMIT_EVENT_RECORD_LEN))?;
        let count = u32::from(h.count) as usize;
        let need = count
            .checked_mul(RMA_IOV_LEN)
            .and_then(|l| l.checked_add(COMMIT_EVENT_RECORD_LEN))
            .ok_or(short(usize::MAX))?;
        let list = b.get(COMMIT_EVENT_RECORD_LEN..need).ok_or(short(need))?;
        Ok(Self {
            event_id: h.event_id.into(),
            flags: h.flags.into(),
            initiator: FabricAddr::from_wire(&h.initiator),
            ep: h.ep.into(),
            data: h.data.into(),
            ranges: list
                .chunks_exact(RMA_IOV_LEN)
                .filter_map(RmaIov::from_slice)
                .copied()
                .collect(),
        })
    }

    /// The wire form (header then ranges).
    pub fn to_bytes(&self) -> Vec<u8> {
        let h = CommitEventRecord {
            event_id: self.event_id.into(),
            flags: self.flags.into(),
            initiator: self.initiator.to_wire(),
            ep: self.ep.into(),
            count: (self.ranges.len() as u32).into(),
            data: self.data.into(),
        };
        let mut v = h.as_slice().to_vec();
        for r in &self.ranges {
            v.extend_from_slice(r.as_slice());
        }
        v
    }
}

/// libfabric `enum fi_op` values (spec §6.11).
pub mod atomic_op {
    pub const MIN: u8 = 0;
    pub const MAX: u8 = 1;
    pub const SUM: u8 = 2;
    pub const PROD: u8 = 3;
    pub const LOR: u8 = 4;
    pub const LAND: u8 = 5;
    pub const BOR: u8 = 6;
    pub const BAND: u8 = 7;
    pub const LXOR: u8 = 8;
    pub const BXOR: u8 = 9;
    pub const ATOMIC_READ: u8 = 10;
    pub const ATOMIC_WRITE: u8 = 11;
    pub const CSWAP: u8 = 12;
    pub const CSWAP_NE: u8 = 13;
    pub const CSWAP_LE: u8 = 14;
    pub const CSWAP_LT: u8 = 15;
    pub const CSWAP_GE: u8 = 16;
    pub const CSWAP_GT: u8 = 17;
    pub const MSWAP: u8 = 18;
    /// Number of defined operations.
    pub const COUNT: u8 = 19;

    /// Whether `op` is valid for `opcode` (spec §6.11 table).
    pub fn allowed(opcode: super::Opcode, op: u8) -> bool {
        use super::Opcode::*;
        match opcode {
            Atomic => op <= BXOR || op == ATOMIC_WRITE,
            FetchAtomic => op <= ATOMIC_WRITE,
            CompareAtomic => (CSWAP..=MSWAP).contains(&op),
            _ => false,
        }
    }
}

/// libfabric `enum fi_datatype` values (spec §6.11).
pub mod datatype {
    pub const INT8: u8 = 0;
    pub const UINT8: u8 = 1;
    pub const INT16: u8 = 2;
    pub const UINT16: u8 = 3;
    pub const INT32: u8 = 4;
    pub const UINT32: u8 = 5;
    pub const INT64: u8 = 6;
    pub const UINT64: u8 = 7;
    pub const FLOAT: u8 = 8;
    pub const DOUBLE: u8 = 9;
    pub const FLOAT_COMPLEX: u8 = 10;
    pub const DOUBLE_COMPLEX: u8 = 11;
    pub const LONG_DOUBLE: u8 = 12;
    pub const LONG_DOUBLE_COMPLEX: u8 = 13;
    pub const INT128: u8 = 14;
    pub const UINT128: u8 = 15;
    /// Number of defined datatypes.
    pub const COUNT: u8 = 16;

    /// Element size in bytes, `None` for an unknown datatype.
    pub const fn size(dt: u8) -> Option<usize> {
        Some(match dt {
            INT8 | UINT8 => 1,
            INT16 | UINT16 => 2,
            INT32 | UINT32 | FLOAT => 4,
            INT64 | UINT64 | DOUBLE | FLOAT_COMPLEX => 8,
            DOUBLE_COMPLEX | LONG_DOUBLE | INT128 | UINT128 => 16,
            LONG_DOUBLE_COMPLEX => 32,
            _ => return None,
        })
    }

    /// Whether `dt` is a floating-point type.
    pub const fn is_float(dt: u8) -> bool {
        matches!(dt, FLOAT | DOUBLE)
    }
}

/// Completion status codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    /// Malformed request: bad header length, reserved bits, bad flag combination.
    Invalid = 1,
    /// Unknown opcode or one whose feature was not negotiated.
    Unsupported = 2,
    /// Endpoint id not open on this device.
    BadEndpoint = 3,
    /// Destination address names no open endpoint.
    AddrNotAvail = 4,
    /// Receive buffer shorter than the message; `len` = bytes placed, `olen` = bytes lost.
    Truncated = 5,
    /// Cancelled by CANCEL, endpoint close or device reset.
    Canceled = 6,
    /// Protection: key, range or access rights.
    Access = 7,
    /// Device resource limit reached (endpoints, MRs, held bytes).
    NoResources = 8,
    /// A descriptor points outside guest memory or a length overflows.
    Fault = 9,
    /// The peer disconnected with the operation in flight.
    PeerGone = 10,
    /// PEEK found no matching message.
    NoMessage = 11,
    /// Message larger than `max_msg_size`.
    TooLarge = 12,
    /// The requested key is taken.
    KeyInUse = 13,
    /// Descriptor chain shape wrong for the opcode (e.g. writable before readable, no completion).
    BadChain = 14,
    /// The target's host is unreachable: its daemon is down, restarted or not answering within
    /// the peer timeout (several hosts only).
    HostUnreach = 15,
    /// The target's commit handler refused the commit; the completion's `data` holds its value.
    CommitRefused = 16,
    /// The target driver did not answer a commit event within the device's commit timeout.
    TimedOut = 17,
    /// SVC_BIND: the service is bound to another open endpoint.
    AddrInUse = 18,
}

/// `data` of the PEER_GONE completion of a DIRECTED receive whose source endpoint was closed by
/// its own driver (EP_CLOSE); 0 when the source was lost (its device reset or disconnected, its
/// host lost). Spec §6.9.1.
pub const PEER_CLOSED: u64 = 1;

impl Status {
    pub fn from_u32(v: u32) -> Option<Self> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => Invalid,
            2 => Unsupported,
            3 => BadEndpoint,
            4 => AddrNotAvail,
            5 => Truncated,
            6 => Canceled,
            7 => Access,
            8 => NoResources,
            9 => Fault,
            10 => PeerGone,
            11 => NoMessage,
            12 => TooLarge,
            13 => KeyInUse,
            14 => BadChain,
            15 => HostUnreach,
            16 => CommitRefused,
            17 => TimedOut,
            18 => AddrInUse,
            _ => return None,
        })
    }
    /// The status's name as the spec writes it (`TRUNCATED`, `PEER_GONE`, ...).
    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "OK",
            Invalid => "INVALID",
            Unsupported => "UNSUPPORTED",
            BadEndpoint => "BAD_ENDPOINT",
            AddrNotAvail => "ADDR_NOT_AVAIL",
            Truncated => "TRUNCATED",
            Canceled => "CANCELED",
            Access => "ACCESS",
            NoResources => "NO_RESOURCES",
            Fault => "FAULT",
            PeerGone => "PEER_GONE",
            NoMessage => "NO_MESSAGE",
            TooLarge => "TOO_LARGE",
            KeyInUse => "KEY_IN_USE",
            BadChain => "BAD_CHAIN",
            HostUnreach => "HOST_UNREACH",
            CommitRefused => "COMMIT_REFUSED",
            TimedOut => "TIMED_OUT",
            AddrInUse => "ADDR_IN_USE",
        }
    }
    pub fn describe(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "success",
            Invalid => "invalid request",
            Unsupported => "operation not supported",
            BadEndpoint => "bad endpoint",
            AddrNotAvail => "address not available",
            Truncated => "message truncated",
            Canceled => "operation canceled",
            Access => "protection error",
            NoResources => "device resources exhausted",
            Fault => "bad address in descriptor",
            PeerGone => "peer disconnected",
            NoMessage => "no matching message",
            TooLarge => "message too long",
            KeyInUse => "key in use",
            BadChain => "malformed descriptor chain",
            HostUnreach => "host unreachable",
            CommitRefused => "commit refused by the target's handler",
            TimedOut => "the target did not answer the commit in time",
            AddrInUse => "address in use",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Parse errors. Parsing never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("{what} too short: need {need} bytes, got {got}")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u16),
    #[error("opcode {0:?} not allowed on this queue")]
    WrongQueue(Opcode),
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u64),
    #[error("flags {0:#x} not valid for opcode {1:?}")]
    BadFlags(u64, Opcode),
    #[error("reserved field not zero")]
    Reserved,
    #[error("bad address {0:?}")]
    BadAddress(String),
    #[error("bad capability list: {0}")]
    BadCaps(&'static str),
}

impl ProtoError {
    /// The completion status a device reports for this parse error.
    pub fn status(&self) -> Status {
        match self {
            ProtoError::UnknownOpcode(_) => Status::Unsupported,
            ProtoError::WrongQueue(_) => Status::Unsupported,
            _ => Status::Invalid,
        }
    }
}

/// A validated request header. Laid out as [`ReqHeader`] (each field at its wire field's
/// offset, the reserved fields padding; checked below): on a little-endian host a device
/// decodes a header with one copy of its 96 bytes ([`REQUEST_IS_WIRE_LAYOUT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub opcode: Opcode,
    pub ep: u32,
    pub flags: u64,
    pub cookie: u64,
    pub peer: FabricAddr,
    pub tag: u64,
    pub ignore: u64,
    pub data: u64,
    pub remote_addr: u64,
    pub remote_key: u64,
    pub atomic_op: u8,
    pub datatype: u8,
    pub count: u32,
    pub compare: u64,
}

/// Whether [`Request`]'s bytes are a [`ReqHeader`]'s on this host (little-endian, the same
/// offsets and size): a header whose opcode is a valid [`Opcode`] may then be copied into a
/// `Request` as it is.
pub const REQUEST_IS_WIRE_LAYOUT: bool = cfg!(target_endian = "little");

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<Request>() == REQ_HEADER_LEN);
    assert!(align_of::<Request>() == align_of::<ReqHeader>());
    assert!(size_of::<Opcode>() == 2);
    assert!(offset_of!(Request, opcode) == offset_of!(ReqHeader, opcode));
    assert!(offset_of!(Request, ep) == offset_of!(ReqHeader, ep));
    assert!(offset_of!(Request, flags) == offset_of!(ReqHeader, flags));
    assert!(offset_of!(Request, cookie) == offset_of!(ReqHeader, cookie));
    assert!(offset_of!(Request, peer) == offset_of!(ReqHeader, peer));
    assert!(offset_of!(FabricAddr, node) == offset_of!(WireAddr, node));
    assert!(offset_of!(FabricAddr, ep) == offset_of!(WireAddr, ep));
    assert!(offset_of!(FabricAddr, generation) == offset_of!(WireAddr, generation));
    assert!(size_of::<FabricAddr>() == size_of::<WireAddr>());
    assert!(offset_of!(Request, tag) == offset_of!(ReqHeader, tag));
    assert!(offset_of!(Request, ignore) == offset_of!(ReqHeader, ignore));
    assert!(offset_of!(Request, data) == offset_of!(ReqHeader, data));
    assert!(offset_of!(Request, remote_addr) == offset_of!(ReqHeader, remote_addr));
    assert!(offset_of!(Request, remote_key) == offset_of!(ReqHeader, remote_key));
    assert!(offset_of!(Request, atomic_op) == offset_of!(ReqHeader, atomic_op));
    assert!(offset_of!(Request, datatype) == offset_of!(ReqHeader, datatype));
    assert!(offset_of!(Request, count) == offset_of!(ReqHeader, count));
    assert!(offset_of!(Request, compare) == offset_of!(ReqHeader, compare));
};

impl Request {
    /// A zeroed request for `opcode`, to be filled in by a driver.
    pub fn new(opcode: Opcode) -> Self {
        Self {
            opcode,
            ep: 0,
            flags: 0,
            cookie: 0,
            peer: FabricAddr::default(),
            tag: 0,
            ignore: 0,
            data: 0,
            remote_addr: 0,
            remote_key: 0,
            atomic_op: 0,
            datatype: 0,
            count: 0,
            compare: 0,
        }
    }

    pub fn to_header(&self) -> ReqHeader {
        ReqHeader {
            opcode: (self.opcode as u16).into(),
            reserved0: 0.into(),
            ep: self.ep.into(),
            flags: self.flags.into(),
            cookie: self.cookie.into(),
            peer: self.peer.to_wire(),
            tag: self.tag.into(),
            ignore: self.ignore.into(),
            data: self.data.into(),
            remote_addr: self.remote_addr.into(),
            remote_key: self.remote_key.into(),
            atomic_op: self.atomic_op,
            datatype: self.datatype,
            reserved1: 0.into(),
            count: self.count.into(),
            compare: self.compare.into(),
        }
    }

    /// Validate a raw header read from a queue of class `queue`.
    pub fn parse(h: &ReqHeader, queue: QueueClass) -> Result<Self, ProtoError> {
        let mut r = Self::new(Opcode::QueryCaps);
        r.parse_from(h, queue)?;
        Ok(r)
    }

    /// [`Request::parse`] into `self` (left as it was on an error): a device parses each
    /// request into the slot it is handled from, without moving it.
    #[inline]
    pub fn parse_from(&mut self, h: &ReqHeader, queue: QueueClass) -> Result<(), ProtoError> {
        self.parse_op(h, queue).map(|_| ())
    }

    /// [`Request::parse_from`], returning what the opcode needs of the device
    /// ([`OpInfo`]: its feature mask).
    #[inline]
    pub fn parse_op(
        &mut self,
        h: &ReqHeader,
        queue: QueueClass,
    ) -> Result<&'static OpInfo, ProtoError> {
        let raw_op: u16 = h.opcode.into();
        let info = OpInfo::of(raw_op).ok_or(ProtoError::UnknownOpcode(raw_op))?;
        let opcode = info.opcode;
        if info.class != queue {
            return Err(ProtoError::WrongQueue(opcode));
        }
        if u16::from(h.reserved0) != 0 || u16::from(h.reserved1) != 0 {
            return Err(ProtoError::Reserved);
        }
        let fl: u64 = h.flags.into();
        if fl & !flags::ALL != 0 {
            return Err(ProtoError::UnknownFlags(fl & !flags::ALL));
        }
        if (fl & flags::COMPLETION_LEVELS).count_ones() > 1 {
            return Err(ProtoError::BadFlags(fl, opcode));
        }
        if fl & !info.allowed != 0 {
            return Err(ProtoError::BadFlags(fl, opcode));
        }
        // DISCARD drops a claimed message (with CLAIM) or the peeked one (with PEEK).
        if fl & flags::DISCARD != 0 && fl & (flags::CLAIM | flags::PEEK) == 0 {
            return Err(ProtoError::BadFlags(fl, opcode));
        }
        *self = Self {
            opcode,
            ep: h.ep.into(),
            flags: fl,
            cookie: h.cookie.into(),
            peer: FabricAddr::from_wire(&h.peer),
            tag: h.tag.into(),
            ignore: h.ignore.into(),
            data: h.data.into(),
            remote_addr: h.remote_addr.into(),
            remote_key: h.remote_key.into(),
            atomic_op: h.atomic_op,
            datatype: h.datatype,
            count: h.count.into(),
            compare: h.compare.into(),
        };
        Ok(info)
    }

    /// Parse a header from raw bytes (the fuzz target's entry point).
    pub fn parse_bytes(b: &[u8], queue: QueueClass) -> Result<Self, ProtoError> {
        if b.len() < REQ_HEADER_LEN {
            return Err(ProtoError::Short {
                what: "request header",
                need: REQ_HEADER_LEN,
                got: b.len(),
            });
        }
        // Copied into an aligned header: `from_slice` refuses a slice that is not aligned for
        // `ReqHeader`, whatever its bytes.
        let mut h = ReqHeader::default();
        h.as_mut_slice().copy_from_slice(&b[..REQ_HEADER_LEN]);
        Self::parse(&h, queue)
    }
}

/// Flags each opcode accepts.
pub const fn allowed_flags(op: Opcode) -> u64 {
    use flags::*;
    use Opcode::*;
    let completion = INJECT_COMPLETE | TRANSMIT_COMPLETE | DELIVERY_COMPLETE;
    match op {
        Send => REMOTE_CQ_DATA | INJECT | completion | FENCE,
        TSend => REMOTE_CQ_DATA | INJECT | completion | FENCE,
        Recv => MULTI_RECV | DIRECTED,
        MrEvent | CommitEvent => 0,
        TRecv => PEEK | CLAIM | DISCARD | DIRECTED,
        RmaWrite => REMOTE_CQ_DATA | INJECT | completion | COMMIT_COMPLETE | FENCE,
        RmaRead => FENCE | DELIVERY_COMPLETE,
        Atomic => INJECT | completion | COMMIT_COMPLETE | FENCE,
        FetchAtomic | CompareAtomic => FENCE | DELIVERY_COMPLETE | COMMIT_COMPLETE,
        Flush => SAVE | DELIVERY_COMPLETE | COMMIT_COMPLETE | REMOTE_CQ_DATA | FENCE,
        QueryCaps | EpOpen | EpClose | MrReg | MrDereg | Cancel | AddrCheck | CommitReply
        | SvcBind | SvcResolve => 0,
    }
}

/// EP_OPEN parameters carried in `ReqHeader::data`.
pub mod ep_open {
    /// The endpoint type: reliable unconnected (FI_EP_RDM).
    pub const TYPE_RDM: u64 = 0;
    /// Unreliable datagram (FI_EP_DGRAM): a message with no posted receive is dropped, counted.
    pub const TYPE_DGRAM: u64 = 1;
    /// Connected (FI_EP_MSG): RDM plus a peer fixed by the driver's connection manager.
    pub const TYPE_MSG: u64 = 2;
}

/// The service table (SVC_BIND, SVC_RESOLVE): services name endpoints of one host, as ports
/// do on an IP host.
pub mod service {
    /// Largest service number (services are 1..=MAX, as TCP/UDP ports).
    pub const MAX: u64 = 65535;
    /// First service SVC_BIND picks when asked for "any" (`data` = 0).
    pub const EPHEMERAL_FIRST: u16 = 49152;
}

/// Tag matching rule shared by device and tests: libfabric's
/// `(recv_tag | ignore) == (send_tag | ignore)`.
pub const fn tag_matches(recv_tag: u64, ignore: u64, send_tag: u64) -> bool {
    (recv_tag | ignore) == (send_tag | ignore)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn op_info_of_every_wire_value_is_the_opcode_s() {
        for raw in 0..=u16::MAX {
            let want = Opcode::from_u16(raw).map(|op| OpInfo {
                opcode: op,
                class: op.queue_class(),
                allowed: allowed_flags(op),
                features: bit(op.required_feature()),
            });
            assert_eq!(OpInfo::of(raw).copied(), want, "opcode {raw:#x}");
        }
    }

    #[test]
    fn parse_bytes_takes_a_header_at_any_alignment() {
        let mut r = Request::new(Opcode::Send);
        r.cookie = 7;
        // Two adjacent offsets: at least one is not aligned for the header.
        let mut buf = [0u8; REQ_HEADER_LEN + 1];
        for off in [0, 1] {
            buf[off..off + REQ_HEADER_LEN].copy_from_slice(r.to_header().as_slice());
            let got = Request::parse_bytes(&buf[off..off + REQ_HEADER_LEN], QueueClass::Tx);
            assert_eq!(got.ok(), Some(r), "header at offset {off}");
        }
    }

    #[test]
    fn sizes_are_fixed() {
        assert_eq!(std::mem::size_of::<ReqHeader>(), 96);
        assert_eq!(std::mem::size_of::<Completion>(), 64);
        assert_eq!(std::mem::size_of::<FabricConfig>(), 48);
        assert_eq!(std::mem::size_of::<WireAddr>(), 16);
        assert_eq!(MEM_SEG_LEN, 16);
        assert_eq!(RMA_IOV_LEN, 24);
        assert_eq!(COMMIT_EVENT_RECORD_LEN, 48);
        assert_eq!(commit_event_area_len(64), 48 + 64 * 24);
    }

    #[test]
    fn commit_opcodes_parse_on_their_queues_only() {
        assert_eq!(Opcode::from_u16(0x0008), Some(Opcode::CommitReply));
        assert_eq!(Opcode::from_u16(0x0184), Some(Opcode::CommitEvent));
        assert_eq!(Opcode::CommitReply.queue_class(), QueueClass::Control);
        assert_eq!(Opcode::CommitEvent.queue_class(), QueueClass::Rx);
        for op in [Opcode::CommitReply, Opcode::CommitEvent] {
            assert_eq!(op.required_feature(), VIRTIO_FABRIC_F_RMA_PMEM);
            let mut r = Request::new(op);
            r.data = 7;
            assert_eq!(Request::parse(&r.to_header(), op.queue_class()), Ok(r));
            assert_eq!(
                Request::parse(&r.to_header(), QueueClass::Tx),
                Err(ProtoError::WrongQueue(op))
            );
            // No flag is defined for either.
            r.flags = flags::COMMIT_COMPLETE;
            assert!(matches!(
                Request::parse(&r.to_header(), op.queue_class()),
                Err(ProtoError::BadFlags(..))
            ));
        }
        assert_eq!(Status::from_u32(16), Some(Status::CommitRefused));
        assert_eq!(Status::from_u32(17), Some(Status::TimedOut));
        assert_eq!(Status::from_u32(18), Some(Status::AddrInUse));
        assert_eq!(Status::from_u32(19), None);
    }

    #[test]
    fn commit_event_record_roundtrip_and_short_input() {
        let m = CommitEventMsg {
            event_id: 0x1122_3344_5566_7788,
            flags: flags::SAVE | flags::COMMIT_COMPLETE,
            initiator: FabricAddr::new(FabricAddr::node_of(1, 2, 3), 4, 5),
            ep: 9,
            data: 0xabc,
            ranges: vec![
                RmaIov {
                    addr: 0x1000.into(),
                    len: 17.into(),
                    key: 0x55.into(),
                },
                RmaIov::default(),
            ],
        };
        let b = m.to_bytes();
        assert_eq!(b.len(), 48 + 2 * 24);
        assert_eq!(&b[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(CommitEventMsg::parse(&b), Ok(m.clone()));
        // Trailing bytes of the area are ignored; a cut record is refused.
        let mut longer = b.clone();
        longer.extend_from_slice(&[0xff; 30]);
        assert_eq!(CommitEventMsg::parse(&longer), Ok(m));
        assert!(CommitEventMsg::parse(&b[..b.len() - 1]).is_err());
        assert!(CommitEventMsg::parse(&b[..47]).is_err());
        let mut huge = b.clone();
        huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(CommitEventMsg::parse(&huge).is_err());
    }

    #[test]
    fn atomic_tables() {
        assert!(atomic_op::allowed(Opcode::Atomic, atomic_op::BXOR));
        assert!(atomic_op::allowed(Opcode::Atomic, atomic_op::ATOMIC_WRITE));
        assert!(!atomic_op::allowed(Opcode::Atomic, atomic_op::ATOMIC_READ));
        assert!(atomic_op::allowed(
            Opcode::FetchAtomic,
            atomic_op::ATOMIC_READ
        ));
        assert!(!atomic_op::allowed(Opcode::FetchAtomic, atomic_op::CSWAP));
        assert!(atomic_op::allowed(Opcode::CompareAtomic, atomic_op::MSWAP));
        assert!(!atomic_op::allowed(Opcode::CompareAtomic, atomic_op::SUM));
        assert!(!atomic_op::allowed(Opcode::Send, atomic_op::SUM));
        assert_eq!(datatype::size(datatype::LONG_DOUBLE_COMPLEX), Some(32));
        assert_eq!(datatype::size(datatype::FLOAT), Some(4));
        assert_eq!(datatype::size(16), None);
        assert_eq!(Opcode::from_u16(0x0183), Some(Opcode::MrEvent));
        assert_eq!(Opcode::MrEvent.queue_class(), QueueClass::Rx);
    }

    #[test]
    fn queue_kinds() {
        assert_eq!(queue_kind(0), QueueKind::Control);
        assert_eq!(queue_kind(tx_queue(3)), QueueKind::Tx(3));
        assert_eq!(queue_kind(rx_queue(3)), QueueKind::Rx(3));
    }

    #[test]
    fn addr_string_roundtrip() {
        let a = FabricAddr::new(FabricAddr::node_of(0x5eed, 0xabc, 2), 17, 5);
        assert_eq!((a.fabric(), a.host(), a.device()), (0x5eed, 0xabc, 2));
        let s = a.to_string();
        assert_eq!(s, "vfab://5eed.abc.2/17.5");
        assert_eq!(s.parse::<FabricAddr>().unwrap(), a);
        assert!("vfab://1.zz.2/1.1".parse::<FabricAddr>().is_err());
        // The pre-fabric-id form names no fabric: refused rather than guessed.
        assert!("vfab://abc.2/17.5".parse::<FabricAddr>().is_err());
        assert!("vfab://1.1.10000/1.1".parse::<FabricAddr>().is_err());
        assert!("vfab://1.1.1.1/1.1".parse::<FabricAddr>().is_err());
        assert!("nonsense".parse::<FabricAddr>().is_err());
    }

    #[test]
    fn rejects_wrong_queue_and_bad_flags() {
        let mut r = Request::new(Opcode::Send);
        assert!(Request::parse(&r.to_header(), QueueClass::Tx).is_ok());
        assert_eq!(
            Request::parse(&r.to_header(), QueueClass::Rx),
            Err(ProtoError::WrongQueue(Opcode::Send))
        );
        r.flags = flags::PEEK;
        assert!(Request::parse(&r.to_header(), QueueClass::Tx).is_err());
        r.flags = flags::TRANSMIT_COMPLETE | flags::DELIVERY_COMPLETE;
        assert!(Request::parse(&r.to_header(), QueueClass::Tx).is_err());
        for op in [Opcode::SvcBind, Opcode::SvcResolve] {
            let mut c = Request::new(op);
            assert!(Request::parse(&c.to_header(), QueueClass::Control).is_ok());
            c.flags = flags::INJECT;
            assert!(Request::parse(&c.to_header(), QueueClass::Control).is_err());
        }
        r.flags = 1 << 40;
        assert!(matches!(
            Request::parse(&r.to_header(), QueueClass::Tx),
            Err(ProtoError::UnknownFlags(_))
        ));
        let mut h = Request::new(Opcode::Recv).to_header();
        h.opcode = 0x7777.into();
        assert_eq!(
            Request::parse(&h, QueueClass::Rx),
            Err(ProtoError::UnknownOpcode(0x7777))
        );
    }

    #[test]
    fn tag_matching() {
        assert!(tag_matches(0x10, 0, 0x10));
        assert!(!tag_matches(0x10, 0, 0x11));
        assert!(tag_matches(0x10, 0xf, 0x1f));
        assert!(!tag_matches(0x10, 0xf, 0x20));
    }

    #[test]
    fn device_ids_map_onto_virtio_pci() {
        assert_eq!(virtio_pci_device_id(VIRTIO_ID_FABRIC), Some(0x1078));
        assert_eq!(
            virtio_pci_device_id(VIRTIO_ID_FABRIC_QEMU_STANDIN),
            Some(0x1066)
        );
        assert_eq!(virtio_pci_device_id(MAX_PCI_VIRTIO_ID), Some(0x107f));
        assert_eq!(virtio_pci_device_id(0), None);
        assert_eq!(virtio_pci_device_id(64), None);
        assert_eq!(parse_device_id("38"), Ok(38));
        assert_eq!(parse_device_id(" 0x26 "), Ok(38));
        assert_eq!(parse_device_id("0X3f"), Ok(63));
        for bad in [
            "0",
            "64",
            "65535",
            "-1",
            "",
            "0x",
            "x26",
            "38a",
            "4294967334",
        ] {
            let e = parse_device_id(bad).unwrap_err();
            assert!(e.contains("1..=63"), "{bad:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), q in 0u8..3) {
            let q = [QueueClass::Control, QueueClass::Tx, QueueClass::Rx][q as usize];
            let _ = Request::parse_bytes(&bytes, q);
            let _ = CommitEventMsg::parse(&bytes);
        }

        #[test]
        fn valid_requests_roundtrip(op in prop::sample::select(vec![
            Opcode::Send, Opcode::TSend, Opcode::Recv, Opcode::TRecv, Opcode::QueryCaps,
            Opcode::EpOpen, Opcode::EpClose, Opcode::Cancel]),
            ep in any::<u32>(), cookie in any::<u64>(), tag in any::<u64>(), data in any::<u64>()) {
            let mut r = Request::new(op);
            r.ep = ep; r.cookie = cookie; r.tag = tag; r.data = data;
            let h = r.to_header();
            let back = Request::parse_bytes(h.as_slice(), op.queue_class()).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn addr_bytes_roundtrip(node in any::<u64>(), ep in any::<u32>(), gen in any::<u32>()) {
            let a = FabricAddr::new(node, ep, gen);
            prop_assert_eq!(FabricAddr::from_bytes(&a.to_bytes()).unwrap(), a);
            prop_assert_eq!(a.to_string().parse::<FabricAddr>().unwrap(), a);
        }
    }
}
