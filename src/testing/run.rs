//! [`Run`]: a `Finale` running inside a test, stopped with virtual signals.

use tokio::task::JoinHandle;

use crate::handle::Handle;
use crate::report::{Reason, ShutdownReport};
use crate::run::finale::Finale;
use crate::signal::Signal;

/// A [`Finale`] running inside a test: spawned on the test's runtime, stopped with a virtual
/// signal, its [`ShutdownReport`] awaited.
///
/// A *virtual* signal does what the supervisor does with a real one, without the OS: the first
/// requests the shutdown with [`Reason::Signal`] (so the report reads exactly as after a real
/// `SIGTERM`), the second escalates it, a third changes nothing (a real process would exit at
/// once; see [`SignalEffect`]). No signal handler is needed: build with
/// [`testing::builder`](super::builder), which installs none.
///
/// # Examples
///
/// A drain delay of 5 s, on paused time: the test takes no time, and the report's durations are
/// exact.
///
/// ```
/// use std::time::Duration;
/// use finale::{Phase, Task, testing};
///
/// #[tokio::main(flavor = "current_thread", start_paused = true)]
/// async fn main() {
///     let finale = testing::builder()
///         .drain_delay(Duration::from_secs(5))
///         .build()
///         .unwrap();
///     finale
///         .spawn(Task::service("api", |ctx| async move {
///             ctx.set_ready();
///             ctx.stopped().await;
///         }))
///         .unwrap();
///
///     let run = testing::Run::start(finale);
///     run.started().await;
///     run.sigterm();
///     let report = run.report().await;
///
///     testing::assert_clean(&report);
///     assert_eq!(report.exit_code, 0);
///     assert_eq!(report.reason.to_string(), "signal SIGTERM");
///     assert_eq!(report.phase(Phase::Announce).unwrap().duration, Duration::from_secs(5));
/// }
/// ```
#[derive(Debug)]
pub struct Run {
    handle: Handle,
    run: JoinHandle<ShutdownReport>,
}

/// What a virtual signal did: what the real one would have done to the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalEffect {
    /// The first: the shutdown was requested, with [`Reason::Signal`].
    Requested,
    /// The shutdown was already requested: this one escalated it, as a second signal does.
    Escalated,
    /// A third signal, or one after the run finished: a real process would now exit at once
    /// (with the [`Immediate`](crate::ShutdownStatus::Immediate) code, or the report's). The
    /// virtual signal changes nothing, so the test goes on.
    WouldExit,
}

impl Run {
    /// Spawns [`Finale::run`] on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(finale: Finale) -> Self {
        let handle = finale.handle();
        Self {
            handle,
            run: tokio::spawn(finale.run()),
        }
    }

    /// The running service's handle: its phases, readiness and in-flight tracker.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Waits until graceful start has completed (every [`Task::service`](crate::Task::service)
    /// reported ready).
    ///
    /// # Panics
    ///
    /// If the shutdown is requested before graceful start completes (a service failed to start,
    /// say): the panic message says why. Await [`report`](Run::report) instead to test a failed
    /// start.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn started(&self) {
        let health = self.handle.health();
        tokio::select! {
            biased;
            () = health.started() => {}
            () = self.handle.shutdown_requested() => {
                if !health.is_started() {
                    let reason = self.handle.reason().map(|r| r.to_string()).unwrap_or_default();
                    panic!("the shutdown was requested before graceful start completed: {reason}");
                }
            }
        }
    }

    /// Sends a virtual `SIGTERM`; see [`signal`](Run::signal).
    pub fn sigterm(&self) -> SignalEffect {
        self.signal(Signal::Terminate)
    }

    /// Sends a virtual `signal`: the first requests the shutdown with [`Reason::Signal`], the
    /// next escalates it, as the supervisor does with real ones. Whether the `Finale` was built
    /// to listen for `signal` does not matter.
    pub fn signal(&self, signal: Signal) -> SignalEffect {
        let shared = &self.handle.shared;
        if shared.life.finished.is_cancelled() {
            return SignalEffect::WouldExit;
        }
        if shared.request(Reason::Signal(signal)) {
            return SignalEffect::Requested;
        }
        if shared.escalate() {
            tracing::warn!(
                target: "finale",
                %signal,
                "second signal (virtual): abandoning the drain, flushing telemetry"
            );
            return SignalEffect::Escalated;
        }
        tracing::warn!(
            target: "finale",
            %signal,
            "third signal (virtual): a real process would exit at once"
        );
        SignalEffect::WouldExit
    }

    /// Waits for the run to end and returns its report.
    ///
    /// The sequence is bounded by its budget: on paused time it takes no real time. (A hook that
    /// blocks its thread past the budget makes finale's supervisor end the process, test runner
    /// included, as it would end the service: the supervisor's deadlines are on the real clock,
    /// and so is the wait of a `run()` that finds the end the supervisor's, so paused time
    /// changes neither.)
    ///
    /// # Panics
    ///
    /// If the run panicked (finale isolates the panics of hooks and tasks; this is for its own).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the run going on its own.
    pub async fn report(self) -> ShutdownReport {
        match self.run.await {
            Ok(report) => report,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the run was cancelled: {e}"),
        }
    }
}
