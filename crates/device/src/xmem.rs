// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Process memory regions: memory a userspace driver registered by its own virtual addresses
//! (MR_REG with `mr_flags::PROCESS_MEMORY`), reached with cross-memory attach
//! (`process_vm_readv`/`process_vm_writev`, as libfabric's shm provider does) instead of a
//! shared mapping. The application's pages stay where they are: nothing is remapped, no write
//! of the application can be lost, and the device touches exactly the registered bytes.
//!
//! Trust: the process is the one at the other end of the vhost-user socket, its pid read from
//! the socket's credentials (`SO_PEERCRED`), never from a request. Process memory is only
//! allowed when that process's address space *is* the guest address space, i.e. it maps every
//! memory region of the device at the region's guest address (a userspace driver does; a VMM
//! such as QEMU maps guest RAM elsewhere, so its guests can never name its memory). Every
//! access stays inside a range the guest registered (checked by the caller, [`crate::fabric`]
//! RMA and atomics), and the kernel checks the rest: unmapped addresses fail the access.
//!
//! The daemon needs ptrace-read access to the process (same uid, or CAP_SYS_PTRACE; with Yama,
//! `ptrace_scope` 0, or 1 when the daemon is privileged).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing::{debug, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};

use crate::chain::{GuestMemoryMmap, MemFault, Segs};

/// The frontend process of one connection, resolved on first use.
pub(crate) struct PeerProcess {
    /// Path of the device socket: the accepted connection carries it as its local name.
    socket: PathBuf,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The pid and a pidfd of it (to tell whether that process still exists).
    pid: OnceLock<Result<(libc::pid_t, OwnedFd), String>>,
    /// Serialises the device's atomics on process memory (read and write are two system calls).
    atomics: Mutex<()>,
}

impl std::fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerProcess")
            .field("socket", &self.socket)
            .field("pid", &self.pid.get().map(|r| r.as_ref().map(|p| p.0)))
            .finish()
    }
}

impl PeerProcess {
    pub fn new(socket: PathBuf, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        Self {
            socket,
            mem,
            pid: OnceLock::new(),
            atomics: Mutex::new(()),
        }
    }

    /// The frontend's pid, if its memory may be accessed as process memory (module docs).
    pub fn pid(&self) -> Result<libc::pid_t, String> {
        let resolved = self.pid.get_or_init(|| {
            let r = peer_pid(&self.socket).and_then(|pid| {
                // The pidfd first: the address-space check then holds for this very process.
                let fd = pidfd_open(pid)?;
                same_address_space(pid, &self.mem.memory())?;
                Ok((pid, fd))
            });
            match &r {
                Ok((pid, _)) => debug!(pid, "frontend reachable by cross-memory attach"),
                Err(e) => warn!("process memory refused: {e}"),
            }
            r
        });
        let (pid, fd) = resolved.as_ref().map_err(Clone::clone)?;
        // After the frontend exits its pid may be reused: never touch another process.
        if !alive(fd) {
            return Err(format!("frontend process {pid} exited"));
        }
        Ok(*pid)
    }

