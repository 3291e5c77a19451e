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
    /// When the shutdown was announced; the origin of the two instants below.
    announced_at: std::sync::OnceLock<tokio::time::Instant>,
    /// Nanoseconds after `announced_at` of the last new connection or request (0: none).
    last_activity: AtomicU64,
    /// Nanoseconds after `announced_at` of the last "not ready" answer (0: none).
    last_probe: AtomicU64,
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
                announced_at: std::sync::OnceLock::new(),
                last_activity: AtomicU64::new(0),
                last_probe: AtomicU64::new(0),
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
    #[inline]
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
            self.stamp(&self.inner.last_probe);
            self.inner.not_ready_answers.fetch_add(1, Ordering::AcqRel);
            self.inner.probed.notify_waiters();
        }
    }

    /// Records a new connection or request (not a health probe) since the shutdown was
    /// announced, for [`DrainDelay::UntilQuiet`](crate::DrainDelay::UntilQuiet). Does nothing
    /// before the announce; one relaxed load then. finale's servers and the tower layer call it;
    /// call it from another server's accept loop or request path to feed the quiet delay.
    pub fn record_activity(&self) {
        if self.inner.announced.load(Ordering::Relaxed) {
            self.stamp(&self.inner.last_activity);
        }
    }

    fn stamp(&self, slot: &AtomicU64) {
        if let Some(at) = self.inner.announced_at.get() {
            // +1 so that "at the announce" is not "never"; a plain store (latest wins is all the
            // delay needs, and no read-modify-write is contended by concurrent requests).
            let nanos = at.elapsed().as_nanos().min(u128::from(u64::MAX - 1)) as u64 + 1;
            slot.store(nanos, Ordering::Relaxed);
        }
    }

    fn since_announce(slot: &AtomicU64) -> Option<std::time::Duration> {
        match slot.load(Ordering::Relaxed) {
            0 => None,
            n => Some(std::time::Duration::from_nanos(n - 1)),
        }
    }

    /// When, after the announce, the last new connection or request and the last "not ready"
    /// answer arrived.
    pub(crate) fn last_seen(&self) -> (Option<std::time::Duration>, Option<std::time::Duration>) {
        (
            Self::since_announce(&self.inner.last_activity),
            Self::since_announce(&self.inner.last_probe),
        )
    }

    /// Waits until `probes` "not ready" answers were served and then nothing new arrived for
    /// `idle`. Call after [`announce`](Health::announce).
    pub(crate) async fn wait_quiet(&self, probes: u64, idle: std::time::Duration) {
        if probes > 0 {
            self.wait_not_ready_answers(probes).await;
        }
        let Some(&at) = self.inner.announced_at.get() else {
            return;
        };
        loop {
            let last = Self::since_announce(&self.inner.last_activity).unwrap_or_default();
            let quiet_until = at + last + idle;
            if tokio::time::Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
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
        // The origin first: whoever sees `announced` can stamp against it.
        let _ = self.inner.announced_at.set(tokio::time::Instant::now());
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
