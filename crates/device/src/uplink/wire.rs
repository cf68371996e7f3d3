// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What hosts say to each other over the uplink. Not part of the virtio device: only `vfabricd`
//! daemons speak it, over the host's libfabric. Everything that arrives is untrusted input,
//! checked like a guest's descriptors: a message that does not parse is refused with an error,
//! never acted on.

use vfabric_proto::{ep_open, ByteValued, Le16, Le32, Le64, Opcode, Status, RMA_IOV_LEN};

/// "VFUL" little-endian.
pub const MAGIC: u32 = 0x4c55_4656;
/// Version of this wire format. 2: FLUSH and the COMMIT_COMPLETE/WHOLE_REGION flags (a daemon
/// of version 1 would drop a FLUSH unanswered, so the two never admit each other). 3: CANCEL,
/// EP_GONE, ADDR_QUERY and ADDR_ANSWER (endpoint lifecycle across hosts). 4: the rendezvous
/// kinds RDV_DATA and RDV_REPLY and HELLO's `caps` (a version-3 daemon would refuse an RDV_DATA
/// as an unknown kind and leave its sender waiting). 5: a CANCEL is answered (a REPLY
/// CANCELED, sent once no rendezvous read of that request is in flight: a sender keeps a
/// source in its guest's memory registered until then) and an RDV_DATA with SOURCE may carry
/// its head inline (an RMA write's ranges, the bytes in guest memory). 6: PULL and the PULLED
/// flag (a receiver past its bound keeps only a stub of a message and asks for its bytes when a
/// receive matches it; a version-5 daemon would never answer the PULL). 7: an RDV_DATA names up
/// to [`MAX_RDV_SEGS`] sources and sinks, each with its length (a large request whose bytes are
/// in several guest ranges is read from them where they are; a version-6 daemon would read
/// the old fixed fields of the description).
pub const VERSION: u16 = 7;

/// Message kinds.
pub mod kind {
    /// A host introduces itself (sent until the peer answers, then as a keepalive).
    pub const HELLO: u16 = 1;
    /// The answer to a HELLO: the same body.
    pub const HELLO_ACK: u16 = 2;
    /// A guest's message or RMA request (or one chunk of it) for an endpoint of the receiving
    /// host.
    pub const DATA: u16 = 3;
    /// The receiving host's verdict on a DATA request: the status its sender completes with
    /// (and, for an RMA read, the bytes read, in chunks).
    pub const REPLY: u16 = 4;
    /// The sender withdrew its DATA request `req_id` (its endpoint closed, its device reset):
    /// a message of it still held at the receiver is dropped, unanswered.
    pub const CANCEL: u16 = 32;
    /// An endpoint (or every endpoint of a device) of the sender is gone: receives directed at
    /// it fail PEER_GONE.
    pub const EP_GONE: u16 = 33;
    /// Is this endpoint of the receiving host open? (ADDR_CHECK, directed receives.)
    pub const ADDR_QUERY: u16 = 34;
    /// The answer to an ADDR_QUERY.
    pub const ADDR_ANSWER: u16 = 35;
    /// A receive matched the stub of the receiving host's message `req_id` (its bytes were not
    /// kept): send it again, with [`super::data_flags::PULLED`].
    pub const PULL: u16 = 36;
    /// Which endpoint of the receiving host a service names (`super::svc`). 16 and up: kept
    /// apart from the data path's kinds.
    pub const SVC_QUERY: u16 = 16;
    /// The answer to an SVC_QUERY.
    pub const SVC_ANSWER: u16 = 17;
    // Rendezvous: 48 and up, apart from the lifecycle (32..) and service (16..) kinds.
    /// Rendezvous: a DATA whose bytes stay in the sender's registered buffer for the receiving
    /// host to read with the uplink's RMA (`RdvDesc::SOURCE`), and/or a request whose returned
    /// bytes (an RMA read's) the receiving host writes into the sender's buffer
    /// (`RdvDesc::SINK`).
    pub const RDV_DATA: u16 = 48;
    /// The verdict on an RDV_DATA with a sink whose bytes were written into the sink: a REPLY
    /// body without bytes, `total_len` the bytes written.
    pub const RDV_REPLY: u16 = 49;
}

/// `ep` of an EP_GONE that names every endpoint of its device (a reset or disconnection).
pub const EVERY_EP: u32 = u32::MAX;

/// Capability bits of HELLO's `caps`.
pub mod caps {
    /// The sender's uplink moves data with RMA (FI_RMA): it reads and writes rendezvous
    /// buffers, and may send RDV_DATA.
    pub const RMA: u32 = 1 << 0;
    pub const ALL: u32 = RMA;
}

/// Flags of [`RdvDesc`].
pub mod rdv_flags {
    /// The request's bytes after the inline ones (its head, e.g. an RMA write's ranges; often
    /// none) are in the sources, in order: `total_len` minus the inline bytes, never none.
    pub const SOURCE: u32 = 1 << 0;
    /// The bytes the verdict returns (an RMA read's, as many as the sinks hold) go to the
    /// sinks, in order, written before the RDV_REPLY.
    pub const SINK: u32 = 1 << 1;
    pub const ALL: u32 = SOURCE | SINK;
}

/// Sources or sinks one RDV_DATA names at most (the iov limit of `tcp;ofi_rxm`'s RMA: one
/// `fi_readmsg` or `fi_writemsg` moves them all).
pub const MAX_RDV_SEGS: usize = 4;

/// One registered buffer of the sender's, read or written by the receiving host's RMA: the
/// provider's `fi_mr_key` and address (virtual or an offset as FI_MR_VIRT_ADDR says).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdvSeg {
    pub addr: Le64,
    pub key: Le64,
    pub len: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (24 bytes, every field naturally aligned).
unsafe impl ByteValued for RdvSeg {}

/// Body of RDV_DATA after the [`Data`] description (then the inline bytes): 200 bytes. The
/// first `src_count` of `src` (SOURCE) and `sink_count` of `sink` (SINK) are used, none
/// empty; the others are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdvDesc {
    pub flags: Le32,
    pub src_count: Le16,
    pub sink_count: Le16,
    pub src: [RdvSeg; MAX_RDV_SEGS],
    pub sink: [RdvSeg; MAX_RDV_SEGS],
}
// SAFETY: plain-old-data, repr(C), no padding (200 bytes, every field naturally aligned).
unsafe impl ByteValued for RdvDesc {}

impl RdvDesc {
    /// The sources named (none past [`MAX_RDV_SEGS`], whatever the count says).
    pub fn sources(&self) -> &[RdvSeg] {
        &self.src[..usize::from(u16::from(self.src_count)).min(MAX_RDV_SEGS)]
    }

    /// The sinks named (none past [`MAX_RDV_SEGS`], whatever the count says).
    pub fn sinks(&self) -> &[RdvSeg] {
        &self.sink[..usize::from(u16::from(self.sink_count)).min(MAX_RDV_SEGS)]
    }

    /// Name one more source (SOURCE); `false` when all are used.
    pub fn push_source(&mut self, addr: u64, key: u64, len: u64) -> bool {
        push_seg(
            &mut self.src,
            &mut self.src_count,
            addr,
            key,
            len,
            &mut self.flags,
            rdv_flags::SOURCE,
        )
    }

    /// Name one more sink (SINK); `false` when all are used.
    pub fn push_sink(&mut self, addr: u64, key: u64, len: u64) -> bool {
        push_seg(
            &mut self.sink,
            &mut self.sink_count,
            addr,
            key,
            len,
            &mut self.flags,
            rdv_flags::SINK,
        )
    }
}

