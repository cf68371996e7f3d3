// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Control-queue requests (QUERY_CAPS, EP_OPEN, EP_CLOSE, CANCEL, ADDR_CHECK). They are
//! synchronous: one at a time per domain, waited for by polling then blocking with a timeout.

use std::time::{Duration, Instant};

use vfabric_proto::caps::CapsHeader;
use vfabric_proto::{
    ep_open, ByteValued, CapEntry, CapsParser, Completion, FabricAddr, Opcode, Request, Status,
};

use crate::domain::DomainInner;
use crate::request::{Done, Payload, PendingOp, Tx as TxData};
use crate::virtqueue::RxData;
use crate::{Error, Result};

/// First QUERY_CAPS buffer size; grown on `Truncated`.
const CAPS_INITIAL_BUF: usize = 4096;
const CAPS_MAX_BUF: usize = 1 << 20;
/// How long a control waiter polls before it blocks.
const CONTROL_SPIN: Duration = Duration::from_micros(50);
/// Longest single sleep of a control waiter (bounds the cost of a wakeup consumed elsewhere).
const CONTROL_SLEEP_SLICE: Duration = Duration::from_millis(10);

/// Outcome of a control request.
#[derive(Debug)]
pub(crate) struct CtrlResult {
    pub status: Status,
    pub completion: Completion,
    /// Bytes the device wrote to the data area.
    pub data: Vec<u8>,
}

/// Dispatch a finished control request (called from progress).
pub(crate) fn complete_control(domain: &DomainInner, f: Done<'_>) {
    let cookie = f.cookie;
    let PendingOp::Control { data } = f.op else {
        return;
    };
    let data = data.take();
    if domain
        .ctrl_abandoned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&cookie)
    {
        tracing::debug!(cookie, "late completion of an abandoned control request");
        return;
    }
    let (status, completion) = match f.completion {
        Some(c) if !f.device_fault => (
            Status::from_u32(c.status.into()).unwrap_or(Status::Invalid),
            *c,
        ),
        Some(c) => (Status::Fault, *c),
        None => (Status::BadChain, Completion::default()),
    };
    let mut bytes = Vec::new();
    if let Some(area) = data {
        let n = (u64::from(completion.len) as usize).min(area.capacity());
        bytes.resize(n, 0);
        area.read_at(0, &mut bytes);
    }
    domain
        .ctrl_results
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            cookie,
            CtrlResult {
                status,
                completion,
                data: bytes,
            },
        );
}

impl DomainInner {
    /// Post a control request with a `data_len`-byte data area and wait for its completion.
    pub(crate) fn control(&self, req: Request, data_len: usize) -> Result<CtrlResult> {
        self.control_with_payload(req, &[], data_len)
    }

