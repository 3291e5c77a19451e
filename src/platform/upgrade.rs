//! Restart without refusing a connection: the running process starts its successor, hands it
//! its listening sockets, waits (bounded) until the successor is ready, and only then runs its
//! own shutdown. Linux and other Unix only; feature `upgrade`.
//!
//! # How it works
//!
//! 1. **Trigger**: the signal of [`Upgrade::signal`] (`SIGUSR2` by default, received by finale's
//!    supervisor thread) or [`Handle::upgrade`](crate::Handle::upgrade).
//! 2. **Successor**: the same binary (or [`Upgrade::program`]) with the same arguments and
//!    environment, plus the listening sockets of finale's servers as systemd passes them:
//!    file descriptors 3, 4, … with `LISTEN_FDS` and `LISTEN_FDNAMES` (each named after its
//!    server), and one more socket named `finale.ready`. `LISTEN_PID` cannot name a process
//!    before it exists, so it is left out and `FINALE_LISTEN_PARENT` names this process
//!    instead: the successor takes the sockets only if it is this process's child.
//! 3. **The successor's servers** find the socket passed under their name and serve it instead of
//!    binding (the same code path as systemd socket activation); the kernel socket, its accept
//!    queue included, is the same one, so no connection is refused. When its graceful start is
//!    done, the successor writes `READY=1` on `finale.ready`.
//! 4. **The old process** waits for that line at most [`Upgrade::ready_timeout`]. Ready: under
//!    systemd it sends `MAINPID=<successor>`, then runs its shutdown with
//!    [`Reason::Upgrade`](crate::Reason::Upgrade): no drain delay (the listener stays open in the
//!    successor), its servers stop accepting without touching the shared socket, and the Drain
//!    finishes what is in flight here while the successor already accepts. Not ready (it exited,
//!    crashed or took too long): a successor still running is stopped with SIGTERM (its own
//!    finale drains what it already accepted from the shared sockets; SIGKILL after
//!    [`STOP_WAIT`]), the failure is logged, counted (`finale_upgrades_total{outcome}`), listed
//!    in the report, and this process goes on serving.
//! 5. **A shutdown requested while the successor starts** (SIGTERM, `Handle::trigger`) and
//!    the successor's `READY=1` are decided by one compare-and-swap: exactly one wins. A
//!    shutdown requested before the old process read the ready line wins: the service is to
//!    stop, not to be replaced. One requested after it is the hand-off's: the successor
//!    serves, this process drains with reason `upgrade`, and the signal counts as the first
//!    after the hand-off; if the upgrade had not yet told systemd (`MAINPID=`), the Announce
//!    phase waits for it, so that this process does not end first (unless a second signal
//!    asks it to leave at once). When the shutdown wins, the upgrade is abandoned, the successor
//!    stopped the same way (SIGKILL once most of the Announce timeout is spent, or of the
//!    budget's time before the Telemetry reserve if that is shorter; first in that phase,
//!    before its hooks; so that no orphan outlives this process), the
//!    report says so, and the servers leave the shared sockets alone while the successor still
//!    holds them.
//!
//! Decided against shellflip (it does not pass listening sockets, waits for readiness without a
//! bound and owns the signal handling) and ecdysis (its own socket creation, a fixed 5 s
//! readiness timeout, process exit on a bad environment): finale owns the sequence, and the
//! `LISTEN_FDS` convention makes socket activation and hand-off one code path. The descriptors
//! are placed in the child with `command-fds` (no `unsafe` in finale).
//!
//! In the successor, the passed sockets are read at [`Builder::build`](crate::Builder::build)
//! and made close-on-exec at once (a child process started before the servers bind does not
//! inherit them); a passed socket no server took (a server the new version no longer has) is
//! closed once graceful start is done, so its port refuses connections instead of queueing
//! them for nobody. The successor's program is found when the old process was built, so a new
//! release installed by renaming it over the running binary is the one started.
//!
//! # Limits
//!
//! - Servers given an address are handed over. A listener you bound yourself and passed to
//!   `serve` is passed too, but your successor's own code binds it again (and fails, the
//!   address being in use): take it in the successor with
//!   [`finale::systemd::listener_named`](crate::systemd::listener_named) under the server's name.
//! - A new address in the successor's configuration is not used: the passed socket keeps the
//!   old one (a warning says so); moving a service to another port needs a restart.
//! - A successor that crashes after `READY=1` leaves nobody serving: the old process has let go.
//! - In-memory state (caches, sessions, counters) does not move: the successor starts fresh.
//! - Two upgrades at once: the second is refused ([`UpgradeError::InProgress`]); so is one once
//!   the shutdown has started.
//! - Under systemd, the successor's own notifications are accepted only with
//!   `NotifyAccess=all` (or `exec`); `WATCHDOG_PID` is not passed on, so the successor's
//!   watchdog applies to it.
//! - Telemetry: both processes push and flush on their own; give each process a label of its
//!   own where a backend groups by instance (a Pushgateway group shared by both would be
//!   overwritten by whichever pushes last): [`generation`] counts the upgrades that led to this
//!   process (`FINALE_UPGRADE_GENERATION`), so `instance="host-{generation}"` or the pid tells
//!   them apart.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use crate::config::ConfigError;
use crate::platform::PARENT_ENV;
use crate::report::Reason;
use crate::run::builder::Install;
use crate::signal::Signal;
use crate::state::{Handover, HandoverFuture, Life, Observer, Shared, lock};
use crate::{Builder, Handle};

/// The variable that carries [`generation`] to a successor.
pub const GENERATION_ENV: &str = "FINALE_UPGRADE_GENERATION";