    /// A duplicate of the frontend's descriptor `fd` (`pidfd_getfd(2)`, which needs the same
    /// ptrace permission as the cross-memory copies): the file of a persistent region.
    pub fn file_of(&self, fd: u64) -> Result<File, String> {
        let fd = i32::try_from(fd).map_err(|_| format!("descriptor {fd} out of range"))?;
        self.pid()?;
        let Some(Ok((_, pidfd))) = self.pid.get() else {
            return Err("frontend process unknown".into());
        };
        // SAFETY: pidfd_getfd(2) duplicates a descriptor of the process into ours; it takes
        // integers only and returns a new descriptor or -1.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            return Err(format!("pidfd_getfd({fd}): {}", io::Error::last_os_error()));
        }
        // SAFETY: `got` is a descriptor the kernel just installed for us alone.
        Ok(unsafe { File::from_raw_fd(got as i32) })
    }

    pub fn atomics_lock(&self) -> MutexGuard<'_, ()> {
        self.atomics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read `buf.len()` bytes of the stream `segs` (process addresses) from byte `off`.
    pub fn read(&self, segs: &Segs, off: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let pid = self.pid().map_err(|_| MemFault)?;
        let mut done = 0usize;
        for (addr, n) in pieces(segs, off, buf.len())? {
            vm_read(pid, addr, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write `buf` into the stream `segs` (process addresses) from byte `off`.
    pub fn write(&self, segs: &Segs, off: u64, buf: &[u8]) -> Result<(), MemFault> {
        let pid = self.pid().map_err(|_| MemFault)?;
        let mut done = 0usize;
        for (addr, n) in pieces(segs, off, buf.len())? {
            vm_write(pid, addr, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// `(address, length)` pieces of `len` bytes of `segs` from byte `off`.
fn pieces(segs: &Segs, off: u64, len: usize) -> Result<Vec<(u64, usize)>, MemFault> {
    let end = off.checked_add(len as u64).ok_or(MemFault)?;
    if end > segs.len {
        return Err(MemFault);
    }
    let (_, tail) = segs.split_at(off);
    let (part, _) = tail.split_at(len as u64);
    Ok(part.segs.iter().map(|s| (s.addr, s.len as usize)).collect())
}

fn vm_read(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> Result<(), MemFault> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` describes the writable rest of `buf`; the kernel checks `remote`
        // against the other process's address space and reads nothing of ours.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            debug!(
                pid,
                addr,
                "process_vm_readv: {}",
                io::Error::last_os_error()
            );
            return Err(MemFault);
        }
        done += n as usize;
    }
    Ok(())
}

fn vm_write(pid: libc::pid_t, addr: u64, buf: &[u8]) -> Result<(), MemFault> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_ptr().cast_mut().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` describes the rest of `buf`, only read; the kernel checks `remote`
        // against the other process's address space.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            debug!(
                pid,
                addr,
                "process_vm_writev: {}",
                io::Error::last_os_error()
            );
            return Err(MemFault);
        }
        done += n as usize;
    }
    Ok(())
}

fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, String> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(format!("pidfd_open({pid}): {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Does the process of `pidfd` still run (signal 0 delivers nothing)?
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal(2) with signal 0 and no info only checks the target.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// The pid of the process connected to the device socket `socket`: the `SO_PEERCRED` of the
/// one accepted connection of this process whose local name is `socket` (a device serves one
/// frontend at a time, and vhost-user-backend does not hand out the connection it accepted).
fn peer_pid(socket: &Path) -> Result<libc::pid_t, String> {
    let want = socket.as_os_str().as_encoded_bytes();
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    let mut found: Option<libc::pid_t> = None;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !unix_name_is(fd, want) || is_listening(fd) {
            continue;
        }
        let Some(pid) = peer_cred_pid(fd) else {
            continue;
        };
        match found {
            Some(p) if p != pid => {
                return Err(format!(
                    "two connections on {}: pids {p} and {pid}",
                    socket.display()
                ))
            }
            _ => found = Some(pid),
        }
    }
    found.ok_or_else(|| format!("no connection on {}", socket.display()))
}

/// Is `fd` a unix socket bound to the path `want`?
fn unix_name_is(fd: i32, want: &[u8]) -> bool {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the sizes given; a non-socket fd only
    // makes the call fail.
    let r = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) };
    if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return false;
    }
    let path_len = (len as usize)
        .saturating_sub(std::mem::offset_of!(libc::sockaddr_un, sun_path))
        .min(addr.sun_path.len());
    let name: Vec<u8> = addr.sun_path[..path_len]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    name == want
}

fn is_listening(fd: i32) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    r != 0 || v != 0
}

