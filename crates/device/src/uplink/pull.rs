// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stubs and PULL: end-to-end backpressure for messages between hosts.
//!
//! A receiver past its bound on held bytes keeps only a stub of a message (its description,
//! `fabric/remote.rs`) and leaves the bytes with the sender, whose request stays outstanding
//! with its guest's chain, exactly as a send held on one host waits in its TX ring. A receive
//! that matches the stub asks the sender for the bytes (PULL); the sender sends the message
//! again from the guest's chain under the same request id with the PULLED flag (as DATA
//! chunks, or by rendezvous from the guest's memory when large), and the receiver places it
//! into that receive and answers as for any message.

use tracing::debug;
use vfabric_proto::Status;

use super::remote::{send_payload, Outbound, RemoteSend};
use super::wire::{data_flags, Message};
use super::Worker;

impl Worker {
    /// Ask `host` for the bytes of its message `req_id`: a receive here matched its stub.
    pub(super) fn pull_out(&mut self, host: u16, req_id: u64) {
        let Some(dest) = self.dest_of(host) else {
            // Down: its stubs and the receives waiting for them were dealt with when it went.
            return;
        };
        let bytes = Message::Pull {
            fabric_id: self.set.fabric_id,
            host_id: self.set.host_id,
            req_id,
        }
        .encode();
        self.queue_to(host, dest, bytes);
    }

    /// `host` asks for the bytes of our message `req_id` again (a receive there matched its
    /// stub): they go from the guest's chain, which the pending request still holds, so the
    /// guest has not reused them. Anything but a message of ours pending at `host` is ignored.
    pub(super) fn pull_in(&mut self, host: u16, req_id: u64) {
        let Some((dev, port, req, mut desc, len)) = self.outbox.pulled(req_id, host) else {
            return debug!(host, req_id, "uplink: a PULL for no message of ours");
        };
        // Large bytes in one guest range are named to the target where they are (no copy).
        let Some((guest, payload)) = send_payload(&port, &req.payload, len) else {
            // The guest's memory went: the message fails, and the CANCEL lets the target
            // match its receive again.
            self.complete_pending(req_id, Some(host), Status::Fault);
            self.outbox.push(Outbound::Cancel { host, req_id });
            return;
        };
        desc.req_id = req_id.into();
        desc.flags = (u32::from(desc.flags) | data_flags::PULLED).into();
        self.outbox.push(Outbound::Send(Box::new(RemoteSend {
            host,
            dev,
            port,
            req,
            desc,
            payload,
            len,
            // Its reservation stays with its pending entry.
            charged: 0,
            guest,
            sink: Vec::new(),
        })));
    }
}
