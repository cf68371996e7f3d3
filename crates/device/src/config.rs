// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Daemon configuration: per-device limits, identity, vendor attributes, socket paths.
//!
//! A [`Config`] comes from code ([`Config::new`]), from a TOML file ([`Config::from_toml_str`],
//! [`Config::from_file`]) or from `vfabricd`'s command line. [`Config::validate`] rejects values
//! the device cannot honour; [`crate::start`] calls it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vfabric_proto::{CapValue, VENDOR_ID_VFABRIC, VIRTIO_ID_FABRIC};

use crate::Error;

/// Most data-plane poller threads per daemon.
pub const MAX_POLLERS: usize = 64;
/// Most devices per daemon.
pub const MAX_DEVICES: u32 = 4096;
/// Default [`Config::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of [`Config::handshake_timeout`].
pub const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(10);
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Vendor attribute key (vendor `VENDOR_ID_VFABRIC`) carrying the configured virtio device id.
pub(crate) const VENDOR_KEY_VIRTIO_DEVICE_ID: u16 =
    vfabric_proto::caps::vfabricd_key::VIRTIO_DEVICE_ID;

/// Per-device limits, advertised in config space and QUERY_CAPS and enforced by the device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Queue pairs after the control queue (virtqueues = 1 + 2 * pairs). 1..=31.
    pub num_queue_pairs: u16,
    /// Endpoints one guest may have open at once.
    pub max_endpoints: u32,
    /// Memory regions one guest may have registered at once (MR_REG beyond it: NoResources).
    pub max_mrs: u32,
    /// Largest ring size the device accepts (power of two, 2..=32768).
    pub max_queue_size: u16,
    /// Largest message in bytes.
    pub max_msg_size: u64,
    /// Bytes a driver may pass with FLAG_INJECT.
    pub inject_size: u32,
    /// Largest send the device copies into its own buffer when no receive is posted.
    pub eager_threshold: u64,
    /// Bound on eagerly buffered bytes per destination device; past it sends are held.
    pub max_unexpected_bytes: u64,
    /// Largest number of data descriptors in one request chain.
    pub max_sge: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            num_queue_pairs: 2,
            max_endpoints: 64,
            max_mrs: 1024,
            max_queue_size: 1024,
            max_msg_size: 16 << 20,
            inject_size: 256,
            eager_threshold: 16 << 10,
            max_unexpected_bytes: 4 << 20,
            max_sge: 64,
        }
    }
}

/// Largest accepted `max_msg_size`: used-ring lengths are 32-bit.
pub const MAX_MSG_SIZE_LIMIT: u64 = 1 << 30;
/// Largest accepted `num_queue_pairs` (the vring worker mask is 64 bits wide).
pub const MAX_QUEUE_PAIRS: u16 = 31;
/// Largest accepted `max_endpoints`.
pub const MAX_ENDPOINTS_LIMIT: u32 = 1 << 16;
/// Largest accepted `max_mrs`.
pub const MAX_MRS_LIMIT: u32 = 1 << 20;
/// Largest accepted `max_unexpected_bytes` (64 GiB).
pub const MAX_UNEXPECTED_BYTES_LIMIT: u64 = 64 << 30;

impl Limits {
    /// Number of virtqueues of a device with these limits.
    pub fn num_queues(&self) -> usize {
        1 + 2 * self.num_queue_pairs as usize
    }

