// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a device tells its driver about itself: feature bits, config space and the QUERY_CAPS
//! attribute list (spec §6.3, §6.5).

use vfabric_proto::{
    bit, caps::key, caps::HostAddrEntry, caps::RemoteHostEntry, flags, CapValue, CapsBuilder,
    FabricConfig, VENDOR_ID_VFABRIC, VIRTIO_FABRIC_F_ATOMIC, VIRTIO_FABRIC_F_LAZY_RX,
    VIRTIO_FABRIC_F_MQ, VIRTIO_FABRIC_F_MSG, VIRTIO_FABRIC_F_REMOTE_CQ_DATA, VIRTIO_FABRIC_F_RMA,
    VIRTIO_FABRIC_F_RMA_PMEM, VIRTIO_FABRIC_F_TAGGED, VIRTIO_FABRIC_F_VENDOR_CAPS,
};

use super::atomic;
use super::Fabric;
use crate::config::VENDOR_KEY_VIRTIO_DEVICE_ID;

/// Request flags this device honours (reported as `caps::key::FLAGS`).
pub(crate) const HONOURED_FLAGS: u64 = flags::REMOTE_CQ_DATA
    | flags::INJECT
    | flags::INJECT_COMPLETE
    | flags::TRANSMIT_COMPLETE
    | flags::DELIVERY_COMPLETE
    | flags::PEEK
    | flags::CLAIM
    | flags::DISCARD
    | flags::DIRECTED
    | flags::FENCE
    | flags::COMMIT_COMPLETE
    | flags::SAVE;

