// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! QUERY_CAPS answer: a typed, self-describing list of capabilities, limits and vendor
//! attributes.
//!
//! Layout (little-endian): a [`CapsHeader`], then `count` entries. Each entry is a
//! [`CapEntryHeader`] followed by `name_len` bytes of UTF-8 name and `value_len` bytes of value,
//! padded with zeros to a multiple of 8 bytes. Vendor 0 is the standard namespace (keys in
//! [`key`]); any other vendor id is vendor-specific and a driver that does not know it keeps the
//! entry as an opaque attribute.

use crate::{ByteValued, Le16, Le32, ProtoError};

/// "VFCP".
pub const CAPS_MAGIC: u32 = 0x5043_4656;
pub const CAPS_VERSION: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapsHeader {
    pub magic: Le32,
    pub version: Le16,
    pub count: Le16,
    /// Total bytes of the answer, header included.
    pub total_len: Le32,
    pub reserved: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (16 bytes).
unsafe impl ByteValued for CapsHeader {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapEntryHeader {
    /// 0: standard key; otherwise the vendor's id.
    pub vendor: Le32,
    pub key: Le16,
    /// `VTYPE_*`.
    pub vtype: u8,
    pub name_len: u8,
    pub value_len: Le32,
    pub reserved: Le32,
}
// SAFETY: plain-old-data, repr(C), no padding (16 bytes).
unsafe impl ByteValued for CapEntryHeader {}

pub const VTYPE_U64: u8 = 1;
pub const VTYPE_BOOL: u8 = 2;
pub const VTYPE_STR: u8 = 3;
pub const VTYPE_BYTES: u8 = 4;

/// Standard keys (vendor 0).
pub mod key {
    pub const MAX_MSG_SIZE: u16 = 1;
    pub const INJECT_SIZE: u16 = 2;
    pub const MAX_ENDPOINTS: u16 = 3;
    pub const MAX_MRS: u16 = 4;
    pub const MAX_UNEXPECTED_BYTES: u16 = 5;
    pub const EAGER_THRESHOLD: u16 = 6;
    pub const MAX_QUEUE_SIZE: u16 = 7;
    pub const NUM_QUEUE_PAIRS: u16 = 8;
    pub const MAX_SGE: u16 = 9;
    /// Bitmask of `VIRTIO_FABRIC_F_*` capability classes implemented.
    pub const CAPS: u16 = 10;
    /// Bitmask of request `flags::*` the device honours.
    pub const FLAGS: u16 = 11;
    /// Message ordering guarantees: bit 0 = send-after-send per queue pair (FI_ORDER_SAS).
    pub const MSG_ORDER: u16 = 12;
    pub const TAG_BITS: u16 = 13;
    pub const MAX_RMA_SIZE: u16 = 14;
    pub const MR_KEY_SIZE: u16 = 15;
    /// Bitmask of atomic operations supported (bit = `fi_op` value).
    pub const ATOMIC_OPS: u16 = 16;
    /// Bitmask of atomic datatypes supported (bit = `fi_datatype` value).
    pub const ATOMIC_TYPES: u16 = 17;
    pub const FABRIC_NAME: u16 = 18;
    pub const DOMAIN_NAME: u16 = 19;
    pub const NODE_ADDR: u16 = 20;
    pub const MAX_CQ_DATA_SIZE: u16 = 21;
    pub const MAX_ATOMIC_COUNT: u16 = 22;
    /// Vendor of the implementation (also in config space).
    pub const VENDOR_ID: u16 = 23;
    pub const DRIVER_VERSION: u16 = 24;
    /// Other hosts of the fabric the device can reach (several hosts): BYTES, one
    /// [`RemoteHostEntry`](crate::caps::RemoteHostEntry) (8 bytes) per host. Absent on one host.
    pub const REMOTE_HOSTS: u16 = 25;
    /// The IP addresses that name hosts of the fabric (several hosts: each host's uplink
    /// address): BYTES, one [`HostAddrEntry`](crate::caps::HostAddrEntry) (20 bytes) per
    /// address. Absent on one host.
    pub const HOST_ADDRS: u16 = 26;
    /// With VIRTIO_FABRIC_F_RMA_PMEM: the coarsest store granularity of the device's persistent
    /// regions (U64: 0 byte, 1 cache line, 2 page); each PMEM MR_REG reports its own (§6.17).
    pub const PMEM_GRANULARITY: u16 = 40;
}

/// Keys of the vendor attributes `vfabricd` reports (vendor `VENDOR_ID_VFABRIC`, only when
/// VIRTIO_FABRIC_F_VENDOR_CAPS is negotiated).
pub mod vfabricd_key {
    pub const COPY_ENGINE: u16 = 1;
    pub const ONE_COPY: u16 = 2;
    pub const DEVICE_VERSION: u16 = 3;
    pub const IMPLEMENTATION: u16 = 4;
    /// With VIRTIO_FABRIC_F_RMA_PMEM: the store granularity of persistent regions as text
    /// ("byte", "cache_line", "page"; the standard `PMEM_GRANULARITY`, for `fi_info`).
    pub const PMEM_GRANULARITY: u16 = 5;
    /// The virtio device id the daemon announces (U64).
    pub const VIRTIO_DEVICE_ID: u16 = 100;
    /// Device statistics (U64 each), current when QUERY_CAPS is answered: the counters
    /// `vfabricd` keeps per device since it started.
    pub const STAT_MESSAGES_SENT: u16 = 200;
    pub const STAT_MESSAGES_RECEIVED: u16 = 201;
    pub const STAT_BYTES_COPIED: u16 = 202;
    pub const STAT_DISCONNECTS: u16 = 203;
    pub const STAT_BAD_CHAINS: u16 = 204;
    pub const STAT_RING_ERRORS: u16 = 205;
    pub const STAT_DGRAM_DROPS: u16 = 206;
    /// Completions with a status other than OK.
    pub const STAT_ERROR_COMPLETIONS: u16 = 207;
    /// Persistent-memory ranges made durable, and their bytes (§6.17).
    pub const STAT_PERSISTED_RANGES: u16 = 220;
    pub const STAT_PERSISTED_BYTES: u16 = 221;
}

/// One entry of the `REMOTE_HOSTS` capability: 8 bytes, little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteHostEntry {
    pub host_id: u16,
    /// Devices the host serves (its device indices are 0..num_devices).
    pub num_devices: u16,
    /// The host answers its peers now (bit 0 of the flags word).
    pub up: bool,
}

impl RemoteHostEntry {
    pub const LEN: usize = 8;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.host_id.to_le_bytes());
        out.extend_from_slice(&self.num_devices.to_le_bytes());
        out.extend_from_slice(&u32::from(self.up).to_le_bytes());
    }

    /// Decode a whole `REMOTE_HOSTS` value (None if its length is not a multiple of 8).
    pub fn decode_all(b: &[u8]) -> Option<Vec<Self>> {
        if !b.len().is_multiple_of(Self::LEN) {
            return None;
        }
        Some(
            b.chunks_exact(Self::LEN)
                .map(|c| Self {
                    host_id: u16::from_le_bytes([c[0], c[1]]),
                    num_devices: u16::from_le_bytes([c[2], c[3]]),
                    up: c[4] & 1 == 1,
                })
                .collect(),
        )
    }
}

