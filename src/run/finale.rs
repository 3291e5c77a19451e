//! [`Finale`]: collects hooks and tasks, then runs the service's life once.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ConfigError;
use crate::handle::Handle;
use crate::hook::{CatchUnwind, Hook, HookError};
use crate::report::{Reason, ShutdownReport};
use crate::run::{runtime, sequence, start};
use crate::signal::Signal;
use crate::state::{EndOwner, Refused, RunningTask, Shared, TaskResult};
use crate::task::{Task, TaskContext};
use crate::track::StopToken;

/// The orchestrator: collects hooks and tasks, then [`run`](Finale::run)s the sequence once.
///
/// # Examples
///
/// ```no_run
/// use finale::{Finale, Hook, Phase, Task};
///
/// #[tokio::main]
/// async fn main() -> Result<(), finale::ConfigError> {
///     let finale = Finale::builder().build()?;
///     finale.spawn(Task::worker("mailer", |ctx| async move {
///         ctx.stopped().await; // send what is queued, then return
///     }))?;
///     finale.hook(Hook::new(Phase::Workers, "close-db", |_| async {}))?;
///     finale.run_and_exit().await // waits for SIGTERM/SIGINT, runs the sequence, exits
/// }
/// ```
pub struct Finale {
    pub(crate) shared: Arc<Shared>,
    pub(crate) signals: Vec<Signal>,
    /// `run()` has it: dropping is no longer abandoning.
    pub(crate) running: bool,
}

impl Drop for Finale {
    fn drop(&mut self) {
        if !self.running {
            // Dropped without running (a test that builds many, a start that gave up): the
            // supervisor steps aside even while `Handle`s keep the state alive, so a later
            // trigger cannot arm a watchdog that ends the process.
            self.shared.life.abandon();
        }
    }
}

impl Finale {
    /// A cloneable handle to trigger and observe the shutdown.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Registers a hook.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`], [`ConfigError::EmptyName`] or
    /// [`ConfigError::TimeoutBeyondPhase`].
    pub fn hook(&self, hook: Hook) -> Result<(), ConfigError> {
        registered(register_hook(&self.shared, hook))
    }

    /// Spawns a tracked task on the current tokio runtime; see [`Task`].
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`], [`ConfigError::EmptyName`],
    /// [`ConfigError::TimeoutBeyondPhase`], or [`ConfigError::NoRuntime`] outside a tokio
    /// runtime.
    pub fn spawn(&self, task: Task) -> Result<(), ConfigError> {
        registered(spawn_task(&self.shared, task))
    }

    /// Awaits a tokio-util [`TaskTracker`](tokio_util::task::TaskTracker) in `phase`: when the
    /// phase starts, the tracker is [closed](tokio_util::task::TaskTracker::close) and its
    /// tasks are awaited like the phase's own [`Task`]s, before the phase's cleanup hooks in the
    /// Workers phase (an entry named `name` in the report). Tell the tracked tasks to stop with
    /// the phase's token, [`Handle::phase_token`]`(phase).`[`cancellation_token()`](StopToken::cancellation_token).
    ///
    /// Tasks still running at the phase's deadline are reported abandoned but keep running (a
    /// `TaskTracker` cannot abort them): a tracked task should stop when its token says so.
    /// `track` has no timeout of its own: a tracked task that ignores its token holds the
    /// Workers phase's cleanup hooks until the phase's deadline. To bound the wait, register
    /// the same wait as a hook with a [`timeout`](Hook::timeout):
    /// `Hook::new(phase, name, move |_| async move { tracker.close(); tracker.wait().await })`
    /// `.alongside_tasks().timeout(limit)`; the cleanup hooks then start at `limit` at the
    /// latest.
    ///
    /// # Examples
    ///
    /// ```
    /// use finale::{Finale, Phase};
    /// use tokio_util::task::TaskTracker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), finale::ConfigError> {
    /// let finale = Finale::builder().no_signals().build()?;
    /// let tracker = TaskTracker::new();
    /// let stop = finale.handle().phase_token(Phase::Workers).cancellation_token();
    /// for _ in 0..3 {
    ///     let stop = stop.clone();
    ///     tracker.spawn(async move {
    ///         stop.cancelled().await;
    ///         // finish the job
    ///     });
    /// }
    /// finale.track(Phase::Workers, "jobs", tracker)?;
    /// finale.handle().trigger("done");
    /// let report = finale.run().await;
    /// assert!(report.entry("jobs").unwrap().outcome.is_completed());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`hook`](Finale::hook): [`ConfigError::DuplicateName`] or [`ConfigError::EmptyName`].
    #[cfg(feature = "tokio-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio-util")))]
    pub fn track(
        &self,
        phase: crate::Phase,
        name: impl Into<Cow<'static, str>>,
        tracker: tokio_util::task::TaskTracker,
    ) -> Result<(), ConfigError> {
        self.hook(
            Hook::new(phase, name, move |_| async move {
                tracker.close();
                tracker.wait().await;
            })
            .alongside_tasks(),
        )
    }

