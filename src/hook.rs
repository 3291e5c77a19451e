//! Hooks: named async functions that run in one phase of the sequence.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::phase::Phase;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error a hook or task returned, kept for the report.
///
/// Cheap to clone; [`source`](std::error::Error::source) gives the original error.
#[derive(Clone)]
pub struct HookError {
    inner: Arc<BoxError>,
}

impl HookError {
    pub(crate) fn new(error: impl Into<BoxError>) -> Self {
        Self {
            inner: Arc::new(error.into()),
        }
    }

    pub(crate) fn msg(message: impl Into<String>) -> Self {
        Self::new(message.into())
    }
}

impl fmt::Debug for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self.inner, f)
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self.inner, f)
    }
}

impl StdError for HookError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&**self.inner)
    }
}

impl PartialEq for HookError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// What a hook's or task's future may return: `()` or `Result<(), E>` for any error type that
/// converts into `Box<dyn Error + Send + Sync>` (any `std::error::Error`, `anyhow::Error`,
/// `String`, ...).
///
/// This trait is sealed.
pub trait HookOutput: sealed::Sealed + Send + 'static {
    #[doc(hidden)]
    fn into_result(self) -> Result<(), HookError>;
}

impl sealed::Sealed for () {}
impl HookOutput for () {
    fn into_result(self) -> Result<(), HookError> {
        Ok(())
    }
}

impl<E> sealed::Sealed for Result<(), E> where E: Into<BoxError> + Send + 'static {}
impl<E> HookOutput for Result<(), E>
where
    E: Into<BoxError> + Send + 'static,
{
    fn into_result(self) -> Result<(), HookError> {
        self.map_err(HookError::new)
    }
}

/// What a running hook knows about its situation.
#[derive(Clone, Debug)]
pub struct HookContext {
    pub(crate) phase: Phase,
    pub(crate) deadline: Instant,
}

impl HookContext {
    /// The phase the hook runs in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the hook will be abandoned: its own timeout or its phase's deadline, whichever is first.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// How long until the [`deadline`](HookContext::deadline).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A hook's or task's work, boxed: called with its context, it returns the future to run.
pub(crate) type WorkFn<C> = Box<dyn FnOnce(C) -> BoxFuture<Result<(), HookError>> + Send + 'static>;

/// Boxes a user's closure. The closure itself is called inside the returned future, on its
/// first poll, so a closure that panics before it returns its future is caught by the same
/// [`CatchUnwind`] as a future that panics later: both are isolated the same way.
pub(crate) fn work_fn<C, F, Fut>(f: F) -> WorkFn<C>
where
    C: Send + 'static,
    F: FnOnce(C) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: HookOutput,
{
    Box::new(move |ctx| Box::pin(async move { f(ctx).await.into_result() }))
}

/// A named async function that runs once, in one [`Phase`], when the shutdown sequence reaches it.
///
/// A phase's [tasks](crate::Task) are told to stop when it starts and are awaited from then on.
/// Its hooks run in order groups: hooks of one [`order`](Hook::order) run concurrently with each
/// other, and a group starts once the group of the next lower order has ended. In the
/// [`Workers`](Phase::Workers) phase, hooks run after the phase's tasks have ended (or been
/// abandoned at their own [`timeout`](crate::Task::timeout)), so that a cleanup hook (closing a
/// pool) never races a worker's last write; a hook that must run alongside the tasks says so
/// with [`alongside_tasks`](Hook::alongside_tasks). A task that never stops holds the hooks
/// until the phase's deadline, where they are abandoned with it: give a task that may hang its
/// own [`timeout`](crate::Task::timeout), so the hooks keep the rest of the phase. A second
/// signal gives up on the phase at once: cleanup hooks still waiting for the tasks never start
/// (reported [`Abandoned`](crate::Outcome::Abandoned)), since the operator asked to stop now.
/// In the other phases every order group runs while the phase's tasks stop: a hook of any order
/// may help them stop, and the phase ends once its hooks and its tasks have all ended.
///
/// A hook that errors, panics (before or after it returns its future) or overruns is recorded in
/// the report and abandoned; the others and the later phases still run. A hook that blocks its
/// thread past its deadline cannot be stopped, but is reported as
/// [`Overran`](crate::Outcome::Overran), and the supervisor still ends the process within the
/// budget.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use finale::{Hook, Phase};
///
/// let close_pool = Hook::new(Phase::Workers, "close-db-pool", |_ctx| async {
///     // pool.close().await;
/// })
/// .timeout(Duration::from_secs(2));
///
/// let commit = Hook::new(Phase::Workers, "commit-offsets", |ctx| async move {
///     let _left = ctx.remaining();
///     Ok::<(), std::io::Error>(())
/// });
/// # let _ = (close_pool, commit);
/// ```
pub struct Hook {
    pub(crate) phase: Phase,
    pub(crate) name: Cow<'static, str>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) order: i32,
    pub(crate) alongside_tasks: bool,
    pub(crate) run: WorkFn<HookContext>,
}

impl Hook {
    /// A hook named `name` that runs `f` in `phase`.
    pub fn new<F, Fut>(phase: Phase, name: impl Into<Cow<'static, str>>, f: F) -> Self
    where
        F: FnOnce(HookContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HookOutput,
    {
        Self {
            phase,
            name: name.into(),
            timeout: None,
            order: 0,
            alongside_tasks: false,
            run: work_fn(f),
        }
    }

    /// Gives the hook its own timeout, within its phase's. A timeout longer than the phase can
    /// last is a [`ConfigError::TimeoutBeyondPhase`](crate::ConfigError::TimeoutBeyondPhase) at
    /// registration.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Orders hooks within their phase: hooks with a lower order run (concurrently with each
    /// other) before hooks with a higher one start. Default `0`.
    ///
    /// The telemetry integrations use this to push metrics before traces and logs, and to release
    /// the log writer last. In the Announce phase the drain delay has order `0`: hooks with the
    /// default order run during the delay, a negative order before it starts, a positive one
    /// after it has ended.
    #[must_use]
    pub fn order(mut self, order: i32) -> Self {
        self.order = order;
        self
    }

    /// Runs the hook at the start of its phase, concurrently with the phase's tasks, instead of
    /// after them. This matters in the [`Workers`](Phase::Workers) phase only, where hooks
    /// otherwise wait until every task of the phase has ended: use it for a hook that helps the
    /// tasks stop (closing a queue they wait on), never for one that closes what they still use.
    /// Such hooks keep their [`order`](Hook::order) among themselves, and every one of their
    /// groups runs while the tasks stop, whatever its order.
    #[must_use]
    pub fn alongside_tasks(mut self) -> Self {
        self.alongside_tasks = true;
        self
    }

    /// The hook's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hook's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hook")
            .field("phase", &self.phase)
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("order", &self.order)
            .field("alongside_tasks", &self.alongside_tasks)
            .finish_non_exhaustive()
    }
}

/// Turns a panic inside a boxed future into an `Err(message)`.
pub(crate) struct CatchUnwind<T> {
    inner: BoxFuture<T>,
}

impl<T> CatchUnwind<T> {
    pub(crate) fn new(inner: BoxFuture<T>) -> Self {
        Self { inner }
    }
}

impl<T> Future for CatchUnwind<T> {
    type Output = Result<T, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The future is never polled again after a panic (it is dropped with `self`), so no
        // broken invariant can be observed: asserting unwind safety is sound.
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}