    /// Check that the device can honour these limits.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_queue_pairs == 0 || self.num_queue_pairs > MAX_QUEUE_PAIRS {
            return bad(format!("num_queue_pairs must be 1..={MAX_QUEUE_PAIRS}"));
        }
        if !self.max_queue_size.is_power_of_two() || self.max_queue_size < 2 {
            return bad("max_queue_size must be a power of two, 2..=32768".into());
        }
        if self.max_endpoints == 0 || self.max_endpoints > MAX_ENDPOINTS_LIMIT {
            return bad(format!("max_endpoints must be 1..={MAX_ENDPOINTS_LIMIT}"));
        }
        if self.max_mrs == 0 || self.max_mrs > MAX_MRS_LIMIT {
            return bad(format!("max_mrs must be 1..={MAX_MRS_LIMIT}"));
        }
        if self.max_unexpected_bytes > MAX_UNEXPECTED_BYTES_LIMIT {
            return bad(format!(
                "max_unexpected_bytes must be at most {MAX_UNEXPECTED_BYTES_LIMIT}"
            ));
        }
        if self.max_msg_size == 0 || self.max_msg_size > MAX_MSG_SIZE_LIMIT {
            return bad(format!("max_msg_size must be 1..={MAX_MSG_SIZE_LIMIT}"));
        }
        if self.eager_threshold > self.max_msg_size {
            return bad("eager_threshold must not exceed max_msg_size".into());
        }
        if u64::from(self.inject_size) > self.max_msg_size {
            return bad("inject_size must not exceed max_msg_size".into());
        }
        if self.max_sge == 0 || self.max_sge > u32::from(u16::MAX) {
            return bad("max_sge must be 1..=65535".into());
        }
        Ok(())
    }
}

/// A vendor-specific QUERY_CAPS attribute (reported when VIRTIO_FABRIC_F_VENDOR_CAPS is
/// negotiated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorAttr {
    /// Vendor id (non-zero; 0 is the standard namespace).
    pub vendor: u32,
    pub key: u16,
    pub name: String,
    pub value: CapValue,
}

impl VendorAttr {
    pub fn new(vendor: u32, key: u16, name: &str, value: CapValue) -> Self {
        Self {
            vendor,
            key,
            name: name.to_string(),
            value,
        }
    }

    /// The attributes this implementation reports by default.
    pub fn defaults() -> Vec<VendorAttr> {
        let v = VENDOR_ID_VFABRIC;
        vec![
            VendorAttr::new(v, 1, "copy_engine", CapValue::Str("memcpy".into())),
            VendorAttr::new(v, 2, "one_copy", CapValue::Bool(true)),
            VendorAttr::new(
                v,
                3,
                "device_version",
                CapValue::Str(env!("CARGO_PKG_VERSION").into()),
            ),
            VendorAttr::new(v, 4, "implementation", CapValue::Str("vfabricd".into())),
        ]
    }
}

/// Configuration of one daemon: one vhost-user socket per device, all devices on one fabric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Socket path of device `i` (its node address is
    /// `FabricAddr::node_of(fabric_id, host_id, i)`).
    pub sockets: Vec<PathBuf>,
    /// Identity of the fabric (bits 63..32 of every node address): configured, or drawn at
    /// random when the configuration is made, so two daemons that are separate fabrics never
    /// hand out the same addresses. Hosts that form one fabric configure the same id.
    pub fabric_id: u32,
    /// Host id within the fabric (bits 31..16 of every node address).
    pub host_id: u16,
    /// Virtio device id announced in QUERY_CAPS (vendor attribute `virtio_device_id`) for the
    /// frontend and the guest driver to match (default 56; 1..=63, the ids virtio-pci can
    /// express).
    pub device_id: u32,
    /// Bounded spin (microseconds) re-checking the avail rings after work was found; 0 = none.
    pub poll_us: u64,
    /// Pin the data-plane poller thread to this CPU (a dedicated core keeps the polled path
    /// free of scheduling delays); with several pollers, poller `i` goes to CPU
    /// `poller_cpu + i`.
    pub poller_cpu: Option<usize>,
    /// Data-plane poller threads; device `d` is polled by poller `d % pollers`.
    pub pollers: usize,
    pub limits: Limits,
    /// Several hosts: this daemon's uplink to the other hosts of its fabric (None: one host).
    pub uplink: Option<crate::uplink::UplinkConfig>,
    /// Vendor attributes appended to QUERY_CAPS answers.
    pub vendor_attrs: Vec<VendorAttr>,
    /// Permission bits of the device sockets (`None`: as the umask leaves them). Only users
    /// with write permission on a socket can connect to its device.
    pub socket_mode: Option<u32>,
    /// Group (name or numeric id) given to the device sockets (`None`: the daemon's group).
    pub socket_group: Option<String>,
    /// A frontend that has not started a ring (SET_VRING_ENABLE, or the ring's kick with
    /// vhost-user protocol features off) this long after it was accepted is dropped, so that a
    /// silent or stalled connection cannot hold the device. Zero: no deadline (a VMM such as
    /// QEMU connects at VM start but starts rings only when the guest's driver loads).
    pub handshake_timeout: Duration,
    /// How long a commit to a region with a commit handler waits for the target driver's
    /// verdict before it completes TIMED_OUT at its initiator (spec §6.17.3).
    pub commit_timeout: Duration,
}