/// How many upgrades led to this process: 0 for a process started otherwise, 1 for its first
/// successor, and so on (from `FINALE_UPGRADE_GENERATION`, which each upgrade sets one higher
/// for the successor). A label that tells the old and the new process apart in telemetry.
pub fn generation() -> u32 {
    std::env::var(GENERATION_ENV)
        .ok()
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or(0)
}

/// How long a successor that is stopped (not ready in time, or the shutdown started) has to
/// end after its SIGTERM before it is killed: 10 seconds.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// How long the old process waits for its successor to report ready, by default: 30 seconds.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The name of the extra passed socket on which the successor reports ready.
pub(crate) const READY_NAME: &str = "finale.ready";
const READY_LINE: &[u8] = b"READY=1\n";

/// How the service restarts without downtime; see the [module docs](self). Set with
/// [`Builder::upgrade`](crate::Builder::upgrade).
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`signal`](Upgrade::signal) | `SIGUSR2` |
/// | [`program`](Upgrade::program) | this process's executable (`std::env::current_exe`) |
/// | [`ready_timeout`](Upgrade::ready_timeout) | [`DEFAULT_READY_TIMEOUT`] |
#[derive(Clone, Debug)]
#[must_use]
pub struct Upgrade {
    pub(crate) signal: Option<Signal>,
    program: Option<PathBuf>,
    ready_timeout: Duration,
}

impl Default for Upgrade {
    fn default() -> Self {
        Self {
            signal: Some(Signal::User2),
            program: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

impl Upgrade {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The signal that starts an upgrade; `None` for [`Handle::upgrade`](crate::Handle::upgrade)
    /// only. It must not be one of the shutdown signals
    /// ([`ConfigError::UpgradeSignal`](crate::ConfigError::UpgradeSignal)).
    pub fn signal(mut self, signal: Option<Signal>) -> Self {
        self.signal = signal;
        self
    }

    /// The successor's executable: a new binary installed next to the running one, say. By
    /// default the running process's own executable (on Linux, if the file was replaced, the
    /// new file at the same path).
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// How long the successor may take to report ready (its graceful start).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    pub(crate) fn ready_timeout_value(&self) -> Duration {
        self.ready_timeout
    }
}

impl Install for Upgrade {
    fn install(self: Box<Self>) -> Result<Arc<dyn Handover>, ConfigError> {
        let timeout = self.ready_timeout_value();
        if timeout.is_zero() || timeout > crate::config::MAX_DURATION {
            return Err(ConfigError::UpgradeReadyTimeout { value: timeout });
        }
        Ok(Arc::new(UpgradeState::new(*self)))
    }
}

// The upgrade's doors on the builder and the handle: defined here, so that the core never
// names the upgrade.
impl Builder {
    /// Lets the service restart without refusing a connection: on the upgrade signal
    /// (`SIGUSR2` by default) or [`Handle::upgrade`](crate::Handle::upgrade), it starts its
    /// successor with its listening sockets and shuts down once the successor is ready. See
    /// [`finale::upgrade`](self).
    ///
    /// # Caveats
    ///
    /// Installs a handler for the upgrade signal, and starts a short-lived thread
    /// (`finale-upgrade`) and a child process per upgrade; see the crate docs, "Threading and
    /// process-wide effects".
    #[cfg_attr(docsrs, doc(cfg(feature = "upgrade")))]
    pub fn upgrade(mut self, upgrade: Upgrade) -> Self {
        self.handover = Some(Box::new(upgrade));
        self
    }
}

impl Handle {
    /// Starts an upgrade, as the upgrade signal does, and waits for its end: the successor
    /// ready (this process is then shutting down, [`Reason::Upgrade`](crate::Reason::Upgrade)),
    /// or an [`UpgradeError`](UpgradeError) and this process goes on serving.
    /// See [`finale::upgrade`](self).
    ///
    /// # Errors
    ///
    /// [`NotEnabled`](UpgradeError::NotEnabled) without
    /// [`Builder::upgrade`](crate::Builder::upgrade), [`InProgress`](UpgradeError::InProgress),
    /// [`ShuttingDown`](UpgradeError::ShuttingDown), or how the successor
    /// failed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future (a caller's timeout, say), or the runtime that polls it, does not
    /// stop the upgrade: it runs to its end on its own thread (the successor started, waited
    /// for, and handed the service or stopped), as one started by the upgrade signal does.
    /// Only its result is lost; the log and the report still tell it.
    #[cfg_attr(docsrs, doc(cfg(feature = "upgrade")))]
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        run(&self.shared).await
    }
}

/// A successful upgrade: the successor is ready and this process is shutting down.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The successor's process id.
    pub successor_pid: u32,
    /// From the trigger to the successor's `READY=1`.
    pub ready_after: Duration,
}

/// Why an upgrade did not happen. In every case this process goes on serving.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The finale was built without [`Builder::upgrade`](crate::Builder::upgrade).
    NotEnabled,
    /// Another upgrade is under way.
    InProgress,
    /// The shutdown has started already.
    ShuttingDown,
    /// The successor could not be started (the program is missing, say).
    Spawn {
        /// The program.
        program: PathBuf,
        /// What failed.
        error: String,
    },
    /// The successor ended before it reported ready.
    Exited {
        /// Its process id.
        pid: u32,
        /// How it ended (`exit status: 3`, `signal: 9 (SIGKILL)`).
        status: String,
    },
    /// The successor did not report ready in time; it was stopped (SIGTERM, so that it
    /// drains what it had accepted, then SIGKILL after [`STOP_WAIT`]).
    NotReady {
        /// Its process id.
        pid: u32,
        /// How long it was given.
        waited: Duration,
    },
    /// The shutdown was requested while the successor was starting: the upgrade was abandoned
    /// and the successor stopped, so that the service stops as asked.
    Aborted {
        /// Its process id.
        pid: u32,
    },
}

