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

use std::cell::{Cell, RefCell};
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
    /// From a [`yield_point`]: one pass over the rings if the device is polled and its pass
    /// lock is free right now (never waits for it); whether work was found.
    fn poll_nested(&self) -> bool;
    /// Whether a [`Polled::poll_nested`] found work since the last call (clears it): work done
    /// from a yield point keeps the device polled like work found by a sweep.
    fn take_nested_work(&self) -> bool;
}

thread_local! {
    /// On a poller thread: the devices it polls (refreshed when the set changes).
    static SWEEP: RefCell<Vec<Weak<dyn Polled>>> = const { RefCell::new(Vec::new()) };
    /// The device this poller thread is draining now (its pass lock is held by this thread).
    static CURRENT: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
    /// A `yield_point` sweep is running on this thread (no nesting).
    static YIELDING: Cell<bool> = const { Cell::new(false) };
}

/// Called between the chunks of a large copy, with no device or ring lock and no memory-region
/// access held. On a poller thread, gives every other device of this poller one pass, so that
/// a bulk transfer of one guest does not hold up the small requests of the others for its whole
/// length (head-of-line blocking). Elsewhere (a device's own vring thread) it does nothing.
pub(crate) fn yield_point() {
    if YIELDING.with(Cell::get) {
        return;
    }
    let others: Vec<Weak<dyn Polled>> = SWEEP.with(|s| s.borrow().clone());
    if others.len() < 2 {
        return;
    }
    YIELDING.with(|y| y.set(true));
    let current = CURRENT.with(Cell::get);
    for w in others {
        let Some(d) = w.upgrade() else { continue };
        if !std::ptr::eq(Arc::as_ptr(&d) as *const (), current) {
            d.poll_nested();
        }
    }
    YIELDING.with(|y| y.set(false));
}

/// Whether this thread is inside a [`yield_point`] sweep (a request of another device is
/// suspended mid-copy below it).
pub(crate) fn in_yield() -> bool {
    YIELDING.with(Cell::get)
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
        // The thread-local list `yield_point` sweeps must be rebuilt.
        let mut sweep_stale = true;
        loop {
            {
                let mut st = lock(&self.state);
                if st.stop {
                    break;
                }
                sweep_stale |= !st.incoming.is_empty();
                active.append(&mut st.incoming);
                while active.is_empty() && !st.stop {
                    st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                    sweep_stale |= !st.incoming.is_empty();
                    active.append(&mut st.incoming);
                }
                if st.stop {
                    break;
                }
            }
            if sweep_stale {
                SWEEP.with(|s| {
                    let mut s = s.borrow_mut();
                    s.clear();
                    s.extend(active.iter().map(|t| t.device.clone()));
                });
                sweep_stale = false;
            }
            let before = active.len();
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
                CURRENT.with(|c| c.set(Arc::as_ptr(&d) as *const ()));
                let worked = d.poll_once() | d.take_nested_work();
                CURRENT.with(|c| c.set(std::ptr::null()));
                if worked {
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
            sweep_stale |= active.len() != before;
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
        SWEEP.with(|s| s.borrow_mut().clear());
        // Shutting down: give every device back its notifications.
        for t in active.drain(..) {
            if let Some(d) = t.device.upgrade() {
                d.try_park();
            }
        }
    }
}