/// Default [`Config::commit_timeout`].
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of [`Config::commit_timeout`].
pub const MIN_COMMIT_TIMEOUT: Duration = Duration::from_millis(10);
pub const MAX_COMMIT_TIMEOUT: Duration = Duration::from_secs(3600);

impl Config {
    /// Defaults for the given sockets.
    pub fn new(sockets: Vec<PathBuf>) -> Self {
        Self {
            sockets,
            fabric_id: random_fabric_id(),
            host_id: 1,
            device_id: VIRTIO_ID_FABRIC,
            poll_us: 50,
            poller_cpu: None,
            pollers: 1,
            limits: Limits::default(),
            uplink: None,
            vendor_attrs: VendorAttr::defaults(),
            socket_mode: None,
            socket_group: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
        }
    }

    /// Check a device count before anything is allocated for it.
    pub fn check_devices(devices: u32) -> Result<(), Error> {
        if devices == 0 {
            return Err(Error::Config("devices must be at least 1".into()));
        }
        if devices > MAX_DEVICES {
            return Err(Error::Config(format!(
                "devices = {devices} is too large: at most {MAX_DEVICES} devices per daemon"
            )));
        }
        Ok(())
    }

    /// `dir/vfabric0.sock` … `dir/vfabric{n-1}.sock`.
    pub fn socket_dir_paths(dir: &Path, devices: u32) -> Vec<PathBuf> {
        (0..devices)
            .map(|i| dir.join(format!("vfabric{i}.sock")))
            .collect()
    }

    /// Parse a TOML configuration. Every key is optional:
    ///
    /// ```toml
    /// socket_dir = "/run/vfabric"     # or: socket_path = "/run/vf.sock" (one device)
    /// devices = 2                     # with socket_dir: vfabric0.sock, vfabric1.sock
    /// fabric_id = 0x5eed              # default: drawn at random at start
    /// host_id = 1
    /// device_id = 56                  # 38 behind QEMU (docs/spec.md §1)
    /// poll_us = 50
    /// socket_mode = "0660"            # octal string (or 0o660); default: per umask
    /// socket_group = "kvm"            # group name or numeric id
    /// handshake_timeout = "5s"        # or "500ms", or whole seconds
    /// replace_vendor_attrs = false    # true: drop the default vendor attributes
    ///
    /// [limits]                        # any field of `Limits`
    /// num_queue_pairs = 2
    /// eager_threshold = 16384
    ///
    /// [[vendor_attr]]                 # added (or replacing the same vendor + key)
    /// vendor = 0x5646
    /// key = 10
    /// name = "numa_node"
    /// value = 0                       # integer → u64, bool, string; hex bytes with type = "bytes"
    /// ```
    pub fn from_toml_str(s: &str) -> Result<Self, Error> {
        let f: FileConfig = toml::from_str(s).map_err(|e| Error::ConfigParse(e.to_string()))?;
        f.into_config()
    }

