//! systemd: tell the service manager how the service's life goes, and serve on the sockets it
//! passed. Linux; no libsystemd needed: the notify protocol is one datagram on the socket
//! named by `$NOTIFY_SOCKET`.
//!
//! # Notifications
//!
//! With [`Builder::systemd_notify(true)`](crate::Builder::systemd_notify), and only when the
//! service manager set `$NOTIFY_SOCKET` (a no-op otherwise), finale sends:
//!
//! | when | datagram |
//! |---|---|
//! | graceful start completed | `READY=1`, `STATUS=running` |
//! | the shutdown is requested (a signal, a trigger, a failed start...) | `STOPPING=1`, `STATUS=stopping: <reason>`, `EXTEND_TIMEOUT_USEC=<left>` (and `WATCHDOG_USEC=<left>` with the watchdog) |
//! | each phase starts (or is skipped) | `STATUS=stopping: <phase>`, `EXTEND_TIMEOUT_USEC=<left>` |
//! | the run ended | `STATUS=stopped: <status>, exit code <code>` |
//! | the supervisor takes over a wedged shutdown | `STATUS=stopped by the supervisor: <why>, exit code <code>`; nothing of the sequence's follows it (a runtime that comes back still runs its phases, unannounced): this is systemd's last status. Not after a hand-off: if an upgrade won the hand-off and the runtime wedged before it sent `MAINPID=`, the supervisor says nothing (the shutdown is the upgrade's) and the last status stays as it was |
//! | an upgrade handed the service over to its ready successor (feature `upgrade`) | `MAINPID=<successor>`, `STATUS=handed over to pid <successor>`; then nothing more from this process |
//! | while running, with `$WATCHDOG_USEC` set (and `$WATCHDOG_PID` unset or this process) | `WATCHDOG=1` every half of `$WATCHDOG_USEC` |
//!
//! `<left>` is what is left, in microseconds, until the trigger + the total budget + the safety
//! margin: systemd's `TimeoutStopSec=` then never kills a shutdown that finale still bounds
//! (finale's supervisor ends it by `total + safety_margin / 2`), even when `TimeoutStopSec=` is
//! shorter than the plan. Lines of one datagram are separated by `\n`. The socket is
//! non-blocking: a datagram systemd cannot take at once (its queue full, PID 1 very busy) is
//! logged and dropped rather than stalling the service, so these promises hold as far as the
//! datagrams are delivered. The one exception is the hand-off's `MAINPID=`: dropped, it would
//! leave systemd taking the old process for the main one, and its exit for the service's end,
//! which stops the successor. It waits for room in the queue, at most 0.5 seconds (less when
//! the Announce phase that would wait for it has less time: 80% of that), on the upgrade's own
//! thread (`finale-upgrade`), and
//! is logged if it still could not go. Meanwhile no other datagram of this process waits for
//! it: each is dropped (the successor speaks for the service from now on). A shutdown of the
//! old process that started meanwhile waits for it in its Announce phase, so the process does
//! not end before it (unless a second signal asks it to leave at once).
//!
//! The watchdog pings come from a task on **your** runtime, started when graceful start
//! completes: if the runtime stops making progress (every worker thread blocked), the pings stop
//! and systemd's watchdog (`WatchdogSec=`) restarts the service, as it should. They stop when
//! the shutdown is requested; the `WATCHDOG_USEC=` sent then stretches the watchdog to cover the
//! shutdown, which finale's own supervisor bounds.
//!
//! Every datagram is sent on a non-blocking socket from the thread where the moment happens
//! (the supervisor thread for a signal, your runtime for the phases): it never blocks (but for
//! the hand-off's `MAINPID=`, above) and never prints; a datagram the service manager cannot
//! take is logged through `tracing` and dropped.
//! `NotifyAccess=main` is enough: every datagram comes from the main process.
//!
//! # Socket activation
//!
//! [`listener`] and [`listener_named`] take the listening sockets systemd passed
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`; `ListenStream=` and `FileDescriptorName=` in
//! the `.socket` unit) as [`std::net::TcpListener`]s, which the servers accept directly:
//!
//! ```no_run
//! # #![allow(dead_code)]
//! # #[cfg(feature = "axum")]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use finale::Finale;
//! use finale::systemd::ListenError;
//!
//! // First, before other threads start (see the caveats): take the passed socket.
//! let listen: finale::axum::Listen = match finale::systemd::listener_named("http") {
//!     Ok(listener) => listener.into(),
//!     // Started by hand, not by the socket unit: bind it ourselves.
//!     Err(ListenError::NotActivated) => ([127, 0, 0, 1], 3000).into(),
//!     Err(e) => return Err(e.into()),
//! };
//! let finale = Finale::builder().systemd_notify(true).build()?;
//! let app = axum::Router::new().merge(finale::axum::health_router(&finale.handle()));
//! finale::axum::serve(&finale, "http", listen, app)?;
//! finale.run_and_exit().await
//! # }
//! ```
//!
//! Behind a socket unit, connections that arrive while the service restarts wait in the
//! socket's backlog (systemd keeps it open) instead of being refused; the draining server
//! leaves an inherited socket's backlog as it is for the next instance.
//!
//! # Caveats
//!
//! The first call of [`listener`], [`listener_named`] or [`listener_names`] takes the passed
//! sockets for the whole process, and (through the `listenfd` crate) removes `LISTEN_PID` and
//! `LISTEN_FDS` from the process's environment, so that child processes do not inherit them.
//! Changing the environment races with C code that reads it on another thread: make that first
//! call early in `main`, before the service starts working. See the crate docs, "Threading and
//! process-wide effects".

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::phase::Phase;
use crate::report::{Reason, ShutdownReport};
use crate::state::{EndOwner, Life, Observer, Shared, StageOutcome, lock};

// ---------------------------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------------------------

/// Sends datagrams to the service manager's notify socket. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

/// How long the hand-off's `MAINPID=` waits for room in systemd's queue, when it is full, at
/// most ([`mainpid_patience`]).
const MAINPID_PATIENCE: Duration = Duration::from_millis(500);

