//! A cheap, cloneable one-shot signal used for "shutdown requested", "drain started" and the
//! stop signal handed to tasks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::Notify;

use super::wait_until;

/// A cloneable, one-shot cancellation signal.
///
/// Every clone observes the same signal. Once cancelled it stays cancelled. Checking it with
/// [`is_cancelled`](StopToken::is_cancelled) is a single atomic load (no lock), so it is fine to
/// call on a hot path.
///
/// Tasks spawned through [`Finale::spawn`](crate::Finale::spawn) receive one in their
/// [`TaskContext`](crate::TaskContext); [`Handle::phase_token`](crate::Handle::phase_token) hands
/// out the one that fires when a phase starts.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().no_signals().build().unwrap();
/// let token = finale.handle().phase_token(finale::Phase::Workers);
/// assert!(!token.is_cancelled());
/// finale.handle().trigger("test");
/// # }
/// ```
#[derive(Clone)]
pub struct StopToken {
    inner: Arc<Inner>,
}

struct Inner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl StopToken {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                cancelled: AtomicBool::new(false),
                notify: Notify::new(),
            }),
        }
    }

    /// Cancels the token. Returns `true` if this call cancelled it, `false` if it already was.
    pub(crate) fn cancel(&self) -> bool {
        // AcqRel: a waiter that observes `true` also observes everything written before the
        // cancel (e.g. the shutdown reason).
        let first = !self.inner.cancelled.swap(true, Ordering::AcqRel);
        if first {
            self.inner.notify.notify_waiters();
        }
        first
    }

    /// Whether the token has been cancelled. One atomic load.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Waits until the token is cancelled.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing; a new call waits again.
    pub async fn cancelled(&self) {
        wait_until(&self.inner.notify, || self.is_cancelled()).await;
    }

    /// Like [`cancelled`](StopToken::cancelled), but owns the token, so the future is
    /// `Send + 'static`, as axum's `with_graceful_shutdown` and tonic's `serve_with_shutdown`
    /// require.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn cancelled_owned(self) -> Cancelled {
        Cancelled {
            inner: Box::pin(async move { self.cancelled().await }),
        }
    }
}

/// The future of [`StopToken::cancelled_owned`], [`Handle::phase_started`](crate::Handle::phase_started)
/// and [`Handle::shutdown_requested`](crate::Handle::shutdown_requested): completes once the token
/// is cancelled. `Send + 'static`, so it can be handed to a server's graceful-shutdown method.
#[must_use = "futures do nothing unless polled"]
pub struct Cancelled {
    inner: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
}

impl Future for Cancelled {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancelled").finish_non_exhaustive()
    }
}

impl fmt::Debug for StopToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_all_clones_once() {
        let token = StopToken::new();
        let waiters: Vec<_> = (0..4)
            .map(|_| tokio::spawn(token.clone().cancelled_owned()))
            .collect();
        tokio::task::yield_now().await;
        assert!(token.cancel());
        assert!(!token.cancel());
        for w in waiters {
            w.await.unwrap();
        }
        assert!(token.is_cancelled());
        token.cancelled().await; // already cancelled: returns at once
    }
}