    /// Read and parse a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let s = std::fs::read_to_string(path).map_err(|source| Error::ConfigFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&s)
    }

    /// Node address of device `index`.
    pub fn node_addr(&self, index: usize) -> u64 {
        vfabric_proto::FabricAddr::node_of(self.fabric_id, self.host_id, index as u16)
    }

    /// Check the whole configuration.
    pub fn validate(&self) -> Result<(), Error> {
        if self.sockets.is_empty() {
            return Err(Error::Config("no device socket configured".into()));
        }
        if self.sockets.len() > MAX_DEVICES as usize {
            return Err(Error::Config(format!(
                "{} sockets: at most {MAX_DEVICES} devices per daemon",
                self.sockets.len()
            )));
        }
        if self.socket_mode.is_some_and(|m| m & !0o777 != 0) {
            return Err(Error::Config(format!(
                "socket_mode {:#o} has bits beyond 0777",
                self.socket_mode.unwrap_or(0)
            )));
        }
        if self.socket_group.as_deref().is_some_and(str::is_empty) {
            return Err(Error::Config("socket_group is empty".into()));
        }
        let timeouts = MIN_HANDSHAKE_TIMEOUT..=MAX_HANDSHAKE_TIMEOUT;
        if !self.handshake_timeout.is_zero() && !timeouts.contains(&self.handshake_timeout) {
            return Err(Error::Config(format!(
                "handshake_timeout {:?} out of range {MIN_HANDSHAKE_TIMEOUT:?}..={MAX_HANDSHAKE_TIMEOUT:?} (0: off)",
                self.handshake_timeout
            )));
        }
        if !(MIN_COMMIT_TIMEOUT..=MAX_COMMIT_TIMEOUT).contains(&self.commit_timeout) {
            return Err(Error::Config(format!(
                "commit_timeout {:?} out of range {MIN_COMMIT_TIMEOUT:?}..={MAX_COMMIT_TIMEOUT:?}",
                self.commit_timeout
            )));
        }
        if let Some(u) = &self.uplink {
            u.validate(self.host_id).map_err(Error::Config)?;
        }
        if self.fabric_id == 0 {
            return Err(Error::Config(
                "fabric_id 0 is reserved (the unspecified address)".into(),
            ));
        }
        if vfabric_proto::virtio_pci_device_id(self.device_id).is_none() {
            return Err(Error::Config(format!(
                "device_id {} out of range 1..={} (the ids virtio-pci can express)",
                self.device_id,
                vfabric_proto::MAX_PCI_VIRTIO_ID
            )));
        }
        for (i, a) in self.sockets.iter().enumerate() {
            if self.sockets[..i].contains(a) {
                return Err(Error::Config(format!("socket {} given twice", a.display())));
            }
        }
        if self.poll_us > 1_000_000 {
            return Err(Error::Config("poll_us must be at most 1000000".into()));
        }
        if !(1..=MAX_POLLERS).contains(&self.pollers) {
            return Err(Error::Config(format!("pollers must be 1..={MAX_POLLERS}")));
        }
        self.limits.validate()?;
        if self.vendor_attrs.len() > 1024 {
            return Err(Error::Config("at most 1024 vendor attributes".into()));
        }
        for a in &self.vendor_attrs {
            if a.vendor == 0 {
                return Err(Error::Config(format!(
                    "vendor attribute {:?}: vendor 0 is the standard namespace",
                    a.name
                )));
            }
            if a.vendor == VENDOR_ID_VFABRIC && a.key == VENDOR_KEY_VIRTIO_DEVICE_ID {
                return Err(Error::Config(format!(
                    "vendor attribute {:?}: key {} of vendor {:#x} is reserved (virtio_device_id)",
                    a.name, a.key, a.vendor
                )));
            }
            if a.name.len() > 255 {
                return Err(Error::Config(format!(
                    "vendor attribute {:?}: name longer than 255 bytes",
                    a.name
                )));
            }
        }
        Ok(())
    }
}

/// A fabric id for a daemon that was given none: 32 random bits from the kernel (never 0, so
/// the unspecified address stays unused). Should the kernel fail, time and pid still make two
/// daemons' ids differ.
pub fn random_fabric_id() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: the kernel writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut id = u32::from_le_bytes(b);
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u32)
            .unwrap_or(0);
        id = t ^ std::process::id().rotate_left(16);
    }
    id.max(1)
}