impl UpgradeError {
    /// The `outcome` label of `finale_upgrades_total`.
    fn outcome(&self) -> &'static str {
        match self {
            UpgradeError::NotEnabled | UpgradeError::InProgress | UpgradeError::ShuttingDown => {
                "refused"
            }
            UpgradeError::Spawn { .. } => "spawn_failed",
            UpgradeError::Exited { .. } => "exited",
            UpgradeError::NotReady { .. } => "not_ready",
            UpgradeError::Aborted { .. } => "aborted",
        }
    }
}

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeError::NotEnabled => f.write_str("upgrades are not enabled (Builder::upgrade)"),
            UpgradeError::InProgress => f.write_str("an upgrade is already under way"),
            UpgradeError::ShuttingDown => f.write_str("the shutdown has started"),
            UpgradeError::Spawn { program, error } => {
                write!(
                    f,
                    "the successor {} could not start: {error}",
                    program.display()
                )
            }
            UpgradeError::Exited { pid, status } => {
                write!(
                    f,
                    "the successor (pid {pid}) ended before it was ready: {status}"
                )
            }
            UpgradeError::NotReady { pid, waited } => write!(
                f,
                "the successor (pid {pid}) was not ready within {waited:?}; it was stopped"
            ),
            UpgradeError::Aborted { pid } => write!(
                f,
                "the shutdown started while the successor (pid {pid}) was starting; it was stopped"
            ),
        }
    }
}

impl std::error::Error for UpgradeError {}

/// The upgrade machinery of one `Finale`.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
#[derive(Debug)]
pub(crate) struct UpgradeState {
    config: Upgrade,
    /// The successor's program, found when the finale was built: by the time of an upgrade
    /// the running executable may have been replaced (renamed over), and the running process's
    /// own path then names a deleted file.
    program: Result<PathBuf, String>,
    busy: AtomicBool,
    handed_off: AtomicBool,
    /// A successor is running that holds the listening sockets too (from its spawn until it is
    /// ready, or stopped): the servers must not change the shared sockets meanwhile.
    sharing: AtomicBool,
    next_id: AtomicU64,
    /// The listening sockets of the servers (a duplicate of each), while they accept.
    listeners: std::sync::Mutex<Vec<(u64, String, OwnedFd)>>,
    /// Upgrades that failed, for the report.
    failed: std::sync::Mutex<Vec<String>>,
    /// Sent `false` when an upgrade ends without a hand-over (failed or abandoned).
    idle: tokio::sync::watch::Sender<bool>,
    /// The successor being started or stopped (0: none).
    successor: std::sync::atomic::AtomicU32,
}

impl UpgradeState {
    pub(crate) fn new(config: Upgrade) -> Self {
        let program = match &config.program {
            Some(program) => Ok(program.clone()),
            None => std::env::current_exe().map_err(|e| e.to_string()),
        };
        Self {
            config,
            program,
            busy: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            sharing: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            listeners: std::sync::Mutex::new(Vec::new()),
            failed: std::sync::Mutex::new(Vec::new()),
            idle: tokio::sync::watch::Sender::new(true),
            successor: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Whether the listening sockets now belong to a successor, or are held by one that is
    /// starting: the servers stop accepting without touching them (no backlog change, no
    /// accept-queue sweep).
    pub(crate) fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::Acquire) || self.sharing.load(Ordering::Acquire)
    }

    /// Whether an upgrade is under way (a successor is being started or waited for).
    pub(crate) fn in_progress(&self) -> bool {
        self.busy.load(Ordering::Acquire) && !self.succeeded()
    }

    /// Resolves once no upgrade is under way: the one running was abandoned (or failed, or
    /// handed over).
    pub(crate) async fn settled(&self) {
        let mut idle = self.idle.subscribe();
        let _ = idle
            .wait_for(|idle| *idle || self.succeeded() || !self.busy.load(Ordering::Acquire))
            .await;
    }

    /// SIGKILL to a successor that does not stop in time (the upgrade thread reaps it).
    pub(crate) fn kill_successor(&self) {
        let pid = self.successor.load(Ordering::Acquire);
        if pid != 0 {
            tracing::warn!(target: "finale", successor_pid = pid, "the successor did not stop in time: killed");
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Whether this process handed its service over (the successor is ready).
    pub(crate) fn succeeded(&self) -> bool {
        self.handed_off.load(Ordering::Acquire)
    }

    /// The signal that starts an upgrade.
    pub(crate) fn signal(&self) -> Option<Signal> {
        self.config.signal
    }

    pub(crate) fn take_failed(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.failed))
    }

    /// Keeps a duplicate of a server's listening socket until the returned registration drops
    /// (when the server stops accepting).
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn register(
        self: &Arc<Self>,
        name: &str,
        listener: &impl AsFd,
    ) -> io::Result<ListenerRegistration> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners).push((id, name.to_owned(), fd));
        Ok(ListenerRegistration {
            state: self.clone(),
            id,
        })
    }
}

impl Handover for UpgradeState {
    fn take_failed(&self) -> Vec<String> {
        UpgradeState::take_failed(self)
    }

    fn succeeded(&self) -> bool {
        UpgradeState::succeeded(self)
    }

    fn handed_off(&self) -> bool {
        UpgradeState::handed_off(self)
    }

