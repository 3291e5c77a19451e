//! Readiness and liveness, shared by finale, the server integrations and user code.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use super::wait_until;

/// The service's health as load balancers and orchestrators see it.
///
/// - **Readiness** is off until graceful start has seen every registered service report ready,
///   and off again from the moment the [`Announce`](crate::Phase::Announce) phase starts, so the
///   load balancer stops sending new traffic while the service still serves.
/// - **Liveness** is not tracked here: a process that can answer is alive, through the whole
///   shutdown (a failing liveness probe would make the orchestrator kill it before its telemetry
///   is out). The health endpoints answer `/livez` with `200` for as long as they answer at all.
///
/// Cheap to clone; every check is one atomic load.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().no_signals().build().unwrap();
/// let health = finale.handle().health();
/// assert!(!health.is_ready()); // not started yet
/// # }
/// ```
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started: AtomicBool,
    announced: AtomicBool,
    /// A non-critical service ended on its own.
    withdrawn: AtomicBool,
    not_ready_answers: AtomicU64,
    probed: Notify,
    /// Woken when graceful start completes.
    started_notify: Notify,
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                started: AtomicBool::new(false),
                announced: AtomicBool::new(false),
                withdrawn: AtomicBool::new(false),
                not_ready_answers: AtomicU64::new(0),
                probed: Notify::new(),
                started_notify: Notify::new(),
            }),
        }
    }

    /// Whether the service should receive new traffic: started, not shutting down, and no
    /// service it runs has ended on its own.
    pub fn is_ready(&self) -> bool {
        self.inner.started.load(Ordering::Acquire)
            && !self.inner.announced.load(Ordering::Acquire)
            && !self.inner.withdrawn.load(Ordering::Acquire)
    }

    /// Whether the shutdown was announced (readiness off for good). One relaxed load.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn is_announced(&self) -> bool {
        self.inner.announced.load(Ordering::Relaxed)
    }

    /// Whether graceful start completed (every registered service reported ready).
    pub(crate) fn is_started(&self) -> bool {
        self.inner.started.load(Ordering::Acquire)
    }

    /// Turns readiness off without a shutdown: a non-critical service ended on its own, so the
    /// instance no longer offers everything it should. Returns whether this call did it.
    pub(crate) fn withdraw(&self) -> bool {
        !self.inner.withdrawn.swap(true, Ordering::AcqRel)
    }

    /// Records that a readiness probe was answered "not ready".
    ///
    /// Health endpoints call this for every `503` they serve during the shutdown; the drain delay
    /// can end early once the load balancer has seen enough of them (see
    /// [`DrainDelay`](crate::DrainDelay)).
    pub fn record_not_ready_answer(&self) {
        if self.inner.announced.load(Ordering::Acquire) {
            self.inner.not_ready_answers.fetch_add(1, Ordering::AcqRel);
            self.inner.probed.notify_waiters();
        }
    }

    /// How many "not ready" answers were served since the shutdown was announced.
    pub fn not_ready_answers(&self) -> u64 {
        self.inner.not_ready_answers.load(Ordering::Acquire)
    }

    /// Waits until at least `n` "not ready" answers were served since the announce.
    pub(crate) async fn wait_not_ready_answers(&self, n: u64) {
        wait_until(&self.inner.probed, || self.not_ready_answers() >= n).await;
    }

    /// Marks graceful start as complete: readiness turns on (unless already announced).
    pub(crate) fn set_started(&self) {
        self.inner.started.store(true, Ordering::Release);
        self.inner.started_notify.notify_waiters();
    }

    /// Waits until graceful start has completed (every registered service reported ready).
    /// Never returns if the start fails; select it against
    /// [`Handle::shutdown_requested`](crate::Handle::shutdown_requested).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn started(&self) {
        wait_until(&self.inner.started_notify, || self.is_started()).await;
    }

    /// Turns readiness off for good. Returns whether this call did it.
    pub(crate) fn announce(&self) -> bool {
        !self.inner.announced.swap(true, Ordering::AcqRel)
    }
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish()
    }
}