/// A fabric id as given on the command line: decimal or `0x` hexadecimal, not 0.
pub fn parse_fabric_id(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("fabric id {s:?}: {e} (a 32-bit number, decimal or 0x-hex)"))?;
    if v == 0 {
        return Err("fabric id 0 is reserved (the unspecified address)".into());
    }
    Ok(v)
}

/// On-disk form of [`Config`].
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    socket_path: Option<PathBuf>,
    socket_dir: Option<PathBuf>,
    devices: Option<u32>,
    fabric_id: Option<u32>,
    host_id: Option<u16>,
    device_id: Option<u32>,
    poll_us: Option<u64>,
    poller_cpu: Option<usize>,
    pollers: Option<usize>,
    /// Octal string ("0660") or integer (write it `0o660`).
    socket_mode: Option<toml::Value>,
    /// Group name or numeric id.
    socket_group: Option<toml::Value>,
    /// "5s", "500ms", or an integer number of seconds.
    handshake_timeout: Option<toml::Value>,
    /// Milliseconds a handled commit waits for its target's verdict.
    commit_timeout_ms: Option<u64>,
    limits: Limits,
    uplink: Option<FileUplink>,
    peers: Vec<FilePeer>,
    /// Replace the default vendor attributes instead of extending them.
    replace_vendor_attrs: bool,
    vendor_attr: Vec<FileVendorAttr>,
}

/// `[uplink]`: several hosts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUplink {
    /// libfabric provider (default `tcp;ofi_rxm`).
    provider: Option<String>,
    /// `HOST[:PORT]` of this host's uplink.
    listen: String,
    /// Milliseconds of silence after which a peer is reported down.
    peer_timeout_ms: Option<u64>,
}

/// `[[peers]]`: one other host of the fabric.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeer {
    id: u16,
    addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVendorAttr {
    vendor: u32,
    key: u16,
    name: String,
    /// Integer → u64, boolean → bool, string → str (or hex bytes with `type = "bytes"`).
    value: toml::Value,
    #[serde(rename = "type")]
    vtype: Option<String>,
}

impl FileVendorAttr {
    fn into_attr(self) -> Result<VendorAttr, Error> {
        let bad = |m: &str| Error::Config(format!("vendor attribute {:?}: {m}", self.name));
        let value = match (self.vtype.as_deref(), &self.value) {
            (None | Some("u64"), toml::Value::Integer(i)) => {
                CapValue::U64(u64::try_from(*i).map_err(|_| bad("negative integer"))?)
            }
            (None | Some("bool"), toml::Value::Boolean(b)) => CapValue::Bool(*b),
            (None | Some("str"), toml::Value::String(s)) => CapValue::Str(s.clone()),
            (Some("bytes"), toml::Value::String(s)) => {
                CapValue::Bytes(parse_hex(s).ok_or_else(|| bad("bytes value is not hex"))?)
            }
            _ => return Err(bad("value does not match its type")),
        };
        Ok(VendorAttr {
            vendor: self.vendor,
            key: self.key,
            name: self.name,
            value,
        })
    }
}

/// Parse socket permission bits given in octal ("0660", "660", "0o660").
pub fn parse_socket_mode(s: &str) -> Result<u32, Error> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| Error::Config(format!("socket mode {s:?} is not an octal number")))?;
    if mode & !0o777 != 0 {
        return Err(Error::Config(format!(
            "socket mode {s:?} has bits beyond 0777"
        )));
    }
    Ok(mode)
}

/// Parse a duration: "5s", "500ms", "1.5s", or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let t = s.trim();
    let bad = || Error::Config(format!("duration {s:?}: give e.g. \"5s\" or \"500ms\""));
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(v * scale).map_err(|_| bad())
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() & 1 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

