// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several hosts: each host is a network namespace (created and removed by the test, joined by
//! veth pairs to a bridge in a "switch" namespace) running its own `vfabricd` with an uplink
//! over the host's libfabric (`tcp;ofi_rxm`). Needs root (CI runs as root) and `ip`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virtio_fabric_tests::{bin, info_json, run_with_timeout, wait_for};

const FABRIC: &str = "0x5eed";
const PROVIDER: &str = "tcp;ofi_rxm";

fn ip(args: &[&str]) {
    let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(20));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let have_ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(root && have_ip) {
        eprintln!("skipped: needs root and iproute2 (CI runs as root)");
    }
    root && have_ip
}

/// A set of namespaces on one Ethernet segment: host `i` is `10.77.0.(i+1)`. Everything is
/// removed on drop, also when the test fails.
struct Lan {
    switch: String,
    hosts: Vec<String>,
}

static LAN_SEQ: AtomicU32 = AtomicU32::new(0);

impl Lan {
    fn new(n: usize) -> Self {
        let tag = format!(
            "vf{}x{}",
            std::process::id() % 100_000,
            LAN_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Self {
            switch: format!("{tag}sw"),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &lan.switch]);
        ip(&["-n", &lan.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{tag}h{i}");
            ip(&["netns", "add", &ns]);
            lan.hosts.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lan.switch,
            ]);
            ip(&["-n", &lan.switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &lan.switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Self::addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lan
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Host `i`'s link down or up (as a cable pulled).
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hosts[i],
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A `vfabricd` inside a host namespace; killed on drop. Its log goes to `log`.
struct HostDaemon {
    child: Child,
    sockets: Vec<PathBuf>,
    log: PathBuf,
}

impl HostDaemon {
    fn start(lan: &Lan, dir: &Path, i: usize, host_id: u16, args: &[String]) -> Self {
        let sock_dir = dir.join(format!("host{i}-{host_id}"));
        std::fs::create_dir_all(&sock_dir).unwrap();
        let log = dir.join(format!("host{i}-{host_id}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lan.hosts[i]])
            .arg(bin("vfabricd"))
            .arg("--socket-dir")
            .arg(&sock_dir)
            .args(["--devices", "2", "--log-level", "info"])
            .args(["--host-id", &host_id.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("spawn vfabricd");
        let sockets: Vec<PathBuf> = (0..2)
            .map(|d| sock_dir.join(format!("vfabric{d}.sock")))
            .collect();
        assert!(
            wait_for(Duration::from_secs(10), || sockets
                .iter()
                .all(|s| s.exists())),
            "vfabricd on host {host_id} did not start: {}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        Self {
            child,
            sockets,
            log,
        }
    }

    /// The daemon's log so far (tracing writes to stdout or stderr, depending on setup).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    /// `(host id, devices, up)` of every remote host device 0 reports.
    fn remote_hosts(&self) -> Vec<(u64, u64, bool)> {
        let v = info_json(&self.sockets[0]);
        let mut hosts: Vec<_> = v[0]["remote_hosts"]
            .as_array()
            .expect("remote_hosts")
            .iter()
            .map(|h| {
                (
                    h["host_id"].as_u64().unwrap(),
                    h["devices"].as_u64().unwrap(),
                    h["up"].as_bool().unwrap(),
                )
            })
            .collect();
        hosts.sort();
        hosts
    }

    fn wait_hosts(&self, want: &[(u64, u64, bool)], within: Duration) {
        let mut last = Vec::new();
        let ok = wait_for(within, || {
            last = self.remote_hosts();
            last == want
        });
        assert!(
            ok,
            "remote hosts {last:?}, want {want:?}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uplink arguments of host `i` (host id `i + 1`) of `n`, peers all others.
fn uplink_args(n: usize, i: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--fabric-id",
        FABRIC,
        "--uplink",
        PROVIDER,
        "--listen",
        &Lan::addr(i),
        "--peer-timeout-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for j in (0..n).filter(|j| *j != i) {
        a.push("--peer".into());
        a.push(format!("{}={}", j + 1, Lan::addr(j)));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn three_hosts_find_each_other_and_see_a_peer_go_and_return() {
    if !can_run() {
        return;
    }
    let lan = Lan::new(3);
    let dir = tempfile::tempdir().unwrap();
    let mut daemons: Vec<HostDaemon> = (0..3)
        .map(|i| HostDaemon::start(&lan, dir.path(), i, i as u16 + 1, &uplink_args(3, i, &[])))
        .collect();
    let within = Duration::from_secs(10);
    daemons[0].wait_hosts(&[(2, 2, true), (3, 2, true)], within);
    daemons[1].wait_hosts(&[(1, 2, true), (3, 2, true)], within);
    daemons[2].wait_hosts(&[(1, 2, true), (2, 2, true)], within);

    // A cable pulled: host 3 is reported down within the peer timeout, and up once back.
    let t = Instant::now();
    lan.link(2, false);
    daemons[0].wait_hosts(&[(2, 2, true), (3, 2, false)], within);
    println!("link down noticed after {:?}", t.elapsed());
    lan.link(2, true);
    daemons[0].wait_hosts(&[(2, 2, true), (3, 2, true)], within);

    // A daemon killed and restarted: down, then up again without restarting anyone else.
    drop(daemons.remove(1));
    daemons[0].wait_hosts(&[(2, 2, false), (3, 2, true)], within);
    daemons.insert(
        1,
        HostDaemon::start(&lan, dir.path(), 1, 2, &uplink_args(3, 1, &[])),
    );
    daemons[0].wait_hosts(&[(2, 2, true), (3, 2, true)], within);
    assert!(
        daemons[0].log().contains("uplink peer restarted"),
        "{}",
        daemons[0].log()
    );
}

#[test]
fn impostors_strangers_and_other_fabrics_are_refused() {
    if !can_run() {
        return;
    }
    let lan = Lan::new(4);
    let dir = tempfile::tempdir().unwrap();
    // Hosts 1 and 2 know each other; host 1 also lists host 3 (at 10.77.0.3).
    let mut a1 = uplink_args(2, 0, &[]);
    a1.extend(["--peer".to_string(), format!("3={}", Lan::addr(2))]);
    let h1 = HostDaemon::start(&lan, dir.path(), 0, 1, &a1);
    let _h2 = HostDaemon::start(&lan, dir.path(), 1, 2, &uplink_args(2, 1, &[]));
    h1.wait_hosts(&[(2, 2, true), (3, 0, false)], Duration::from_secs(10));

    let refused = |what: &str| {
        assert!(
            wait_for(Duration::from_secs(10), || h1.log().contains(what)),
            "host 1 did not log {what:?}:\n{}",
            h1.log()
        );
    };
    // A daemon in namespace `ns` with host id `id` on `fabric` that knows only host 1.
    let greeter = |ns: usize, id: u16, fabric: &str| {
        let args = [
            "--fabric-id",
            fabric,
            "--uplink",
            PROVIDER,
            "--listen",
            &Lan::addr(ns),
            "--peer",
            &format!("1={}", Lan::addr(0)),
        ]
        .map(String::from);
        HostDaemon::start(&lan, dir.path(), ns, id, &args)
    };
    // From 10.77.0.4, claiming to be host 2: refused (host 2's id from another address).
    let impostor = greeter(3, 2, FABRIC);
    refused("claims host id 2 but comes from an address outside the peer set");
    drop(impostor);
    // From 10.77.0.3 (host 3's address) but another fabric: refused.
    let other = greeter(2, 3, "0xbad");
    refused("belongs to fabric bad, this host to fabric 5eed");
    drop(other);
    // From 10.77.0.4 claiming host 9, which host 1 does not know: refused.
    let stranger = greeter(3, 9, FABRIC);
    refused("host id 9 is not in the configured peer set");
    drop(stranger);
    // None of them made it into host 1's view.
    assert_eq!(h1.remote_hosts(), vec![(2, 2, true), (3, 0, false)]);
}