fn push_seg(
    segs: &mut [RdvSeg; MAX_RDV_SEGS],
    count: &mut Le16,
    addr: u64,
    key: u64,
    len: u64,
    flags: &mut Le32,
    flag: u32,
) -> bool {
    let n = usize::from(u16::from(*count));
    let Some(seg) = segs.get_mut(n) else {
        return false;
    };
    *seg = RdvSeg {
        addr: addr.into(),
        key: key.into(),
        len: len.into(),
    };
    *count = (n as u16 + 1).into();
    *flags = (u32::from(*flags) | flag).into();
    true
}

/// The bytes `segs` hold in all (`None` past `u64`), if the first `count` are none empty and
/// the rest all zero.
fn seg_bytes(segs: &[RdvSeg; MAX_RDV_SEGS], count: u16) -> Result<u64, WireError> {
    let n = usize::from(count);
    if n > MAX_RDV_SEGS {
        return Err(WireError::Rdv("more than 4 sources or sinks"));
    }
    if segs[n..].iter().any(|s| *s != RdvSeg::default()) {
        return Err(WireError::Reserved);
    }
    segs[..n].iter().try_fold(0u64, |sum, s| {
        let len = u64::from(s.len);
        if len == 0 {
            return Err(WireError::Rdv("an empty source or sink"));
        }
        sum.checked_add(len).ok_or(WireError::Rdv("too long"))
    })
}

pub const RDV_LEN: usize = std::mem::size_of::<RdvDesc>();

/// Flags of a DATA message (any other bit is refused).
pub mod data_flags {
    /// `data` is remote CQ data for the receive completion.
    pub const REMOTE_CQ_DATA: u32 = 1 << 0;
    /// Reply only once the message is placed in a receive buffer (never buffered eagerly).
    pub const DELIVERY_COMPLETE: u32 = 1 << 1;
    /// RMA writes, atomics and FLUSH: reply only once the target ranges are persistent
    /// (§6.17); a FLUSH without it is a visibility flush.
    pub const COMMIT_COMPLETE: u32 = 1 << 2;
    /// FLUSH only: its one range names a whole region by key (address and length 0).
    pub const WHOLE_REGION: u32 = 1 << 3;
    /// SEND/TSEND only: the bytes of a message sent before, for the receive that matched its
    /// stub (asked for with PULL; same request id).
    pub const PULLED: u32 = 1 << 4;
    pub const ALL: u32 =
        REMOTE_CQ_DATA | DELIVERY_COMPLETE | COMMIT_COMPLETE | WHOLE_REGION | PULLED;
}

/// Header of every uplink message: 24 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub magic: Le32,
    pub version: Le16,
    pub kind: Le16,
    /// The sender's fabric id (a host of another fabric is refused).
    pub fabric_id: Le32,
    /// The sender's host id.
    pub host_id: Le16,
    pub reserved0: Le16,
    /// Bytes after the header.
    pub len: Le32,
    pub reserved1: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (24 bytes, every field naturally aligned).
unsafe impl ByteValued for Header {}

/// Body of HELLO and HELLO_ACK: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// Devices the sender serves (its device indices are 0..num_devices).
    pub num_devices: Le16,
    pub reserved: Le16,
    /// Capability bits of the sender's uplink (none defined yet: 0).
    pub caps: Le32,
    /// Drawn at the sender's start: a new value means the peer daemon restarted.
    pub epoch: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (16 bytes).
unsafe impl ByteValued for Hello {}

/// Body of DATA before the chunk's bytes: 72 bytes. A guest message of `total_len` bytes
/// travels as consecutive chunks (`offset` 0, then each following on), all with the same
/// description; the receiving host acts on it once the last chunk arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Data {
    /// The sender's id of this request, echoed by the REPLY.
    pub req_id: Le64,
    pub total_len: Le64,
    /// Where this chunk's bytes go in the message.
    pub offset: Le64,
    pub tag: Le64,
    /// Remote CQ data (with [`data_flags::REMOTE_CQ_DATA`]).
    pub data: Le64,
    pub src_ep: Le32,
    pub src_gen: Le32,
    pub dst_ep: Le32,
    pub dst_gen: Le32,
    /// The sender's device on its host (the source address is the sender's host and this).
    pub src_dev: Le16,
    /// The destination device on the receiving host.
    pub dst_dev: Le16,
    /// `Opcode::Send`, `TSend`, `RmaWrite`, `RmaRead`, `Atomic`, `FetchAtomic`,
    /// `CompareAtomic` or `Flush` (its ranges only, no bytes).
    pub opcode: Le16,
    /// Endpoint type of the sender (`ep_open::TYPE_*`): only the same type receives it.
    pub ep_kind: Le16,
    pub flags: Le32,
    /// RMA and atomics: the message starts with this many `RmaIov` ranges (then, for a write,
    /// the bytes to write; for an atomic, its one range, then the operands and the compare
    /// values, with `tag` = `atomic_op | datatype << 8`); 0 for sends.
    pub count: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (72 bytes, every field naturally aligned).
unsafe impl ByteValued for Data {}

/// Body of REPLY before its bytes (an RMA read's data, in chunks like DATA): 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub req_id: Le64,
    /// A `vfabric_proto::Status`.
    pub status: Le32,
    pub reserved: Le32,
    /// Bytes the reply carries in all its chunks (0 but for an RMA read).
    pub total_len: Le64,
    pub offset: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (32 bytes).
unsafe impl ByteValued for Reply {}

/// Body of CANCEL: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cancel {
    pub req_id: Le64,
    pub reserved: Le64,
}
// SAFETY: plain-old-data, repr(C), no padding (16 bytes).
unsafe impl ByteValued for Cancel {}

/// Body of EP_GONE, ADDR_QUERY and ADDR_ANSWER: 24 bytes. The endpoint is one of the host that
/// sends EP_GONE or receives ADDR_QUERY (device, endpoint, generation); `req_id` pairs a query
/// with its answer (0 in EP_GONE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpState {
    pub req_id: Le64,
    pub dev: Le16,
    /// EP_GONE: 1 = closed by its own driver (EP_CLOSE), 0 = lost. ADDR_ANSWER: 1 = open.
    /// ADDR_QUERY: 0.
    pub state: Le16,
    /// [`EVERY_EP`] in an EP_GONE for a whole device.
    pub ep: Le32,
    pub generation: Le32,
    pub reserved: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (24 bytes).
unsafe impl ByteValued for EpState {}

pub const HEADER_LEN: usize = std::mem::size_of::<Header>();
pub const DATA_LEN: usize = std::mem::size_of::<Data>();
pub const REPLY_LEN: usize = std::mem::size_of::<Reply>();
/// Largest RMA scatter list one DATA request carries.
pub const MAX_RANGES: u32 = 256;
/// Largest message the uplink receives (and so sends). Small enough to stay below the
/// eager size of `ofi_rxm` (16 KiB), whose eager messages keep their order.
pub const MAX_MESSAGE: usize = 8192;
/// Most guest bytes one DATA message carries.
pub const MAX_CHUNK: usize = MAX_MESSAGE - HEADER_LEN - DATA_LEN;
/// Most read bytes one REPLY carries.
pub const MAX_REPLY_CHUNK: usize = MAX_MESSAGE - HEADER_LEN - REPLY_LEN;