    /// Runs the service's whole life: waits for graceful start (every [`Task::service`] ready),
    /// waits for the shutdown to be requested, runs the sequence and returns its report.
    ///
    /// A shutdown requested before `run` (a signal during initialisation, say) is held: the
    /// sequence starts as soon as `run` is reached, and its budget counts from the trigger.
    ///
    /// It returns a report whenever the sequence owns the end of the process (always, unless
    /// the supervisor took over first: see the caveats), also when the start fails (then with
    /// [`ShutdownStatus::StartupFailure`](crate::ShutdownStatus::StartupFailure)), and also on a
    /// runtime without the time driver, which the sequence needs (then a startup failure that
    /// says so, instead of a panic). The IO driver is not needed: signals are received on
    /// finale's own thread.
    ///
    /// # Caveats
    ///
    /// The supervisor thread started by [`build`](crate::Builder::build) bounds this call: if the
    /// sequence has not ended by the end of the total budget (a hook that blocks its thread,
    /// a wedged runtime), the supervisor flushes the telemetry it can reach from its own threads
    /// and ends the process with the deadline-overrun code. See the crate docs, "Threading and
    /// process-wide effects".
    ///
    /// The end of the process has one owner: the sequence as it ends, or the supervisor as it
    /// takes over, whichever claims it first. If the runtime unblocks after the supervisor
    /// took over and the sequence still ends, `run()` does not return into an exit of its own
    /// under the supervisor's: it waits until the supervisor ends the process (with its code,
    /// its termination message last), and returns the report only if the supervisor has not
    /// by half a second past the process's last moment (`total + safety_margin / 2` after the
    /// trigger). That wait is on the real clock, as the supervisor's deadlines are: paused
    /// tokio time does not shorten it. A short-lived thread (`finale-exit-wait`) keeps the time;
    /// if it cannot start, the thread that runs `run()` sleeps to the bound itself (on a
    /// `current_thread` runtime, the whole runtime).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future abandons the sequence where it is.
    pub async fn run(mut self) -> ShutdownReport {
        self.running = true;
        let shared = self.shared.clone();
        drop(self);
        let registry = shared.take_registry();
        let report = match runtime::check() {
            Ok(()) => {
                start::graceful_start(&shared, &registry.tasks).await;
                shared.life.requested.cancelled().await;
                sequence::shutdown(&shared, registry).await
            }
            Err(error) => sequence::without_timers(&shared, registry, error),
        };
        // The end of the process has one owner: claimed here, or by the supervisor before it
        // takes over, whichever comes first (`Life::claim_end`).
        let ours = shared.life.claim_end(EndOwner::Sequence);
        // The platform hears the ending (termination message, systemd's status). Ours: the
        // supervisor no longer takes over (its claim fails), so what bounds this is each
        // observer's own bound: the termination message's write is waited for at most 500 ms
        // and not past the process's last moment (10 ms at least), systemd's datagram never
        // blocks; a third signal still exits at once. The supervisor's: the observers leave the
        // last word to it, and we wait for its exit below.
        shared.observe(|o| o.finished(&shared, &report));
        if !ours {
            wait_for_the_supervisors_exit(&shared).await;
        }
        shared.life.finish(report.exit_code);
        report
    }

