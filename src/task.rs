//! Tracked tasks: background workers and services that live until the shutdown stops them.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::handle::Handle;
use crate::hook::{HookOutput, WorkFn, work_fn};
use crate::phase::Phase;
use crate::track::StopToken;

/// What a running task gets: its stop signal, its readiness switch and a handle to the shutdown.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub(crate) name: Cow<'static, str>,
    pub(crate) stop: StopToken,
    pub(crate) ready: StopToken,
    pub(crate) handle: Handle,
}

impl TaskContext {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The signal to stop: cancelled when the task's stop phase starts (the Workers phase for
    /// [`Task::worker`], the Drain phase for [`Task::service`]). Pass
    /// `ctx.stop_token().cancelled_owned()` to axum's `with_graceful_shutdown`.
    pub fn stop_token(&self) -> StopToken {
        self.stop.clone()
    }

    /// Waits until the task should stop. Cancel safe.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Whether the task should stop. One atomic load.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Reports the task ready: graceful start waits for this from every [`Task::service`].
    /// Calling it again does nothing.
    pub fn set_ready(&self) {
        self.ready.cancel();
    }

    /// A handle to the shutdown, to trigger it or watch its progress.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// A named, tracked background task.
///
/// finale spawns it at once, tells it to stop when its stop phase starts and awaits it in that
/// phase, bounded by the phase's deadline (or the task's own [`timeout`](Task::timeout)); one that
/// does not stop in time is aborted and reported.
///
/// - [`Task::worker`]: a background job (queue consumer, ticker, mailer). Stops in the
///   [`Workers`](Phase::Workers) phase, after the servers have drained, so requests still in flight
///   can rely on it. Ready at once; not critical unless [`critical(true)`](Task::critical). A
///   worker that returns `Ok` on its own has simply finished its job.
/// - [`Task::service`]: something that serves (an HTTP or gRPC server). Stops in the
///   [`Drain`](Phase::Drain) phase. Graceful start waits until it calls
///   [`TaskContext::set_ready`]; if it fails first, the start fails (exit code 3). Critical by
///   default: a service that fails *or ends on its own* before the shutdown requests the
///   shutdown ([`Reason::TaskFailed`](crate::Reason::TaskFailed)), since the process no longer
///   serves what it should. A non-critical service that ends turns readiness off instead.
///
/// A closure that panics, before or after it returns its future, is isolated like a failing
/// task: the panic is recorded as the task's outcome.
///
/// # Examples
///
/// ```
/// use finale::{Finale, Task};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), finale::ConfigError> {
/// let finale = Finale::builder().no_signals().build()?;
/// finale.spawn(Task::worker("ticker", |ctx| async move {
///     while !ctx.is_stopping() {
///         tokio::select! {
///             _ = ctx.stopped() => break,
///             _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => { /* tick */ }
///         }
///     }
/// }).critical(true))?;
/// # Ok(())
/// # }
/// ```
pub struct Task {
    pub(crate) name: Cow<'static, str>,
    pub(crate) stop_in: Phase,
    pub(crate) critical: bool,
    pub(crate) needs_ready: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) run: WorkFn<TaskContext>,
}

impl Task {
    fn new<F, Fut>(name: Cow<'static, str>, stop_in: Phase, f: F) -> Self
    where
        F: FnOnce(TaskContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HookOutput,
    {
        Self {
            name,
            stop_in,
            critical: false,
            needs_ready: false,
            timeout: None,
            run: work_fn(f),
        }
    }

    /// A background worker, stopped and awaited in the Workers phase.
    pub fn worker<F, Fut>(name: impl Into<Cow<'static, str>>, f: F) -> Self
    where
        F: FnOnce(TaskContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HookOutput,
    {
        Self::new(name.into(), Phase::Workers, f)
    }

    /// A service, awaited ready at start, stopped and awaited in the Drain phase. Critical.
    pub fn service<F, Fut>(name: impl Into<Cow<'static, str>>, f: F) -> Self
    where
        F: FnOnce(TaskContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HookOutput,
    {
        let mut task = Self::new(name.into(), Phase::Drain, f);
        task.critical = true;
        task.needs_ready = true;
        task
    }

    /// Whether the task is critical. A critical task that fails (an error or a panic) before the
    /// shutdown triggers the shutdown with [`Reason::TaskFailed`](crate::Reason::TaskFailed); so
    /// does a critical [service](Task::service) that ends on its own. A non-critical task's
    /// failure is logged and reported, and the service keeps running.
    ///
    /// Default: `false` for [`worker`](Task::worker), `true` for [`service`](Task::service).
    #[must_use]
    pub fn critical(mut self, critical: bool) -> Self {
        self.critical = critical;
        self
    }

    /// Stops and awaits the task in `phase` instead of its default.
    #[must_use]
    pub fn stop_in(mut self, phase: Phase) -> Self {
        self.stop_in = phase;
        self
    }

    /// Bounds the wait for the task in its stop phase, within the phase's own deadline.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.name)
            .field("stop_in", &self.stop_in)
            .field("critical", &self.critical)
            .field("needs_ready", &self.needs_ready)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
