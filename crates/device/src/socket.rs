// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device sockets that cannot be stolen.
//!
//! [`DeviceSocket::bind`] never removes anything but a stale socket: a path held by a live
//! listener (another `vfabricd`) is refused, a path that is not a socket (a regular file, a
//! directory) is refused, and only a socket nobody listens on (connect: `ECONNREFUSED`) is
//! replaced. The check-and-bind runs under an exclusive `flock` of the socket's directory, so
//! two daemons starting together cannot both find the path stale. Permissions and group are
//! applied between `bind` and `listen`: no frontend can connect before they are in place. On
//! drop the path is removed only if it is still the socket this daemon bound (same device and
//! inode), so a daemon never deletes another daemon's socket.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vhost::vhost_user::Listener;

use crate::Error;

/// How long to wait for another daemon's check-and-bind of the same directory.
const DIR_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the kernel queues while the device serves a frontend.
const BACKLOG: libc::c_int = 16;

/// Ownership and permissions applied to every device socket.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SocketAccess {
    pub mode: Option<u32>,
    pub gid: Option<libc::gid_t>,
}

/// A bound, listening device socket, removed on drop if it is still ours.
pub(crate) struct DeviceSocket {
    listener: Listener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket inode we created.
    id: (u64, u64),
}

impl DeviceSocket {
    /// Bind `path` (see the module documentation for what is refused).
    pub fn bind(path: &Path, access: SocketAccess) -> Result<Self, Error> {
        let fail = |source: io::Error| Error::Socket {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let _dir_lock = DirLock::acquire(dir).map_err(fail)?;
        let fd = match bind_unix(path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                remove_if_stale(path)?;
                bind_unix(path).map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        };
        // From here on the path is ours: remove it again if setting it up fails.
        let meta = std::fs::symlink_metadata(path).map_err(fail)?;
        let id = (meta.dev(), meta.ino());
        let setup = || -> io::Result<()> {
            if let Some(gid) = access.gid {
                std::os::unix::fs::lchown(path, None, Some(gid))?;
            }
            if let Some(mode) = access.mode {
                let c = cstring(path)?;
                // SAFETY: `c` is a valid NUL-terminated path; chmod reads it only.
                if unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: `fd` is the bound socket we own; listen takes no pointers.
            if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = std::fs::remove_file(path);
            return Err(fail(e));
        }
        // A listener built from a raw socket has no path: vhost never unlinks it, we do.
        let listener = Listener::from(UnixListener::from(fd));
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            id,
        })
    }

    pub fn listener_mut(&mut self) -> &mut Listener {
        &mut self.listener
    }
}

impl AsRawFd for DeviceSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for DeviceSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), "cannot remove the socket: {e}");
                }
            }
            Ok(_) => warn!(
                path = %self.path.display(),
                "socket path was replaced by someone else: left alone"
            ),
            Err(_) => {}
        }
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A socket bound to `path` but not listening yet (connects are refused until `listen`).
fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path longer than {} bytes or containing NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call and `len` does not
    // exceed its size (checked above); bind only reads it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `path` exists: remove it if it is a socket nobody listens on, else refuse.
fn remove_if_stale(path: &Path) -> Result<(), Error> {
    let fail = |source: io::Error| Error::Socket {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale socket (nobody listens on it)");
            std::fs::remove_file(path).map_err(fail)
        }
        Err(e) => Err(fail(io::Error::new(
            e.kind(),
            format!("cannot tell whether the existing socket is in use: {e}"),
        ))),
    }
}

/// An exclusive `flock` of a directory, held while a socket in it is checked and bound.
struct DirLock(Option<File>);

impl DirLock {
    fn acquire(dir: &Path) -> io::Result<Self> {
        // Without read permission on the directory there is nothing to lock: the probe alone
        // protects live sockets then.
        let Ok(f) = File::open(dir) else {
            return Ok(Self(None));
        };
        let end = Instant::now() + DIR_LOCK_TIMEOUT;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self(Some(f)));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                        "directory {} stayed locked by another process for {DIR_LOCK_TIMEOUT:?}",
                        dir.display()
                    ),
                    ))
                }
                // Filesystems without flock: the probe alone protects live sockets.
                _ => return Ok(Self(None)),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            // SAFETY: flock on a descriptor we own; closing it would release the lock too.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// Resolve a group name or numeric id.
pub(crate) fn resolve_group(group: &str) -> Result<libc::gid_t, Error> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = CString::new(group)
        .map_err(|_| Error::Config(format!("socket group {group:?} contains a NUL byte")))?;
    // SAFETY: group is plain data; all-zero is a valid value for an out-parameter.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `name` is NUL-terminated, `grp` and `result`
    // are writable out-parameters, `buf` is writable for `buf.len()` bytes.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 || result.is_null() {
        return Err(Error::Config(format!(
            "socket group {group:?}: no such group"
        )));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_live_sockets_and_non_sockets_replaces_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.sock");
        let first = DeviceSocket::bind(&p, SocketAccess::default()).unwrap();
        match DeviceSocket::bind(&p, SocketAccess::default()) {
            Err(Error::SocketInUse { .. }) => {}
            other => panic!("second bind of a live socket: {:?}", other.err()),
        }
        assert!(p.exists(), "the live socket must survive");
        drop(first);
        assert!(!p.exists(), "our own socket is removed on drop");

        // A stale socket (its listener closed without unlinking, as after a crash) is
        // replaced.
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let replaced = DeviceSocket::bind(&p, SocketAccess::default()).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(replaced);

        let f = dir.path().join("file");
        std::fs::write(&f, b"precious").unwrap();
        match DeviceSocket::bind(&f, SocketAccess::default()) {
            Err(Error::NotASocket { .. }) => {}
            other => panic!("bind over a regular file: {:?}", other.err()),
        }
        assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    }

    #[test]
    fn removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.sock");
        let s = DeviceSocket::bind(&p, SocketAccess::default()).unwrap();
        // Someone replaces the path (e.g. an operator, or another daemon after a forced
        // removal): dropping ours must leave theirs.
        std::fs::remove_file(&p).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(s);
        assert!(p.exists(), "another listener's socket was removed");
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(theirs);
    }

    #[test]
    fn applies_mode_before_listening() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let access = SocketAccess {
            mode: Some(0o600),
            gid: None,
        };
        let _s = DeviceSocket::bind(&p, access).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        assert_eq!(resolve_group(&gid.to_string()).unwrap(), gid);
        assert!(resolve_group("no-such-group-vfabric-test").is_err());
    }
}