    /// As [`DomainInner::control`] with a payload (≤ `INLINE_TX_MAX` bytes, carried in the
    /// header descriptor, e.g. MR_REG's segments).
    pub(crate) fn control_with_payload(
        &self,
        req: Request,
        payload: &[u8],
        data_len: usize,
    ) -> Result<CtrlResult> {
        if payload.len() > crate::virtqueue::INLINE_TX_MAX {
            return Err(Error::InvalidArgument("control payload too large".into()));
        }
        self.check_usable()?;
        let _serial = self.ctrl_lock.lock().unwrap();
        let deadline = Instant::now() + self.ctrl_timeout;
        let header = req.to_header();
        let cookie = loop {
            let area = if data_len > 0 {
                let a = self.mem.alloc(data_len, 64)?;
                a.zero();
                Some(a)
            } else {
                None
            };
            let descs = area.as_ref().map(|a| [(a.device_addr(), data_len as u32)]);
            let rx = match &descs {
                Some(d) => RxData::Descs(d),
                None => RxData::None,
            };
            let tx = if payload.is_empty() {
                TxData::None
            } else {
                TxData::Inline(Payload::Bytes(payload))
            };
            match self.queues[0].post(
                || header,
                tx,
                rx,
                false,
                false,
                || PendingOp::Control { data: area },
            ) {
                Ok(c) => break c,
                // Ring full of abandoned requests: let the device drain it.
                Err(Error::Again) if Instant::now() < deadline => {
                    self.progress_quiet();
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
        };
        let spin_until = Instant::now() + CONTROL_SPIN;
        loop {
            self.progress_quiet();
            if let Some(r) = self.ctrl_results.lock().unwrap().remove(&cookie) {
                return Ok(r);
            }
            let now = Instant::now();
            if now >= deadline {
                self.ctrl_abandoned.lock().unwrap().insert(cookie);
                tracing::warn!(?req.opcode, "control request timed out");
                return Err(Error::Timeout);
            }
            if self.is_closed() {
                return Err(Error::Closed);
            }
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            self.block(Some(deadline.min(now + CONTROL_SLEEP_SLICE)), None)?;
        }
    }

    fn control_ok(&self, req: Request, data_len: usize) -> Result<CtrlResult> {
        let r = self.control(req, data_len)?;
        match r.status {
            Status::Ok => Ok(r),
            s => Err(Error::Device(s)),
        }
    }

    /// QUERY_CAPS, growing the buffer while the device answers `Truncated`.
    pub(crate) fn query_caps(&self) -> Result<Vec<CapEntry>> {
        let mut size = CAPS_INITIAL_BUF;
        for _ in 0..6 {
            let r = self.control(Request::new(Opcode::QueryCaps), size)?;
            match r.status {
                Status::Ok => {
                    let hlen = std::mem::size_of::<CapsHeader>();
                    if let Some(h) = r.data.get(..hlen).and_then(CapsHeader::from_slice) {
                        let total = u32::from(h.total_len) as usize;
                        if total > r.data.len() {
                            return Err(Error::Transport(format!(
                                "QUERY_CAPS answer claims {total} bytes, device wrote {}",
                                r.data.len()
                            )));
                        }
                    }
                    return Ok(CapsParser::parse(&r.data)?);
                }
                Status::Truncated => {
                    let olen = u64::from(r.completion.olen) as usize;
                    let len = u64::from(r.completion.len) as usize;
                    // `olen` is "bytes needed"; accept either reading of it.
                    let needed = olen.max(len.saturating_add(olen)).max(size * 2);
                    if needed > CAPS_MAX_BUF {
                        return Err(Error::TooSmall { needed });
                    }
                    tracing::debug!(size, needed, "QUERY_CAPS truncated, retrying");
                    size = needed;
                }
                s => return Err(Error::Device(s)),
            }
        }
        Err(Error::Transport("QUERY_CAPS kept truncating".into()))
    }

    /// EP_OPEN: returns (endpoint id, full address).
    pub(crate) fn ep_open(&self, ep_type: u64) -> Result<(u32, FabricAddr)> {
        let mut req = Request::new(Opcode::EpOpen);
        req.data = ep_type;
        let r = self.control_ok(req, 0)?;
        let id = u64::from(r.completion.data);
        let addr = FabricAddr::from_wire(&r.completion.src);
        if id > u32::MAX as u64 || addr.ep as u64 != id {
            return Err(Error::Transport(format!(
                "EP_OPEN answered id {id} with address {addr}"
            )));
        }
        Ok((id as u32, addr))
    }

    pub(crate) fn ep_close(&self, ep: u32) -> Result<()> {
        let mut req = Request::new(Opcode::EpClose);
        req.ep = ep;
        self.control_ok(req, 0).map(|_| ())
    }

    /// CANCEL: true if the device found the request (it then completes `Canceled`).
    pub(crate) fn cancel_request(&self, ep: u32, cookie: u64) -> Result<bool> {
        let mut req = Request::new(Opcode::Cancel);
        req.ep = ep;
        req.data = cookie;
        let r = self.control(req, 0)?;
        match r.status {
            Status::Ok => Ok(true),
            Status::NoMessage => Ok(false),
            s => Err(Error::Device(s)),
        }
    }

    pub(crate) fn addr_check(&self, addr: &FabricAddr) -> Result<bool> {
        let mut req = Request::new(Opcode::AddrCheck);
        req.peer = *addr;
        let r = self.control(req, 0)?;
        match r.status {
            Status::Ok => Ok(true),
            Status::AddrNotAvail | Status::BadEndpoint => Ok(false),
            s => Err(Error::Device(s)),
        }
    }
}

impl DomainInner {
    /// SVC_BIND: bind `service` (0: any free one) to endpoint `ep`; the service bound.
    pub(crate) fn svc_bind(&self, ep: u32, service: u16) -> Result<u16> {
        let mut req = Request::new(Opcode::SvcBind);
        req.ep = ep;
        req.data = service.into();
        let r = self.control_ok(req, 0)?;
        u16::try_from(u64::from(r.completion.data))
            .ok()
            .filter(|s| *s != 0 && (service == 0 || *s == service))
            .ok_or_else(|| {
                Error::Transport(format!(
                    "SVC_BIND of {service} answered {:?}",
                    r.completion.data
                ))
            })
    }

    /// SVC_RESOLVE: the endpoint bound to `service` on the host of node address `host`
    /// (`None`: nothing is bound to it).
    pub(crate) fn svc_resolve(&self, host: u64, service: u16) -> Result<Option<FabricAddr>> {
        let mut req = Request::new(Opcode::SvcResolve);
        req.peer = FabricAddr::new(host, 0, 0);
        req.data = service.into();
        let r = self.control(req, 0)?;
        match r.status {
            Status::Ok => Ok(Some(FabricAddr::from_wire(&r.completion.src))),
            Status::AddrNotAvail => Ok(None),
            s => Err(Error::Device(s)),
        }
    }
}

/// EP_OPEN type code for an endpoint type.
pub(crate) fn ep_type_code(t: crate::endpoint::EpType) -> Result<u64> {
    use crate::endpoint::EpType;
    match t {
        EpType::Rdm => Ok(ep_open::TYPE_RDM),
        EpType::Dgram => Ok(ep_open::TYPE_DGRAM),
        EpType::Msg => Err(Error::Unsupported(
            "FI_EP_MSG (connection management is not implemented)".into(),
        )),
    }
}
