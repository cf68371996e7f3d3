// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The system calls on the driver's hot path (kicks, wakeup-eventfd resets, the sleep's
//! `ppoll`), made directly: on x86-64 a bare `syscall` instruction, with no libc wrapper
//! (argument shuffling, `errno`, cancellation-point bookkeeping: ≈30 instructions a call);
//! elsewhere through `libc::syscall`.

/// System call `nr` with up to five arguments (unused ones 0): the kernel's return value,
/// `-errno` on failure.
///
/// # Safety
/// As for the system call itself: every pointer argument must be valid for what the kernel
/// reads or writes through it.
#[inline(always)]
pub(crate) unsafe fn raw5(nr: libc::c_long, args: [usize; 5]) -> isize {
    #[cfg(target_arch = "x86_64")]
    {
        let ret: isize;
        // SAFETY: the Linux x86-64 system call convention: number in rax, arguments in rdi,
        // rsi, rdx, r10, r8, result in rax; the kernel clobbers rcx and r11 only and does not
        // touch our stack. What it reads or writes through the arguments is the caller's
        // guarantee; the asm is not marked `nomem`, so the compiler orders our accesses to that
        // memory around it.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") args[0],
                in("rsi") args[1],
                in("rdx") args[2],
                in("r10") args[3],
                in("r8") args[4],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller's guarantee, as above.
        let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) };
        if rc < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as isize)
        } else {
            rc as isize
        }
    }
}
