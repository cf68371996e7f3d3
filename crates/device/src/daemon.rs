// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Serving the device sockets: [`start`] binds every socket, then one thread per device accepts
//! a frontend, runs a `VhostUserDaemon` for it until it disconnects, frees everything it held and
//! accepts the next one.
//!
//! A device serves one frontend at a time; others wait in the socket's backlog. So that a
//! connection that never becomes a working guest (silent, half a header, setup stalled before
//! any ring runs) cannot hold the device, a frontend that has no ring running
//! `handshake_timeout` after it was accepted is dropped (unless the deadline is 0: off). A
//! guest that got a ring running and then goes idle keeps the device: it is a legitimate guest.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::FabricBackend;
use crate::chain::GuestMemoryMmap;
use crate::config::Config;
use crate::fabric::{Fabric, Notify};
use crate::poller::Poller;
use crate::socket::{resolve_group, DeviceSocket, SocketAccess};
use crate::stats::{Counters, Stats};
use crate::Error;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by the handle and the serving threads.
struct Shared {
    stop: AtomicBool,
    /// Readable once shutdown was requested (never consumed).
    stop_evt: EventFd,
    /// The live connection of each device, to drop it on shutdown.
    conns: Vec<Mutex<Option<ShutdownHandle>>>,
}

/// A running daemon. Dropping it shuts it down.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    pollers: Vec<Arc<Poller>>,
    /// The poller threads, one per entry of `pollers`.
    poller_threads: Vec<JoinHandle<()>>,
    fabric: Arc<Fabric>,
    sockets: Vec<PathBuf>,
    /// The serving threads, one per device.
    threads: Vec<JoinHandle<()>>,
    /// The link to the other hosts of the fabric (several hosts).
    uplink: Option<crate::uplink::Uplink>,
}

