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
//!   the shutdown has started, including one requested while the upgrade begins.
//! - A server's name is the name its socket is passed under, where `:` separates the names: a
//!   server named with a `:` or a NUL byte, or named `finale.ready` (the successor's ready
//!   socket), is refused when it is registered
//!   ([`ConfigError::ServerName`](crate::ConfigError::ServerName)).
//! - Under systemd, the successor's own notifications are accepted only with
//!   `NotifyAccess=all` (or `exec`); `WATCHDOG_PID` is not passed on, so the successor's
//!   watchdog applies to it.
//! - Telemetry: both processes push and flush on their own; give each process a label of its
//!   own where a backend groups by instance (a Pushgateway group shared by both would be
//!   overwritten by whichever pushes last): [`generation`] counts the upgrades that led to this
//!   process (`FINALE_UPGRADE_GENERATION`), so `instance="host-{generation}"` or the pid tells
//!   them apart.

// Layout: `config.rs` (`Upgrade`, the settings), `error.rs` (`Upgraded`, `UpgradeError`),
// `state.rs` (the machinery of one `Finale`: under way, shared, handed off; the servers'
// sockets), `successor.rs` (the successor started with the sockets, its `READY=1` waited for,
// or stopped), `handoff.rs` (one upgrade on its own thread, from the trigger to the hand-off or
// the failure; `Handle::upgrade`), `ready.rs` (the successor's side: its generation, its
// `READY=1`), `tests.rs`.

mod config;
mod error;
mod handoff;
mod ready;
mod state;
mod successor;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::Builder;
use crate::config::ConfigError;
use crate::run::builder::Install;
use crate::state::Handover;

pub use config::{DEFAULT_READY_TIMEOUT, Upgrade};
pub use error::{UpgradeError, Upgraded};
#[cfg_attr(
    not(all(test, any(feature = "axum", feature = "hyper", feature = "tonic"))),
    allow(unused_imports)
)]
pub(crate) use ready::READY_NAME;
pub(crate) use ready::ready_reporter;
pub use ready::{GENERATION_ENV, generation};
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(unused_imports)
)]
pub(crate) use state::state;
pub use successor::STOP_WAIT;

impl Install for Upgrade {
    fn install(self: Box<Self>) -> Result<Arc<dyn Handover>, ConfigError> {
        let timeout = self.ready_timeout_value();
        if timeout.is_zero() || timeout > crate::config::MAX_DURATION {
            return Err(ConfigError::UpgradeReadyTimeout { value: timeout });
        }
        Ok(Arc::new(state::UpgradeState::new(*self)))
    }
}

// The upgrade's door on the builder (the handle's is in `handoff.rs`): defined here, so that
// the core never names the upgrade.
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
