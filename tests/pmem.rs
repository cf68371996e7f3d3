// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Persistent memory across processes (spec §6.17): a `vfabricd` process, a target process
//! (`vfabric pmem target`) holding a file as a persistent region, and this process as the
//! initiator.
//!
//! * Crash consistency: writes with FI_COMMIT_COMPLETE, and writes followed by FI_SAVE, get
//!   their completion; then the target and the daemon are both killed with SIGKILL and the file,
//!   opened afresh, holds every committed byte (several sizes and offsets, page-straddling).
//! * The persistence primitive: the daemon runs under `strace`, and its `msync` calls are
//!   exactly the committed ranges (pmem2 rounds the start down to a page).
//! * The target commit handler (spec §6.17.3): a target process with a handler that dies
//!   (SIGKILL) while a commit waits for it fails the commit (PEER_GONE), and the daemon goes on
//!   serving a new target's handled commits.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfabric::{
    fi, AddressVector, BindFlags, CompletionQueue, CqAttr, Domain, DomainAttr, Endpoint, EpAttr,
    Error, FiAddr, Iov, RmaIov, RmaMsg, WaitMode,
};
use virtio_fabric_tests::{bin, wait_for, DaemonProcess};

const FILE_LEN: usize = 1 << 20;

/// A child killed (SIGKILL) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `vfabric pmem target` on `device` for `file`; its endpoint address, region base, key.
fn start_target(device: &Path, file: &Path, addr_file: &Path) -> (Killed, String, u64, u64) {
    start_target_with(device, file, addr_file, &[])
}