/// A parsed message (a DATA message borrows its bytes from the receive buffer).
// A message lives for one call, on the stack: an RDV_DATA's 200-byte description is not worth
// an allocation per message (and would cost `Copy`).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        ack: bool,
        fabric_id: u32,
        host_id: u16,
        num_devices: u16,
        epoch: u64,
        /// [`caps`] bits.
        caps: u32,
    },
    Data {
        fabric_id: u32,
        host_id: u16,
        desc: Data,
        chunk: &'a [u8],
    },
    Reply {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        status: Status,
        total_len: u64,
        offset: u64,
        chunk: &'a [u8],
    },
    /// CANCEL.
    Cancel {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
    },
    /// PULL: send request `req_id` again (a receive matched its stub).
    Pull {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
    },
    /// EP_GONE: endpoint `ep` (generation `generation`, or every endpoint with [`EVERY_EP`])
    /// of device `dev` of the sender is gone, `closed` by its driver or lost.
    EpGone {
        fabric_id: u32,
        host_id: u16,
        dev: u16,
        ep: u32,
        generation: u32,
        closed: bool,
    },
    /// ADDR_QUERY about the receiving host's endpoint `(dev, ep, generation)`.
    AddrQuery {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        dev: u16,
        ep: u32,
        generation: u32,
    },
    /// ADDR_ANSWER to query `req_id`.
    AddrAnswer {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        open: bool,
    },
    /// The endpoint bound to `service` on the receiving host, please (`super::svc`).
    SvcQuery {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        service: u16,
    },
    /// The answer to SVC_QUERY `req_id`: the endpoint, or `AddrNotAvail`.
    SvcAnswer {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        found: Result<super::svc::Found, Status>,
    },
    /// Rendezvous (kinds 48 and 49), kept apart from the eager kinds above.
    Rdv(Rdv<'a>),
}

/// The rendezvous messages.
#[allow(clippy::large_enum_variant)] // As `Message`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rdv<'a> {
    /// A DATA request (`offset` 0, whole) with a rendezvous description: with SOURCE its
    /// bytes are to be read from the sender (`chunk` empty), else `chunk` is all of them.
    Data {
        fabric_id: u32,
        host_id: u16,
        desc: Data,
        rdv: RdvDesc,
        chunk: &'a [u8],
    },
    /// The verdict on an RDV_DATA with SINK: `written` bytes are in the sink.
    Reply {
        fabric_id: u32,
        host_id: u16,
        req_id: u64,
        status: Status,
        written: u64,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("wire version {0}, this daemon speaks {VERSION}")]
    Version(u16),
    #[error("length field {field} does not match the {got} bytes received")]
    Length { field: u32, got: usize },
    #[error("reserved field not zero")]
    Reserved,
    #[error("unknown message kind {0}")]
    Kind(u16),
    #[error("DATA opcode {0:#x} is not a send")]
    Opcode(u16),
    #[error("DATA endpoint type {0} unknown")]
    EpKind(u16),
    #[error("DATA flags {0:#x} unknown")]
    Flags(u32),
    #[error("DATA chunk at {offset} of {len} bytes overruns the message of {total} bytes")]
    Chunk { offset: u64, len: usize, total: u64 },
    #[error("REPLY status {0} unknown")]
    Status(u32),
    #[error("DATA with {count} RMA ranges for opcode {opcode:#x}")]
    Ranges { count: u32, opcode: u16 },
    #[error("DATA flags {flags:#x} do not apply to opcode {opcode:#x}")]
    FlagsForOpcode { flags: u32, opcode: u16 },
    #[error("HELLO capabilities {0:#x} unknown")]
    Caps(u32),
    #[error("RDV_DATA: {0}")]
    Rdv(&'static str),
    #[error("endpoint state {0} unknown")]
    State(u16),
    #[error("SVC_QUERY for service 0")]
    Service,
}

fn header(kind: u16, fabric_id: u32, host_id: u16, body_len: usize) -> Header {
    Header {
        magic: MAGIC.into(),
        version: VERSION.into(),
        kind: kind.into(),
        fabric_id: fabric_id.into(),
        host_id: host_id.into(),
        reserved0: 0.into(),
        len: (body_len as u32).into(),
        reserved1: 0.into(),
    }
}

