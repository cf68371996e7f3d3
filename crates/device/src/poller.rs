// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's data-plane pollers: threads that poll the rings of busy devices.
//!
//! A device's vring worker wakes on a kick, drains its queues and, when it found work, hands the
//! device to its poller with notifications still disabled (EVENT_IDX: the guest stops kicking).
//! The poller then sweeps its active devices, draining whatever arrives, until a device has been
//! idle for the poll budget; only then does it re-enable that device's notifications (re-checking
//! the rings once more, so no request is stranded) and drop it.
//!
//! `--pollers N` starts N pollers; device `d` belongs to poller `d % N`. One poller for all
//! devices keeps the busy-polling cost to one core however many guests are active (on a
//! 2-core machine the difference between a working fast path and threads fighting over two
//! cores); more pollers spread many busy devices over more cores. The poller knows a device
//! only through [`Polled`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// What a poller needs of a device.
pub(crate) trait Polled: Send + Sync {
    /// Drain the rings; whether work was found.
    fn poll_once(&self) -> bool;
    /// Re-enable notifications and give the rings back to the kicks; `false` (keep polling)
    /// if requests arrived meanwhile.
    fn try_park(&self) -> bool;
    /// The device is disconnected or broken: forget it.
    fn is_broken(&self) -> bool;
    /// Forget a broken device (it is not polled any more).
    fn release_polled(&self);
}

/// Idle sweeps between `yield_now` calls (a power of two): lets a guest that shares this core
/// run even when the placement is not ideal.
const SWEEPS_PER_YIELD: u32 = 64;

struct Target {
    device: Weak<dyn Polled>,
    last_work: Instant,
}

#[derive(Default)]
struct State {
    incoming: Vec<Target>,
    stop: bool,
}

pub(crate) struct Poller {
    state: Mutex<State>,
    wake: Condvar,
    budget: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Poller {
    pub fn new(budget: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            budget,
        })
    }

    /// Whether polling is enabled at all (`--poll-us` > 0).
    pub fn enabled(&self) -> bool {
        !self.budget.is_zero()
    }

    /// Take over polling of `device`. The caller has left its notifications disabled and marked
    /// it polled; the poller re-enables them when it lets go.
    pub fn activate(&self, device: Weak<dyn Polled>) {
        let mut st = lock(&self.state);
        st.incoming.push(Target {
            device,
            last_work: Instant::now(),
        });
        drop(st);
        self.wake.notify_one();
    }

    pub fn stop(&self) {
        lock(&self.state).stop = true;
        self.wake.notify_all();
    }

    /// The poller thread's body; returns after [`Poller::stop`].
    pub fn run(&self) {
        let mut active: Vec<Target> = Vec::new();
        let mut idle_sweeps = 0u32;
        loop {
            {
                let mut st = lock(&self.state);
                if st.stop {
                    break;
                }
                active.append(&mut st.incoming);
                while active.is_empty() && !st.stop {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                    active.append(&mut st.incoming);
                }
                if st.stop {
                    break;
                }
            }
            let mut found = false;
            let now = Instant::now();
            active.retain_mut(|t| {
                let Some(d) = t.device.upgrade() else {
                    return false;
                };
                if d.is_broken() {
                    d.release_polled();
                    return false;
                }
                if d.poll_once() {
                    t.last_work = now;
                    found = true;
                    return true;
                }
                if now.duration_since(t.last_work) < self.budget {
                    return true;
                }
                // Idle for the whole budget: hand the device back to its kicks, unless
                // something arrived while re-enabling notifications.
                if d.try_park() {
                    false
                } else {
                    t.last_work = now;
                    true
                }
            });
            if found {
                idle_sweeps = 0;
            } else {
                idle_sweeps = idle_sweeps.wrapping_add(1);
                if idle_sweeps & (SWEEPS_PER_YIELD - 1) == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        // Shutting down: give every device back its notifications.
        for t in active.drain(..) {
            if let Some(d) = t.device.upgrade() {
                d.try_park();
            }
        }
    }
}