impl DaemonHandle {
    /// Socket path of each device, in device order.
    pub fn socket_paths(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// Current counters of every device.
    pub fn stats(&self) -> Stats {
        Stats {
            devices: (0..self.fabric.num_devices())
                .map(|i| {
                    let sock = self.sockets.get(i).cloned().unwrap_or_default();
                    self.fabric.counters(i).map_or_else(Default::default, |c| {
                        c.snapshot(sock, self.fabric.node_addr(i))
                    })
                })
                .collect(),
        }
    }

    /// Disconnect every frontend, stop serving, remove the sockets, join the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.threads.is_empty() && self.poller_threads.is_empty() {
            return;
        }
        info!("shutting down");
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.stop_evt.write(1) {
            error!("cannot signal the serving threads: {e}");
        }
        for c in &self.shared.conns {
            if let Some(h) = lock(c).as_ref() {
                h.shutdown();
            }
        }
        // The uplink first: no new host traffic while guests go away.
        self.uplink.take();
        // Serving threads first (they retire their backends), then the pollers.
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("a serving thread panicked");
            }
        }
        for p in &self.pollers {
            p.stop();
        }
        for t in self.poller_threads.drain(..) {
            if t.join().is_err() {
                error!("a poller thread panicked");
            }
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bind every device socket of `config` and serve them on background threads.
///
/// Returns once all sockets are listening (frontends may connect right away).
pub fn start(config: Config) -> Result<DaemonHandle, Error> {
    config.validate()?;
    let access = SocketAccess {
        mode: config.socket_mode,
        gid: config
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?,
    };
    // Sockets bound so far are removed again (only ours) if a later one fails.
    let mut listeners = Vec::with_capacity(config.sockets.len());
    for path in &config.sockets {
        listeners.push(DeviceSocket::bind(path, access)?);
    }
    let fabric = Arc::new(Fabric::new(&config));
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        stop_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        conns: config.sockets.iter().map(|_| Mutex::new(None)).collect(),
    });
    let mut handle = DaemonHandle {
        shared: shared.clone(),
        fabric: fabric.clone(),
        sockets: config.sockets.clone(),
        threads: Vec::new(),
        pollers: Vec::new(),
        poller_threads: Vec::new(),
        uplink: None,
    };
    if let Some(u) = &config.uplink {
        handle.uplink = Some(
            crate::uplink::Uplink::start(
                u,
                config.fabric_id,
                config.host_id,
                config.sockets.len() as u16,
                fabric.clone(),
            )
            .map_err(Error::Uplink)?,
        );
    }
    for i in 0..config.pollers {
        let p = Poller::new(Duration::from_micros(config.poll_us));
        handle.pollers.push(p.clone());
        let cpu = config.poller_cpu.map(|c| c + i);
        let t = std::thread::Builder::new()
            .name(format!("vfabric-poll{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    crate::pin_current_thread(cpu);
                }
                p.run()
            })
            .map_err(Error::Thread)?;
        handle.poller_threads.push(t);
    }
    info!(
        devices = config.sockets.len(),
        fabric_id = %format_args!("{:x}", config.fabric_id),
        host_id = config.host_id,
        virtio_device_id = config.device_id,
        poll_us = config.poll_us,
        pollers = config.pollers,
        handshake_timeout = ?config.handshake_timeout,
        "starting vfabricd"
    );
    {
        // The commit timer: handled commits past their deadline complete TIMED_OUT (§6.17.3).
        let (fabric, shared) = (fabric.clone(), shared.clone());
        let tick =
            (config.commit_timeout / 8).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let t = std::thread::Builder::new()
            .name("vfabric-commit".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    let mut n = crate::fabric::Notify::default();
                    fabric.expire_commits(Instant::now(), &mut n);
                }
            })
            .map_err(Error::Thread)?;
        handle.threads.push(t);
    }
    for (dev, listener) in listeners.into_iter().enumerate() {
        let poller = handle.pollers[dev % handle.pollers.len()].clone();
        let (fabric, shared) = (fabric.clone(), shared.clone());
        let deadline = config.handshake_timeout;
        let socket = config.sockets[dev].clone();
        let t = std::thread::Builder::new()
            .name(format!("vfabric{dev}"))
            .spawn(move || serve(dev, socket, listener, fabric, shared, poller, deadline))
            .map_err(Error::Thread)?;
        handle.threads.push(t);
        info!(
            dev,
            socket = %config.sockets[dev].display(),
            node = %format_args!("{:#x}", config.node_addr(dev)),
            "device listening"
        );
    }
    Ok(handle)
}

/// Wait until `listen` has a connection (`Ok(true)`) or `stop` is signalled (`Ok(false)`).
fn wait_readable(listen: RawFd, stop: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listen,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid, initialised array of two pollfd structs that outlives the
        // call; poll only writes their `revents` fields.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            return Err(io::Error::other("listening socket failed"));
        }
    }
}

/// Progress of one connection's setup, for its handshake deadline.
#[derive(Default)]
struct Handshake {
    state: Mutex<HandshakeState>,
    changed: Condvar,
}

#[derive(Default)]
struct HandshakeState {
    ring_running: bool,
    connection_over: bool,
}

impl Handshake {
    fn ring_started(&self) {
        lock(&self.state).ring_running = true;
        self.changed.notify_all();
    }

    fn connection_over(&self) {
        lock(&self.state).connection_over = true;
        self.changed.notify_all();
    }