impl<'a> Message<'a> {
    /// Encode into a message buffer.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Message::Hello {
                ack,
                fabric_id,
                host_id,
                num_devices,
                epoch,
                caps,
            } => {
                let body = Hello {
                    num_devices: num_devices.into(),
                    reserved: 0.into(),
                    caps: caps.into(),
                    epoch: epoch.into(),
                };
                let k = if ack { kind::HELLO_ACK } else { kind::HELLO };
                let mut v = header(k, fabric_id, host_id, body.as_slice().len())
                    .as_slice()
                    .to_vec();
                v.extend_from_slice(body.as_slice());
                v
            }
            Message::Data {
                fabric_id,
                host_id,
                desc,
                chunk,
            } => {
                let mut v = Vec::with_capacity(HEADER_LEN + DATA_LEN + chunk.len());
                v.extend_from_slice(
                    header(kind::DATA, fabric_id, host_id, DATA_LEN + chunk.len()).as_slice(),
                );
                v.extend_from_slice(desc.as_slice());
                v.extend_from_slice(chunk);
                v
            }
            Message::Reply {
                fabric_id,
                host_id,
                req_id,
                status,
                total_len,
                offset,
                chunk,
            } => {
                let body = Reply {
                    req_id: req_id.into(),
                    status: (status as u32).into(),
                    reserved: 0.into(),
                    total_len: total_len.into(),
                    offset: offset.into(),
                };
                let mut v = header(kind::REPLY, fabric_id, host_id, REPLY_LEN + chunk.len())
                    .as_slice()
                    .to_vec();
                v.extend_from_slice(body.as_slice());
                v.extend_from_slice(chunk);
                v
            }
            Message::Rdv(Rdv::Data {
                fabric_id,
                host_id,
                desc,
                rdv,
                chunk,
            }) => {
                let len = DATA_LEN + RDV_LEN + chunk.len();
                let mut v = Vec::with_capacity(HEADER_LEN + len);
                v.extend_from_slice(header(kind::RDV_DATA, fabric_id, host_id, len).as_slice());
                v.extend_from_slice(desc.as_slice());
                v.extend_from_slice(rdv.as_slice());
                v.extend_from_slice(chunk);
                v
            }
            Message::Rdv(Rdv::Reply {
                fabric_id,
                host_id,
                req_id,
                status,
                written,
            }) => {
                let body = Reply {
                    req_id: req_id.into(),
                    status: (status as u32).into(),
                    reserved: 0.into(),
                    total_len: written.into(),
                    offset: 0.into(),
                };
                let mut v = header(kind::RDV_REPLY, fabric_id, host_id, REPLY_LEN)
                    .as_slice()
                    .to_vec();
                v.extend_from_slice(body.as_slice());
                v
            }
            Message::Cancel {
                fabric_id,
                host_id,
                req_id,
            } => {
                let body = Cancel {
                    req_id: req_id.into(),
                    reserved: 0.into(),
                };
                with_body(kind::CANCEL, fabric_id, host_id, body.as_slice())
            }
            Message::Pull {
                fabric_id,
                host_id,
                req_id,
            } => {
                let body = Cancel {
                    req_id: req_id.into(),
                    reserved: 0.into(),
                };
                with_body(kind::PULL, fabric_id, host_id, body.as_slice())
            }
            Message::EpGone {
                fabric_id,
                host_id,
                dev,
                ep,
                generation,
                closed,
            } => {
                let body = ep_state(0, dev, u16::from(closed), ep, generation);
                with_body(kind::EP_GONE, fabric_id, host_id, body.as_slice())
            }
            Message::AddrQuery {
                fabric_id,
                host_id,
                req_id,
                dev,
                ep,
                generation,
            } => {
                let body = ep_state(req_id, dev, 0, ep, generation);
                with_body(kind::ADDR_QUERY, fabric_id, host_id, body.as_slice())
            }
            Message::AddrAnswer {
                fabric_id,
                host_id,
                req_id,
                open,
            } => {
                let body = ep_state(req_id, 0, u16::from(open), 0, 0);
                with_body(kind::ADDR_ANSWER, fabric_id, host_id, body.as_slice())
            }
            Message::SvcQuery {
                fabric_id,
                host_id,
                req_id,
                service,
            } => {
                let body = super::svc::SvcQuery {
                    req_id: req_id.into(),
                    service: service.into(),
                    ..Default::default()
                };
                let mut v = header(kind::SVC_QUERY, fabric_id, host_id, body.as_slice().len())
                    .as_slice()
                    .to_vec();
                v.extend_from_slice(body.as_slice());
                v
            }
            Message::SvcAnswer {
                fabric_id,
                host_id,
                req_id,
                found,
            } => {
                let body = super::svc::answer_body(req_id, &found);
                let mut v = header(kind::SVC_ANSWER, fabric_id, host_id, body.as_slice().len())
                    .as_slice()
                    .to_vec();
                v.extend_from_slice(body.as_slice());
                v
            }
        }
    }

    /// Parse one received message (all of it: trailing bytes are an error).
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let h = b
            .get(..HEADER_LEN)
            .and_then(Header::from_slice)
            .ok_or(WireError::Short(b.len()))?;
        let magic = u32::from(h.magic);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let version = u16::from(h.version);
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        if u16::from(h.reserved0) != 0 || u32::from(h.reserved1) != 0 {
            return Err(WireError::Reserved);
        }
        let body = &b[HEADER_LEN..];
        let len = u32::from(h.len);
        if len as usize != body.len() {
            return Err(WireError::Length {
                field: len,
                got: body.len(),
            });
        }
        match u16::from(h.kind) {
            k @ (kind::HELLO | kind::HELLO_ACK) => {
                let hello = Hello::from_slice(body).ok_or(WireError::Length {
                    field: len,
                    got: body.len(),
                })?;
                if u16::from(hello.reserved) != 0 {
                    return Err(WireError::Reserved);
                }
                let caps = u32::from(hello.caps);
                if caps & !caps::ALL != 0 {
                    return Err(WireError::Caps(caps));
                }
                Ok(Message::Hello {
                    ack: k == kind::HELLO_ACK,
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    num_devices: hello.num_devices.into(),
                    epoch: hello.epoch.into(),
                    caps,
                })
            }
            kind::DATA => {
                let short = WireError::Length {
                    field: len,
                    got: body.len(),
                };
                let desc = *body
                    .get(..DATA_LEN)
                    .and_then(Data::from_slice)
                    .ok_or(short)?;
                let chunk = &body[DATA_LEN..];
                check_data(&desc, chunk.len())?;
                Ok(Message::Data {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    desc,
                    chunk,
                })
            }
            kind::RDV_DATA => {
                let short = || WireError::Length {
                    field: len,
                    got: body.len(),
                };
                let desc = *body
                    .get(..DATA_LEN)
                    .and_then(Data::from_slice)
                    .ok_or_else(short)?;
                let rdv = *body
                    .get(DATA_LEN..DATA_LEN + RDV_LEN)
                    .and_then(RdvDesc::from_slice)
                    .ok_or_else(short)?;
                let chunk = &body[DATA_LEN + RDV_LEN..];
                let flags = u32::from(rdv.flags);
                if flags & !rdv_flags::ALL != 0 || flags == 0 {
                    return Err(WireError::Rdv("unknown or no flags"));
                }
                // A rendezvous request is one whole message.
                if u64::from(desc.offset) != 0 {
                    return Err(WireError::Rdv("offset not 0"));
                }
                let source = flags & rdv_flags::SOURCE != 0;
                let sink = flags & rdv_flags::SINK != 0;
                let src_count = u16::from(rdv.src_count);
                let sink_count = u16::from(rdv.sink_count);
                if source != (src_count != 0) || sink != (sink_count != 0) {
                    return Err(WireError::Rdv("sources or sinks not as the flags say"));
                }
                let src_bytes = seg_bytes(&rdv.src, src_count)?;
                seg_bytes(&rdv.sink, sink_count)?;
                let total = u64::from(desc.total_len);
                if source {
                    // Inline bytes with a source are the request's head (an RMA write's
                    // ranges); the sources hold the rest, never nothing.
                    if chunk.len() as u64 >= total {
                        return Err(WireError::Rdv("a source that holds no bytes"));
                    }
                    if chunk.len() as u64 + src_bytes != total {
                        return Err(WireError::Rdv(
                            "sources not the bytes after the inline ones",
                        ));
                    }
                    let whole = usize::try_from(total).map_err(|_| WireError::Rdv("too long"))?;
                    check_data(&desc, whole)?;
                } else {
                    if chunk.len() as u64 != total {
                        return Err(WireError::Rdv("inline bytes not the whole message"));
                    }
                    check_data(&desc, chunk.len())?;
                }
                if sink && u16::from(desc.opcode) != Opcode::RmaRead as u16 {
                    return Err(WireError::Rdv("a sink only for an RMA read"));
                }
                Ok(Message::Rdv(Rdv::Data {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    desc,
                    rdv,
                    chunk,
                }))
            }
            kind::RDV_REPLY => {
                let r = *Reply::from_slice(body).ok_or(WireError::Length {
                    field: len,
                    got: body.len(),
                })?;
                if u32::from(r.reserved) != 0 || u64::from(r.offset) != 0 {
                    return Err(WireError::Reserved);
                }
                let raw = u32::from(r.status);
                let status = Status::from_u32(raw).ok_or(WireError::Status(raw))?;
                Ok(Message::Rdv(Rdv::Reply {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    req_id: r.req_id.into(),
                    status,
                    written: r.total_len.into(),
                }))
            }
            kind::REPLY => {
                let r = *body.get(..REPLY_LEN).and_then(Reply::from_slice).ok_or(
                    WireError::Length {
                        field: len,
                        got: body.len(),
                    },
                )?;
                let chunk = &body[REPLY_LEN..];
                if u32::from(r.reserved) != 0 {
                    return Err(WireError::Reserved);
                }
                let raw = u32::from(r.status);
                let status = Status::from_u32(raw).ok_or(WireError::Status(raw))?;
                let (offset, total) = (u64::from(r.offset), u64::from(r.total_len));
                let fits = offset
                    .checked_add(chunk.len() as u64)
                    .is_some_and(|end| end <= total);
                if !fits || (chunk.is_empty() && total != 0) {
                    return Err(WireError::Chunk {
                        offset,
                        len: chunk.len(),
                        total,
                    });
                }
                Ok(Message::Reply {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    req_id: r.req_id.into(),
                    status,
                    total_len: total,
                    offset,
                    chunk,
                })
            }
            k @ (kind::CANCEL | kind::PULL) => {
                let c = Cancel::from_slice(body).ok_or(WireError::Length {
                    field: len,
                    got: body.len(),
                })?;
                if u64::from(c.reserved) != 0 {
                    return Err(WireError::Reserved);
                }
                let (fabric_id, host_id, req_id) =
                    (h.fabric_id.into(), h.host_id.into(), c.req_id.into());
                Ok(if k == kind::PULL {
                    Message::Pull {
                        fabric_id,
                        host_id,
                        req_id,
                    }
                } else {
                    Message::Cancel {
                        fabric_id,
                        host_id,
                        req_id,
                    }
                })
            }
            k @ (kind::EP_GONE | kind::ADDR_QUERY | kind::ADDR_ANSWER) => {
                let e = EpState::from_slice(body).ok_or(WireError::Length {
                    field: len,
                    got: body.len(),
                })?;
                if u32::from(e.reserved) != 0 {
                    return Err(WireError::Reserved);
                }
                let (fabric_id, host_id) = (h.fabric_id.into(), h.host_id.into());
                let state = u16::from(e.state);
                let flag = match (k, state) {
                    (kind::ADDR_QUERY, 0) => false,
                    (kind::EP_GONE | kind::ADDR_ANSWER, 0 | 1) => state == 1,
                    _ => return Err(WireError::State(state)),
                };
                Ok(match k {
                    kind::EP_GONE => Message::EpGone {
                        fabric_id,
                        host_id,
                        dev: e.dev.into(),
                        ep: e.ep.into(),
                        generation: e.generation.into(),
                        closed: flag,
                    },
                    kind::ADDR_QUERY => Message::AddrQuery {
                        fabric_id,
                        host_id,
                        req_id: e.req_id.into(),
                        dev: e.dev.into(),
                        ep: e.ep.into(),
                        generation: e.generation.into(),
                    },
                    _ => Message::AddrAnswer {
                        fabric_id,
                        host_id,
                        req_id: e.req_id.into(),
                        open: flag,
                    },
                })
            }
            kind::SVC_QUERY => {
                let (req_id, service) = super::svc::parse_query(body)?;
                Ok(Message::SvcQuery {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    req_id,
                    service,
                })
            }
            kind::SVC_ANSWER => {
                let (req_id, found) = super::svc::parse_answer(body)?;
                Ok(Message::SvcAnswer {
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    req_id,
                    found,
                })
            }
            k => Err(WireError::Kind(k)),
        }
    }
}