impl FileConfig {
    fn into_config(self) -> Result<Config, Error> {
        let sockets = match (self.socket_path, self.socket_dir) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give either socket_path or socket_dir, not both".into(),
                ))
            }
            (Some(p), None) => {
                if self.devices.is_some_and(|d| d != 1) {
                    return Err(Error::Config(
                        "socket_path serves exactly one device".into(),
                    ));
                }
                vec![p]
            }
            (None, Some(d)) => {
                let devices = self.devices.unwrap_or(1);
                Config::check_devices(devices)?;
                Config::socket_dir_paths(&d, devices)
            }
            (None, None) => Vec::new(),
        };
        let mut c = Config::new(sockets);
        if let Some(f) = self.fabric_id {
            c.fabric_id = f;
        }
        if let Some(h) = self.host_id {
            c.host_id = h;
        }
        if let Some(d) = self.device_id {
            c.device_id = d;
        }
        if let Some(p) = self.poll_us {
            c.poll_us = p;
        }
        c.poller_cpu = self.poller_cpu;
        if let Some(p) = self.pollers {
            c.pollers = p;
        }
        c.limits = self.limits;
        match (self.uplink, self.peers.is_empty()) {
            (Some(u), _) => {
                let mut up = crate::uplink::UplinkConfig::new(
                    u.provider
                        .as_deref()
                        .unwrap_or(crate::uplink::DEFAULT_PROVIDER),
                    &u.listen,
                );
                if let Some(ms) = u.peer_timeout_ms {
                    up.peer_timeout = std::time::Duration::from_millis(ms);
                }
                up.peers = self.peers.into_iter().map(|p| (p.id, p.addr)).collect();
                c.uplink = Some(up);
            }
            (None, false) => {
                return Err(Error::Config(
                    "[[peers]] need an [uplink] section (listen = \"HOST[:PORT]\")".into(),
                ))
            }
            (None, true) => {}
        }
        c.socket_mode =
            match self.socket_mode {
                None => None,
                Some(toml::Value::Integer(m)) => Some(u32::try_from(m).map_err(|_| {
                    Error::Config(format!("socket_mode {m} is negative or too large"))
                })?),
                Some(toml::Value::String(m)) => Some(parse_socket_mode(&m)?),
                Some(v) => {
                    return Err(Error::Config(format!(
                        "socket_mode {v}: give an octal string such as \"0660\""
                    )))
                }
            };
        c.socket_group = match self.socket_group {
            None => None,
            Some(toml::Value::String(g)) => Some(g),
            Some(toml::Value::Integer(g)) if g >= 0 => Some(g.to_string()),
            Some(v) => {
                return Err(Error::Config(format!(
                    "socket_group {v}: give a group name or a numeric id"
                )))
            }
        };
        match self.handshake_timeout {
            None => {}
            Some(toml::Value::String(t)) => c.handshake_timeout = parse_duration(&t)?,
            Some(toml::Value::Integer(t)) if t >= 0 => {
                c.handshake_timeout = Duration::from_secs(t.unsigned_abs())
            }
            Some(v) => {
                return Err(Error::Config(format!(
                    "handshake_timeout {v}: give a duration such as \"5s\" or \"500ms\""
                )))
            }
        }
        if let Some(ms) = self.commit_timeout_ms {
            c.commit_timeout = Duration::from_millis(ms);
        }
        if self.replace_vendor_attrs {
            c.vendor_attrs.clear();
        }
        for a in self.vendor_attr {
            let a = a.into_attr()?;
            c.vendor_attrs
                .retain(|d| !(d.vendor == a.vendor && d.key == a.key));
            c.vendor_attrs.push(a);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::new(vec!["/tmp/x.sock".into()]);
        c.validate().unwrap();
        assert_eq!(c.limits.num_queues(), 5);
        assert_eq!(c.device_id, VIRTIO_ID_FABRIC);
    }

    #[test]
    fn device_ids_outside_virtio_pci_are_refused() {
        let mut c = Config::new(vec!["/tmp/x.sock".into()]);
        c.device_id = vfabric_proto::VIRTIO_ID_FABRIC_QEMU_STANDIN;
        c.validate().unwrap();
        for bad in [0, 64, 65535] {
            c.device_id = bad;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("device_id"), "{bad}: {e}");
        }
        let t = Config::from_toml_str("socket_path = \"/tmp/x\"\ndevice_id = 38\n").unwrap();
        assert_eq!(t.device_id, 38);
        t.validate().unwrap();
    }

    #[test]
    fn fabric_ids_are_drawn_apart_and_parsed() {
        let a = Config::new(vec!["/tmp/x.sock".into()]);
        let b = Config::new(vec!["/tmp/x.sock".into()]);
        // Two daemons given no id are separate fabrics (a 1 in 2^32 clash aside).
        assert_ne!(a.fabric_id, b.fabric_id);
        assert_ne!(a.node_addr(0), b.node_addr(0));
        assert_eq!(parse_fabric_id("0x5eed"), Ok(0x5eed));
        assert_eq!(parse_fabric_id("77"), Ok(77));
        assert!(parse_fabric_id("0").is_err());
        assert!(parse_fabric_id("0x1_0000_0000").is_err());
        assert!(parse_fabric_id("fabric").is_err());
        let mut c = a.clone();
        c.fabric_id = 0;
        assert!(c.validate().is_err());
        assert!(Config::from_toml_str("socket_path = \"/tmp/x\"\nhost_id = 70000\n").is_err());
    }

    #[test]
    fn pollers_are_bounded() {
        let mut c = Config::new(vec!["/tmp/x.sock".into()]);
        assert_eq!(c.pollers, 1);
        c.pollers = 0;
        assert!(c.validate().is_err());
        c.pollers = MAX_POLLERS + 1;
        assert!(c.validate().is_err());
        c.pollers = 4;
        c.validate().unwrap();
    }

    #[test]
    fn device_counts_are_bounded_before_allocation() {
        let e = Config::check_devices(u32::MAX).unwrap_err().to_string();
        assert!(
            e.contains("4294967295") && e.contains("at most 4096"),
            "{e}"
        );
        let e = Config::check_devices(0).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        Config::check_devices(MAX_DEVICES).unwrap();
        // The TOML path checks before building the socket list (no 100 GB allocation).
        let e = Config::from_toml_str("socket_dir = \"/tmp/x\"\ndevices = 4294967295")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        assert!(Config::from_toml_str("socket_dir = \"/tmp/x\"\ndevices = 0").is_err());
    }

    #[test]
    fn every_limit_is_bounded_and_named() {
        let check = |f: &dyn Fn(&mut Limits), name: &str| {
            let mut c = Config::new(vec!["/tmp/x.sock".into()]);
            f(&mut c.limits);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{name}: {e}");
        };
        check(&|l| l.max_mrs = u32::MAX, "max_mrs");
        check(&|l| l.max_mrs = 0, "max_mrs");
        check(
            &|l| l.max_unexpected_bytes = u64::MAX,
            "max_unexpected_bytes",
        );
        check(&|l| l.max_endpoints = u32::MAX, "max_endpoints");
        check(&|l| l.max_msg_size = u64::MAX, "max_msg_size");
        check(&|l| l.max_sge = u32::MAX, "max_sge");
        check(&|l| l.num_queue_pairs = u16::MAX, "num_queue_pairs");
    }

    #[test]
    fn socket_options_parse_and_validate() {
        assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_socket_mode("600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0o770").unwrap(), 0o770);
        assert!(parse_socket_mode("0669").is_err());
        assert!(parse_socket_mode("4777").is_err());
        assert!(parse_socket_mode("rw").is_err());
        let c = Config::from_toml_str(
            "socket_path = \"/tmp/a.sock\"\nsocket_mode = \"0660\"\nsocket_group = \"kvm\"\nhandshake_timeout = \"750ms\"",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.socket_mode, Some(0o660));
        assert_eq!(c.socket_group.as_deref(), Some("kvm"));
        assert_eq!(c.handshake_timeout, Duration::from_millis(750));
        let c =
            Config::from_toml_str("socket_mode = 0o600\nsocket_group = 36\nhandshake_timeout = 3")
                .unwrap();
        assert_eq!(c.socket_mode, Some(0o600));
        assert_eq!(c.socket_group.as_deref(), Some("36"));
        assert_eq!(c.handshake_timeout, Duration::from_secs(3));
        // TOML decimal 660 is not 0660: refused rather than silently wrong.
        let c = Config::from_toml_str("socket_path = \"/a\"\nsocket_mode = 660").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::from_toml_str("socket_mode = true").is_err());
        assert!(Config::from_toml_str("handshake_timeout = \"soon\"").is_err());
        let c = Config::from_toml_str("commit_timeout_ms = 250").unwrap();
        assert_eq!(c.commit_timeout, Duration::from_millis(250));
        assert_eq!(
            Config::from_toml_str("").unwrap().commit_timeout,
            DEFAULT_COMMIT_TIMEOUT
        );
        let mut c = Config::new(vec![PathBuf::from("/tmp/a.sock")]);
        c.commit_timeout = Duration::from_millis(1);
        assert!(c.validate().is_err(), "below 10 ms");
        c.commit_timeout = Duration::from_secs(3601);
        assert!(c.validate().is_err(), "above an hour");
        let mut c = Config::new(vec!["/tmp/x.sock".into()]);
        c.handshake_timeout = Duration::from_millis(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("handshake_timeout"));
        c.handshake_timeout = Duration::from_secs(7200);
        assert!(c.validate().is_err());
        c.handshake_timeout = Duration::ZERO;
        c.validate().unwrap();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "-1s", "abc", "5m", "nan", "inf"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn toml_roundtrip_and_errors() {
        let c = Config::from_toml_str(
            r#"
            socket_dir = "/tmp/vf"
            devices = 3
            host_id = 7
            fabric_id = 0x5eed
            poll_us = 0
            pollers = 2
            [limits]
            num_queue_pairs = 4
            eager_threshold = 1024
            [[vendor_attr]]
            vendor = 0x5646
            key = 1
            name = "copy_engine"
            value = "dma"
            [[vendor_attr]]
            vendor = 9
            key = 2
            name = "blob"
            type = "bytes"
            value = "00ff10"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.sockets.len(), 3);
        assert_eq!(c.sockets[2], PathBuf::from("/tmp/vf/vfabric2.sock"));
        assert_eq!(c.host_id, 7);
        assert_eq!(c.fabric_id, 0x5eed);
        assert_eq!(c.pollers, 2);
        assert_eq!(c.limits.num_queue_pairs, 4);
        assert_eq!(c.limits.max_endpoints, 64);
        let ce: Vec<_> = c.vendor_attrs.iter().filter(|a| a.key == 1).collect();
        assert_eq!(ce.len(), 1, "0x5646 key 1 replaced, not duplicated");
        assert!(c
            .vendor_attrs
            .iter()
            .any(|a| a.value == CapValue::Str("dma".into())));
        assert!(c
            .vendor_attrs
            .iter()
            .any(|a| a.value == CapValue::Bytes(vec![0, 0xff, 0x10])));

        assert!(Config::from_toml_str("bogus = 1").is_err());
        assert!(Config::from_toml_str("[limits]\nmax_queue_size = 1000").is_ok());
        let c =
            Config::from_toml_str("socket_path = \"/a\"\n[limits]\nmax_queue_size = 1000").unwrap();
        assert!(c.validate().is_err());
        let c =
            Config::from_toml_str("socket_path = \"/a\"\n[limits]\nnum_queue_pairs = 0").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::from_toml_str(
            "[[vendor_attr]]\nvendor = 1\nkey = 1\nname = \"x\"\nvalue = -1"
        )
        .is_err());
        assert!(Config::new(vec![]).validate().is_err());
    }
}