/// [`start_target`] with more `vfabric pmem target` options.
fn start_target_with(
    device: &Path,
    file: &Path,
    addr_file: &Path,
    extra: &[&str],
) -> (Killed, String, u64, u64) {
    let child = Command::new(bin("vfabric"))
        .args(["pmem", "target", "--timeout-s", "60"])
        .args(extra)
        .arg("--device")
        .arg(device)
        .arg("--file")
        .arg(file)
        .arg("--len")
        .arg(FILE_LEN.to_string())
        .arg("--addr-file")
        .arg(addr_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vfabric pmem target");
    let child = Killed(child);
    assert!(
        wait_for(Duration::from_secs(20), || addr_file.exists()),
        "the target did not publish its region"
    );
    let text = std::fs::read_to_string(addr_file).unwrap();
    let mut f = text.split_whitespace();
    let name = f.next().unwrap().to_string();
    let base = f.next().unwrap().parse().unwrap();
    let key = f.next().unwrap().parse().unwrap();
    (child, name, base, key)
}

struct Initiator {
    _domain: Domain,
    ep: Endpoint,
    tx: CompletionQueue,
    _rx: CompletionQueue,
    _av: AddressVector,
    peer: FiAddr,
}

fn initiator(device: &Path, target_name: &str) -> Initiator {
    let domain = Domain::open(device, DomainAttr::default()).expect("open domain");
    let cq = || {
        domain
            .cq_open(CqAttr {
                size: 64,
                wait: WaitMode::None,
            })
            .unwrap()
    };
    let (tx, rx) = (cq(), cq());
    let av = domain.av_open().unwrap();
    let ep = domain.endpoint(EpAttr::default()).unwrap();
    ep.bind_cq(&tx, BindFlags::TRANSMIT).unwrap();
    ep.bind_cq(&rx, BindFlags::RECV).unwrap();
    ep.bind_av(&av).unwrap();
    ep.enable().unwrap();
    let peer = av.insert_str(target_name).unwrap();
    Initiator {
        _domain: domain,
        ep,
        tx,
        _rx: rx,
        _av: av,
        peer,
    }
}

impl Initiator {
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut v = Vec::new();
        loop {
            match self.tx.read(&mut v, 1) {
                Ok(_) => return,
                Err(Error::Again) => {}
                Err(Error::Avail) => panic!("error completion: {:?}", self.tx.readerr()),
                Err(e) => panic!("cq read: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a completion"
            );
            std::thread::yield_now();
        }
    }

    fn write(&self, base: u64, key: u64, off: usize, data: &[u8], flags: u64) {
        let rma = [RmaIov {
            addr: base + off as u64,
            len: data.len() as u64,
            key,
        }];
        self.ep
            .writemsg(
                &RmaMsg {
                    iov: &[Iov::bytes(data)],
                    addr: self.peer,
                    rma_iov: &rma,
                    context: 1,
                    data: 0,
                },
                flags,
            )
            .unwrap();
        self.wait_ok();
    }

    fn save(&self, ranges: &[RmaIov]) {
        self.ep
            .writemsg(
                &RmaMsg {
                    iov: &[],
                    addr: self.peer,
                    rma_iov: ranges,
                    context: 2,
                    data: 0,
                },
                fi::SAVE | fi::COMMIT_COMPLETE,
            )
            .unwrap();
        self.wait_ok();
    }
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// (offset, length) of the committed writes: several sizes, page-straddling ones included.
const WRITES: &[(usize, usize)] = &[
    (0, 1),
    (100, 8),
    (4090, 12),
    (8192, 4096),
    (12288 + 2000, 8192),
    (65536 - 3, 70000),
    (FILE_LEN - 5000, 5000),
];

fn file_range(path: &Path, off: usize, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off as u64)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

fn crash_run(save: bool) {
    let mut daemon = DaemonProcess::start(2, &[]);
    let file: PathBuf = daemon.path("pmem.file");
    let addr_file = daemon.path("target.addr");
    let (mut target, name, base, key) = start_target(&daemon.sockets[0], &file, &addr_file);
    let ini = initiator(&daemon.sockets[1], &name);
    for (i, &(off, n)) in WRITES.iter().enumerate() {
        let data = pattern(i as u64 + if save { 100 } else { 0 }, n);
        if save {
            ini.write(base, key, off, &data, 0);
            ini.save(&[RmaIov {
                addr: base + off as u64,
                len: n as u64,
                key,
            }]);
        } else {
            ini.write(base, key, off, &data, fi::COMMIT_COMPLETE);
        }
    }
    // Every write completed: kill the target and the daemon without any chance to clean up.
    // SAFETY: kill(2) on our own children's pids.
    unsafe {
        libc::kill(target.0.id() as i32, libc::SIGKILL);
    }
    daemon.signal(libc::SIGKILL);
    let _ = target.0.wait();
    assert!(daemon.wait_exit(Duration::from_secs(10)).is_some());
    drop(ini);
    for (i, &(off, n)) in WRITES.iter().enumerate() {
        let want = pattern(i as u64 + if save { 100 } else { 0 }, n);
        assert!(
            file_range(&file, off, n) == want,
            "committed bytes {off}+{n} missing from the file"
        );
    }
}

#[test]
fn commit_complete_writes_survive_sigkill_of_target_and_daemon() {
    crash_run(false);
}

#[test]
fn saved_writes_survive_sigkill_of_target_and_daemon() {
    crash_run(true);
}

/// `msync(addr, len, ...)` calls in an strace log.
fn msyncs(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let args = l.split("msync(").nth(1)?;
            let mut f = args.split(',');
            let addr = u64::from_str_radix(f.next()?.trim().trim_start_matches("0x"), 16).ok()?;
            let len = f.next()?.trim().parse().ok()?;
            Some((addr, len))
        })
        .collect()
}

