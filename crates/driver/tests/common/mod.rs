// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Support shared by the driver's integration tests: an embedded `vfabricd`, bounded CQ waits,
//! data patterns and checksums. Each test file uses its own subset.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vfabric::{CompletionQueue, CqEntry, CqErrEntry, Error};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub daemon: Option<vfabric_device::DaemonHandle>,
    pub paths: Vec<PathBuf>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown();
        }
    }
}

pub fn rig(devices: u32) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let paths = vfabric_device::Config::socket_dir_paths(dir.path(), devices);
    let config = vfabric_device::Config::new(paths.clone());
    let daemon = vfabric_device::start(config).expect("start embedded vfabricd");
    Rig {
        _dir: dir,
        daemon: Some(daemon),
        paths,
    }
}

pub fn next(cq: &CompletionQueue) -> Result<CqEntry, CqErrEntry> {
    let deadline = Instant::now() + TIMEOUT;
    let mut v = Vec::new();
    loop {
        match cq.read(&mut v, 1) {
            Ok(_) => return Ok(v.pop().unwrap()),
            Err(Error::Again) => {}
            Err(Error::Avail) => return Err(cq.readerr().expect("error entry at head")),
            Err(e) => panic!("cq read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a completion"
        );
        std::thread::yield_now();
    }
}

pub fn next_ok(cq: &CompletionQueue) -> CqEntry {
    next(cq).unwrap_or_else(|e| panic!("unexpected error completion: {e:?}"))
}

pub fn next_err(cq: &CompletionQueue) -> CqErrEntry {
    match next(cq) {
        Ok(e) => panic!("expected an error completion, got {e:?}"),
        Err(e) => e,
    }
}

pub fn assert_quiet(cq: &CompletionQueue, d: Duration) {
    let until = Instant::now() + d;
    let mut v = Vec::new();
    while Instant::now() < until {
        match cq.read(&mut v, 1) {
            Err(Error::Again) => std::thread::sleep(Duration::from_millis(1)),
            other => panic!("unexpected completion: {other:?} {v:?}"),
        }
    }
}

pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// FNV-1a, the checksum of the integrity tests.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
    })
}

/// An enabled RDM endpoint with its transmit and receive CQs and its AV.
pub struct Ep {
    pub ep: vfabric::Endpoint,
    pub tx: CompletionQueue,
    pub rx: CompletionQueue,
    pub av: vfabric::AddressVector,
}

/// A domain on device `path` with `mem_mb` MiB of shared memory.
pub fn open_domain_mb(path: &std::path::Path, mem_mb: usize) -> vfabric::Domain {
    vfabric::Domain::open(
        path,
        vfabric::DomainAttr {
            mem_bytes: mem_mb << 20,
            ..Default::default()
        },
    )
    .expect("open domain")
}

/// An enabled RDM endpoint of `domain` whose CQs hold `cq_size` entries.
pub fn rdm_endpoint(domain: &vfabric::Domain, cq_size: usize) -> Ep {
    let cq = || {
        domain
            .cq_open(vfabric::CqAttr {
                size: cq_size,
                wait: vfabric::WaitMode::None,
            })
            .unwrap()
    };
    let (tx, rx) = (cq(), cq());
    let av = domain.av_open().unwrap();
    let ep = domain.endpoint(vfabric::EpAttr::default()).unwrap();
    ep.bind_cq(&tx, vfabric::BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, vfabric::BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    Ep { ep, tx, rx, av }
}

/// Two devices: initiator `a` on device 0, target `b` on device 1 with `b_addr` in a's AV.
pub struct Pair {
    pub da: vfabric::Domain,
    pub db: vfabric::Domain,
    pub a: Ep,
    pub b: Ep,
    pub b_addr: vfabric::FiAddr,
}

/// A [`Pair`] on devices 0 and 1 of `r` (`mem_mb` MiB per domain, CQs of `cq_size`).
pub fn rdm_pair(r: &Rig, mem_mb: usize, cq_size: usize) -> Pair {
    let da = open_domain_mb(&r.paths[0], mem_mb);
    let db = open_domain_mb(&r.paths[1], mem_mb);
    let a = rdm_endpoint(&da, cq_size);
    let b = rdm_endpoint(&db, cq_size);
    let b_addr = a.av.insert(b.ep.name()).unwrap();
    Pair {
        da,
        db,
        a,
        b,
        b_addr,
    }
}
