// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What hosts say to each other over the uplink. Not part of the virtio device: only `vfabricd`
//! daemons speak it, over the host's libfabric. Everything that arrives is untrusted input,
//! checked like a guest's descriptors: a message that does not parse is refused with an error,
//! never acted on.

use vfabric_proto::{ByteValued, Le16, Le32, Le64};

/// "VFUL" little-endian.
pub const MAGIC: u32 = 0x4c55_4656;
/// Version of this wire format.
pub const VERSION: u16 = 1;

/// Message kinds.
pub mod kind {
    /// A host introduces itself (sent until the peer answers, then as a keepalive).
    pub const HELLO: u16 = 1;
    /// The answer to a HELLO: the same body.
    pub const HELLO_ACK: u16 = 2;
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

pub const HEADER_LEN: usize = std::mem::size_of::<Header>();
/// Largest message the uplink receives (and so sends).
pub const MAX_MESSAGE: usize = 4096;

/// A parsed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        ack: bool,
        fabric_id: u32,
        host_id: u16,
        num_devices: u16,
        epoch: u64,
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
}

impl Message {
    /// Encode into a message buffer.
    pub fn encode(&self) -> Vec<u8> {
        let Message::Hello {
            ack,
            fabric_id,
            host_id,
            num_devices,
            epoch,
        } = *self;
        let body = Hello {
            num_devices: num_devices.into(),
            reserved: 0.into(),
            caps: 0.into(),
            epoch: epoch.into(),
        };
        let h = Header {
            magic: MAGIC.into(),
            version: VERSION.into(),
            kind: if ack { kind::HELLO_ACK } else { kind::HELLO }.into(),
            fabric_id: fabric_id.into(),
            host_id: host_id.into(),
            reserved0: 0.into(),
            len: (std::mem::size_of::<Hello>() as u32).into(),
            reserved1: 0.into(),
        };
        let mut v = h.as_slice().to_vec();
        v.extend_from_slice(body.as_slice());
        v
    }

    /// Parse one received message (all of it: trailing bytes are an error).
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
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
                if u16::from(hello.reserved) != 0 || u32::from(hello.caps) != 0 {
                    return Err(WireError::Reserved);
                }
                Ok(Message::Hello {
                    ack: k == kind::HELLO_ACK,
                    fabric_id: h.fabric_id.into(),
                    host_id: h.host_id.into(),
                    num_devices: hello.num_devices.into(),
                    epoch: hello.epoch.into(),
                })
            }
            k => Err(WireError::Kind(k)),
        }
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

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Message::parse(&bytes);
        }
    }
}
