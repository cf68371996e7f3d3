// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device sockets and configuration of the `vfabricd` binary: sockets cannot be stolen or
//! left behind, a connection that never becomes a guest cannot hold a device, a busy device
//! says so, and bad settings are refused with a message that names them.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use vfabric::{Domain, DomainAttr, EpAttr, Error as DrvError};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_fabric_tests::{bin, output_text as text, run_with_timeout, wait_for, DaemonProcess};

fn vfabricd() -> Command {
    Command::new(bin("vfabricd"))
}

/// (device, inode) of a path.
fn inode(p: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(p).expect("stat");
    (m.dev(), m.ino())
}

fn attr(timeout: Duration) -> DomainAttr {
    DomainAttr {
        mem_bytes: 4 << 20,
        control_timeout: timeout,
        ..DomainAttr::default()
    }
}

/// `vfabric info` on one device.
fn info(dev: &Path) -> Output {
    run_with_timeout(
        Command::new(bin("vfabric"))
            .args(["info", "--device"])
            .arg(dev),
        Duration::from_secs(30),
    )
}

#[test]
fn a_second_daemon_cannot_steal_the_sockets() {
    let mut d = DaemonProcess::start(2, &[]);
    let before: Vec<_> = d.sockets.iter().map(|s| inode(s)).collect();
    let o = run_with_timeout(
        vfabricd()
            .arg("--socket-dir")
            .arg(d.dir.path())
            .args(["--devices", "2"]),
        Duration::from_secs(15),
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("is in use"), "{t}");
    let after: Vec<_> = d.sockets.iter().map(|s| inode(s)).collect();
    assert_eq!(before, after, "the first daemon's sockets were replaced");
    // The first daemon still serves both devices.
    for s in &d.sockets {
        let o = info(s);
        assert!(o.status.success(), "{}", text(&o));
    }
    d.expect_clean_exit(libc::SIGTERM);
}

#[test]
fn socket_path_over_a_regular_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("precious.txt");
    std::fs::write(&f, b"keep me").unwrap();
    let o = run_with_timeout(
        vfabricd().arg("--socket-path").arg(&f),
        Duration::from_secs(15),
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("not a socket"), "{t}");
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vf.sock");
    // A socket file nobody listens on, as a killed daemon leaves it.
    drop(UnixListener::bind(&p).unwrap());
    // Another test's fork may hold the listener for the moment until its exec closes it
    // (CLOEXEC): wait for the socket to be dead rather than assume it at once.
    assert!(wait_for(Duration::from_secs(5), || UnixStream::connect(&p).is_err()));
    let mut child = vfabricd().arg("--socket-path").arg(&p).spawn().unwrap();
    let up = wait_for(Duration::from_secs(10), || UnixStream::connect(&p).is_ok());
    let o = if up { Some(info(&p)) } else { None };
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "vfabricd did not take over the stale socket");
    let o = o.unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn sighup_and_sigint_exit_cleanly_and_remove_sockets() {
    for sig in [libc::SIGHUP, libc::SIGINT] {
        DaemonProcess::start(2, &[]).expect_clean_exit(sig);
    }
}

#[test]
fn socket_mode_and_group_are_applied() {
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let d = DaemonProcess::start(
        2,
        &["--socket-mode", "0640", "--socket-group", &gid.to_string()],
    );
    for s in &d.sockets {
        let m = std::fs::metadata(s).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640, "{}", s.display());
        assert_eq!(m.gid(), gid);
    }
    drop(d);

    // The same from the TOML file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vfabricd.toml");
    let sock = dir.path().join("vf.sock");
    std::fs::write(
        &cfg,
        format!(
            "socket_path = {:?}\nsocket_mode = \"0600\"\nsocket_group = {gid}\n",
            sock.display().to_string()
        ),
    )
    .unwrap();
    let mut child = vfabricd().arg("--config").arg(&cfg).spawn().unwrap();
    let up = wait_for(Duration::from_secs(10), || sock.exists());
    let mode = std::fs::metadata(&sock).map(|m| m.permissions().mode() & 0o777);
    let _ = child.kill();
    let _ = child.wait();
    assert!(up);
    assert_eq!(mode.unwrap(), 0o600);

    let o = run_with_timeout(
        vfabricd().args([
            "--socket-path",
            "/tmp/never.sock",
            "--socket-group",
            "no-such-group-vfabric",
        ]),
        Duration::from_secs(15),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no-such-group-vfabric"), "{}", text(&o));
}

/// How a connection that never becomes a guest behaves.
#[derive(Debug, Clone, Copy)]
enum Loiterer {
    /// Connects and says nothing.
    Silent,
    /// Sends half a vhost-user header.
    HalfHeader,
    /// Completes the vhost-user handshake (owner, features, protocol features) and starts no
    /// ring.
    NoRing,
}

