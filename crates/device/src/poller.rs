// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's data-plane poller: one thread that polls the rings of every busy device.
//!
//! A device's vring worker wakes on a kick, drains its queues and, when it found work, hands the
//! device to the poller with notifications still disabled (EVENT_IDX: the guest stops kicking).
//! The poller then sweeps all active devices, draining whatever arrives, until a device has been
//! idle for the poll budget; only then does it re-enable that device's notifications (re-checking
//! the rings once more, so no request is stranded) and drop it. One spinning thread for all
//! devices, instead of one per device, keeps the busy-polling cost to one core however many
//! guests are active — on a 2-core machine the difference between a working fast path and
//! three threads fighting over two cores.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vhost_user_backend::VringRwLock;

use crate::backend::FabricBackend;

/// Idle sweeps between `yield_now` calls (a power of two): lets a guest that shares this core
/// run even when the placement is not ideal.
const SWEEPS_PER_YIELD: u32 = 64;

struct Target {
    backend: Weak<FabricBackend>,
    vrings: Vec<VringRwLock>,
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

    /// Take over polling of `backend`'s rings. The caller has disabled its notifications and
    /// marked it polled; the poller re-enables them when it lets go.
    pub fn activate(&self, backend: Weak<FabricBackend>, vrings: &[VringRwLock]) {
        let mut st = lock(&self.state);
        st.incoming.push(Target {
            backend,
            vrings: vrings.to_vec(),
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
                let Some(b) = t.backend.upgrade() else {
                    return false;
                };
                if b.is_broken() {
                    b.release_polled();
                    return false;
                }
                if b.poll_once(&t.vrings) {
                    t.last_work = now;
                    found = true;
                    return true;
                }
                if now.duration_since(t.last_work) < self.budget {
                    return true;
                }
                // Idle for the whole budget: hand the device back to its kicks, unless
                // something arrived while re-enabling notifications.
                if b.try_park(&t.vrings) {
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
            if let Some(b) = t.backend.upgrade() {
                b.try_park(&t.vrings);
            }
        }
    }
}