    /// [`run`](Finale::run)s, then ends the process with the report's exit code.
    ///
    /// (If the supervisor took the shutdown over before the sequence ended, the supervisor
    /// ends the process, with its own code: see [`run`](Finale::run).)
    ///
    /// # Why finale exits explicitly
    ///
    /// `std::process::exit` skips every destructor: called in the middle of the work it loses
    /// whatever buffered telemetry was waiting for a `Drop` (OTel batches, the tracing-appender
    /// buffer, a final metrics push). Returning from `main` instead drops the tokio runtime, which
    /// waits without limit for `spawn_blocking` tasks and can hang on a stuck thread (a blocked
    /// export, a read on stdin) until the platform's SIGKILL, losing everything. finale therefore
    /// flushes first, inside its budget, and only then calls `std::process::exit` with the
    /// report's code: nothing is left to lose, and nothing can keep the process alive.
    pub async fn run_and_exit(self) -> ! {
        let report = self.run().await;
        report.exit()
    }
}

impl fmt::Debug for Finale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finale")
            .field("budget", &self.shared.budget)
            .field("signals", &self.signals)
            .finish_non_exhaustive()
    }
}

/// What a `Finale` method returns for a refused registration.
fn registered(result: Result<(), Refused>) -> Result<(), ConfigError> {
    match result {
        Ok(()) => Ok(()),
        Err(Refused::Config(e)) => Err(e),
        // Only `run(self)` takes the registry, and it consumes the `Finale`: while a `&Finale`
        // exists the registry is there. (The process-wide instance reports this case itself.)
        Err(Refused::Started) => unreachable!("the registry is taken only by `Finale::run`"),
    }
}

/// Registers a hook, unless the sequence has started.
pub(crate) fn register_hook(shared: &Shared, hook: Hook) -> Result<(), Refused> {
    let (name, phase, timeout) = (hook.name.clone(), hook.phase, hook.timeout);
    shared.register(&name, phase, timeout, |registry| registry.hooks.push(hook))
}

/// Spawns a task on the current runtime and registers it, unless the sequence has started.
pub(crate) fn spawn_task(shared: &Arc<Shared>, task: Task) -> Result<(), Refused> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
    let Task {
        name,
        stop_in,
        critical,
        needs_ready,
        timeout,
        run,
    } = task;
    shared.register(&name.clone(), stop_in, timeout, |registry| {
        let ready = StopToken::new();
        if !needs_ready {
            ready.cancel();
        }
        let ctx = TaskContext {
            name: name.clone(),
            stop: shared.phase_token(stop_in),
            ready: ready.clone(),
            handle: Handle {
                shared: shared.clone(),
            },
        };
        // The user's closure runs inside this future, so a closure that panics before it returns
        // its future is caught here too.
        let fut = CatchUnwind::new(run(ctx));
        let watch = TaskWatch {
            shared: shared.clone(),
            name: name.clone(),
            critical,
            needs_ready,
            ready: ready.clone(),
        };
        let join = runtime.spawn(async move { watch.ended(fut.await) });
        registry.tasks.push(RunningTask {
            name,
            stop_in,
            timeout,
            needs_ready,
            ready,
            join,
        });
    })
}

/// What a task's end means for the service, decided when it ends.
struct TaskWatch {
    shared: Arc<Shared>,
    name: Cow<'static, str>,
    critical: bool,
    needs_ready: bool,
    ready: StopToken,
}

impl TaskWatch {
    fn ended(self, result: TaskResult) -> TaskResult {
        if !self.shared.is_requested() {
            let was_ready = self.ready.is_cancelled();
            let failure = match &result {
                Ok(Ok(())) if self.needs_ready => Some(HookError::msg(if was_ready {
                    "ended on its own before the shutdown"
                } else {
                    "ended before it was ready"
                })),
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.clone()),
                Err(panic) => Some(HookError::msg(format!("panicked: {panic}"))),
            };
            if let Some(error) = failure {
                let name = self.name.clone();
                if self.needs_ready && !was_ready {
                    self.shared.request(Reason::StartupFailed { name, error });
                } else if self.critical {
                    self.shared.request(Reason::TaskFailed { name, error });
                } else {
                    if self.needs_ready && self.shared.health.withdraw() {
                        tracing::warn!(target: "finale", task = %name, "a service ended: readiness off");
                    }
                    tracing::warn!(target: "finale", task = %name, %error, "task failed");
                }
            }
        }
        // A task that ended cannot hold up graceful start.
        self.ready.cancel();
        result
    }
}