    fn signal(&self) -> Option<Signal> {
        UpgradeState::signal(self)
    }

    fn start(&self, shared: &Arc<Shared>) -> HandoverFuture {
        let shared = shared.clone();
        Box::pin(async move {
            let _ = run(&shared).await;
        })
    }

    fn completing(self: Arc<Self>) -> Option<HandoverFuture> {
        // `idle` goes back to `true` once the upgrade has told the platform and counted the
        // hand-over (`try_upgrade`).
        if *self.idle.borrow() {
            return None;
        }
        Some(Box::pin(async move {
            let mut idle = self.idle.subscribe();
            let _ = idle.wait_for(|idle| *idle).await;
        }))
    }

    fn abandon(self: Arc<Self>, patience: Duration) -> Option<HandoverFuture> {
        if !self.in_progress() {
            return None;
        }
        Some(Box::pin(async move {
            tokio::select! {
                () = self.settled() => {}
                () = tokio::time::sleep(patience) => {
                    self.kill_successor();
                    self.settled().await;
                }
            }
        }))
    }
}

/// The upgrade machinery of `shared`'s `Finale`, if it has upgrades on.
pub(crate) fn state(shared: &Shared) -> Option<Arc<UpgradeState>> {
    let any: Arc<dyn std::any::Any + Send + Sync> = shared.upgrade.clone()?;
    any.downcast().ok()
}

/// A server's listening socket, offered to a successor while the server accepts.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
#[derive(Debug)]
pub(crate) struct ListenerRegistration {
    state: Arc<UpgradeState>,
    id: u64,
}

impl Drop for ListenerRegistration {
    fn drop(&mut self) {
        lock(&self.state.listeners).retain(|(id, _, _)| *id != self.id);
    }
}

/// Runs one upgrade; see the [module docs](self). Everything from the successor's start to
/// the hand-off's completion (the platform told, the shutdown requested) or the successor's
/// stop runs on the upgrade's own thread: dropping this future, or the runtime that polls it,
/// leaves nothing half done; only the answer is lost.
pub(crate) async fn run(shared: &Arc<Shared>) -> Result<Upgraded, UpgradeError> {
    let state = begin(shared).map_err(|e| ended(shared, e))?;
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let on_thread = (shared.clone(), state.clone());
    let thread = std::thread::Builder::new()
        .name("finale-upgrade".to_owned())
        .spawn(move || {
            let (shared, state) = on_thread;
            let _ = tx.send(upgrade_here(&shared, &state));
        });
    match thread {
        Ok(_) => rx.await.unwrap_or_else(|_| {
            // The thread panicked (a metrics recorder or a log layer of the user's, say).
            match shared.life.handover_pid() {
                // After the hand-off won: its drop guard requested the shutdown.
                Some(successor_pid) => Ok(Upgraded {
                    successor_pid,
                    ready_after: started.elapsed(),
                }),
                None => {
                    // Not counted here: the panic may have come from counting it there.
                    let e = UpgradeError::Spawn {
                        program: state.program.clone().unwrap_or_default(),
                        error: "the upgrade thread panicked".to_owned(),
                    };
                    lock(&state.failed).push(e.to_string());
                    tracing::error!(target: "finale", error = %e, "upgrade failed; still serving");
                    Err(e)
                }
            }
        }),
        Err(e) => {
            state.busy.store(false, Ordering::Release);
            state.idle.send_replace(true);
            Err(ended(
                shared,
                UpgradeError::Spawn {
                    program: PathBuf::new(),
                    error: format!("no thread for the upgrade: {e}"),
                },
            ))
        }
    }
}

/// The checks before an upgrade starts; marks it under way.
fn begin(shared: &Shared) -> Result<Arc<UpgradeState>, UpgradeError> {
    let Some(state) = state(shared) else {
        return Err(UpgradeError::NotEnabled);
    };
    if shared.reason().is_some() {
        return Err(UpgradeError::ShuttingDown);
    }
    if state.busy.swap(true, Ordering::AcqRel) {
        return Err(UpgradeError::InProgress);
    }
    state.idle.send_replace(false);
    Ok(state)
}

/// An upgrade that did not happen: counted, logged, and listed in the report if it failed.
fn ended(shared: &Shared, e: UpgradeError) -> UpgradeError {
    crate::names::add(
        &shared.recorders(),
        &crate::names::metric::UPGRADES_TOTAL,
        &[("outcome", e.outcome())],
        1,
    );
    match e {
        UpgradeError::Aborted { .. } => {
            tracing::warn!(target: "finale", error = %e, "upgrade abandoned");
        }
        _ => tracing::error!(target: "finale", error = %e, "upgrade failed; still serving"),
    }
    if let Some(state) = state(shared)
        && !matches!(
            e,
            UpgradeError::NotEnabled
                | UpgradeError::InProgress
                | UpgradeError::ShuttingDown
                | UpgradeError::Aborted { .. }
        )
    {
        lock(&state.failed).push(e.to_string());
    }
    e
}

/// Marks the upgrade settled as its thread ends, however it ends (a panic in a metrics
/// recorder or a log layer included): the Announce phase's wait for it never outlasts it. A
/// panic after the hand-off won still requests the shutdown (the successor serves; this
/// process must not go on serving beside it, refusing every later upgrade).
struct Settled<'a> {
    shared: &'a Shared,
    state: &'a UpgradeState,
}

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        let Self { shared, state } = *self;
        if let Some(successor_pid) = shared.life.handover_pid() {
            state.handed_off.store(true, Ordering::Release);
            if std::thread::panicking() && shared.reason().is_none() {
                tracing::error!(target: "finale", successor_pid, "the upgrade thread panicked after the hand-off won: shutting down");
                shared.request(Reason::Upgrade { successor_pid });
            }
        } else {
            if std::thread::panicking() {
                // A successor started and not yet waited for: it is not to serve.
                state.kill_successor();
            }
            // The sockets are this process's alone again.
            state.sharing.store(false, Ordering::Release);
            state.busy.store(false, Ordering::Release);
        }
        state.idle.send_replace(true);
    }
}

