// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabricd`: serve virtio-fabric devices on vhost-user sockets until SIGTERM, SIGINT or
//! SIGHUP.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use vfabric_device::{capabilities_json, parse_duration, parse_socket_mode, start, Config, Error};

/// virtio-fabric vhost-user device daemon: one socket per device, all devices on one local
/// fabric, one copy between guests.
#[derive(Parser, Debug)]
#[command(name = "vfabricd", version, about)]
struct Args {
    /// Socket of a single device.
    #[arg(long, conflicts_with = "socket_dir")]
    socket_path: Option<PathBuf>,
    /// Directory for DIR/vfabric0.sock … vfabric{N-1}.sock (created if missing).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Number of devices with --socket-dir (1..=4096).
    #[arg(long, requires = "socket_dir")]
    devices: Option<u32>,
    /// Permission bits of the device sockets, in octal (e.g. 0660; default: per umask).
    /// Whoever can write to a device socket can be that device's guest.
    #[arg(long, value_parser = |s: &str| parse_socket_mode(s).map_err(|e| e.to_string()))]
    socket_mode: Option<u32>,
    /// Group (name or id) of the device sockets (default: the daemon's group).
    #[arg(long)]
    socket_group: Option<String>,
    /// Drop a frontend that has not started a ring this long after it connected, freeing the
    /// device for the next guest (e.g. 5s, 500ms; default 5s; 0: no deadline, e.g. for a VMM
    /// that connects long before its guest's driver starts the rings).
    #[arg(long, value_parser = |s: &str| parse_duration(s).map_err(|e| e.to_string()))]
    handshake_timeout: Option<std::time::Duration>,
    /// Milliseconds a commit to a region with a target commit handler waits for the target's
    /// verdict before its initiator gets TIMED_OUT (default 5000; 10..=3600000).
    #[arg(long)]
    commit_timeout_ms: Option<u64>,
    /// TOML file with the same settings (command-line options override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter directive).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Fabric id (decimal or 0x-hex, not 0): daemons with the same id form one fabric; without
    /// it a random id is drawn at start, so separate daemons never confuse addresses.
    #[arg(long, value_parser = vfabric_device::parse_fabric_id)]
    fabric_id: Option<u32>,
    /// Host id within the fabric (0..=65535; default 1).
    #[arg(long)]
    host_id: Option<u16>,
    /// Several hosts: the libfabric provider that links this host to the others of its fabric
    /// (e.g. "tcp;ofi_rxm", "verbs;ofi_rxm"); needs --listen.
    #[arg(long, requires = "listen")]
    uplink: Option<String>,
    /// This host's uplink address, HOST[:PORT] (default port 9229).
    #[arg(long, requires = "uplink")]
    listen: Option<String>,
    /// Another host of the fabric, ID=HOST[:PORT] (repeat for each).
    #[arg(long = "peer", value_parser = vfabric_device::uplink::parse_peer, requires = "uplink")]
    peers: Vec<(u16, String)>,
    /// Milliseconds of silence after which a peer host is reported down (default 3000).
    #[arg(long, requires = "uplink")]
    peer_timeout_ms: Option<u64>,
    /// Virtio device id, 1..=63 (default 56, the provisional id; QEMU 8.2-11.1 abort on 56, so
    /// behind QEMU's generic vhost-user device use the stand-in 38 and set the same number as its
    /// virtio-id and as the guest driver's VFABRIC_DEVICE_ID).
    #[arg(long, value_parser = vfabric_proto::parse_device_id)]
    device_id: Option<u32>,
    /// Spin budget in microseconds after work was found (0 disables polling).
    #[arg(long)]
    poll_us: Option<u64>,
    /// Pin the data-plane poller thread to this CPU (poller i of several to this CPU + i).
    #[arg(long)]
    poller_cpu: Option<usize>,
    /// Data-plane poller threads (default 1); device d is polled by poller d % N.
    #[arg(long)]
    pollers: Option<usize>,
    /// Queue pairs per device (default 2).
    #[arg(long)]
    num_queue_pairs: Option<u16>,
    /// Endpoints per device (default 64).
    #[arg(long)]
    max_endpoints: Option<u32>,
    /// Memory regions per device (default 1024).
    #[arg(long)]
    max_mrs: Option<u32>,
    /// Largest ring size (default 1024).
    #[arg(long)]
    max_queue_size: Option<u16>,
    /// Largest message in bytes (default 16 MiB).
    #[arg(long)]
    max_msg_size: Option<u64>,
    /// Inject size in bytes (default 256).
    #[arg(long)]
    inject_size: Option<u32>,
    /// Largest eagerly buffered send in bytes (default 16 KiB).
    #[arg(long)]
    eager_threshold: Option<u64>,
    /// Eager bytes buffered per destination device before sends are held (default 4 MiB).
    #[arg(long)]
    max_unexpected_bytes: Option<u64>,
    /// Data descriptors per request chain (default 64).
    #[arg(long)]
    max_sge: Option<u32>,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(a: Args) -> Result<Self, Error> {
        let mut c = match &a.config {
            Some(p) => Config::from_file(p)?,
            None => Config::new(Vec::new()),
        };
        if let Some(p) = a.socket_path {
            c.sockets = vec![p];
        } else if let Some(d) = a.socket_dir {
            let devices = a.devices.unwrap_or(1);
            Config::check_devices(devices).map_err(|_| {
                Error::Config(format!(
                    "--devices {devices}: give 1..={} devices",
                    vfabric_device::MAX_DEVICES
                ))
            })?;
            std::fs::create_dir_all(&d).map_err(|source| Error::SocketDir {
                path: d.clone(),
                source,
            })?;
            c.sockets = Config::socket_dir_paths(&d, devices);
        }
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src {
                    $dst = v;
                }
            };
        }
        set!(c.fabric_id, a.fabric_id);
        if let (Some(prov), Some(listen)) = (&a.uplink, &a.listen) {
            let mut u = vfabric_device::uplink::UplinkConfig::new(prov, listen);
            u.peers = a.peers.clone();
            if let Some(ms) = a.peer_timeout_ms {
                u.peer_timeout = std::time::Duration::from_millis(ms);
            }
            c.uplink = Some(u);
        }
        set!(c.host_id, a.host_id);
        set!(c.device_id, a.device_id);
        set!(c.poll_us, a.poll_us);
        set!(c.pollers, a.pollers);
        if a.poller_cpu.is_some() {
            c.poller_cpu = a.poller_cpu;
        }
        if a.socket_mode.is_some() {
            c.socket_mode = a.socket_mode;
        }
        if a.socket_group.is_some() {
            c.socket_group = a.socket_group;
        }
        set!(c.handshake_timeout, a.handshake_timeout);
        if let Some(ms) = a.commit_timeout_ms {
            c.commit_timeout = std::time::Duration::from_millis(ms);
        }
        let l = &mut c.limits;
        set!(l.num_queue_pairs, a.num_queue_pairs);
        set!(l.max_endpoints, a.max_endpoints);
        set!(l.max_mrs, a.max_mrs);
        set!(l.max_queue_size, a.max_queue_size);
        set!(l.max_msg_size, a.max_msg_size);
        set!(l.inject_size, a.inject_size);
        set!(l.eager_threshold, a.eager_threshold);
        set!(l.max_unexpected_bytes, a.max_unexpected_bytes);
        set!(l.max_sge, a.max_sge);
        if c.sockets.is_empty() {
            return Err(Error::Config(
                "give --socket-path, --socket-dir or a config file with sockets".into(),
            ));
        }
        c.validate()?;
        Ok(c)
    }
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and the threads it spawns later) so that
/// `sigwait` receives them: each ends the daemon cleanly (sockets removed).
fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; an all-zero value is a valid buffer for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; the old mask is not requested (null is allowed).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

fn wait_signal(set: &libc::sigset_t) -> io::Result<i32> {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer for the call.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return ExitCode::SUCCESS;
    }
    let filter = match EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vfabricd: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();

    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let set = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = match start(config) {
        Ok(d) => d,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match wait_signal(&set) {
        Ok(sig) => info!(sig, "signal received"),
        Err(e) => error!("sigwait failed: {e}"),
    }
    daemon.shutdown();
    ExitCode::SUCCESS
}