/// One entry of the `HOST_ADDRS` capability: 20 bytes, little-endian: `le16 host_id`,
/// `le16 family` (4 or 6), 16 address bytes (an IPv4 address in the first 4, network order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAddrEntry {
    pub host_id: u16,
    pub addr: std::net::IpAddr,
}

impl HostAddrEntry {
    pub const LEN: usize = 20;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.host_id.to_le_bytes());
        let mut a = [0u8; 16];
        let family: u16 = match self.addr {
            std::net::IpAddr::V4(v4) => {
                a[..4].copy_from_slice(&v4.octets());
                4
            }
            std::net::IpAddr::V6(v6) => {
                a.copy_from_slice(&v6.octets());
                6
            }
        };
        out.extend_from_slice(&family.to_le_bytes());
        out.extend_from_slice(&a);
    }

    /// Decode a whole `HOST_ADDRS` value (None if its length is not a multiple of 20 or an
    /// entry has an unknown family).
    pub fn decode_all(b: &[u8]) -> Option<Vec<Self>> {
        if !b.len().is_multiple_of(Self::LEN) {
            return None;
        }
        b.chunks_exact(Self::LEN)
            .map(|c| {
                let host_id = u16::from_le_bytes([c[0], c[1]]);
                let a: [u8; 16] = c[4..20].try_into().ok()?;
                let addr = match u16::from_le_bytes([c[2], c[3]]) {
                    4 => std::net::IpAddr::from([a[0], a[1], a[2], a[3]]),
                    6 => std::net::IpAddr::from(a),
                    _ => return None,
                };
                Some(Self { host_id, addr })
            })
            .collect()
    }
}

