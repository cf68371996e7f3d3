// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabricd`: the virtio-fabric device, a vhost-user backend daemon.
//!
//! Each device is one vhost-user socket serving one frontend (guest) at a time; all devices of a
//! daemon share one local fabric, and a message moves with one copy from the sender's mapped
//! memory into the receiver's. See `docs/design.md` for the device/driver contract.
//!
//! Embedding (tests, the CLI demo):
//!
//! ```no_run
//! let config = vfabric_device::Config::new(vec!["/tmp/vf0.sock".into(), "/tmp/vf1.sock".into()]);
//! let daemon = vfabric_device::start(config)?;
//! // ... frontends connect to daemon.socket_paths() ...
//! println!("{:?}", daemon.stats());
//! daemon.shutdown();
//! # Ok::<(), vfabric_device::Error>(())
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

mod backend;
mod chain;
mod config;
mod daemon;
mod fabric;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod pmem;
mod poller;
mod ring;
mod socket;
mod stats;
#[cfg(test)]
mod testutil;
pub mod uplink;
mod xmem;

use std::path::PathBuf;

pub use config::{
    parse_duration, parse_fabric_id, parse_socket_mode, Config, Limits, VendorAttr,
    DEFAULT_HANDSHAKE_TIMEOUT, MAX_DEVICES,
};
pub use daemon::{start, DaemonHandle};
pub use stats::{DeviceStats, Stats};

/// Pin the calling thread to `cpu` (logged and ignored if the CPU is not available).
pub fn pin_current_thread(cpu: usize) {
    if cpu >= libc::CPU_SETSIZE as usize {
        tracing::warn!(cpu, "cannot pin to a CPU beyond CPU_SETSIZE");
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is below
    // CPU_SETSIZE) and sched_setaffinity only reads it for the calling thread (pid 0).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        tracing::warn!(
            cpu,
            "cannot pin thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The `type` vfabricd reports with `--print-capabilities`.
pub const VHOST_USER_TYPE: &str = "fabric";

/// The vhost-user backend capability JSON (`--print-capabilities`).
pub fn capabilities_json() -> String {
    format!("{{\n  \"type\": \"{VHOST_USER_TYPE}\"\n}}")
}

/// Errors of the daemon's setup (guest errors never surface here: they become completion
/// statuses or a dropped connection).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot read configuration file {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse configuration: {0}")]
    ConfigParse(String),
    #[error("cannot create socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is in use: another process (a running vfabricd?) listens on it; stop it or \
         choose another socket"
    )]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot spawn a thread: {0}")]
    Thread(std::io::Error),
    #[error("uplink: {0}")]
    Uplink(String),
}
