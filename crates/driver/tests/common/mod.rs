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