/// The upgrade, on its own thread: the successor started and waited for (spawning and waiting
/// block), then the hand-off completed, or the successor stopped.
fn upgrade_here(shared: &Arc<Shared>, state: &UpgradeState) -> Result<Upgraded, UpgradeError> {
    let _settled = Settled { shared, state };
    let started = Instant::now();
    let pid = spawn_and_wait(state, &shared.life).map_err(|e| ended(shared, e))?;
    // From here the sockets are the successor's: the servers must leave them as they are.
    state.handed_off.store(true, Ordering::Release);
    let upgraded = Upgraded {
        successor_pid: pid,
        ready_after: started.elapsed(),
    };
    // The steps of the hand-off's completion each run the user's recorders or log layers: a
    // panic in one does not skip the next (systemd must hear `MAINPID=`, the shutdown must be
    // requested). Counted and logged before the shutdown is requested: a process with nothing
    // to drain may be gone soon after.
    isolated(|| {
        crate::names::add(
            &shared.recorders(),
            &crate::names::metric::UPGRADES_TOTAL,
            &[("outcome", "ready")],
            1,
        );
    });
    isolated(|| {
        tracing::info!(
            target: "finale",
            successor_pid = pid,
            ready_after = ?upgraded.ready_after,
            "upgrade: the successor is ready; shutting down"
        );
    });
    isolated(|| shared.observe(|o| o.handed_over(shared, pid)));
    state.idle.send_replace(true);
    // A signal requested after the hand-off won requested it already, as the hand-off's.
    isolated(|| {
        shared.request(Reason::Upgrade { successor_pid: pid });
    });
    Ok(upgraded)
}

/// Runs `step`; a panic in it (a user's recorder or log layer) ends the step, not the thread.
fn isolated(step: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
}

fn spawn_and_wait(state: &UpgradeState, life: &Life) -> Result<u32, UpgradeError> {
    let program = state.program.clone().map_err(|error| UpgradeError::Spawn {
        program: PathBuf::from("<current executable>"),
        error,
    })?;
    let spawn_error = |error: String| UpgradeError::Spawn {
        program: program.clone(),
        error,
    };
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| spawn_error(format!("socket pair: {e}")))?;
    let mut names: Vec<String> = Vec::new();
    let mut mappings = Vec::new();
    for (_, name, fd) in lock(&state.listeners).iter() {
        let fd = fd
            .try_clone()
            .map_err(|e| spawn_error(format!("duplicate the socket of {name}: {e}")))?;
        mappings.push(FdMapping {
            parent_fd: fd,
            child_fd: 3 + i32::try_from(names.len()).unwrap_or(i32::MAX - 3),
        });
        names.push(name.clone());
    }
    mappings.push(FdMapping {
        parent_fd: OwnedFd::from(theirs),
        child_fd: 3 + i32::try_from(names.len()).unwrap_or(i32::MAX - 3),
    });
    names.push(READY_NAME.to_owned());

    let mut command = std::process::Command::new(&program);
    command
        .args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(PARENT_ENV, std::process::id().to_string())
        .env(GENERATION_ENV, generation().saturating_add(1).to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env_remove("WATCHDOG_PID");
    command
        .fd_mappings(mappings)
        .map_err(|e| spawn_error(e.to_string()))?;
    state.sharing.store(true, Ordering::Release);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            state.sharing.store(false, Ordering::Release);
            return Err(spawn_error(e.to_string()));
        }
    };
    // Closes this process's copies of the successor's ends: its exit is then an end of file.
    drop(command);
    let pid = child.id();
    state.successor.store(pid, Ordering::Release);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tracing::info!(target: "finale", successor_pid = pid, program = %program.display(), "upgrade: successor started");
        wait_ready(state, life, &mut ours, &mut child, pid)
    }));
    let result = match waited {
        Ok(result) => result,
        Err(panic) => {
            // A log layer of the user's panicked while the successor started: one that is not
            // waited for is not to serve (stopped and reaped), unless its hand-off won already.
            if life.handover_pid() != Some(pid) {
                isolated(|| stop(&mut child, pid));
                let _ = child.kill();
                let _ = child.wait();
                state.successor.store(0, Ordering::Release);
                state.sharing.store(false, Ordering::Release);
            }
            std::panic::resume_unwind(panic)
        }
    };
    state.successor.store(0, Ordering::Release);
    if result.is_err() {
        // Stopped and reaped: the sockets are this process's alone again.
        state.sharing.store(false, Ordering::Release);
    }
    result
}