/// The checks of a DATA description with a chunk of `chunk_len` bytes (shared by DATA and
/// RDV_DATA).
fn check_data(desc: &Data, chunk_len: usize) -> Result<(), WireError> {
    let op = u16::from(desc.opcode);
    let rma = [
        Opcode::RmaWrite,
        Opcode::RmaRead,
        Opcode::Atomic,
        Opcode::FetchAtomic,
        Opcode::CompareAtomic,
        Opcode::Flush,
    ]
    .iter()
    .any(|o| *o as u16 == op);
    let flush = op == Opcode::Flush as u16;
    if op != Opcode::Send as u16 && op != Opcode::TSend as u16 && !rma {
        return Err(WireError::Opcode(op));
    }
    // Sends carry no ranges; RMA requests 1..=MAX_RANGES, all in the message.
    let count = u32::from(desc.count);
    if (rma && (count == 0 || count > MAX_RANGES))
        || (!rma && count != 0)
        || u64::from(desc.total_len) < u64::from(count) * RMA_IOV_LEN as u64
        || (flush && u64::from(desc.total_len) != u64::from(count) * RMA_IOV_LEN as u64)
    {
        return Err(WireError::Ranges { count, opcode: op });
    }
    let ep_kind = u16::from(desc.ep_kind);
    if !matches!(
        u64::from(ep_kind),
        ep_open::TYPE_RDM | ep_open::TYPE_DGRAM | ep_open::TYPE_MSG
    ) {
        return Err(WireError::EpKind(ep_kind));
    }
    let flags = u32::from(desc.flags);
    if flags & !data_flags::ALL != 0 {
        return Err(WireError::Flags(flags));
    }
    // Persistence only where there is something to persist; a whole region is
    // one range of a FLUSH.
    let persists = flush
        || [
            Opcode::RmaWrite,
            Opcode::Atomic,
            Opcode::FetchAtomic,
            Opcode::CompareAtomic,
        ]
        .iter()
        .any(|o| *o as u16 == op);
    let send = op == Opcode::Send as u16 || op == Opcode::TSend as u16;
    if (flags & data_flags::COMMIT_COMPLETE != 0 && !persists)
        || (flags & data_flags::WHOLE_REGION != 0 && !(flush && count == 1))
        || (flags & data_flags::PULLED != 0 && !send)
    {
        return Err(WireError::FlagsForOpcode { flags, opcode: op });
    }
    let (offset, total) = (u64::from(desc.offset), u64::from(desc.total_len));
    let fits = offset
        .checked_add(chunk_len as u64)
        .is_some_and(|end| end <= total);
    // Only an empty message has an empty chunk: every chunk moves the offset on.
    if !fits || (chunk_len == 0 && total != 0) {
        return Err(WireError::Chunk {
            offset,
            len: chunk_len,
            total,
        });
    }
    Ok(())
}

/// A message of `kind` with a fixed `body`.
fn with_body(kind: u16, fabric_id: u32, host_id: u16, body: &[u8]) -> Vec<u8> {
    let mut v = header(kind, fabric_id, host_id, body.len())
        .as_slice()
        .to_vec();
    v.extend_from_slice(body);
    v
}