impl Fabric {
    /// Feature bits the device offers beyond the transport ones.
    pub fn fabric_features(&self) -> u64 {
        let mut f = bit(VIRTIO_FABRIC_F_MSG)
            | bit(VIRTIO_FABRIC_F_TAGGED)
            | bit(VIRTIO_FABRIC_F_VENDOR_CAPS)
            | bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA)
            | bit(VIRTIO_FABRIC_F_LAZY_RX)
            | bit(VIRTIO_FABRIC_F_RMA)
            | bit(VIRTIO_FABRIC_F_ATOMIC)
            | bit(VIRTIO_FABRIC_F_RMA_PMEM);
        if self.limits.num_queue_pairs > 1 {
            f |= bit(VIRTIO_FABRIC_F_MQ);
        }
        f
    }

    /// Config space of device `dev`.
    pub fn config_space(&self, dev: usize) -> FabricConfig {
        let l = &self.limits;
        FabricConfig {
            num_queue_pairs: u32::from(l.num_queue_pairs).into(),
            max_endpoints: l.max_endpoints.into(),
            max_mrs: l.max_mrs.into(),
            max_queue_size: u32::from(l.max_queue_size).into(),
            max_msg_size: l.max_msg_size.into(),
            inject_size: l.inject_size.into(),
            vendor_id: VENDOR_ID_VFABRIC.into(),
            node_addr: self.node_addr(dev).into(),
            max_sge: l.max_sge.into(),
            fabric_id: self.fabric_id.into(),
        }
    }

    /// QUERY_CAPS answer of device `dev` for a driver that acked `acked`.
    pub fn caps(&self, dev: usize, acked: u64) -> Vec<u8> {
        let l = &self.limits;
        let mut b = CapsBuilder::new();
        b.std_u64(key::MAX_MSG_SIZE, "max_msg_size", l.max_msg_size)
            .std_u64(key::INJECT_SIZE, "inject_size", l.inject_size.into())
            .std_u64(key::MAX_ENDPOINTS, "max_endpoints", l.max_endpoints.into())
            .std_u64(key::MAX_MRS, "max_mrs", l.max_mrs.into())
            .std_u64(
                key::MAX_UNEXPECTED_BYTES,
                "max_unexpected_bytes",
                l.max_unexpected_bytes,
            )
            .std_u64(key::EAGER_THRESHOLD, "eager_threshold", l.eager_threshold)
            .std_u64(
                key::MAX_QUEUE_SIZE,
                "max_queue_size",
                l.max_queue_size.into(),
            )
            .std_u64(
                key::NUM_QUEUE_PAIRS,
                "num_queue_pairs",
                l.num_queue_pairs.into(),
            )
            .std_u64(key::MAX_SGE, "max_sge", l.max_sge.into())
            .std_u64(key::CAPS, "caps", self.fabric_features())
            .std_u64(
                key::FLAGS,
                "flags",
                if acked & bit(VIRTIO_FABRIC_F_RMA_PMEM) != 0 {
                    HONOURED_FLAGS
                } else {
                    HONOURED_FLAGS & !(flags::COMMIT_COMPLETE | flags::SAVE)
                },
            )
            .std_u64(key::MSG_ORDER, "msg_order", 1)
            .std_u64(
                key::TAG_BITS,
                "tag_bits",
                if acked & bit(VIRTIO_FABRIC_F_TAGGED) != 0 {
                    64
                } else {
                    0
                },
            )
            .std_u64(
                key::MAX_RMA_SIZE,
                "max_rma_size",
                if acked & bit(VIRTIO_FABRIC_F_RMA) != 0 {
                    self.max_rma_size()
                } else {
                    0
                },
            )
            .std_u64(
                key::MR_KEY_SIZE,
                "mr_key_size",
                if acked & bit(VIRTIO_FABRIC_F_RMA) != 0 {
                    8
                } else {
                    0
                },
            )
            .std_u64(
                key::ATOMIC_OPS,
                "atomic_ops",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    atomic::ATOMIC_OPS
                } else {
                    0
                },
            )
            .std_u64(
                key::ATOMIC_TYPES,
                "atomic_types",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    atomic::ATOMIC_TYPES
                } else {
                    0
                },
            )
            .std_u64(
                key::MAX_ATOMIC_COUNT,
                "max_atomic_count",
                if acked & bit(VIRTIO_FABRIC_F_ATOMIC) != 0 {
                    atomic::MAX_ATOMIC_COUNT.into()
                } else {
                    0
                },
            )
            .push(
                0,
                key::FABRIC_NAME,
                "fabric_name",
                CapValue::Str("vfabric".into()),
            )
            .push(
                0,
                key::DOMAIN_NAME,
                "domain_name",
                CapValue::Str(format!("vfabric{dev}")),
            )
            .std_u64(key::NODE_ADDR, "node_addr", self.node_addr(dev))
            .std_u64(
                key::MAX_CQ_DATA_SIZE,
                "max_cq_data_size",
                if acked & bit(VIRTIO_FABRIC_F_REMOTE_CQ_DATA) != 0 {
                    8
                } else {
                    0
                },
            )
            .std_u64(key::VENDOR_ID, "vendor_id", VENDOR_ID_VFABRIC.into())
            .push(
                0,
                key::DRIVER_VERSION,
                "driver_version",
                CapValue::Str(env!("CARGO_PKG_VERSION").into()),
            );
        if acked & bit(VIRTIO_FABRIC_F_RMA_PMEM) != 0 {
            b.std_u64(
                key::PMEM_GRANULARITY,
                "pmem_granularity",
                crate::pmem::DEVICE_GRANULARITY as u64,
            );
        }
        let remote = self.remote_hosts.snapshot();
        if !remote.is_empty() {
            let mut v = Vec::with_capacity(remote.len() * RemoteHostEntry::LEN);
            for h in &remote {
                RemoteHostEntry {
                    host_id: h.host_id,
                    num_devices: h.num_devices,
                    up: h.up,
                }
                .encode(&mut v);
            }
            b.push(0, key::REMOTE_HOSTS, "remote_hosts", CapValue::Bytes(v));
        }
        if !self.host_addrs().is_empty() {
            let mut v = Vec::with_capacity(self.host_addrs().len() * HostAddrEntry::LEN);
            for e in self.host_addrs() {
                e.encode(&mut v);
            }
            b.push(0, key::HOST_ADDRS, "host_addrs", CapValue::Bytes(v));
        }
        if acked & bit(VIRTIO_FABRIC_F_VENDOR_CAPS) != 0 {
            if acked & bit(VIRTIO_FABRIC_F_RMA_PMEM) != 0 {
                b.push(
                    VENDOR_ID_VFABRIC,
                    vfabric_proto::caps::vfabricd_key::PMEM_GRANULARITY,
                    "pmem_granularity",
                    CapValue::Str(crate::pmem::DEVICE_GRANULARITY.name().into()),
                );
            }
            for a in &self.vendor_attrs {
                b.push(a.vendor, a.key, &a.name, a.value.clone());
            }
            b.push(
                VENDOR_ID_VFABRIC,
                VENDOR_KEY_VIRTIO_DEVICE_ID,
                "virtio_device_id",
                CapValue::U64(self.device_id.into()),
            );
            self.push_stats(&mut b, dev);
        }
        b.encode()
    }

    /// The device's statistics as vendor attributes (`vfabricd_key::STAT_*`).
    fn push_stats(&self, b: &mut CapsBuilder, dev: usize) {
        use vfabric_proto::caps::vfabricd_key as k;
        let Some(c) = self.counters(dev) else {
            return;
        };
        let s = c.snapshot(Default::default(), 0);
        let errors = s.error_completions.iter().map(|(_, n)| n).sum::<u64>();
        for (key, name, v) in [
            (k::STAT_MESSAGES_SENT, "messages_sent", s.messages_sent),
            (
                k::STAT_MESSAGES_RECEIVED,
                "messages_received",
                s.messages_received,
            ),
            (k::STAT_BYTES_COPIED, "bytes_copied", s.bytes_copied),
            (k::STAT_DISCONNECTS, "disconnects", s.disconnects),
            (k::STAT_BAD_CHAINS, "bad_chains", s.bad_chains),
            (k::STAT_RING_ERRORS, "ring_errors", s.ring_errors),
            (k::STAT_DGRAM_DROPS, "dgram_drops", s.dgram_drops),
            (k::STAT_ERROR_COMPLETIONS, "error_completions", errors),
            (
                k::STAT_PERSISTED_RANGES,
                "persisted_ranges",
                s.persisted_ranges,
            ),
            (
                k::STAT_PERSISTED_BYTES,
                "persisted_bytes",
                s.persisted_bytes,
            ),
        ] {
            b.push(VENDOR_ID_VFABRIC, key, name, CapValue::U64(v));
        }
    }

    /// Largest RMA transfer (MAX_RMA_SIZE): the message size limit.
    pub(crate) fn max_rma_size(&self) -> u64 {
        self.limits.max_msg_size
    }
}
