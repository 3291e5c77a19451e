//! The cloneable [`Handle`]: trigger the shutdown, wait for its phases, query its state.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::config::Budget;
use crate::phase::Phase;
use crate::report::Reason;
use crate::state::{Shared, State};
use crate::track::{Cancelled, Health, InFlight, StopToken};

/// A cheap, cloneable handle to the shutdown: trigger it, wait for its phases, query its state.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().no_signals().build().unwrap();
/// let handle = finale.handle();
/// assert!(!handle.is_shutdown_requested());
/// assert!(handle.trigger("maintenance"));
/// assert!(!handle.trigger("again")); // the first reason wins
/// handle.shutdown_requested().await;
/// let report = finale.run().await;
/// assert_eq!(report.exit_code, 0);
/// # }
/// ```
///
/// Hand a phase to a server you run yourself: the future is `Send + 'static`.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn f(finale: finale::Finale, listener: tokio::net::TcpListener, app: axum::Router) {
/// use finale::Phase;
/// let stop = finale.handle().phase_started(Phase::Drain);
/// tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await });
/// # }
/// ```
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Requests the shutdown with a reason, recorded as [`Reason::Requested`]. Returns `true` if
    /// this call started the shutdown, `false` if it had already been requested.
    pub fn trigger(&self, reason: impl Into<Cow<'static, str>>) -> bool {
        self.shared.request(Reason::Requested(reason.into()))
    }

    /// Requests the shutdown (with `reason`, as [`trigger`](Handle::trigger)) when `token` is
    /// cancelled: the other direction of
    /// [`StopToken::cancellation_token`], for an application or library whose own root
    /// `CancellationToken` means "stop the service". A task on the current runtime waits for
    /// the token, and ends when the shutdown is requested by anything else.
    ///
    /// # Examples
    ///
    /// ```
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), finale::ConfigError> {
    /// let finale = finale::Finale::builder().no_signals().build()?;
    /// let root = CancellationToken::new();
    /// finale.handle().trigger_on_cancel(root.clone(), "root token cancelled")?;
    /// root.cancel(); // somewhere in the application
    /// let report = finale.run().await;
    /// assert_eq!(report.reason, finale::Reason::Requested("root token cancelled".into()));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::NoRuntime`](crate::ConfigError::NoRuntime) outside a tokio runtime.
    #[cfg(feature = "tokio-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio-util")))]
    pub fn trigger_on_cancel(
        &self,
        token: tokio_util::sync::CancellationToken,
        reason: impl Into<Cow<'static, str>>,
    ) -> Result<(), crate::ConfigError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| crate::ConfigError::NoRuntime)?;
        let (handle, reason) = (self.clone(), reason.into());
        runtime.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {
                    handle.trigger(reason);
                }
                () = handle.shutdown_requested() => {}
            }
        });
        Ok(())
    }

    /// Escalates a running shutdown, as a second signal does: the current phase is abandoned and
    /// the Telemetry phase runs with the escalation budget (never past the total budget).
    /// Returns `true` if this call escalated; `false` if the shutdown was not requested yet or
    /// was already escalated.
    pub fn escalate(&self) -> bool {
        self.shared.escalate()
    }

    /// Completes once the shutdown is requested (by a signal, [`trigger`](Handle::trigger), a
    /// failed start, a failed critical task or a panic). Owns what it needs: `Send + 'static`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn shutdown_requested(&self) -> Cancelled {
        self.shared.life.requested.clone().cancelled_owned()
    }

    /// Whether the shutdown has been requested. One atomic load.
    pub fn is_shutdown_requested(&self) -> bool {
        self.shared.is_requested()
    }

    /// Completes once `phase` starts, at once if it already has. Every phase's token fires on
    /// every path, also when a second signal skips the phase. `Send + 'static`: hand
    /// `phase_started(Phase::Drain)` to axum's `with_graceful_shutdown` or tonic's
    /// `serve_with_shutdown`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn phase_started(&self, phase: Phase) -> Cancelled {
        self.phase_token(phase).cancelled_owned()
    }

    /// The token cancelled when `phase` starts: hand `phase_token(Phase::Workers)` to background
    /// tasks that finale does not spawn itself. (Tasks spawned with
    /// [`Finale::spawn`](crate::Finale::spawn) get theirs in their
    /// [`TaskContext`](crate::TaskContext).)
    pub fn phase_token(&self, phase: Phase) -> StopToken {
        self.shared.phase_token(phase)
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// The reason of the shutdown, once requested.
    pub fn reason(&self) -> Option<Reason> {
        self.shared.reason()
    }

    /// Readiness, as `/readyz` reports it.
    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    /// The in-flight tracker the Drain phase waits on.
    pub fn in_flight(&self) -> InFlight {
        self.shared.in_flight
    }

    /// The budget this run uses.
    pub fn budget(&self) -> Budget {
        self.shared.budget
    }

    /// The deadline of `phase`, once it has started: when what is unfinished in it is abandoned.
    pub fn phase_deadline(&self, phase: Phase) -> Option<tokio::time::Instant> {
        self.shared.phase_deadline(phase)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}