/// How long past the process's last moment (`trigger + total + safety_margin / 2`, by when the
/// supervisor exits) `run()` still waits for a supervisor that owns the end: its termination
/// message's write may take its floor past that moment, and a loaded machine more.
const SUPERVISOR_EXIT_SLACK: Duration = Duration::from_millis(500);

/// The supervisor claimed the end of the process before the sequence did: it is delivering,
/// writes the last word and exits with its own code. `run()` does not return into an exit of
/// its own (the caller's [`ShutdownReport::exit`], or a return from `main`) that would cut the
/// supervisor's write or exit with another code: it waits for the supervisor's exit, bounded
/// by the process's last moment plus [`SUPERVISOR_EXIT_SLACK`] (a supervisor that has not
/// exited by then is stuck itself, and the report is returned).
///
/// The bound is on the std clock, the supervisor's, and is kept by a thread of its own that
/// sleeps until it and then wakes this future: no tokio timer, which a paused clock (a test's
/// `start_paused`) would move to the bound at once when the runtime goes idle. The runtime
/// keeps polling meanwhile (a gRPC exporter built on it may be what the supervisor's flush is
/// waiting for); no time driver is needed. Only if that thread cannot be started does the wait
/// block the runtime's thread instead.
async fn wait_for_the_supervisors_exit(shared: &Shared) {
    let b = &shared.budget;
    let past_last = b.total + b.safety_margin / 2 + SUPERVISOR_EXIT_SLACK;
    let until = shared.life.trigger().map_or_else(
        || std::time::Instant::now() + past_last,
        |t0| t0 + past_last,
    );
    tracing::debug!(
        target: "finale",
        "the supervisor took the shutdown over before the sequence ended: it ends the process"
    );
    let bound = StopToken::new();
    let at_bound = bound.clone();
    let spawned = std::thread::Builder::new()
        .name("finale-exit-wait".to_owned())
        .spawn(move || {
            // Never less than asked: the bound is not early.
            std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
            at_bound.cancel();
        });
    match spawned {
        Ok(_) => bound.cancelled().await,
        Err(_) => std::thread::sleep(until.saturating_duration_since(std::time::Instant::now())),
    }
    tracing::warn!(
        target: "finale",
        "the supervisor owns the end of the process but has not ended it: returning the report"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The supervisor claimed the end before the sequence ended (it took over; the runtime
    /// came back): `run()` does not return into an exit of its own under the supervisor's,
    /// but waits for it until half a second past the process's last moment, on the real
    /// clock, the supervisor's: paused tokio time, which jumps to the next timer whenever the
    /// runtime is idle, does not shorten the wait. (Here no supervisor exits: the wait runs to
    /// its bound.)
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn run_waits_for_a_supervisor_that_owns_the_end_on_the_real_clock() {
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(crate::Environment::Local)
            .total_budget(Duration::from_millis(200))
            .telemetry_reserve(Duration::from_millis(100))
            .escalation_budget(Duration::from_millis(100))
            .safety_margin(Duration::from_millis(100))
            .build()
            .unwrap();
        finale.handle().trigger("test");
        let shared = finale.shared.clone();
        assert!(shared.life.claim_end(EndOwner::Supervisor));
        let _report = finale.run().await;
        let b = shared.budget;
        let bound =
            shared.life.trigger().unwrap() + b.total + b.safety_margin / 2 + SUPERVISOR_EXIT_SLACK;
        let now = std::time::Instant::now();
        assert!(now >= bound, "returned {:?} early", bound - now);
        assert!(shared.life.finished.is_cancelled());
    }
}
