// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The lock of a device's fabric state: a futex mutex without poisoning.
//!
//! `std::sync::Mutex` records a panic while it is held and checks for one on every lock and
//! unlock; the fabric ignores that record (its state is only changed by code that does not
//! panic), and a message takes two device locks (the receive's post, the send's match), so the
//! checks were paid twice per message for nothing. The algorithm is the standard one (and
//! std's): 0 unlocked, 1 locked, 2 locked with waiters; an uncontended lock is one
//! compare-exchange and its unlock one swap.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
/// Locked, and a thread may be asleep waiting for it.
const CONTENDED: u32 = 2;

/// A mutex for the fabric's per-device state.
pub(crate) struct DevLock<T> {
    state: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard exists at a time
// (the state's compare-exchange and swap hand it over with Acquire/Release ordering), as with
// `std::sync::Mutex`.
unsafe impl<T: Send> Send for DevLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for DevLock<T> {}

impl<T> DevLock<T> {
    pub fn new(value: T) -> Self {
        Self {
            state: AtomicU32::new(UNLOCKED),
            value: UnsafeCell::new(value),
        }
    }

    #[inline]
    pub fn lock(&self) -> DevGuard<'_, T> {
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        DevGuard { lock: self }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        // Holders keep it briefly: spin a little before sleeping.
        for _ in 0..100 {
            let s = self.state.load(Ordering::Relaxed);
            if s == UNLOCKED
                && self
                    .state
                    .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            if s == CONTENDED {
                break;
            }
            std::hint::spin_loop();
        }
        // Taken as CONTENDED, so that our unlock wakes whoever else sleeps on it.
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            futex(
                &self.state,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                CONTENDED,
            );
        }
    }

    #[inline]
    fn unlock(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            self.wake_one();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_one(&self) {
        futex(&self.state, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
    }
}

/// FUTEX_WAIT (sleep while `word` holds `val`; a spurious return is re-checked by the caller's
/// loop) or FUTEX_WAKE (`val` sleepers) on `word`.
fn futex(word: &AtomicU32, op: libc::c_int, val: u32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic for the call's duration; no timeout and
    // no second address are passed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// The lock held; released on drop.
pub(crate) struct DevGuard<'a, T> {
    lock: &'a DevLock<T>,
}

impl<T> Deref for DevGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this guard is the one holder of the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for DevGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard is the one holder of the lock, borrowed mutably.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for DevGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Waits (bounded) for `n` workers to report on `done`.
    fn join_within(done: &mpsc::Receiver<()>, n: usize, what: &str) {
        for _ in 0..n {
            done.recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{what}: a worker never finished"));
        }
    }

    /// Four threads add to a plain (non-atomic) pair under the lock, contended enough that
    /// some sleep: no update is lost and the pair is never seen torn.
    #[test]
    fn excludes() {
        const THREADS: u64 = 4;
        const ROUNDS: u64 = 20_000;
        let lock = Arc::new(DevLock::new((0u64, 0u64)));
        let (tx, done) = mpsc::channel();
        for _ in 0..THREADS {
            let (lock, tx) = (lock.clone(), tx.clone());
            std::thread::spawn(move || {
                for i in 0..ROUNDS {
                    let mut g = lock.lock();
                    assert_eq!(g.0, g.1, "torn pair");
                    g.0 += 1;
                    if i % 1000 == 0 {
                        // Hold it across a yield now and then, so that others sleep on it.
                        std::thread::yield_now();
                    }
                    g.1 += 1;
                }
                let _ = tx.send(());
            });
        }
        join_within(&done, THREADS as usize, "excludes");
        assert_eq!(*lock.lock(), (THREADS * ROUNDS, THREADS * ROUNDS));
    }

    /// A thread that went to sleep on the lock is woken by its release.
    #[test]
    fn release_wakes_a_sleeper() {
        let lock = Arc::new(DevLock::new(0u32));
        let held = lock.lock();
        let (tx, done) = mpsc::channel();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                *lock.lock() += 1;
                let _ = tx.send(());
            })
        };
        // Long past its spinning: it sleeps on the futex (the state says so).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while lock.state.load(Ordering::Acquire) != CONTENDED {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never slept"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        join_within(&done, 1, "release_wakes_a_sleeper");
        waiter.join().expect("waiter panicked");
        assert_eq!(*lock.lock(), 1);
    }
}
