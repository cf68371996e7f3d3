// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Across processes: the `vfabricd` binary and guests that are separate `vfabric` processes.

use std::process::Command;
use std::time::{Duration, Instant};

use virtio_fabric_tests::{bin, info_json, run_with_timeout, wait_for, DaemonProcess};

fn vfabric() -> Command {
    Command::new(bin("vfabric"))
}

/// Run server and client of `kind` on devices 0 and 1; return the client's JSON.
fn run_pair(
    d: &DaemonProcess,
    kind: &str,
    sizes: &str,
    iters: &str,
    tag: &str,
) -> serde_json::Value {
    let addr = d.path(&format!("{tag}.addr"));
    let mut server = vfabric()
        .args([kind, "--server", "--quiet", "--verify", "--timeout-s", "20"])
        .arg("--device")
        .arg(&d.sockets[0])
        .arg("--addr-file")
        .arg(&addr)
        .args(["--sizes", sizes, "--iters", iters, "--warmup", "5"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn server");
    let out = run_with_timeout(
        vfabric()
            .args([kind, "--json", "--verify", "--timeout-s", "20"])
            .arg("--device")
            .arg(&d.sockets[1])
            .arg("--addr-file")
            .arg(&addr)
            .args(["--sizes", sizes, "--iters", iters, "--warmup", "5"]),
        Duration::from_secs(60),
    );
    let status = server.wait().expect("server wait");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "server failed");
    serde_json::from_slice(&out.stdout).expect("client JSON")
}

fn check_results(v: &serde_json::Value, sizes: &[u64]) {
    let rs = v["results"].as_array().expect("results");
    assert_eq!(rs.len(), sizes.len(), "{v}");
    for (r, s) in rs.iter().zip(sizes) {
        assert_eq!(r["size"].as_u64(), Some(*s));
        assert_eq!(r["verified"].as_bool(), Some(true));
        assert!(r["one_way_us"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn info_lists_every_device_with_capabilities() {
    let d = DaemonProcess::start(2, &[]);
    let out = run_with_timeout(
        vfabric()
            .args(["info", "-v"])
            .arg("--device")
            .arg(&d.sockets[0])
            .arg("--device")
            .arg(&d.sockets[1]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "domain: vfabric0",
        "domain: vfabric1",
        "FI_EP_RDM",
        "MSG",
        "TAGGED",
        "RING_EVENT_IDX",
        "max_msg_size",
        "vendor attributes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // VFABRIC_DEVICES works the same as --device.
    let env = format!("{}:{}", d.sockets[0].display(), d.sockets[1].display());
    let out = run_with_timeout(
        vfabric()
            .args(["info", "--json"])
            .env("VFABRIC_DEVICES", env),
        Duration::from_secs(20),
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let domains: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["domain"].as_str().unwrap().to_string())
        .collect();
    assert!(domains.contains(&"vfabric0".to_string()));
    assert!(domains.contains(&"vfabric1".to_string()));
}

#[test]
fn pingpong_and_bw_between_guest_processes() {
    let d = DaemonProcess::start(2, &[]);
    let v = run_pair(&d, "pingpong", "0,8,4k,64k,1m,4m", "40", "pp");
    check_results(&v, &[0, 8, 4096, 65536, 1 << 20, 4 << 20]);
    let v = run_pair(&d, "bw", "8,64k,1m", "128", "bw");
    check_results(&v, &[8, 65536, 1 << 20]);
    // The daemon served both runs and its guests came and went.
    let mut d = d;
    assert!(d.alive());
}

#[test]
fn guest_killed_mid_transfer_leaves_daemon_and_others_working() {
    let mut d = DaemonProcess::start(2, &[]);
    let addr = d.path("kill.addr");
    // A long bandwidth run of 4 MiB messages.
    let mut server = vfabric()
        .args([
            "bw",
            "--server",
            "--quiet",
            "--timeout-s",
            "3",
            "--fixed-iters",
        ])
        .arg("--device")
        .arg(&d.sockets[0])
        .arg("--addr-file")
        .arg(&addr)
        .args(["--sizes", "4m", "--iters", "1000000", "--window", "16"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut client = vfabric()
        .args(["bw", "--quiet", "--timeout-s", "30", "--fixed-iters"])
        .arg("--device")
        .arg(&d.sockets[1])
        .arg("--addr-file")
        .arg(&addr)
        .args(["--sizes", "4m", "--iters", "1000000", "--window", "16"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn client");
    assert!(wait_for(Duration::from_secs(10), || addr.exists()));
    // Let data flow, then kill the sending guest without warning.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(client.try_wait(), Ok(None)),
        "client ended before it was killed"
    );
    client.kill().expect("kill client");
    client.wait().unwrap();
    // The receiving guest notices (its waits time out) and exits with an error, in bounded time.
    let start = Instant::now();
    let st = loop {
        if let Some(st) = server.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server hung");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success(), "server should report the lost peer");
    assert!(d.alive(), "vfabricd died with its guest");
    // Both devices accept new guests, which exchange verified data.
    let v = run_pair(&d, "pingpong", "8,64k,1m", "20", "after");
    check_results(&v, &[8, 65536, 1 << 20]);
}

#[test]
fn sigterm_exits_cleanly_and_removes_sockets() {
    DaemonProcess::start(3, &[]).expect_clean_exit(libc::SIGTERM);
}

#[test]
fn print_capabilities_and_config_file() {
    let out = run_with_timeout(
        Command::new(bin("vfabricd")).arg("--print-capabilities"),
        Duration::from_secs(10),
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("capabilities JSON");
    assert!(v["type"].is_string());

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vfabricd.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket_dir = {:?}\ndevices = 1\nhost_id = 7\nfabric_id = 0xab\n[limits]\nmax_endpoints = 3\nmax_msg_size = 65536\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("vfabricd"))
        .arg("--config")
        .arg(&cfg)
        .spawn()
        .unwrap();
    let sock = dir.path().join("vfabric0.sock");
    assert!(wait_for(Duration::from_secs(10), || sock.exists()));
    let out = run_with_timeout(
        vfabric().args(["info", "-v", "--device"]).arg(&sock),
        Duration::from_secs(20),
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("max_msg_size=65536"), "{text}");
    assert!(text.contains("max_endpoints=3"), "{text}");
    assert!(
        text.contains("fabric id: ab  node: 0x000000ab00070000"),
        "{text}"
    );
}

/// Two daemons that were given no fabric id are separate fabrics: `vfabric info` shows
/// different ids, and a client on one that is handed the other's server address fails at
/// once with an error naming both fabrics (before fabric ids it messaged an endpoint of its
/// own fabric that happened to carry the same numbers, and waited).
#[test]
fn a_server_address_from_another_fabric_is_refused() {
    let (a, b) = (DaemonProcess::start(1, &[]), DaemonProcess::start(1, &[]));
    let fabric_of = |d: &DaemonProcess| {
        info_json(&d.sockets[0])[0]["fabric_id"]
            .as_u64()
            .expect("fabric_id")
    };
    let (fa, fb) = (fabric_of(&a), fabric_of(&b));
    assert_ne!(fa, fb, "two daemons without --fabric-id share a fabric id");

    let addr = a.path("server.addr");
    let mut server = vfabric()
        .args(["pingpong", "--server", "--quiet", "--timeout-s", "20"])
        .arg("--device")
        .arg(&a.sockets[0])
        .arg("--addr-file")
        .arg(&addr)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn server");
    let started = Instant::now();
    let out = run_with_timeout(
        vfabric()
            .args(["pingpong", "--timeout-s", "20"])
            .arg("--device")
            .arg(&b.sockets[0])
            .arg("--addr-file")
            .arg(&addr),
        Duration::from_secs(30),
    );
    let _ = server.kill();
    let _ = server.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "client on fabric {fb:x} reached fabric {fa:x}"
    );
    assert!(
        err.contains(&format!("belongs to fabric {fa:x}")) && err.contains(&format!("{fb:x}")),
        "unclear error: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refusal took {:?}",
        started.elapsed()
    );
}

/// `--fabric-id` sets the id every address carries; 0 is refused.
#[test]
fn fabric_id_is_configurable() {
    let d = DaemonProcess::start(1, &["--fabric-id", "0x5eed"]);
    let out = run_with_timeout(
        vfabric().args(["info", "--device"]).arg(&d.sockets[0]),
        Duration::from_secs(20),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fabric id: 5eed"), "{text}");
    let out = run_with_timeout(
        Command::new(bin("vfabricd")).args([
            "--socket-path",
            "/nonexistent/x.sock",
            "--fabric-id",
            "0",
        ]),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fabric id 0 is reserved"));
}

/// Spawn one side of a long `pingpong` (timeout 60 s) on `device`.
fn long_pingpong(
    d: &DaemonProcess,
    device: usize,
    server: bool,
    addr: &std::path::Path,
) -> std::process::Child {
    let mut c = vfabric();
    c.arg("pingpong");
    if server {
        c.arg("--server");
    }
    c.args(["--quiet", "--timeout-s", "60", "--fixed-iters"])
        .arg("--device")
        .arg(&d.sockets[device])
        .arg("--addr-file")
        .arg(addr)
        .args(["--sizes", "64", "--iters", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pingpong")
}

/// When one guest dies, the other's pingpong fails within a few seconds (not after its 60 s
/// timeout) saying the peer is gone: its receives are directed at the peer and complete
/// PEER_GONE when the peer's device disconnects.
#[test]
fn killed_peer_is_reported_promptly() {
    for kill_server in [false, true] {
        let d = DaemonProcess::start(2, &[]);
        let addr = d.path("peer.addr");
        let mut server = long_pingpong(&d, 0, true, &addr);
        let mut client = long_pingpong(&d, 1, false, &addr);
        assert!(wait_for(Duration::from_secs(10), || addr.exists()));
        std::thread::sleep(Duration::from_millis(500));
        let (victim, survivor) = if kill_server {
            (&mut server, &mut client)
        } else {
            (&mut client, &mut server)
        };
        assert!(
            matches!(victim.try_wait(), Ok(None)),
            "ended before the kill"
        );
        victim.kill().expect("kill");
        victim.wait().unwrap();
        let start = Instant::now();
        let st = loop {
            if let Some(st) = survivor.try_wait().unwrap() {
                break st;
            }
            // Well under the pingpong's own 60 s timeout, with room for a loaded 2-CPU machine.
            if start.elapsed() > Duration::from_secs(20) {
                let _ = survivor.kill();
                panic!("survivor (server killed: {kill_server}) still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        use std::io::Read;
        survivor
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!st.success(), "survivor should fail: {err}");
        assert!(
            err.contains("peer device disconnected"),
            "server killed: {kill_server}: {err}"
        );
    }
}

/// Requests past a limit fail at once, naming it, instead of waiting out the timeout: a
/// message size over the device's max_msg_size (16 MiB) and a bw window over the CQ size.
#[test]
fn requests_past_a_limit_fail_at_once() {
    let d = DaemonProcess::start(1, &[]);
    for (kind, opt, value, needle) in [
        ("pingpong", "--sizes", "17m", "maximum message size"),
        ("bw", "--window", "100000", "completion queue size 1024"),
    ] {
        for server in [true, false] {
            let mut c = vfabric();
            c.arg(kind);
            if server {
                c.arg("--server");
            }
            let start = Instant::now();
            let out = run_with_timeout(
                c.args(["--quiet", "--timeout-s", "30", opt, value])
                    .arg("--device")
                    .arg(&d.sockets[0])
                    .arg("--addr-file")
                    .arg(d.path("limits.addr")),
                Duration::from_secs(60),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{kind} {opt} {value}: {err}");
            assert!(err.contains(needle), "{kind} {opt} {value}: {err}");
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{kind} {opt} {value} took {:?}",
                start.elapsed()
            );
        }
    }
}
