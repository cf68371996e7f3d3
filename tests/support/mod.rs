// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Support for the workspace-level tests: locating the built binaries, running `vfabricd` as a
//! child process, bounded waits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries (`target/debug` or `target/release`), found from
/// the running test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Wait until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A `vfabricd` child process serving `devices` sockets in a temporary directory. Killed on
/// drop.
pub struct DaemonProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sockets: Vec<PathBuf>,
}

impl DaemonProcess {
    pub fn start(devices: u32, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(bin("vfabricd"))
            .arg("--socket-dir")
            .arg(dir.path())
            .arg("--devices")
            .arg(devices.to_string())
            .args(extra_args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vfabricd");
        let sockets: Vec<PathBuf> = (0..devices)
            .map(|i| dir.path().join(format!("vfabric{i}.sock")))
            .collect();
        assert!(
            wait_for(Duration::from_secs(10), || sockets
                .iter()
                .all(|s| s.exists())),
            "vfabricd did not create its sockets"
        );
        Self {
            child,
            dir,
            sockets,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Signal the daemon and check that it exits successfully and removes its sockets.
    pub fn expect_clean_exit(&mut self, sig: i32) {
        self.signal(sig);
        let st = self
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("vfabricd did not exit on signal {sig}"));
        assert!(st.success(), "exit status {st:?} on signal {sig}");
        for s in &self.sockets {
            assert!(!s.exists(), "{} left behind", s.display());
        }
    }

    /// Wait for the daemon to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, stdout and stderr of a finished command, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `vfabric info --json` of one device, parsed.
pub fn info_json(device: &Path) -> serde_json::Value {
    let out = run_with_timeout(
        Command::new(bin("vfabric"))
            .args(["info", "--json", "--device"])
            .arg(device),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("vfabric info JSON")
}

/// Run a command with a deadline; kills it and panics on timeout. Returns its output.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    // Its own process group: whatever it leaves behind (a forked child of a failed check)
    // is killed with it, so reading its output to the end cannot hang.
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                kill_group(child.id());
                return child.wait_with_output().expect("output");
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                kill_group(child.id());
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{:?} timed out after {timeout:?}; stderr: {}",
                    cmd,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// SIGKILL to the process group `pgid` (a child started with `process_group(0)`).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Whether `path` exists (for sockets removed at shutdown).
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// A directory holding `libvfabric-fi.so` (a link to cargo's `libvfabric_provider.so`), for
/// libfabric's `FI_PROVIDER_PATH`.
pub fn provider_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let so = bin_dir().join("libvfabric_provider.so");
        assert!(
            so.exists(),
            "{} not built: run `cargo build -p vfabric-provider` (scripts/test.sh does)",
            so.display()
        );
        let d = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(&so, d.path().join("libvfabric-fi.so")).expect("symlink");
        d
    })
    .path()
}

/// tests/c/`name`.c compiled against the installed libfabric headers (and the provider's
/// extension header), linked with -lfabric, into the binary directory.
pub fn compile_c(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join(format!("tests/c/{name}.c"));
    let out = bin_dir().join(name);
    let tmp = private_path(&out);
    let o = run_with_timeout(
        Command::new("cc")
            .arg(format!(
                "-I{}",
                root.join("crates/provider/include").display()
            ))
            .args([
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unused-parameter",
                "-O1",
                "-o",
            ])
            .arg(&tmp)
            .arg(&src)
            .args(["-lfabric", "-lpthread"]),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "compiling {}: {}",
        src.display(),
        output_text(&o)
    );
    publish(&tmp, &out);
    out
}

/// A file name next to `out` that no other test (thread or process) compiles into at the same
/// time: tests that build the same program run in parallel, and one must not replace the file
/// under another's feet while that one starts it.
pub fn private_path(out: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = out.file_name().expect("a file name").to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    out.with_file_name(name)
}

/// Move a freshly built `tmp` to `out` in one step (rename): a process already running the
/// old `out` keeps its file, a new one gets the whole new file, never a half-written one.
pub fn publish(tmp: &Path, out: &Path) {
    std::fs::rename(tmp, out)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), out.display()));
}

/// Whether process `proc` (a pid, or "self"; its network namespace's view) has a TCP socket
/// listening on `port`, IPv4 or IPv6.
pub fn listening_in(proc: &str, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{proc}/net/{f}")).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3
                    && cols[3] == "0A"
                    && cols[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}