#[test]
fn the_daemon_msyncs_exactly_the_committed_ranges() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is needed (scripts/setup.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let sockets: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("vfabric{i}.sock")))
        .collect();
    let strace = Command::new("strace")
        .args(["-f", "-e", "trace=msync,fdatasync,fsync", "-o"])
        .arg(&log)
        .arg(bin("vfabricd"))
        .arg("--socket-dir")
        .arg(dir.path())
        .args(["--devices", "2"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn strace vfabricd");
    let mut strace = Killed(strace);
    assert!(
        wait_for(Duration::from_secs(20), || sockets
            .iter()
            .all(|s| s.exists())),
        "vfabricd did not create its sockets"
    );
    let file = dir.path().join("pmem.file");
    let addr_file = dir.path().join("target.addr");
    let (target, name, base, key) = start_target(&sockets[0], &file, &addr_file);
    let ini = initiator(&sockets[1], &name);
    for (i, &(off, n)) in WRITES.iter().enumerate() {
        ini.write(base, key, off, &pattern(i as u64, n), fi::COMMIT_COMPLETE);
    }
    // A plain write and a visibility save persist nothing.
    ini.write(base, key, 0, &[1, 2, 3], 0);
    ini.ep
        .save(
            &[RmaIov {
                addr: base,
                len: 3,
                key,
            }],
            ini.peer,
            fi::DELIVERY_COMPLETE,
            None,
            3,
        )
        .unwrap();
    ini.wait_ok();
    // One save of two ranges: two msyncs.
    let two = [
        RmaIov {
            addr: base + 10,
            len: 10,
            key,
        },
        RmaIov {
            addr: base + 20000,
            len: 5000,
            key,
        },
    ];
    ini.save(&two);
    drop(ini);
    drop(target);
    // Stop the daemon (strace's child) and let strace write its log.
    let daemon_pid = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        strace.0.id(),
        strace.0.id()
    ))
    .unwrap_or_default();
    for pid in daemon_pid.split_whitespace() {
        // SAFETY: kill(2) on the daemon strace started for this test.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGTERM) };
    }
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && matches!(strace.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let calls = msyncs(&text);
    let mut want: Vec<(usize, usize)> = WRITES.to_vec();
    want.extend([(10, 10), (20000, 5000)]);
    assert_eq!(
        calls.len(),
        want.len(),
        "one msync per committed range:\n{text}"
    );
    // pmem2 msyncs from the page holding the range's first byte: the same mapping base for
    // every call, and the range's length plus its offset in that page.
    let map_base = calls[0].0 - (want[0].0 as u64 & !4095);
    for (&(addr, len), &(off, n)) in calls.iter().zip(&want) {
        assert_eq!(
            addr,
            map_base + (off as u64 & !4095),
            "msync address of {off}+{n}"
        );
        assert_eq!(len, (n + off % 4096) as u64, "msync length of {off}+{n}");
    }
    assert!(
        !text.contains("fdatasync(") && !text.contains("fsync("),
        "the region covers whole pages of the file: no fdatasync\n{text}"
    );
}

/// A target process whose commit handler never runs (it does not progress) is killed while a
/// commit waits for it: the initiator's commit completes PEER_GONE, and the daemon serves the
/// next target's handled commits.
#[test]
fn a_target_dying_while_its_handler_is_awaited_fails_the_commit() {
    let daemon = DaemonProcess::start(2, &["--commit-timeout-ms", "60000"]);
    let file: PathBuf = daemon.path("pmem-handled.file");
    let addr_file = daemon.path("target-handled.addr");
    let (mut target, name, base, key) =
        start_target_with(&daemon.sockets[0], &file, &addr_file, &["--commit-handler"]);
    let ini = initiator(&daemon.sockets[1], &name);
    let range = [RmaIov {
        addr: base,
        len: 64,
        key,
    }];
    ini.ep.commit(&range, ini.peer, 0, 7).unwrap();
    // The commit waits for a handler that never runs (the long timeout cannot end it).
    std::thread::sleep(Duration::from_millis(300));
    let mut v = Vec::new();
    assert!(matches!(ini.tx.read(&mut v, 1), Err(Error::Again)));
    let _ = target.0.kill();
    let _ = target.0.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match ini.tx.read(&mut v, 1) {
            Err(Error::Avail) => break ini.tx.readerr().unwrap(),
            Err(Error::Again) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no completion after the target died"
        );
        std::thread::yield_now();
    };
    assert_eq!((e.context, e.status), (7, vfabric::Status::PeerGone));
    // A new target (progressing, accepting) on the same device: the daemon goes on.
    let addr_file = daemon.path("target-handled2.addr");
    let (_target, name, base, key) = start_target_with(
        &daemon.sockets[0],
        &file,
        &addr_file,
        &["--commit-handler", "--progress"],
    );
    let peer = ini._av.insert_str(&name).unwrap();
    ini.ep
        .commit(
            &[RmaIov {
                addr: base,
                len: 64,
                key,
            }],
            peer,
            0,
            8,
        )
        .unwrap();
    ini.wait_ok();
}