fn peer_cred_pid(fd: i32) -> Option<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Does process `pid` map the regions of `mem` (by file and inode) at their guest addresses?
/// Then guest addresses are its virtual addresses. A region whose file the process no longer
/// maps at all is skipped (memory it shared and unmapped since: the device keeps the region,
/// see the driver's `Domain::unshare_raw`), but at least one region must be found, and a region
/// mapped anywhere but at its guest address (a VMM's guest RAM) disqualifies the process.
fn same_address_space(pid: libc::pid_t, mem: &GuestMemoryMmap) -> Result<(), String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    // (start, file offset, inode) of each mapping.
    let mapped: Vec<(u64, u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let start = it.next()?.split_once('-')?.0;
            let offset = it.nth(1)?;
            let inode = it.nth(1)?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(offset, 16).ok()?,
                inode.parse().ok()?,
            ))
        })
        .collect();
    let mut found = 0;
    for r in mem.iter() {
        let gpa = r.start_addr().0;
        let fo = r
            .file_offset()
            .ok_or_else(|| format!("region at {gpa:#x} has no file"))?;
        let file: &File = fo.file();
        let ino = file
            .metadata()
            .map_err(|e| format!("fstat of fd {}: {e}", file.as_raw_fd()))?
            .ino();
        let views: Vec<(u64, u64)> = mapped
            .iter()
            .filter(|m| m.2 == ino)
            .map(|m| (m.0, m.1))
            .collect();
        if views.is_empty() {
            continue;
        }
        // A mapping of the region's file where guest address = virtual address.
        let len = r.len();
        let identity = views.iter().any(|&(start, off)| {
            start >= gpa && start - gpa < len && off.checked_sub(fo.start()) == Some(start - gpa)
        });
        if !identity {
            return Err(format!(
                "process {pid} does not map guest memory at its guest address {gpa:#x}: its \
                 address space is not the guest's"
            ));
        }
        found += 1;
    }
    if found == 0 {
        return Err(format!("process {pid} maps none of the guest memory"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};

    use vm_memory::{FileOffset, GuestAddress};

    use super::*;
    use crate::chain::Seg;

    fn own_pid() -> libc::pid_t {
        // SAFETY: getpid has no inputs and cannot fail.
        unsafe { libc::getpid() }
    }

    #[test]
    fn the_peer_is_found_by_the_socket_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        // Not accepted yet: the listening socket and the unnamed client side do not count.
        assert!(peer_pid(&path).is_err());
        let (_conn, _) = listener.accept().unwrap();
        assert_eq!(peer_pid(&path), Ok(own_pid()));
        assert!(peer_pid(&dir.path().join("other.sock")).is_err());
    }

    /// A memfd of `len` bytes mapped in this process: (file, address).
    fn memfd_mapped(len: usize) -> (File, u64) {
        let name = std::ffi::CString::new("xmem-test").unwrap();
        // SAFETY: `name` is NUL-terminated; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and ours.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len as u64).unwrap();
        // SAFETY: a shared mapping of the memfd at an address of the kernel's choosing (left
        // mapped for the test process's life).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p as u64)
    }

    fn guest(file: &File, gpa: u64, len: usize) -> GuestMemoryMmap {
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(gpa), len, Some(fo))]).unwrap()
    }

    #[test]
    fn only_a_process_mapping_guest_memory_at_guest_addresses_qualifies() {
        let len = 1 << 16;
        let (f, at) = memfd_mapped(len);
        // A userspace driver: guest address = its virtual address.
        assert!(same_address_space(own_pid(), &guest(&f, at, len)).is_ok());
        // A VMM: guest RAM mapped elsewhere in its address space.
        let vm = guest(&f, at + (1 << 30), len);
        let e = same_address_space(own_pid(), &vm).unwrap_err();
        assert!(e.contains("not the guest's"), "{e}");
    }

    #[test]
    fn reads_and_writes_stay_in_the_stream() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 64];
        let mut segs = Segs::default();
        segs.push(Seg {
            addr: a.as_mut_ptr() as u64,
            len: 10,
        });
        segs.push(Seg {
            addr: b.as_mut_ptr() as u64,
            len: 10,
        });
        let p = PeerProcess::new(
            PathBuf::new(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        );
        p.pid
            .set(Ok((own_pid(), pidfd_open(own_pid()).unwrap())))
            .unwrap();
        let data: Vec<u8> = (1..=16).collect();
        p.write(&segs, 2, &data).unwrap();
        // SAFETY: reading our own buffers the kernel wrote behind the compiler's back.
        let (a_now, b_now) = unsafe {
            (
                std::ptr::read_volatile(a.as_ptr().cast::<[u8; 12]>()),
                std::ptr::read_volatile(b.as_ptr().cast::<[u8; 12]>()),
            )
        };
        assert_eq!(&a_now[2..10], &data[..8]);
        assert_eq!(&b_now[..8], &data[8..]);
        assert_eq!(&b_now[8..], &[0; 4], "nothing past the stream");
        let mut back = [0u8; 16];
        p.read(&segs, 2, &mut back).unwrap();
        assert_eq!(back.as_slice(), data.as_slice());
        // Past the end of the stream: refused before any system call.
        assert_eq!(p.write(&segs, 5, &data), Err(MemFault));
        // Unmapped memory: the kernel refuses it.
        let mut bad = Segs::default();
        bad.push(Seg { addr: 8, len: 8 });
        assert_eq!(p.read(&bad, 0, &mut back[..8]), Err(MemFault));
    }
}