/// How long the hand-off's `MAINPID=` may wait for room: [`MAINPID_PATIENCE`], or less, so that
/// the wait ends (sent, or given up) within the Announce phase of a shutdown that started or
/// starts meanwhile, which waits for it: the process does not end first. At most 80% of what
/// [`Shared::announce_wait_left`] gives.
fn mainpid_patience(shared: &Shared) -> Duration {
    MAINPID_PATIENCE.min(shared.announce_wait_left() * 4 / 5)
}

#[derive(Debug)]
struct Inner {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$WATCHDOG_USEC`, when it is meant for this process.
    watchdog: Option<Duration>,
    /// Set once `MAINPID=<successor>` was sent: from then on the successor speaks for the
    /// service, and this process sends nothing more (with `NotifyAccess=all` its `STATUS=`
    /// would show on the successor). Checked and set under this lock around the send itself,
    /// so that a ping that passed the check cannot go out after `MAINPID=`.
    ///
    /// Every datagram goes out under this lock, the supervisor's last status included, and
    /// the sequence's are checked against the end's owner under it too (see
    /// [`Notifier::send_unless_ended`]).
    handed: Mutex<bool>,
}

#[cfg(test)]
thread_local! {
    /// In the crate's tests: the notify socket a `Finale` built on this thread uses, as if
    /// `$NOTIFY_SOCKET` named it (the process's environment is shared by every test).
    pub(crate) static TEST_NOTIFY_SOCKET: std::cell::RefCell<Option<std::path::PathBuf>> =
        const { std::cell::RefCell::new(None) };
}

impl Notifier {
    /// The notifier the service manager asked for through the environment; `None` without
    /// `$NOTIFY_SOCKET` (not started by systemd, or `Type=` other than `notify`).
    pub(crate) fn from_env() -> Option<Self> {
        #[cfg(test)]
        if let Some(path) = TEST_NOTIFY_SOCKET.with(|socket| socket.borrow().clone()) {
            return Self::new(path.as_os_str(), None);
        }
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Self::new(&socket, watchdog)
    }

    /// A notifier for the socket `path` (`/path` or `@abstract`); `None`, logged, if it cannot
    /// be used.
    pub(crate) fn new(path: &OsStr, watchdog: Option<Duration>) -> Option<Self> {
        let made = notify_addr(path).and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok((socket, addr))
        });
        match made {
            Ok((socket, addr)) => {
                tracing::debug!(target: "finale", socket = ?path, ?watchdog, "systemd notifications on");
                Some(Self {
                    inner: Arc::new(Inner {
                        socket,
                        addr,
                        watchdog,
                        handed: Mutex::new(false),
                    }),
                })
            }
            Err(error) => {
                tracing::warn!(target: "finale", socket = ?path, %error, "systemd notifications off: NOTIFY_SOCKET unusable");
                None
            }
        }
    }

    /// Sends one datagram without blocking, unless the service was handed over; a failure is
    /// logged, never returned. For the supervisor's last word only: every other datagram goes
    /// through [`send_unless_ended`](Notifier::send_unless_ended), but the hand-off's
    /// `MAINPID=`, which never follows a supervisor's status (a won hand-off makes the shutdown
    /// the upgrade's, and the supervisor then sends none).
    fn send(&self, message: &str) {
        let handed = lock(&self.inner.handed);
        if *handed {
            return;
        }
        self.transmit(message);
    }

    /// Sends one datagram of the service's life (readiness, a ping, the trigger, a phase, the
    /// run's end) without blocking, unless the service was handed over or the supervisor owns
    /// the end of the process: then its status is the last word, and this process says nothing
    /// after it.
    ///
    /// Why no such datagram can follow the supervisor's: the owner is read under the lock that
    /// every send holds, and the supervisor claims the end ([`Life::claim_end`]) before it
    /// sends its status under that same lock. A datagram whose check ran before the claim goes
    /// out before the lock is released, so before the supervisor's status; a check after the
    /// supervisor's send sees the claim (the lock orders it after the send, which came after
    /// the claim) and sends nothing.
    fn send_unless_ended(&self, life: &Life, message: &str) {
        let handed = lock(&self.inner.handed);
        if *handed || life.end_owner() == Some(EndOwner::Supervisor) {
            return;
        }
        self.transmit(message);
    }

    /// Waits for room in systemd's queue to send the hand-off's datagram, at most `patience`
    /// ([`mainpid_patience`]), on a blocking socket of its own (a datagram send to a full queue
    /// waits for room, up to the socket's write timeout); a signal that interrupts the wait
    /// does not end it. Called without `handed`: the flag is already set, so every other
    /// datagram is dropped at once meanwhile, none goes out after this one, and no sender waits
    /// for this one.
    fn transmit_patiently(&self, message: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        let waited = UnixDatagram::unbound().and_then(|socket| {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Err(io::ErrorKind::WouldBlock.into());
                }
                socket.set_write_timeout(Some(left))?;
                match socket.send_to_addr(message.as_bytes(), &self.inner.addr) {
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    sent => break sent,
                }
            }
        });
        match waited {
            Ok(_) => {
                tracing::debug!(target: "finale", message, "systemd notified once its queue had room")
            }
            Err(error) => {
                tracing::warn!(target: "finale", message, %error, ?patience, "systemd notification not sent: its queue stayed full")
            }
        }
    }

    /// Sends one datagram without blocking; a failure is logged. The caller holds `handed`.
    fn transmit(&self, message: &str) {
        match self
            .inner
            .socket
            .send_to_addr(message.as_bytes(), &self.inner.addr)
        {
            Ok(_) => tracing::trace!(target: "finale", message, "systemd notified"),
            Err(error) => {
                tracing::warn!(target: "finale", message, %error, "systemd notification not sent")
            }
        }
    }

    /// Pings the watchdog every `every` until the shutdown is requested or the state is gone.
    async fn ping(self, life: Arc<Life>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        // After a stall, one ping and the same pace again, not a burst that hides the stall.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = life.requested.cancelled() => return,
                () = life.dropped.cancelled() => return,
                _ = tick.tick() => self.send_unless_ended(&life, "WATCHDOG=1"),
            }
        }
    }
}

/// `$WATCHDOG_USEC`, if set, positive and meant for `pid` (`$WATCHDOG_PID` unset or equal), as
/// `sd_watchdog_enabled(3)` reads them.
fn watchdog(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match watchdog_pid.map(|p| p.trim().parse::<u32>()) {
        None => {}
        Some(Ok(p)) if p == pid => {}
        Some(_) => return None,
    }
    Some(Duration::from_micros(usec))
}

/// The address in `$NOTIFY_SOCKET`: a path, or `@name` in Linux's abstract namespace.
fn notify_addr(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(value)),
        #[cfg(target_os = "linux")]
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not an absolute path or an @abstract socket name",
        )),
    }
}

/// What is left until the trigger + total + safety margin (from now, before the trigger).
fn left(shared: &Shared) -> Duration {
    let b = shared.budget;
    let all = b.total + b.safety_margin;
    match shared.life.trigger() {
        Some(t0) => (t0 + all).saturating_duration_since(Instant::now()),
        None => all,
    }
}

/// One line of `STATUS=`: no control characters, at most 200 bytes.
fn status(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 200 {
        let mut end = 200;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

impl Observer for Notifier {
    fn started(&self, shared: &Shared) {
        self.send_unless_ended(&shared.life, "READY=1\nSTATUS=running");
        let Some(every) = self.inner.watchdog.map(|w| w / 2) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.clone().ping(shared.life.clone(), every));
            }
            Err(_) => {
                tracing::warn!(target: "finale", "systemd watchdog not pinged: no tokio runtime")
            }
        }
    }

    fn requested(&self, shared: &Shared, reason: &Reason) {
        if matches!(reason, Reason::Upgrade { .. }) {
            // The successor is the main process now: `STOPPING=1` would stop the service.
            return;
        }
        let mut message = format!(
            "STOPPING=1\nSTATUS=stopping: {}",
            status(&reason.to_string())
        );
        let left = left(shared);
        if !left.is_zero() {
            let _ = write!(message, "\nEXTEND_TIMEOUT_USEC={}", left.as_micros());
            if self.inner.watchdog.is_some() {
                let _ = write!(message, "\nWATCHDOG_USEC={}", left.as_micros());
            }
        }
        self.send_unless_ended(&shared.life, &message);
    }

    fn phase_started(&self, shared: &Shared, phase: Phase) {
        if handed_over(shared) {
            return;
        }
        let mut message = format!("STATUS=stopping: {phase}");
        let left = left(shared);
        if !left.is_zero() {
            let _ = write!(message, "\nEXTEND_TIMEOUT_USEC={}", left.as_micros());
        }
        // A runtime that comes back after the supervisor took over still runs its phases:
        // their statuses are not sent, the supervisor's is the last word.
        self.send_unless_ended(&shared.life, &message);
    }

    fn finished(&self, shared: &Shared, report: &ShutdownReport) {
        if handed_over(shared) {
            return;
        }
        // After a takeover the supervisor's status is the last word, whenever the sequence ends.
        self.send_unless_ended(
            &shared.life,
            &format!(
                "STATUS=stopped: {}, exit code {}",
                report.status, report.exit_code
            ),
        );
    }

    fn took_over(&self, shared: &Shared, why: &str, code: i32, _stages: &[StageOutcome]) {
        if handed_over(shared) {
            return;
        }
        self.send(&format!(
            "STATUS=stopped by the supervisor: {}, exit code {code}",
            status(why)
        ));
    }

    fn handed_over(&self, shared: &Shared, successor_pid: u32) {
        let message = format!("MAINPID={successor_pid}\nSTATUS=handed over to pid {successor_pid}");
        {
            // The flag and the first try under one lock: this is the last datagram this
            // process sends.
            let mut handed = lock(&self.inner.handed);
            if *handed {
                return;
            }
            *handed = true;
            match self
                .inner
                .socket
                .send_to_addr(message.as_bytes(), &self.inner.addr)
            {
                Ok(_) => {
                    tracing::trace!(target: "finale", message, "systemd notified");
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    tracing::warn!(target: "finale", message, %error, "systemd notification not sent");
                    return;
                }
            }
        }
        // systemd's queue is full. Dropped, this datagram would leave systemd taking this
        // process for the service's main process, and its exit for the service's end (stopping
        // the successor): it waits for room.
        self.transmit_patiently(&message, mainpid_patience(shared));
    }
}

/// Whether this process handed the service over to a successor: it no longer speaks for it.
fn handed_over(shared: &Shared) -> bool {
    matches!(shared.reason(), Some(Reason::Upgrade { .. }))
}

// ---------------------------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------------------------

/// Why a socket passed by systemd could not be had.
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenError {
    /// No socket was passed: `LISTEN_FDS` is not set (the service was not started by a socket
    /// unit or `systemd-socket-activate`).
    NotActivated,
    /// `LISTEN_PID` names another process (or is missing): the sockets were meant for a
    /// parent process, not this one.
    PidMismatch {
        /// The value of `LISTEN_PID` (empty when missing).
        listen_pid: String,
        /// This process.
        pid: u32,
    },
    /// `LISTEN_FDS` or `LISTEN_FDNAMES` does not parse, or they disagree on the count.
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// No socket was passed at this index.
    IndexNotFound {
        /// The index asked for (0 is the first passed socket, file descriptor 3).
        index: usize,
        /// How many were passed.
        passed: usize,
    },
    /// No socket left with this name (`FileDescriptorName=`, `--fdname=`).
    NameNotFound {
        /// The name asked for.
        name: String,
        /// The names of the passed sockets, in order.
        names: Vec<String>,
    },
    /// This socket was taken by an earlier call.
    AlreadyTaken {
        /// Its index.
        index: usize,
    },
    /// The socket is not a listening TCP socket: a Unix socket, a datagram socket, or a
    /// connection (`Accept=yes`).
    NotTcpListener {
        /// Its index.
        index: usize,
        /// Its name.
        name: String,
        /// What the check found.
        source: io::Error,
    },
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::NotActivated => {
                f.write_str("no socket was passed by systemd (LISTEN_FDS is not set)")
            }
            ListenError::PidMismatch { listen_pid, pid } => write!(
                f,
                "the sockets passed by systemd are meant for process {listen_pid:?} \
                 (LISTEN_PID), not this one ({pid})"
            ),
            ListenError::InvalidEnv { var, value } => {
                write!(f, "environment variable {var}={value:?} is invalid")
            }
            ListenError::IndexNotFound { index, passed } => write!(
                f,
                "no socket passed by systemd at index {index} ({passed} passed)"
            ),
            ListenError::NameNotFound { name, names } => write!(
                f,
                "no socket passed by systemd is named {name:?} (FileDescriptorName=); \
                 passed: {names:?}"
            ),
            ListenError::AlreadyTaken { index } => {
                write!(f, "the socket passed at index {index} was taken already")
            }
            ListenError::NotTcpListener {
                index,
                name,
                source,
            } => write!(
                f,
                "the socket passed at index {index} ({name:?}) is not a listening TCP socket: \
                 {source}"
            ),
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListenError::NotTcpListener { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What `LISTEN_*` said, without the `io::Error` so that it can be kept for the process.
#[derive(Clone, Debug)]
enum EnvProblem {
    NotActivated,
    PidMismatch { listen_pid: String, pid: u32 },
    InvalidEnv { var: &'static str, value: String },
}

impl From<EnvProblem> for ListenError {
    fn from(p: EnvProblem) -> Self {
        match p {
            EnvProblem::NotActivated => ListenError::NotActivated,
            EnvProblem::PidMismatch { listen_pid, pid } => {
                ListenError::PidMismatch { listen_pid, pid }
            }
            EnvProblem::InvalidEnv { var, value } => ListenError::InvalidEnv { var, value },
        }
    }
}

/// The sockets passed to this process, taken once.
struct Passed {
    names: Vec<String>,
    slots: Vec<Slot>,
}

/// One passed descriptor, taken from listenfd when the sockets are first read (which marks it
/// close-on-exec at once, as `sd_listen_fds(3)` does: a child process started before the
/// servers bind does not inherit the service's sockets).
enum Slot {
    Tcp(TcpListener),
    Unix(std::os::unix::net::UnixStream),
    /// Neither: listenfd's reason (the descriptor is left as it was).
    Other(io::Error),
    Taken,
}

impl Passed {
    fn untaken(&self, index: usize) -> bool {
        !matches!(self.slots[index], Slot::Taken)
    }
}

/// The passed sockets of the process: read (and taken from the environment) by the first call.
fn passed() -> Result<&'static Mutex<Passed>, ListenError> {
    static PASSED: OnceLock<Result<Mutex<Passed>, EnvProblem>> = OnceLock::new();
    PASSED
        .get_or_init(|| {
            let env = |k: &str| std::env::var(k).ok();
            let names = check_env(
                env("LISTEN_FDS").as_deref(),
                env("LISTEN_PID").as_deref(),
                env("LISTEN_FDNAMES").as_deref(),
                std::process::id(),
                passed_by_parent(),
            )?;
            // Checked: LISTEN_PID is this process, so listenfd hands out exactly these.
            let mut fds = listenfd::ListenFd::from_env();
            let slots = (0..names.len())
                .map(|index| match fds.take_tcp_listener(index) {
                    Ok(Some(listener)) => Slot::Tcp(listener),
                    Ok(None) => Slot::Taken,
                    Err(tcp_error) => match fds.take_unix_listener(index) {
                        // A connected socket (one end of a pair: an upgrade's `finale.ready`)
                        // or a listening one, whatever listenfd's type says.
                        Ok(Some(unix)) => {
                            Slot::Unix(std::os::unix::net::UnixStream::from(OwnedFd::from(unix)))
                        }
                        _ => Slot::Other(tcp_error),
                    },
                })
                .collect();
            Ok(Mutex::new(Passed { names, slots }))
        })
        .as_ref()
        .map_err(|p| p.clone().into())
}

/// The names of the passed sockets, after checking `LISTEN_FDS` and `LISTEN_PID` as
/// `sd_listen_fds(3)` does (and `LISTEN_FDNAMES` as `sd_listen_fds_with_names(3)`).
///
/// `by_parent`: the sockets come from this process's parent (an upgrade: `LISTEN_PID` cannot
/// name a process before it exists, `FINALE_LISTEN_PARENT` names the parent instead).
fn check_env(
    fds: Option<&str>,
    listen_pid: Option<&str>,
    fdnames: Option<&str>,
    pid: u32,
    by_parent: bool,
) -> Result<Vec<String>, EnvProblem> {
    let Some(fds) = fds else {
        return Err(EnvProblem::NotActivated);
    };
    let for_us = match listen_pid {
        None => by_parent,
        Some(p) => p.trim().parse::<u32>().ok() == Some(pid),
    };
    if !for_us {
        return Err(EnvProblem::PidMismatch {
            listen_pid: listen_pid.unwrap_or_default().to_owned(),
            pid,
        });
    }
    let count: usize = fds.trim().parse().map_err(|_| EnvProblem::InvalidEnv {
        var: "LISTEN_FDS",
        value: fds.to_owned(),
    })?;
    let names: Vec<String> = match fdnames {
        // systemd's default name for a socket without `FileDescriptorName=`.
        None => vec!["unknown".to_owned(); count],
        Some(names) => names.split(':').map(str::to_owned).collect(),
    };
    if names.len() != count {
        return Err(EnvProblem::InvalidEnv {
            var: "LISTEN_FDNAMES",
            value: fdnames.unwrap_or_default().to_owned(),
        });
    }
    Ok(names)
}

/// Takes the listening TCP socket systemd passed at `index` (0 is the first, file descriptor
/// 3), as a blocking [`std::net::TcpListener`] ready to hand to `finale::axum::serve`,
/// `finale::hyper::serve` or `finale::tonic::serve` (they make it non-blocking).
///
/// # Errors
///
/// [`ListenError::NotActivated`] when no socket was passed; [`PidMismatch`](ListenError::PidMismatch),
/// [`InvalidEnv`](ListenError::InvalidEnv), [`IndexNotFound`](ListenError::IndexNotFound),
/// [`AlreadyTaken`](ListenError::AlreadyTaken) or
/// [`NotTcpListener`](ListenError::NotTcpListener).
///
/// # Caveats
///
/// The first call takes the passed sockets for the process and removes `LISTEN_PID` and
/// `LISTEN_FDS` from its environment; see the [module docs](self#caveats).
pub fn listener(index: usize) -> Result<TcpListener, ListenError> {
    let mut passed = lock(passed()?);
    take(&mut passed, index)
}

/// Takes the first listening TCP socket not taken yet whose name (`FileDescriptorName=` in the
/// `.socket` unit, `--fdname=` of `systemd-socket-activate`) is `name`. Sockets without a name
/// are named `unknown` by systemd.
///
/// # Errors
///
/// As [`listener`], with [`ListenError::NameNotFound`] instead of `IndexNotFound`.
///
/// # Caveats
///
/// As [`listener`].
pub fn listener_named(name: &str) -> Result<TcpListener, ListenError> {
    let mut passed = lock(passed()?);
    let index = (0..passed.names.len())
        .find(|&i| passed.names[i] == name && passed.untaken(i))
        .ok_or_else(|| ListenError::NameNotFound {
            name: name.to_owned(),
            names: passed.names.clone(),
        })?;
    take(&mut passed, index)
}

/// The names of the sockets systemd passed, in index order.
///
/// # Errors
///
/// [`ListenError::NotActivated`], [`PidMismatch`](ListenError::PidMismatch) or
/// [`InvalidEnv`](ListenError::InvalidEnv).
///
/// # Caveats
///
/// As [`listener`].
pub fn listener_names() -> Result<Vec<String>, ListenError> {
    Ok(lock(passed()?).names.clone())
}

/// Whether `FINALE_LISTEN_PARENT` names this process's parent: the passed sockets are an
/// upgrade's hand-off, meant for this process.
fn passed_by_parent() -> bool {
    let parent = std::env::var(crate::platform::PARENT_ENV).ok();
    parent.and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::os::unix::process::parent_id())
}

/// The passed listening TCP socket named `name`, if there is one not taken yet: what a server
/// given an address serves instead of binding (socket activation, an upgrade's hand-off). No
/// error: without passed sockets, or with ones meant for another process, the server binds.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
pub(crate) fn take_named_if_passed(name: &str) -> Option<TcpListener> {
    let passed = passed().ok()?;
    let mut passed = lock(passed);
    let index = (0..passed.names.len()).find(|&i| passed.names[i] == name && passed.untaken(i))?;
    match take(&mut passed, index) {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(target: "finale", name, error = %e, "a passed socket could not be used");
            None
        }
    }
}

/// The passed listening Unix socket named `name`, if there is one not taken yet: what a server
/// given a socket path serves instead of binding (`ListenStream=/path`, an upgrade's
/// hand-off). A connected one (an upgrade's `finale.ready`) is not a listener: left alone.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
pub(crate) fn take_unix_named_if_passed(name: &str) -> Option<std::os::unix::net::UnixListener> {
    let passed = passed().ok()?;
    let mut passed = lock(passed);
    let index = (0..passed.names.len()).find(|&i| {
        passed.names[i] == name
            && matches!(&passed.slots[i], Slot::Unix(socket) if socket.peer_addr().is_err())
    })?;
    match std::mem::replace(&mut passed.slots[index], Slot::Taken) {
        Slot::Unix(socket) => Some(std::os::unix::net::UnixListener::from(OwnedFd::from(
            socket,
        ))),
        _ => None,
    }
}

/// Takes the passed Unix stream socket named `name` (an upgrade's `finale.ready`).
#[cfg(feature = "upgrade")]
pub(crate) fn take_unix_named(name: &str) -> Option<std::os::unix::net::UnixStream> {
    let passed = passed().ok()?;
    let mut passed = lock(passed);
    let index = (0..passed.names.len())
        .find(|&i| passed.names[i] == name && matches!(passed.slots[i], Slot::Unix(_)))?;
    match std::mem::replace(&mut passed.slots[index], Slot::Taken) {
        Slot::Unix(socket) => Some(socket),
        _ => None,
    }
}

/// Closes the passed listening sockets (TCP or Unix) no server took, and names them: in an upgrade's successor, a
/// server the new version no longer has must refuse its connections, not leave them hanging in
/// a queue nobody accepts from.
#[cfg(feature = "upgrade")]
pub(crate) fn close_untaken() -> Vec<String> {
    let Ok(passed) = passed() else {
        return Vec::new();
    };
    let mut passed = lock(passed);
    let mut closed = Vec::new();
    for index in 0..passed.names.len() {
        // Listening sockets (TCP, or Unix: not a connection such as `finale.ready`).
        let listening = match &passed.slots[index] {
            Slot::Tcp(_) => true,
            Slot::Unix(socket) => socket.peer_addr().is_err(),
            Slot::Other(_) | Slot::Taken => false,
        };
        if listening {
            passed.slots[index] = Slot::Taken;
            closed.push(passed.names[index].clone());
        }
    }
    closed
}

fn take(passed: &mut Passed, index: usize) -> Result<TcpListener, ListenError> {
    let count = passed.names.len();
    if index >= count {
        return Err(ListenError::IndexNotFound {
            index,
            passed: count,
        });
    }
    let name = passed.names[index].clone();
    let not_tcp = |source| ListenError::NotTcpListener {
        index,
        name: name.clone(),
        source,
    };
    // listenfd checked that the descriptor is an IPv4 or IPv6 stream socket (and marked it
    // close-on-exec) when the sockets were read.
    let listener = match std::mem::replace(&mut passed.slots[index], Slot::Taken) {
        Slot::Tcp(listener) => listener,
        Slot::Taken => return Err(ListenError::AlreadyTaken { index }),
        Slot::Other(e) => return Err(not_tcp(e)),
        Slot::Unix(socket) => {
            passed.slots[index] = Slot::Unix(socket);
            return Err(not_tcp(io::Error::other("it is a Unix socket")));
        }
    };
    // A connection handed over by `Accept=yes` is a stream socket too, but it has a peer.
    let stream = TcpStream::from(OwnedFd::from(listener));
    if let Ok(peer) = stream.peer_addr() {
        return Err(not_tcp(io::Error::other(format!(
            "it is a connection from {peer} (Accept=yes?), not a listening socket"
        ))));
    }
    Ok(TcpListener::from(OwnedFd::from(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn systemd_watchdog_is_for_this_process_only() {
        let us = 4242;
        assert_eq!(watchdog(None, None, us), None);
        assert_eq!(watchdog(Some("0"), None, us), None);
        assert_eq!(watchdog(Some("x"), None, us), None);
        assert_eq!(
            watchdog(Some("2000000"), None, us),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog(Some("2000000"), Some("4242"), us),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog(Some("2000000"), Some("4243"), us), None);
        assert_eq!(watchdog(Some("2000000"), Some("nope"), us), None);
    }

    #[test]
    fn systemd_listen_env_is_checked_like_sd_listen_fds() {
        let us = 77;
        assert!(matches!(
            check_env(None, Some("77"), None, us, false),
            Err(EnvProblem::NotActivated)
        ));
        assert!(matches!(
            check_env(Some("1"), Some("78"), None, us, false),
            Err(EnvProblem::PidMismatch { pid: 77, .. })
        ));
        assert!(matches!(
            check_env(Some("1"), None, None, us, false),
            Err(EnvProblem::PidMismatch { .. })
        ));
        assert!(matches!(
            check_env(Some("two"), Some("77"), None, us, false),
            Err(EnvProblem::InvalidEnv {
                var: "LISTEN_FDS",
                ..
            })
        ));
        assert!(matches!(
            check_env(Some("2"), Some("77"), Some("http"), us, false),
            Err(EnvProblem::InvalidEnv {
                var: "LISTEN_FDNAMES",
                ..
            })
        ));
        assert_eq!(
            check_env(Some("2"), Some("77"), None, us, false).unwrap(),
            ["unknown", "unknown"]
        );
        assert_eq!(
            check_env(Some("2"), Some("77"), Some("http:grpc"), us, false).unwrap(),
            ["http", "grpc"]
        );
        // An upgrade's hand-off: no LISTEN_PID, the parent named instead; a LISTEN_PID that is
        // set still has to be this process.
        assert_eq!(
            check_env(Some("2"), None, Some("http:finale.ready"), us, true).unwrap(),
            ["http", "finale.ready"]
        );
        assert!(matches!(
            check_env(Some("1"), Some("78"), None, us, true),
            Err(EnvProblem::PidMismatch { .. })
        ));
    }

    #[test]
    fn systemd_notify_socket_addresses() {
        assert!(notify_addr(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(notify_addr(OsStr::new("@/org/freedesktop/systemd1/notify")).is_ok());
        assert!(notify_addr(OsStr::new("relative")).is_err());
        assert!(notify_addr(OsStr::new("vsock:2:1234")).is_err());
    }

    #[test]
    fn systemd_status_is_one_short_line() {
        assert_eq!(status("a\nb"), "a b");
        let long = "é".repeat(150);
        let s = status(&long);
        assert!(s.len() <= 200 && s.chars().all(|c| c == 'é'));
    }

    /// A fresh scratch directory for one test (its name, the process and the thread).
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A service manager's socket at `path` (its reads bounded by `timeout`) and a notifier
    /// that sends to it.
    fn socket_pair(path: &std::path::Path, timeout: Duration) -> (UnixDatagram, Notifier) {
        let receiver = UnixDatagram::bind(path).unwrap();
        receiver.set_read_timeout(Some(timeout)).unwrap();
        (receiver, Notifier::new(path.as_os_str(), None).unwrap())
    }

    /// The hand-off to pid 4242 on a thread of its own, once `first` ran there.
    fn hand_over_on_a_thread(
        notifier: &Notifier,
        finale: crate::Finale,
        first: impl FnOnce() + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let notifier = notifier.clone();
        std::thread::spawn(move || {
            first();
            Observer::handed_over(&notifier, &finale.shared, 4242);
        })
    }

    /// Reads the `queued` datagrams that filled the queue and the one after them, which must
    /// be the hand-off's `MAINPID=4242`; then the hand-off's thread ends and `dir` goes.
    fn mainpid_comes_last(
        receiver: &UnixDatagram,
        queued: usize,
        handing: std::thread::JoinHandle<()>,
        dir: &std::path::Path,
    ) {
        let seen = read_up_to(receiver, queued + 1);
        handing.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
        assert_eq!(
            seen.last().map(|m| m.starts_with("MAINPID=4242\n")),
            Some(true),
            "{seen:?}"
        );
    }

    /// Fills the queue of the socket at `path` (nobody reads it yet: the kernel keeps ten
    /// datagrams by default); how many it took.
    fn fill_queue(path: &std::path::Path) -> usize {
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        let mut queued = 0;
        while filler.send_to(b"WATCHDOG=1", path).is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the queue never filled");
        }
        queued
    }

    /// Up to `n` datagrams from `receiver`, until one does not come within its read timeout.
    fn read_up_to(receiver: &UnixDatagram, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        for _ in 0..n {
            match receiver.recv(&mut buf) {
                Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => break,
            }
        }
        seen
    }

    #[test]
    fn systemd_datagrams_reach_the_socket_and_never_block() {
        let dir = scratch("finale-notify-unit");
        let path = dir.join("notify");
        let (receiver, notifier) = socket_pair(&path, Duration::from_secs(5));
        notifier.send("READY=1");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        // Nobody reads: the queue fills, and sending still returns at once.
        let start = Instant::now();
        for _ in 0..10_000 {
            notifier.send("WATCHDOG=1");
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The hand-off's `MAINPID=` finds systemd's queue full (its reader busy): it waits for
    /// room instead of being dropped (a dropped one leaves systemd taking the old process for
    /// the service's main process, whose exit it takes for the service's end).
    #[test]
    fn systemd_mainpid_waits_for_room_in_a_full_queue() {
        let finale = crate::Finale::builder().no_signals().build().unwrap();
        let dir = scratch("finale-notify-full");
        let path = dir.join("notify");
        let (receiver, notifier) = socket_pair(&path, Duration::from_secs(3));
        // Nobody reads yet: the queue fills (the kernel keeps ten datagrams by default).
        let queued = fill_queue(&path);
        let handing = hand_over_on_a_thread(&notifier, finale, || {});
        // Until the hand-off has tried once (it sets its flag first, under the lock).
        let until = Instant::now() + Duration::from_secs(2);
        while !*lock(&notifier.inner.handed) && Instant::now() < until {
            std::thread::yield_now();
        }
        // The queue is still full: a hand-off that drops its datagram has returned by now; one
        // that waits for room is waiting, and the reader makes room.
        assert!(!handing.is_finished(), "the hand-off did not wait for room");
        mainpid_comes_last(&receiver, queued, handing, &dir);
    }

    /// While the hand-off's `MAINPID=` waits for room, another datagram (a watchdog ping from
    /// the runtime) does not wait for it: it is dropped at once, and `MAINPID=` still goes out
    /// when the reader makes room.
    #[test]
    fn systemd_nothing_waits_behind_a_waiting_mainpid() {
        let finale = crate::Finale::builder().no_signals().build().unwrap();
        let finale_life = finale.shared.life.clone();
        let dir = scratch("finale-notify-behind");
        let path = dir.join("notify");
        let (receiver, notifier) = socket_pair(&path, Duration::from_secs(3));
        let queued = fill_queue(&path);
        let (started, handing_started) = std::sync::mpsc::channel();
        let handing = hand_over_on_a_thread(&notifier, finale, move || started.send(()).unwrap());
        handing_started.recv().unwrap();
        // Until the hand-off holds the flag (it waits for room without the lock).
        let until = Instant::now() + Duration::from_secs(2);
        while !*lock(&notifier.inner.handed) && Instant::now() < until {
            std::thread::yield_now();
        }
        // With the lock held through the wait, this ping would block until the hand-off gave
        // up, by which time its `MAINPID=` would be gone for good.
        notifier.send_unless_ended(&finale_life, "WATCHDOG=1");
        assert!(!handing.is_finished(), "the hand-off stopped waiting");
        mainpid_comes_last(&receiver, queued, handing, &dir);
    }

    /// Signals delivered to the thread whose `MAINPID=` waits for room interrupt its send
    /// (a send with a timeout is never restarted): the wait goes on, and `MAINPID=` goes out
    /// once the reader makes room.
    #[test]
    fn systemd_a_signal_does_not_cut_the_mainpid_wait_short() {
        use nix::sys::pthread::{pthread_kill, pthread_self};
        use nix::sys::signal::Signal as NixSignal;
        // A handler for SIGUSR1 (tokio's, with `SA_RESTART`), so that the signal interrupts
        // the send rather than end the process.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _usr1 = runtime.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap()
        });
        let finale = crate::Finale::builder().no_signals().build().unwrap();
        let dir = scratch("finale-notify-eintr");
        let path = dir.join("notify");
        let (receiver, notifier) = socket_pair(&path, Duration::from_secs(3));
        let queued = fill_queue(&path);
        let (tx, thread) = std::sync::mpsc::channel();
        let handing = hand_over_on_a_thread(&notifier, finale, move || {
            tx.send(pthread_self()).unwrap();
        });
        let thread = thread.recv().unwrap();
        // Bounded: a signal every 10 ms for 200 ms, while the hand-off waits (it would give up
        // at the first that lands in its send).
        for _ in 0..20 {
            if handing.is_finished() {
                break;
            }
            let _ = pthread_kill(thread, NixSignal::SIGUSR1);
            std::thread::sleep(Duration::from_millis(10));
        }
        mainpid_comes_last(&receiver, queued, handing, &dir);
    }

    /// The wait is bounded: with nobody reading, the hand-off waits its patience, then gives
    /// up (logged) instead of holding its thread. Its patience fits the Announce phase that
    /// waits for it: 0.5 s with the default budget, 80% of a shorter Announce timeout, 80% of
    /// a budget that leaves less before the Telemetry reserve, and 80% of what is left of the
    /// phase when the shutdown was requested earlier.
    #[test]
    fn systemd_mainpid_waits_at_most_its_patience() {
        type Shape = fn(crate::Builder) -> crate::Builder;
        let shapes: [(&str, Shape, Option<Duration>, Duration); 4] = [
            ("default", |b| b, None, MAINPID_PATIENCE),
            (
                "announce 200 ms",
                |b| b.announce_timeout(Duration::from_millis(200)),
                None,
                Duration::from_millis(160),
            ),
            (
                "100 ms before the reserve",
                |b| {
                    b.total_budget(Duration::from_secs(3))
                        .telemetry_reserve(Duration::from_millis(2_900))
                },
                None,
                Duration::from_millis(80),
            ),
            (
                "requested 150 ms before, announce 200 ms",
                |b| b.announce_timeout(Duration::from_millis(200)),
                Some(Duration::from_millis(150)),
                Duration::from_millis(40),
            ),
        ];
        let dir = scratch("finale-notify-stuck");
        for (round, (what, shape, triggered_ago, most)) in shapes.into_iter().enumerate() {
            let builder = crate::Finale::builder().no_signals().read_env(false);
            let finale = shape(builder).build().unwrap();
            if let Some(ago) = triggered_ago {
                finale.shared.life.triggered_ago(ago);
            }
            let patience = mainpid_patience(&finale.shared);
            assert!(
                patience <= most && patience >= most.mul_f32(0.9),
                "{what}: patience {patience:?}, expected {most:?}"
            );
            let path = dir.join(format!("notify-{round}"));
            let (_receiver, notifier) = socket_pair(&path, Duration::from_secs(3));
            fill_queue(&path);
            let start = Instant::now();
            Observer::handed_over(&notifier, &finale.shared, 4242);
            let took = start.elapsed();
            assert!(
                took < most + Duration::from_secs(1),
                "{what}: held for {took:?}, patience {most:?}"
            );
            if triggered_ago.is_none() {
                assert!(
                    took >= most.mul_f32(0.9),
                    "{what}: waited {took:?} of {most:?}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A log layer of the user's that panics on the shutdown request's log line: systemd is
    /// still told of the trigger (`STOPPING=1`) before the panic goes on.
    #[test]
    fn systemd_hears_the_trigger_when_its_log_line_panics() {
        use tracing_subscriber::layer::SubscriberExt;
        struct Panics;
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Panics {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                panic!("a log layer that panics");
            }
        }
        let dir = scratch("finale-notify-panicking-log");
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        TEST_NOTIFY_SOCKET.with(|socket| *socket.borrow_mut() = Some(path.clone()));
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .systemd_notify(true)
            .build()
            .unwrap();
        TEST_NOTIFY_SOCKET.with(|socket| socket.borrow_mut().take());
        let shared = finale.shared.clone();
        let subscriber = tracing_subscriber::registry().with(Panics);
        let requested = tracing::subscriber::with_default(subscriber, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                shared.request(crate::Reason::Requested("test".into()))
            }))
        });
        let mut buf = [0u8; 512];
        let heard = receiver
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            requested.is_err(),
            "the layer's panic goes on to the caller"
        );
        assert!(
            heard.as_deref().is_ok_and(|m| m.starts_with("STOPPING=1")),
            "systemd was not told: {heard:?}"
        );
    }

    /// Watchdog pings from other threads while the service is handed over: none reaches the
    /// socket after `MAINPID=` (the check and the send are one step under the lock that
    /// `handed_over` holds while it sends and sets the flag). 200 rounds that show it: a round
    /// whose `MAINPID=` found the socket's queue full for longer than its patience (a reader
    /// starved on a busy machine lets the queue's ten datagrams fill) shows nothing, and
    /// another round runs instead, at most 200 more.
    #[test]
    fn systemd_no_datagram_follows_mainpid() {
        const ROUNDS: usize = 200;
        let finale = crate::Finale::builder().no_signals().build().unwrap();
        let dir = scratch("finale-notify-handed");
        let mut shown = 0;
        for round in 0..2 * ROUNDS {
            let path = dir.join(format!("notify-{round}"));
            let (receiver, notifier) = socket_pair(&path, Duration::from_secs(10));
            let stop = Arc::new(AtomicBool::new(false));
            let pingers: Vec<_> = (0..3)
                .map(|_| {
                    let (notifier, stop) = (notifier.clone(), stop.clone());
                    std::thread::spawn(move || {
                        // Bounded: at most 20,000 pings each, paced so that the reader
                        // keeps the socket's queue from filling (a full queue drops datagrams).
                        for _ in 0..20_000 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            notifier.send("WATCHDOG=1");
                            std::thread::sleep(Duration::from_micros(20));
                        }
                    })
                })
                .collect();
            let reader = std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut buf = [0u8; 256];
                // Until the test's own end marker, sent once the pingers stopped.
                while let Ok(n) = receiver.recv(&mut buf) {
                    if &buf[..n] == b"END" {
                        break;
                    }
                    seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                seen
            });
            Observer::handed_over(&notifier, &finale.shared, 4242);
            stop.store(true, Ordering::Relaxed);
            for p in pingers {
                p.join().unwrap();
            }
            UnixDatagram::unbound()
                .unwrap()
                .send_to(b"END", &path)
                .unwrap();
            let seen = reader.join().unwrap();
            let Some(at) = seen.iter().position(|m| m.starts_with("MAINPID=4242")) else {
                continue;
            };
            assert_eq!(
                seen.len(),
                at + 1,
                "round {round}: {:?} after MAINPID",
                &seen[at + 1..]
            );
            shown += 1;
            if shown == ROUNDS {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            shown, ROUNDS,
            "MAINPID reached the socket in {shown} rounds"
        );
    }

    /// Phase statuses from other threads while the supervisor claims the end and sends its
    /// status: none reaches the socket after the supervisor's (the owner is read under the
    /// lock the supervisor's send holds, and the claim comes before that send). A round whose
    /// supervisor status the full datagram queue dropped (the kernel's queue is short) shows
    /// nothing and is skipped; at least one round must show the order.
    #[test]
    fn systemd_no_status_of_the_sequence_follows_the_supervisors() {
        let dir = scratch("finale-notify-ended");
        let mut conclusive = 0;
        for round in 0..50 {
            let finale = crate::Finale::builder().no_signals().build().unwrap();
            let shared = finale.shared.clone();
            let path = dir.join(format!("notify-{round}"));
            let (receiver, notifier) = socket_pair(&path, Duration::from_secs(10));
            let stop = Arc::new(AtomicBool::new(false));
            let senders: Vec<_> = (0..3)
                .map(|_| {
                    let (notifier, stop, shared) = (notifier.clone(), stop.clone(), shared.clone());
                    std::thread::spawn(move || {
                        // Bounded, and paced so that the reader keeps the queue from filling.
                        for _ in 0..20_000 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            Observer::phase_started(&notifier, &shared, Phase::Telemetry);
                            std::thread::sleep(Duration::from_micros(20));
                        }
                    })
                })
                .collect();
            let (first_tx, first) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut buf = [0u8; 256];
                while let Ok(n) = receiver.recv(&mut buf) {
                    if &buf[..n] == b"END" {
                        break;
                    }
                    seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    let _ = first_tx.send(());
                }
                seen
            });
            // The sequence's statuses are going out: the supervisor claims in their midst.
            first.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(shared.life.claim_end(EndOwner::Supervisor));
            Observer::took_over(&notifier, &shared, "stuck", 5, &[]);
            stop.store(true, Ordering::Relaxed);
            for s in senders {
                s.join().unwrap();
            }
            UnixDatagram::unbound()
                .unwrap()
                .send_to(b"END", &path)
                .unwrap();
            let seen = reader.join().unwrap();
            // The socket's queue is short (`net.unix.max_dgram_qlen`, often 10): a reader that
            // stalls lets it fill, and the non-blocking send drops the supervisor's status.
            // Such a round shows nothing about the order.
            let Some(at) = seen
                .iter()
                .position(|m| m.starts_with("STATUS=stopped by the supervisor"))
            else {
                continue;
            };
            conclusive += 1;
            assert_eq!(
                seen.len(),
                at + 1,
                "round {round}: {:?} after the supervisor's status",
                &seen[at + 1..]
            );
            drop(finale);
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            conclusive > 0,
            "every round dropped the supervisor's status"
        );
    }
}