/// Waits for the successor's `READY=1`, at most the ready timeout; a shutdown requested
/// meanwhile abandons the upgrade (the service is to stop, not to be replaced).
fn wait_ready(
    state: &UpgradeState,
    life: &Life,
    ours: &mut UnixStream,
    child: &mut std::process::Child,
    pid: u32,
) -> Result<u32, UpgradeError> {
    /// How often the wait looks at whether the shutdown was requested.
    const SLICE: Duration = Duration::from_millis(20);
    enum End {
        Exited,
        TimedOut,
        Aborted,
    }
    let timeout = state.config.ready_timeout_value();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let ended = loop {
        if life.shutdown_won() {
            break End::Aborted;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break End::TimedOut;
        }
        if ours.set_read_timeout(Some(left.min(SLICE))).is_err() {
            break End::TimedOut;
        }
        let mut buf = [0u8; 64];
        match ours.read(&mut buf) {
            Ok(0) => break End::Exited,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(READY_LINE.len()).any(|w| w == READY_LINE) {
                    // One decision, against the shutdown's request: a shutdown requested
                    // before this instant (within the last slice too) wins; one after it is
                    // the hand-off's.
                    if !life.claim_handover(pid) {
                        break End::Aborted;
                    }
                    // Now, not once the caller hears of it: a signal's request may start the
                    // sequence first, and its servers must leave the sockets alone.
                    state.handed_off.store(true, Ordering::Release);
                    return Ok(pid);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break End::Exited,
        }
    };
    // It closed its end: it exited (or crashed) before it was ready, or it closed the socket
    // and runs on (a program that closes the descriptors it inherits). Its exit is waited for
    // until the ready timeout (or the shutdown), not for ever: then it is stopped.
    let ended = match ended {
        End::Exited => loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(UpgradeError::Exited {
                        pid,
                        status: status.to_string(),
                    });
                }
                Ok(None) if life.shutdown_won() => break End::Aborted,
                Ok(None) if Instant::now() >= deadline => break End::TimedOut,
                // Polling the child's exit, bounded by the ready timeout.
                Ok(None) => std::thread::sleep(SLICE.min(Duration::from_millis(10))),
                Err(e) => {
                    return Err(UpgradeError::Exited {
                        pid,
                        status: format!("unknown ({e})"),
                    });
                }
            }
        },
        other => other,
    };
    match ended {
        // (`Exited` was waited for above: it ends there, or as one of the other two.)
        End::Exited | End::TimedOut => {
            stop(child, pid);
            Err(UpgradeError::NotReady {
                pid,
                waited: timeout,
            })
        }
        End::Aborted => {
            // In the report already: this process may be gone before the successor is.
            let abandoned = UpgradeError::Aborted { pid };
            lock(&state.failed).push(abandoned.to_string());
            stop(child, pid);
            Err(abandoned)
        }
    }
}