#[test]
fn connections_that_never_start_a_ring_are_dropped_at_the_deadline() {
    let d = DaemonProcess::start(1, &["--handshake-timeout", "300ms"]);
    let sock = &d.sockets[0];
    for kind in [Loiterer::Silent, Loiterer::HalfHeader, Loiterer::NoRing] {
        let mut raw = None;
        let mut fe = None;
        match kind {
            Loiterer::Silent => raw = Some(UnixStream::connect(sock).unwrap()),
            Loiterer::HalfHeader => {
                let mut s = UnixStream::connect(sock).unwrap();
                s.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
                raw = Some(s);
            }
            Loiterer::NoRing => {
                let mut f = Frontend::connect(sock, 5).unwrap();
                f.set_owner().unwrap();
                let feats = f.get_features().unwrap();
                f.set_features(feats).unwrap();
                let p = f.get_protocol_features().unwrap();
                f.set_protocol_features(p).unwrap();
                fe = Some(f);
            }
        }
        // A real guest gets the device although the loiterer is still connected.
        let dom = Domain::open(sock, attr(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{kind:?}: a guest could not get the device: {e}"));
        let _ep = dom.endpoint(EpAttr::default()).expect("endpoint");
        // And the daemon closed the loiterer's connection.
        if let Some(mut s) = raw {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 16];
            assert!(
                matches!(s.read(&mut b), Ok(0) | Err(_)),
                "{kind:?}: still connected"
            );
        }
        if let Some(f) = fe {
            assert!(f.get_features().is_err(), "{kind:?}: still connected");
        }
        drop(dom);
    }
}

#[test]
fn an_idle_guest_keeps_its_device_and_the_next_is_told_busy() {
    let d = DaemonProcess::start(1, &["--handshake-timeout", "200ms"]);
    let sock = &d.sockets[0];
    let a = Domain::open(sock, attr(Duration::from_secs(10))).expect("first guest");
    // Idle well past the handshake deadline: a working guest is not dropped.
    std::thread::sleep(Duration::from_millis(700));
    let e = Domain::open(sock, attr(Duration::from_secs(1))).expect_err("second guest");
    assert!(matches!(e, DrvError::Busy { .. }), "{e:?}");
    assert_eq!(e.errno(), vfabric::fi::EBUSY);
    assert!(e.to_string().contains("is busy"), "{e}");
    let ep = a
        .endpoint(EpAttr::default())
        .expect("the idle guest still works");
    // The CLI says it in words too.
    let o = info(sock);
    assert!(!o.status.success());
    assert!(text(&o).contains("is busy"), "{}", text(&o));
    drop((ep, a));
    // Freed: the next guest gets it.
    Domain::open(sock, attr(Duration::from_secs(10))).expect("device free again");
}

// ---------------------------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------------------------

/// Run vfabricd with `args`; it must fail with exit code `code` and say `needle`.
fn refused(args: &[&str], code: i32, needle: &str) {
    let o = run_with_timeout(vfabricd().args(args), Duration::from_secs(15));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {t}");
    assert!(t.contains(needle), "{args:?}: missing {needle:?} in {t}");
    assert!(!t.contains("backtrace"), "{args:?}: {t}");
}

#[test]
fn bad_settings_are_refused_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("s");
    let sd = sd.to_str().unwrap();
    refused(
        &["--socket-dir", sd, "--devices", "4294967295"],
        1,
        "--devices 4294967295",
    );
    refused(&["--socket-dir", sd, "--devices", "0"], 1, "--devices 0");
    refused(
        &["--socket-dir", sd, "--log-level", "[[["],
        2,
        "invalid --log-level",
    );
    refused(
        &["--socket-dir", sd, "--max-mrs", "4294967295"],
        1,
        "max_mrs",
    );
    refused(
        &["--socket-dir", sd, "--handshake-timeout", "soon"],
        2,
        "handshake-timeout",
    );
    refused(&["--socket-dir", sd, "--socket-mode", "0999"], 2, "octal");
    // A socket directory that cannot be created is named as such.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let under_file = file.join("sub");
    refused(
        &["--socket-dir", under_file.to_str().unwrap()],
        1,
        "cannot create socket directory",
    );
}

#[test]
fn invalid_vfabric_mem_mb_is_refused_by_name() {
    let d = DaemonProcess::start(1, &[]);
    for bad in ["0", "abc", "-5", "17592186044417"] {
        let o = run_with_timeout(
            Command::new(bin("vfabric"))
                .args(["info", "--device"])
                .arg(&d.sockets[0])
                .env("VFABRIC_MEM_MB", bad),
            Duration::from_secs(30),
        );
        let t = text(&o);
        assert!(!o.status.success(), "VFABRIC_MEM_MB={bad}: {t}");
        assert!(t.contains("VFABRIC_MEM_MB"), "VFABRIC_MEM_MB={bad}: {t}");
    }
    let o = run_with_timeout(
        Command::new(bin("vfabric"))
            .args(["info", "--device"])
            .arg(&d.sockets[0])
            .env("VFABRIC_MEM_MB", "8"),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "{}", text(&o));
}