    /// Wait until a ring runs or the connection is over (false), or `timeout` passes (true).
    fn expired(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !st.ring_running && !st.connection_over {
            let now = Instant::now();
            if now >= end {
                return true;
            }
            st = self
                .changed
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        false
    }
}

/// Drop the frontend behind `conn` if it has no ring running within `timeout`.
fn watch_handshake(
    dev: usize,
    handshake: Arc<Handshake>,
    conn: ShutdownHandle,
    counters: Arc<Counters>,
    timeout: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vfabric{dev}-hs"))
        .spawn(move || {
            if handshake.expired(timeout) {
                warn!(
                    dev,
                    ?timeout,
                    "frontend started no ring within the handshake deadline: dropping it"
                );
                Counters::inc(&counters.handshake_timeouts);
                conn.shutdown();
            }
        })
}

/// Serve device `dev`: one frontend at a time, forever (until shutdown).
fn serve(
    dev: usize,
    socket: PathBuf,
    mut listener: DeviceSocket,
    fabric: Arc<Fabric>,
    shared: Arc<Shared>,
    poller: Arc<Poller>,
    handshake_timeout: Duration,
) {
    let Some(counters) = fabric.counters(dev).cloned() else {
        return;
    };
    let stopping = || shared.stop.load(Ordering::SeqCst);
    while !stopping() {
        match wait_readable(listener.as_raw_fd(), shared.stop_evt.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                error!(dev, "cannot wait for frontends: {e}");
                break;
            }
        }
        if stopping() {
            break;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = match FabricBackend::new(
            dev,
            fabric.clone(),
            poller.clone(),
            mem.clone(),
            Some(socket.clone()),
        ) {
            Ok(b) => b,
            Err(e) => {
                error!(dev, "cannot create the backend: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut daemon =
            match VhostUserDaemon::new(format!("vfabric{dev}-vu"), backend.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    error!(dev, "cannot create the vhost-user daemon: {e}");
                    backend.close_exit_fd();
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
        // The fabric wakes the device through this when it may have receives to take (LAZY_RX).
        let wake = daemon.get_epoll_handlers().iter().try_for_each(|h| {
            backend.set_worker_epoll(h.as_raw_fd());
            h.register_listener(backend.wake_fd(), EventSet::IN, backend.wake_event())?;
            h.register_listener(
                backend.rx_check_fd(),
                EventSet::IN,
                backend.wake_event() + 1,
            )
        });
        if let Err(e) = wake {
            error!(dev, "cannot register the device's wake-up: {e}");
            backend.close_exit_fd();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let handshake = Arc::new(Handshake::default());
        let started = handshake.clone();
        backend.on_ring_started(Box::new(move || started.ring_started()));
        // Attach before accepting: requests can only arrive after the connection exists.
        fabric.connect(dev, backend.port());
        let served = match daemon.start(listener.listener_mut()) {
            Ok(()) => {
                info!(dev, "frontend connected");
                let mut watchdog = None;
                if let Some(h) = daemon.shutdown_handle() {
                    backend.set_shutdown(h.clone());
                    *lock(&shared.conns[dev]) = Some(h.clone());
                    if !handshake_timeout.is_zero() {
                        let (hs, c) = (handshake.clone(), counters.clone());
                        match watch_handshake(dev, hs, h.clone(), c, handshake_timeout) {
                            Ok(t) => watchdog = Some(t),
                            Err(e) => {
                                // Without its deadline a silent client could hold the device.
                                error!(dev, "cannot start the handshake watchdog: {e}");
                                h.shutdown();
                            }
                        }
                    }
                }
                if stopping() {
                    daemon.request_shutdown();
                }
                let ended = daemon.wait();
                handshake.connection_over();
                if watchdog.is_some_and(|t| t.join().is_err()) {
                    error!(dev, "the handshake watchdog panicked");
                }
                match ended {
                    Ok(())
                    | Err(DaemonError::HandleRequest(
                        VhostUserError::Disconnected | VhostUserError::PartialMessage,
                    )) => info!(dev, "frontend disconnected"),
                    Err(e) => warn!(dev, "frontend connection ended: {e}"),
                }
                *lock(&shared.conns[dev]) = None;
                true
            }
            Err(e) => {
                error!(dev, "cannot accept a frontend: {e}");
                false
            }
        };
        // Dropping the daemon joins its vring worker: no thread of this connection runs after.
        drop(daemon);
        backend.retire();
        backend.close_exit_fd();
        let mut n = Notify::default();
        fabric.disconnect(dev, &mut n);
        n.flush();
        if served {
            Counters::inc(&counters.disconnects);
        }
    }
    // Dropping the listener removes the socket file (if it is still ours).
    drop(listener);
    info!(dev, "device stopped");
}