fn ep_state(req_id: u64, dev: u16, state: u16, ep: u32, generation: u32) -> EpState {
    EpState {
        req_id: req_id.into(),
        dev: dev.into(),
        state: state.into(),
        ep: ep.into(),
        generation: generation.into(),
        reserved: 0.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips_and_bad_messages_are_refused() {
        let m = Message::Hello {
            ack: true,
            fabric_id: 0x5eed,
            host_id: 3,
            num_devices: 2,
            epoch: 99,
            caps: caps::RMA,
        };
        let b = m.encode();
        assert_eq!(b.len(), HEADER_LEN + 16);
        assert_eq!(Message::parse(&b), Ok(m));
        assert_eq!(Message::parse(&b[..10]), Err(WireError::Short(10)));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(Message::parse(&bad), Err(WireError::Magic(_))));
        let mut bad = b.clone();
        bad[4] = 9;
        assert_eq!(Message::parse(&bad), Err(WireError::Version(9)));
        let mut bad = b.clone();
        bad.push(0);
        assert!(matches!(
            Message::parse(&bad),
            Err(WireError::Length { .. })
        ));
        let mut bad = b.clone();
        bad[6] = 77;
        assert_eq!(Message::parse(&bad), Err(WireError::Kind(77)));
        let mut bad = b;
        bad[HEADER_LEN + 2] = 1;
        assert_eq!(Message::parse(&bad), Err(WireError::Reserved));
    }

    fn data_desc(total: u64, offset: u64) -> Data {
        Data {
            req_id: 77.into(),
            total_len: total.into(),
            offset: offset.into(),
            tag: 0x1234.into(),
            data: 0xdada.into(),
            src_ep: 1.into(),
            src_gen: 2.into(),
            dst_ep: 3.into(),
            dst_gen: 4.into(),
            src_dev: 0.into(),
            dst_dev: 1.into(),
            opcode: (Opcode::TSend as u16).into(),
            ep_kind: (ep_open::TYPE_RDM as u16).into(),
            flags: data_flags::REMOTE_CQ_DATA.into(),
            count: 0.into(),
        }
    }

    fn data(desc: Data, chunk: &[u8]) -> Vec<u8> {
        Message::Data {
            fabric_id: 0x5eed,
            host_id: 2,
            desc,
            chunk,
        }
        .encode()
    }

    /// Byte offset of field `at` of the DATA body in an encoded message.
    const fn body(at: usize) -> usize {
        HEADER_LEN + at
    }

    #[test]
    fn data_round_trips_and_bad_descriptions_are_refused() {
        assert_eq!(DATA_LEN, 72);
        const { assert!(MAX_CHUNK > 0 && HEADER_LEN + DATA_LEN + MAX_CHUNK == MAX_MESSAGE) };
        let chunk = [5u8; 100];
        let b = data(data_desc(1000, 200), &chunk);
        assert_eq!(b.len(), HEADER_LEN + DATA_LEN + 100);
        assert_eq!(
            Message::parse(&b),
            Ok(Message::Data {
                fabric_id: 0x5eed,
                host_id: 2,
                desc: data_desc(1000, 200),
                chunk: &chunk,
            })
        );
        // An empty message is one empty chunk.
        assert!(Message::parse(&data(data_desc(0, 0), &[])).is_ok());
        let refused = |d: Data, chunk: &[u8]| Message::parse(&data(d, chunk)).map(|_| ());
        // A chunk past the message's end, or an empty chunk of a non-empty message.
        assert!(matches!(
            refused(data_desc(1000, 950), &chunk),
            Err(WireError::Chunk { .. })
        ));
        assert!(matches!(
            refused(data_desc(u64::MAX, u64::MAX - 10), &chunk),
            Err(WireError::Chunk { .. })
        ));
        assert!(matches!(
            refused(data_desc(10, 0), &[]),
            Err(WireError::Chunk { .. })
        ));
        let mut d = data_desc(100, 0);
        d.opcode = (Opcode::MrReg as u16).into();
        assert_eq!(
            refused(d, &chunk),
            Err(WireError::Opcode(Opcode::MrReg as u16))
        );
        let mut d = data_desc(100, 0);
        d.ep_kind = 9.into();
        assert_eq!(refused(d, &chunk), Err(WireError::EpKind(9)));
        let mut d = data_desc(100, 0);
        d.flags = (1 << 7).into();
        assert_eq!(refused(d, &chunk), Err(WireError::Flags(1 << 7)));
        // Ranges: none for a send, 1..=MAX_RANGES inside the message for RMA.
        let mut d = data_desc(100, 0);
        d.count = 1.into();
        assert!(matches!(refused(d, &chunk), Err(WireError::Ranges { .. })));
        let mut d = data_desc(100, 0);
        d.opcode = (Opcode::RmaRead as u16).into();
        assert!(matches!(refused(d, &chunk), Err(WireError::Ranges { .. })));
        d.count = 4.into();
        assert!(refused(d, &chunk).is_ok());
        d.count = 5.into();
        assert!(
            matches!(refused(d, &chunk), Err(WireError::Ranges { .. })),
            "past the message"
        );
        d.count = (MAX_RANGES + 1).into();
        d.total_len = u64::MAX.into();
        assert!(matches!(refused(d, &chunk), Err(WireError::Ranges { .. })));
        // FLUSH: ranges only (no bytes), COMMIT_COMPLETE and WHOLE_REGION where they apply.
        let mut f = data_desc(2 * RMA_IOV_LEN as u64, 0);
        f.opcode = (Opcode::Flush as u16).into();
        f.count = 2.into();
        f.flags = data_flags::COMMIT_COMPLETE.into();
        let ranges = [0u8; 2 * RMA_IOV_LEN];
        assert!(refused(f, &ranges).is_ok());
        let mut extra = f;
        extra.total_len = (2 * RMA_IOV_LEN as u64 + 1).into();
        assert!(
            matches!(
                refused(extra, &[0u8; 2 * RMA_IOV_LEN + 1]),
                Err(WireError::Ranges { .. })
            ),
            "a FLUSH carries no bytes"
        );
        let mut none = f;
        none.count = 0.into();
        assert!(matches!(
            refused(none, &ranges),
            Err(WireError::Ranges { .. })
        ));
        let mut whole = f;
        whole.flags = (data_flags::WHOLE_REGION | data_flags::COMMIT_COMPLETE).into();
        assert!(
            matches!(
                refused(whole, &ranges),
                Err(WireError::FlagsForOpcode { .. })
            ),
            "a whole region is one range"
        );
        whole.count = 1.into();
        whole.total_len = (RMA_IOV_LEN as u64).into();
        assert!(refused(whole, &ranges[..RMA_IOV_LEN]).is_ok());
        // Persistence and whole regions mean nothing for sends and reads.
        let mut send = data_desc(100, 0);
        send.flags = data_flags::COMMIT_COMPLETE.into();
        assert!(matches!(
            refused(send, &chunk),
            Err(WireError::FlagsForOpcode { .. })
        ));
        let mut rd = data_desc(100, 0);
        rd.opcode = (Opcode::RmaRead as u16).into();
        rd.count = 1.into();
        rd.flags = data_flags::COMMIT_COMPLETE.into();
        assert!(matches!(
            refused(rd, &chunk),
            Err(WireError::FlagsForOpcode { .. })
        ));
        let mut wr = rd;
        wr.opcode = (Opcode::RmaWrite as u16).into();
        assert!(refused(wr, &chunk).is_ok());
        wr.flags = data_flags::WHOLE_REGION.into();
        assert!(matches!(
            refused(wr, &chunk),
            Err(WireError::FlagsForOpcode { .. })
        ));
        // PULLED: the bytes of a message only.
        send.flags = data_flags::PULLED.into();
        assert!(refused(send, &chunk).is_ok());
        wr.flags = data_flags::PULLED.into();
        assert!(matches!(
            refused(wr, &chunk),
            Err(WireError::FlagsForOpcode { .. })
        ));
        // Shorter than its description, and a length field that lies.
        let b = data(data_desc(100, 0), &chunk);
        let mut short = b[..HEADER_LEN + 40].to_vec();
        short[16..20].copy_from_slice(&40u32.to_le_bytes());
        assert!(matches!(
            Message::parse(&short),
            Err(WireError::Length { .. })
        ));
        let mut lying = b.clone();
        lying[16] ^= 1;
        assert!(matches!(
            Message::parse(&lying),
            Err(WireError::Length { .. })
        ));
        // Fields land where the layout says (the receiver reads them there).
        assert_eq!(b[body(60)..body(62)], (Opcode::TSend as u16).to_le_bytes());
    }

    #[test]
    fn reply_round_trips_and_unknown_statuses_are_refused() {
        let m = Message::Reply {
            fabric_id: 0x5eed,
            host_id: 1,
            req_id: u64::MAX,
            status: Status::HostUnreach,
            total_len: 0,
            offset: 0,
            chunk: &[],
        };
        let b = m.encode();
        assert_eq!(b.len(), HEADER_LEN + 32);
        assert_eq!(Message::parse(&b), Ok(m));
        // Read data in chunks: each inside the total, never empty.
        let read = Message::Reply {
            fabric_id: 0x5eed,
            host_id: 1,
            req_id: 5,
            status: Status::Ok,
            total_len: 100,
            offset: 90,
            chunk: &[1; 10],
        };
        assert_eq!(Message::parse(&read.encode()), Ok(read));
        let reply = |offset: u64, chunk: &'static [u8]| Message::Reply {
            fabric_id: 0x5eed,
            host_id: 1,
            req_id: 5,
            status: Status::Ok,
            total_len: 100,
            offset,
            chunk,
        };
        let past = reply(91, &[1; 10]);
        assert!(matches!(
            Message::parse(&past.encode()),
            Err(WireError::Chunk { .. })
        ));
        let empty = reply(90, &[]);
        assert!(matches!(
            Message::parse(&empty.encode()),
            Err(WireError::Chunk { .. })
        ));
        let mut bad = b.clone();
        bad[body(8)] = 200;
        assert_eq!(Message::parse(&bad), Err(WireError::Status(200)));
        let mut bad = b.clone();
        bad[body(12)] = 1;
        assert_eq!(Message::parse(&bad), Err(WireError::Reserved));
        let mut bad = b;
        bad.truncate(HEADER_LEN + 20);
        bad[16..20].copy_from_slice(&20u32.to_le_bytes());
        assert!(matches!(
            Message::parse(&bad),
            Err(WireError::Length { .. })
        ));
    }

    fn rdv(desc: Data, flags: u32, sink_len: u64, chunk: &[u8]) -> Vec<u8> {
        Message::Rdv(Rdv::Data {
            fabric_id: 1,
            host_id: 2,
            desc,
            rdv: rdv_desc(&desc, flags, sink_len, chunk.len()),
            chunk,
        })
        .encode()
    }

    /// One source of the bytes after the inline ones (with SOURCE), one sink of `sink_len`
    /// bytes (with SINK and `sink_len`), `flags` as given.
    fn rdv_desc(desc: &Data, flags: u32, sink_len: u64, inline: usize) -> RdvDesc {
        let mut r = RdvDesc::default();
        if flags & rdv_flags::SOURCE != 0 {
            let len = u64::from(desc.total_len).saturating_sub(inline as u64);
            r.push_source(0x1000, 0xfeed, len);
        }
        if flags & rdv_flags::SINK != 0 && sink_len != 0 {
            r.push_sink(0x2000, 0xbeef, sink_len);
        }
        r.flags = flags.into();
        r
    }

    fn rdv_with(desc: Data, r: RdvDesc) -> Vec<u8> {
        Message::Rdv(Rdv::Data {
            fabric_id: 1,
            host_id: 2,
            desc,
            rdv: r,
            chunk: &[],
        })
        .encode()
    }

    #[test]
    fn a_rendezvous_names_up_to_four_sources_and_sinks_that_hold_its_bytes() {
        let d = data_desc(1 << 20, 0);
        let mut r = RdvDesc::default();
        for (i, len) in [1u64 << 18, 1 << 19, 1 << 17, 1 << 17]
            .into_iter()
            .enumerate()
        {
            assert!(r.push_source(0x1000 * i as u64, 7 + i as u64, len));
        }
        assert!(!r.push_source(0, 0, 1), "a fifth source");
        let Ok(Message::Rdv(Rdv::Data { rdv: got, .. })) = Message::parse(&rdv_with(d, r)) else {
            panic!("four sources refused");
        };
        assert_eq!(got.sources().len(), 4);
        assert_eq!(u64::from(got.sources()[3].key), 10);
        let refused = |r: RdvDesc| Message::parse(&rdv_with(d, r)).map(|_| ());
        let mut short = r;
        short.src[3].len = (1u64 << 16).into();
        assert!(
            matches!(refused(short), Err(WireError::Rdv(_))),
            "sources short of the bytes"
        );
        let mut empty = r;
        empty.src[1].len = 0.into();
        empty.src[2].len = (1u64 << 18).into();
        assert!(
            matches!(refused(empty), Err(WireError::Rdv(_))),
            "an empty source"
        );
        let mut five = r;
        five.src_count = 5.into();
        assert!(
            matches!(refused(five), Err(WireError::Rdv(_))),
            "a count past 4"
        );
        let mut stray = RdvDesc::default();
        stray.push_source(0x1000, 7, 1 << 20);
        stray.src[2].key = 9.into();
        assert_eq!(
            refused(stray),
            Err(WireError::Reserved),
            "an unused source not zero"
        );
        let mut uncounted = r;
        uncounted.src_count = 0.into();
        assert!(
            matches!(refused(uncounted), Err(WireError::Rdv(_))),
            "SOURCE with none"
        );
        // A read whose bytes come back into three sinks.
        let mut read = data_desc(RMA_IOV_LEN as u64, 0);
        read.opcode = (Opcode::RmaRead as u16).into();
        read.count = 1.into();
        read.flags = 0.into();
        let mut sinks = RdvDesc::default();
        for i in 0..3u64 {
            sinks.push_sink(0x2000 * i, i, 1 << 16);
        }
        let b = Message::Rdv(Rdv::Data {
            fabric_id: 1,
            host_id: 2,
            desc: read,
            rdv: sinks,
            chunk: &[5u8; RMA_IOV_LEN],
        })
        .encode();
        let Ok(Message::Rdv(Rdv::Data { rdv: got, .. })) = Message::parse(&b) else {
            panic!("three sinks refused");
        };
        assert_eq!(
            got.sinks().iter().map(|s| u64::from(s.len)).sum::<u64>(),
            3 << 16
        );
    }

    #[test]
    fn rendezvous_messages_round_trip_and_bad_ones_are_refused() {
        // A large send whose bytes the target reads.
        let d = data_desc(1 << 20, 0);
        let b = rdv(d, rdv_flags::SOURCE, 0, &[]);
        let Ok(Message::Rdv(Rdv::Data {
            desc,
            rdv: r,
            chunk,
            ..
        })) = Message::parse(&b)
        else {
            panic!("{:?}", Message::parse(&b));
        };
        assert_eq!((desc, chunk.len()), (d, 0));
        assert_eq!(
            r.sources(),
            &[RdvSeg {
                addr: 0x1000.into(),
                key: 0xfeed.into(),
                len: (1u64 << 20).into()
            }]
        );
        // An RMA read with a sink, its ranges inline.
        let mut read = data_desc(RMA_IOV_LEN as u64, 0);
        read.opcode = (Opcode::RmaRead as u16).into();
        read.count = 1.into();
        read.flags = 0.into();
        let ranges = [5u8; RMA_IOV_LEN];
        assert!(Message::parse(&rdv(read, rdv_flags::SINK, 1 << 20, &ranges)).is_ok());
        // Both: large ranges from the source, bytes back into the sink.
        let mut big_read = read;
        big_read.count = 2.into();
        big_read.total_len = (2 * RMA_IOV_LEN as u64).into();
        assert!(
            Message::parse(&rdv(big_read, rdv_flags::SOURCE | rdv_flags::SINK, 64, &[])).is_ok()
        );
        let refused = |b: Vec<u8>| Message::parse(&b).map(|_| ());
        let rdv_refused = |b: Vec<u8>, why: &str| {
            assert!(matches!(refused(b), Err(WireError::Rdv(_))), "{why}");
        };
        rdv_refused(rdv(d, 0, 0, &[]), "no flags");
        rdv_refused(rdv(d, 1 << 7, 0, &[]), "an unknown flag");
        // A source with its head inline (an RMA write's ranges).
        let mut w = data_desc(RMA_IOV_LEN as u64 + (1 << 20), 0);
        w.opcode = (Opcode::RmaWrite as u16).into();
        w.count = 1.into();
        w.flags = 0.into();
        assert!(Message::parse(&rdv(w, rdv_flags::SOURCE, 0, &ranges)).is_ok());
        let mut all_inline = w;
        all_inline.total_len = (RMA_IOV_LEN as u64).into();
        rdv_refused(
            rdv(all_inline, rdv_flags::SOURCE, 0, &ranges),
            "a source with all its bytes inline",
        );
        rdv_refused(
            rdv(data_desc(0, 0), rdv_flags::SOURCE, 0, &[]),
            "an empty source",
        );
        rdv_refused(
            rdv(data_desc(1 << 20, 8), rdv_flags::SOURCE, 0, &[]),
            "a source at an offset",
        );
        rdv_refused(
            rdv(d, rdv_flags::SOURCE | rdv_flags::SINK, 64, &[]),
            "a sink for a send",
        );
        rdv_refused(rdv(read, rdv_flags::SINK, 0, &ranges), "an empty sink");
        rdv_refused(
            rdv(read, rdv_flags::SINK, 64, &ranges[..10]),
            "inline bytes not the whole message",
        );
        // The DATA checks apply: an unknown opcode under a rendezvous is refused too.
        let mut bad = d;
        bad.opcode = 0x77.into();
        assert_eq!(
            refused(rdv(bad, rdv_flags::SOURCE, 0, &[])),
            Err(WireError::Opcode(0x77))
        );
        let mut b = rdv(d, rdv_flags::SOURCE, 0, &[]);
        b.truncate(b.len() - 1);
        assert!(matches!(Message::parse(&b), Err(WireError::Length { .. })));

        let reply = Message::Rdv(Rdv::Reply {
            fabric_id: 1,
            host_id: 2,
            req_id: 9,
            status: Status::Ok,
            written: 1 << 20,
        });
        assert_eq!(Message::parse(&reply.encode()), Ok(reply));
        let mut bad = reply.encode();
        bad[HEADER_LEN + 24] = 1; // offset
        assert_eq!(Message::parse(&bad), Err(WireError::Reserved));
        let mut bad = reply.encode();
        bad.push(0);
        assert!(Message::parse(&bad).is_err());
        // HELLO capabilities: known bits only.
        let mut h = Message::Hello {
            ack: false,
            fabric_id: 1,
            host_id: 2,
            num_devices: 1,
            epoch: 3,
            caps: caps::RMA,
        }
        .encode();
        assert!(Message::parse(&h).is_ok());
        h[HEADER_LEN + 4] = 0x80;
        assert_eq!(Message::parse(&h), Err(WireError::Caps(0x80)));
    }

    #[test]
    fn lifecycle_messages_round_trip_and_bad_ones_are_refused() {
        let msgs = [
            Message::Cancel {
                fabric_id: 0x5eed,
                host_id: 2,
                req_id: 77,
            },
            Message::EpGone {
                fabric_id: 0x5eed,
                host_id: 2,
                dev: 1,
                ep: EVERY_EP,
                generation: 0,
                closed: false,
            },
            Message::EpGone {
                fabric_id: 0x5eed,
                host_id: 2,
                dev: 0,
                ep: 3,
                generation: 9,
                closed: true,
            },
            Message::AddrQuery {
                fabric_id: 0x5eed,
                host_id: 2,
                req_id: u64::MAX,
                dev: 1,
                ep: 4,
                generation: 5,
            },
            Message::AddrAnswer {
                fabric_id: 0x5eed,
                host_id: 2,
                req_id: 6,
                open: true,
            },
            Message::Pull {
                fabric_id: 0x5eed,
                host_id: 2,
                req_id: 78,
            },
        ];
        for m in msgs {
            let b = m.encode();
            assert_eq!(Message::parse(&b), Ok(m));
            // Reserved bits, a state out of range, a short or long body.
            let mut bad = b.clone();
            let last = bad.len() - 1;
            bad[last] = 1;
            assert_eq!(Message::parse(&bad), Err(WireError::Reserved), "{m:?}");
            let mut long = b.clone();
            long.push(0);
            let n = (long.len() - HEADER_LEN) as u32;
            long[16..20].copy_from_slice(&n.to_le_bytes());
            assert!(matches!(
                Message::parse(&long),
                Err(WireError::Length { .. })
            ));
            let mut short = b[..b.len() - 1].to_vec();
            let n = (short.len() - HEADER_LEN) as u32;
            short[16..20].copy_from_slice(&n.to_le_bytes());
            assert!(matches!(
                Message::parse(&short),
                Err(WireError::Length { .. })
            ));
        }
        let mut q = msgs[3].encode();
        q[body(10)] = 1;
        assert_eq!(
            Message::parse(&q),
            Err(WireError::State(1)),
            "a query has no state"
        );
        let mut g = msgs[1].encode();
        g[body(10)] = 2;
        assert_eq!(Message::parse(&g), Err(WireError::State(2)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Message::parse(&bytes);
        }

        /// Valid messages of every kind with bytes changed anywhere: parsed or refused, and
        /// whatever parses describes a chunk inside its message.
        #[test]
        fn mutated_messages_never_panic(
            kind in 0usize..9,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let mut b = match kind {
                0 => Message::Hello { ack: false, fabric_id: 1, host_id: 2, num_devices: 3, epoch: 4, caps: 0 }
                    .encode(),
                1 => data(data_desc(300, 100), &[9u8; 50]),
                3 => Message::Cancel { fabric_id: 1, host_id: 2, req_id: 3 }.encode(),
                7 => Message::Pull { fabric_id: 1, host_id: 2, req_id: 3 }.encode(),
                4 => Message::EpGone {
                    fabric_id: 1, host_id: 2, dev: 3, ep: 4, generation: 5, closed: true,
                }
                .encode(),
                5 => rdv(data_desc(1 << 20, 0), rdv_flags::SOURCE, 0, &[]),
                8 => {
                    let mut r = RdvDesc::default();
                    for i in 0..3u64 {
                        r.push_source(0x1000 * i, i, [1 << 19, 1 << 18, 1 << 18][i as usize]);
                    }
                    rdv_with(data_desc(1 << 20, 0), r)
                }
                6 => Message::Rdv(Rdv::Reply {
                    fabric_id: 1, host_id: 2, req_id: 3, status: Status::Ok, written: 64,
                })
                .encode(),
                _ => Message::Reply {
                    fabric_id: 1, host_id: 2, req_id: 3, status: Status::Ok,
                    total_len: 20, offset: 10, chunk: &[3; 10],
                }
                .encode(),
            };
            for (at, x) in flips {
                let i = at % b.len();
                b[i] ^= x;
            }
            if let Some(c) = cut {
                b.truncate(c % (b.len() + 1));
            }
            match Message::parse(&b) {
                Ok(Message::Data { desc, chunk, .. }) => {
                    let end = u64::from(desc.offset) + chunk.len() as u64;
                    prop_assert!(end <= u64::from(desc.total_len));
                }
                Ok(Message::Reply { total_len, offset, chunk, .. }) => {
                    prop_assert!(offset + chunk.len() as u64 <= total_len);
                }
                // A rendezvous parses only as one whole message: inline bytes are all of it,
                // or its head with a source holding at least one byte; a sink only for a read.
                Ok(Message::Rdv(Rdv::Data { desc, rdv, chunk, .. })) => {
                    let flags = u32::from(rdv.flags);
                    prop_assert_eq!(u64::from(desc.offset), 0);
                    if flags & rdv_flags::SOURCE != 0 {
                        prop_assert!((chunk.len() as u64) < u64::from(desc.total_len));
                    } else {
                        prop_assert_eq!(chunk.len() as u64, u64::from(desc.total_len));
                    }
                    let src: u64 = rdv.sources().iter().map(|s| u64::from(s.len)).sum();
                    if flags & rdv_flags::SOURCE != 0 {
                        prop_assert_eq!(chunk.len() as u64 + src, u64::from(desc.total_len));
                    } else {
                        prop_assert_eq!(src, 0);
                    }
                    prop_assert_eq!(flags & rdv_flags::SINK != 0, !rdv.sinks().is_empty());
                    prop_assert!(rdv.sources().iter().chain(rdv.sinks()).all(|s| u64::from(s.len) != 0));
                }
                _ => {}
            }
        }
    }
}