/// A decoded capability value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CapValue {
    U64(u64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
}

impl std::fmt::Display for CapValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapValue::U64(v) => write!(f, "{v}"),
            CapValue::Bool(v) => write!(f, "{v}"),
            CapValue::Str(v) => write!(f, "{v}"),
            CapValue::Bytes(v) => {
                for b in v {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapEntry {
    pub vendor: u32,
    pub key: u16,
    pub name: String,
    pub value: CapValue,
}

/// Builds a QUERY_CAPS answer (device side).
#[derive(Default)]
pub struct CapsBuilder {
    entries: Vec<CapEntry>,
}

impl CapsBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, vendor: u32, key: u16, name: &str, value: CapValue) -> &mut Self {
        self.entries.push(CapEntry {
            vendor,
            key,
            name: name.chars().take(255).collect(),
            value,
        });
        self
    }
    pub fn std_u64(&mut self, key: u16, name: &str, v: u64) -> &mut Self {
        self.push(0, key, name, CapValue::U64(v))
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; std::mem::size_of::<CapsHeader>()];
        for e in &self.entries {
            let value: Vec<u8> = match &e.value {
                CapValue::U64(v) => v.to_le_bytes().to_vec(),
                CapValue::Bool(v) => vec![*v as u8],
                CapValue::Str(s) => s.as_bytes().to_vec(),
                CapValue::Bytes(b) => b.clone(),
            };
            let vtype = match e.value {
                CapValue::U64(_) => VTYPE_U64,
                CapValue::Bool(_) => VTYPE_BOOL,
                CapValue::Str(_) => VTYPE_STR,
                CapValue::Bytes(_) => VTYPE_BYTES,
            };
            let name = e.name.as_bytes();
            let name = &name[..name.len().min(255)];
            let h = CapEntryHeader {
                vendor: e.vendor.into(),
                key: e.key.into(),
                vtype,
                name_len: name.len() as u8,
                value_len: (value.len() as u32).into(),
                reserved: 0.into(),
            };
            out.extend_from_slice(h.as_slice());
            out.extend_from_slice(name);
            out.extend_from_slice(&value);
            while out.len() & 7 != 0 {
                out.push(0);
            }
        }
        let hdr = CapsHeader {
            magic: CAPS_MAGIC.into(),
            version: CAPS_VERSION.into(),
            count: (self.entries.len() as u16).into(),
            total_len: (out.len() as u32).into(),
            reserved: 0.into(),
        };
        out[..std::mem::size_of::<CapsHeader>()].copy_from_slice(hdr.as_slice());
        out
    }
}

/// Parses a QUERY_CAPS answer (driver side). Never panics on hostile input.
pub struct CapsParser;