/// Stops a successor that will not take over: SIGTERM first, so that its own finale drains the
/// connections it already accepted from the shared sockets, then SIGKILL if it is still there
/// after [`STOP_WAIT`]; reaped either way.
fn stop(child: &mut std::process::Child, pid: u32) {
    if signal(pid, nix::sys::signal::Signal::SIGTERM) {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                // Polling the child's exit, bounded by the deadline.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
        tracing::warn!(target: "finale", successor_pid = pid, "the successor did not stop within {STOP_WAIT:?}: killed");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to the process `pid` (a successor this process started); whether it went.
fn signal(pid: u32, signal: nix::sys::signal::Signal) -> bool {
    i32::try_from(pid)
        .is_ok_and(|raw| nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).is_ok())
}

/// In a successor: the socket on which to report ready, if this process was started by an
/// upgrade.
pub(crate) fn ready_reporter() -> Option<ReadyReporter> {
    std::env::var_os(PARENT_ENV)?;
    let stream = crate::platform::systemd::take_unix_named(READY_NAME)?;
    Some(ReadyReporter {
        stream: std::sync::Mutex::new(Some(stream)),
    })
}

/// Writes `READY=1` to the old process when graceful start is done.
#[derive(Debug)]
pub(crate) struct ReadyReporter {
    stream: std::sync::Mutex<Option<UnixStream>>,
}

impl Observer for ReadyReporter {
    fn started(&self, _shared: &Shared) {
        // Sockets of servers this version no longer has: refused from now on, not queued for
        // nobody.
        let closed = crate::platform::systemd::close_untaken();
        if !closed.is_empty() {
            tracing::warn!(
                target: "finale",
                sockets = %closed.join(", "),
                "upgrade: passed sockets no server took were closed"
            );
        }
        if let Some(mut stream) = lock(&self.stream).take()
            && let Err(e) = io::Write::write_all(&mut stream, READY_LINE)
        {
            tracing::warn!(target: "finale", error = %e, "upgrade: could not report ready to the old process");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Finale;

    /// The successor's `READY=1` won (the upgrade thread claimed the hand-off) and a signal's
    /// request came in the instant before the thread marked the hand-off done: the request is
    /// the hand-off's, and so is the sequence it starts. It must not treat the upgrade as one
    /// still under way: no "upgrade abandoned" wait (which would SIGKILL a successor that won
    /// once its patience ran out), no drain delay. It waits instead for the hand-off to be
    /// completed (systemd's `MAINPID=` may wait for room in a full queue): the process must not
    /// end before the platform was told. Here the upgrade completes 300 ms into Announce.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_request_between_the_claim_and_the_hand_off_flag_is_the_hand_offs() {
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(crate::Environment::Local)
            .upgrade(Upgrade::new().signal(None))
            .build()
            .unwrap();
        let shared = finale.shared.clone();
        let upgrade = state(&shared).unwrap();
        // What the upgrade thread has done at that instant: started, ready line read, claimed.
        upgrade.busy.store(true, Ordering::Release);
        upgrade.idle.send_replace(false);
        assert!(shared.life.claim_handover(4242));
        assert!(
            !finale.handle().trigger("signal"),
            "substituted, not the caller's"
        );
        assert!(matches!(
            shared.reason(),
            Some(Reason::Upgrade {
                successor_pid: 4242
            })
        ));
        assert!(shared.upgraded());
        // The upgrade's own task completes the hand-off a moment later.
        let completing = {
            let (shared, upgrade) = (shared.clone(), upgrade.clone());
            tokio::spawn(async move {
                shared.life.phase_started[crate::Phase::Announce.index()]
                    .cancelled()
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                upgrade.handed_off.store(true, Ordering::Release);
                upgrade.idle.send_replace(true);
            })
        };
        let report = finale.run().await;
        completing.await.unwrap();
        let text = report.to_string();
        assert!(!text.contains("upgrade abandoned"), "{text}");
        assert!(text.contains("clean"), "{text}");
        let announce = &report.phases[crate::Phase::Announce.index()];
        assert!(
            announce.duration >= Duration::from_millis(300),
            "the Announce did not wait for the hand-off: {text}"
        );
        assert!(
            announce
                .entries
                .iter()
                .any(|e| e.name == "upgrade hand-over" && e.outcome.is_completed()),
            "{text}"
        );
    }

    /// A successor of the tests' own: a shell script, `body`, which writes its pid to
    /// `$PID_FILE` (`finale.ready` is its fd 3: no listener is handed over here). Killed
    /// (SIGKILL, by the pid it wrote) and its files removed when dropped, whatever the test's
    /// outcome.
    struct Successor {
        dir: std::path::PathBuf,
        script: std::path::PathBuf,
        pid_file: std::path::PathBuf,
    }

    impl Successor {
        fn new(name: &str, body: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("finale-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let script = dir.join("successor.sh");
            let pid_file = dir.join("successor.pid");
            std::fs::write(
                &script,
                format!("#!/bin/sh\nPID_FILE='{}'\n{body}", pid_file.display()),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            Self {
                dir,
                script,
                pid_file,
            }
        }

        /// A finale whose upgrades start this successor.
        fn finale(&self, shape: impl FnOnce(crate::Builder) -> crate::Builder) -> Finale {
            let builder = Finale::builder()
                .no_signals()
                .read_env(false)
                .environment(crate::Environment::Local);
            shape(builder).build().unwrap()
        }

        /// The upgrade that starts this successor.
        fn upgrade(&self) -> Upgrade {
            Upgrade::new().signal(None).program(&self.script)
        }

        /// Its pid, once it started.
        fn pid(&self) -> Option<u32> {
            std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|pid| pid.trim().parse().ok())
        }

        /// Whether it runs (started, and neither gone nor a zombie).
        fn alive(&self) -> bool {
            self.pid().is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    !stat
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
            })
        }
    }

    impl Drop for Successor {
        fn drop(&mut self) {
            if let Some(pid) = self.pid() {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// How a caller lets go of `Handle::upgrade`'s future while the successor starts.
    #[derive(Clone, Copy, Debug)]
    enum GiveUp {
        /// A timeout on the caller's runtime.
        Timeout,
        /// A timeout on a scratch runtime, which is then dropped.
        RuntimeDropped,
        /// Polled once with no runtime at all, then dropped.
        NoRuntime,
    }

    /// The caller lets go of `Handle::upgrade` while the successor starts (it reports ready
    /// 0.3 s after it started): the upgrade still runs to its end on its own thread. The
    /// hand-off is completed (the shutdown requested as the upgrade's, nothing left under way)
    /// rather than left half done with both processes serving and every later upgrade refused.
    #[tokio::test]
    async fn an_upgrade_whose_caller_gave_up_still_completes() {
        for give_up in [GiveUp::Timeout, GiveUp::RuntimeDropped, GiveUp::NoRuntime] {
            caller_gives_up(give_up).await;
        }
    }

    async fn caller_gives_up(give_up: GiveUp) {
        let successor = Successor::new(
            &format!("upgrade-dropped-{give_up:?}"),
            "echo $$ > \"$PID_FILE\"\nsleep 0.3\nprintf 'READY=1\\n' >&3\nexec sleep 30\n",
        );
        let finale = successor.finale(|b| b.upgrade(successor.upgrade()));
        let shared = finale.shared.clone();
        let handle = finale.handle();
        match give_up {
            GiveUp::Timeout => {
                let gave_up =
                    tokio::time::timeout(Duration::from_millis(50), handle.upgrade()).await;
                assert!(gave_up.is_err(), "the successor reports ready only later");
            }
            GiveUp::RuntimeDropped => std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let gave_up = runtime.block_on(async {
                    tokio::time::timeout(Duration::from_millis(50), handle.upgrade()).await
                });
                assert!(gave_up.is_err(), "the successor reports ready only later");
                drop(runtime);
            })
            .join()
            .unwrap(),
            GiveUp::NoRuntime => std::thread::spawn(move || {
                let mut upgrade = Box::pin(handle.upgrade());
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(upgrade.as_mut().poll(&mut cx).is_pending());
            })
            .join()
            .unwrap(),
        }
        // Bounded: the successor is ready 0.3 s after it started.
        let until = Instant::now() + Duration::from_secs(10);
        while shared.reason().is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reason = shared.reason();
        assert!(
            matches!(reason, Some(Reason::Upgrade { .. })),
            "{give_up:?}: the hand-off was left half done: {reason:?}"
        );
        let upgrade = state(&shared).unwrap();
        assert!(
            !upgrade.in_progress(),
            "{give_up:?}: an upgrade still under way"
        );
        assert!(
            *upgrade.idle.borrow(),
            "{give_up:?}: the hand-off was not completed"
        );
    }

    /// Counts the upgrade's `ready` outcome by panicking: a user's recorder gone wrong.
    struct PanicsOnReady;

    impl crate::names::Recorder for PanicsOnReady {
        fn add(&self, metric: &crate::names::Metric, labels: crate::names::Labels<'_>, _: u64) {
            if metric.name == crate::names::metric::UPGRADES_TOTAL.name
                && labels.contains(&("outcome", "ready"))
            {
                panic!("a recorder that panics on the hand-off");
            }
        }

        fn set(&self, _: &crate::names::Metric, _: crate::names::Labels<'_>, _: f64) {}
    }

    /// The upgrade thread panics after the hand-off won (in a recorder of the user's): systemd
    /// still hears `MAINPID=`, the shutdown is still requested as the hand-off's, the caller
    /// hears of the successor, and the process is not left serving beside it, refusing every
    /// later upgrade.
    #[tokio::test]
    async fn a_panic_after_the_hand_off_won_still_shuts_down() {
        let successor = Successor::new(
            "upgrade-panicked",
            "echo $$ > \"$PID_FILE\"\nprintf 'READY=1\\n' >&3\nexec sleep 30\n",
        );
        let dir = &successor.dir;
        let notify = dir.join("notify");
        let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        crate::platform::systemd::TEST_NOTIFY_SOCKET
            .with(|socket| *socket.borrow_mut() = Some(notify.clone()));
        let finale = successor.finale(|b| b.systemd_notify(true).upgrade(successor.upgrade()));
        crate::platform::systemd::TEST_NOTIFY_SOCKET.with(|socket| socket.borrow_mut().take());
        let shared = finale.shared.clone();
        shared.add_recorder(Arc::new(PanicsOnReady));
        let answer = finale.handle().upgrade().await;
        let reason = shared.reason();
        let again = finale.handle().upgrade().await;
        // What systemd heard: every datagram up to `MAINPID=`, or until none comes (bounded).
        let mut heard = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = systemd.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if heard.last().is_some_and(|m| m.starts_with("MAINPID=")) {
                break;
            }
        }
        assert!(answer.is_ok(), "the successor serves: {answer:?}");
        let successor = answer.as_ref().map(|u| u.successor_pid).unwrap_or_default();
        assert!(
            heard
                .iter()
                .any(|m| m.starts_with(&format!("MAINPID={successor}\n"))),
            "systemd never heard MAINPID=: {heard:?}"
        );
        assert!(
            matches!(reason, Some(Reason::Upgrade { .. })),
            "no shutdown requested: {reason:?}"
        );
        assert_eq!(again, Err(UpgradeError::ShuttingDown));
        assert!(*state(&shared).unwrap().idle.borrow());
    }

    /// A shutdown wins while the successor starts, and the successor ignores SIGTERM: the
    /// Announce phase kills it (SIGKILL) before its own deadline, however little time the phase
    /// has, and whatever Announce hooks run first, so that no orphan outlives this process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_successor_never_outlives_the_announce_phase() {
        type Shape = fn(crate::Builder) -> crate::Builder;
        let shapes: [(&str, Shape, bool); 2] = [
            (
                "300 ms before the Telemetry reserve",
                |b| {
                    b.total_budget(Duration::from_secs(3))
                        .telemetry_reserve(Duration::from_millis(2_700))
                },
                false,
            ),
            ("a 900 ms Announce hook first", |b| b, true),
        ];
        for (round, (what, shape, slow_hook)) in shapes.into_iter().enumerate() {
            // Never ready, and deaf to SIGTERM (ignored across the `exec`) by the time its pid
            // is known.
            let successor = Successor::new(
                &format!("upgrade-orphan-{round}"),
                "trap '' TERM\necho $$ > \"$PID_FILE\"\nexec sleep 30\n",
            );
            let finale = successor.finale(|b| shape(b.upgrade(successor.upgrade())));
            if slow_hook {
                finale
                    .hook(
                        crate::Hook::new(crate::Phase::Announce, "slow", |_| {
                            tokio::time::sleep(Duration::from_millis(900))
                        })
                        .order(-10),
                    )
                    .unwrap();
            }
            let handle = finale.handle();
            let upgrading = tokio::spawn(async move { handle.upgrade().await });
            // Bounded: until the successor has started.
            let until = Instant::now() + Duration::from_secs(10);
            while successor.pid().is_none() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let pid = successor.pid().expect("the successor started");
            finale.handle().trigger("stop");
            let report = finale.run().await;
            let alive = successor.alive();
            let answer = upgrading.await.unwrap();
            assert!(
                !alive,
                "{what}: the successor {pid} outlived the run\n{report}"
            );
            assert!(
                matches!(answer, Err(UpgradeError::Aborted { .. })),
                "{what}: {answer:?}"
            );
        }
    }

    /// A successor that closes its ready socket and runs on (a program that closes the
    /// descriptors it inherits) is not waited for past the ready timeout: it is stopped, and
    /// the upgrade fails as not ready, the old process serving on.
    #[tokio::test]
    async fn a_successor_that_closes_its_ready_socket_is_not_waited_for_for_ever() {
        let successor = Successor::new(
            "upgrade-closed",
            "echo $$ > \"$PID_FILE\"\nexec 3>&-\nexec sleep 30\n",
        );
        let finale = successor.finale(|b| {
            b.upgrade(
                successor
                    .upgrade()
                    .ready_timeout(Duration::from_millis(300)),
            )
        });
        let answer = tokio::time::timeout(Duration::from_secs(10), finale.handle().upgrade()).await;
        let alive = successor.alive();
        assert!(
            matches!(answer, Ok(Err(UpgradeError::NotReady { .. }))),
            "{answer:?}"
        );
        assert!(!alive, "the successor {:?} runs on", successor.pid());
        assert!(finale.shared.reason().is_none(), "still serving");
    }
}