impl CapsParser {
    pub fn parse(buf: &[u8]) -> Result<Vec<CapEntry>, ProtoError> {
        let hlen = std::mem::size_of::<CapsHeader>();
        let h = buf
            .get(..hlen)
            .and_then(CapsHeader::from_slice)
            .ok_or(ProtoError::BadCaps("short header"))?;
        if u32::from(h.magic) != CAPS_MAGIC {
            return Err(ProtoError::BadCaps("bad magic"));
        }
        if u16::from(h.version) != CAPS_VERSION {
            return Err(ProtoError::BadCaps("unknown version"));
        }
        let total = u32::from(h.total_len) as usize;
        let buf = buf.get(..total).ok_or(ProtoError::BadCaps("truncated"))?;
        let mut off = hlen;
        let mut out = Vec::new();
        let elen = std::mem::size_of::<CapEntryHeader>();
        for _ in 0..u16::from(h.count) {
            let e = buf
                .get(
                    off..off
                        .checked_add(elen)
                        .ok_or(ProtoError::BadCaps("overflow"))?,
                )
                .and_then(CapEntryHeader::from_slice)
                .ok_or(ProtoError::BadCaps("short entry"))?;
            off += elen;
            let nlen = e.name_len as usize;
            let vlen = u32::from(e.value_len) as usize;
            let name_end = off
                .checked_add(nlen)
                .ok_or(ProtoError::BadCaps("overflow"))?;
            let val_end = name_end
                .checked_add(vlen)
                .ok_or(ProtoError::BadCaps("overflow"))?;
            let name = buf
                .get(off..name_end)
                .ok_or(ProtoError::BadCaps("short name"))?;
            let val = buf
                .get(name_end..val_end)
                .ok_or(ProtoError::BadCaps("short value"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            // Entries of a value type this driver does not know (or malformed values) are
            // skipped, not fatal: a newer device may add types (docs/spec.md).
            let value = match e.vtype {
                VTYPE_U64 => val
                    .try_into()
                    .ok()
                    .map(|b: [u8; 8]| CapValue::U64(u64::from_le_bytes(b))),
                VTYPE_BOOL => val.first().map(|b| CapValue::Bool(*b != 0)),
                VTYPE_STR => Some(CapValue::Str(String::from_utf8_lossy(val).into_owned())),
                VTYPE_BYTES => Some(CapValue::Bytes(val.to_vec())),
                _ => None,
            };
            let Some(value) = value else {
                off = val_end.div_ceil(8) * 8;
                continue;
            };
            out.push(CapEntry {
                vendor: e.vendor.into(),
                key: e.key.into(),
                name,
                value,
            });
            off = val_end.div_ceil(8) * 8;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let mut b = CapsBuilder::new();
        b.std_u64(key::MAX_MSG_SIZE, "max_msg_size", 1 << 22)
            .push(0x5646, 1, "copy_engine", CapValue::Str("memcpy".into()))
            .push(0x5646, 2, "numa_aware", CapValue::Bool(false));
        let bytes = b.encode();
        let e = CapsParser::parse(&bytes).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].value, CapValue::U64(1 << 22));
        assert_eq!(e[1].name, "copy_engine");
        assert_eq!(e[2].value, CapValue::Bool(false));
    }

    #[test]
    fn unknown_value_types_are_skipped() {
        let mut b = CapsBuilder::new();
        b.std_u64(key::INJECT_SIZE, "inject_size", 64)
            .std_u64(key::MAX_SGE, "max_sge", 8);
        let mut bytes = b.encode();
        // The first entry's header starts right after the 16-byte list header; vtype is at +6.
        bytes[16 + 6] = 0x7f;
        let e = CapsParser::parse(&bytes).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, key::MAX_SGE);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = CapsParser::parse(&bytes);
        }

        #[test]
        fn corrupted_answers_do_not_panic(idx in 0usize..200, val in any::<u8>()) {
            let mut b = CapsBuilder::new();
            b.std_u64(key::INJECT_SIZE, "inject_size", 64)
                .push(7, 9, "x", CapValue::Str("abc".into()));
            let mut bytes = b.encode();
            let i = idx % bytes.len();
            bytes[i] = val;
            let _ = CapsParser::parse(&bytes);
        }
    }
}
