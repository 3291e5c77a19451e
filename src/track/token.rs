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
    /// The `CancellationToken` handed out by [`StopToken::cancellation_token`], created on the
    /// first call. Under the lock, so that a token created while `cancel` runs is cancelled
    /// either by `cancel` (it saw the token) or by its creator (it saw the flag).
    #[cfg(feature = "tokio-util")]
    linked: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl StopToken {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                cancelled: AtomicBool::new(false),
                notify: Notify::new(),
                #[cfg(feature = "tokio-util")]
                linked: std::sync::Mutex::new(None),
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
            #[cfg(feature = "tokio-util")]
            if let Some(linked) = &*self.linked() {
                linked.cancel();
            }
        }
        first
    }

    #[cfg(feature = "tokio-util")]
    fn linked(&self) -> std::sync::MutexGuard<'_, Option<tokio_util::sync::CancellationToken>> {
        // Nothing panics while holding it; a poisoned lock still holds a valid token.
        self.inner
            .linked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This token as a tokio-util [`CancellationToken`](tokio_util::sync::CancellationToken),
    /// for code that takes one: it is cancelled when this token is (at once if it already is).
    ///
    /// Each call returns a [child](tokio_util::sync::CancellationToken::child_token) of one
    /// token shared by every clone of this `StopToken`: cancelling what you were given
    /// cancels it and its own children, never this token or another caller's. No task is
    /// spawned. The shared token is allocated on the first call; each call allocates the child
    /// it returns (tokio-util's tree node).
    ///
    /// # Examples
    ///
    /// ```
    /// use finale::{Finale, Phase};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let finale = Finale::builder().no_signals().build().unwrap();
    /// // A library that stops when its `CancellationToken` is cancelled.
    /// let token: CancellationToken = finale.handle().phase_token(Phase::Workers).cancellation_token();
    /// let job = tokio::spawn(async move { token.cancelled().await });
    /// finale.handle().trigger("done");
    /// finale.run().await;
    /// job.await.unwrap(); // stopped in the Workers phase
    /// # }
    /// ```
    #[cfg(feature = "tokio-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio-util")))]
    pub fn cancellation_token(&self) -> tokio_util::sync::CancellationToken {
        let mut linked = self.linked();
        let shared = linked.get_or_insert_with(tokio_util::sync::CancellationToken::new);
        if self.is_cancelled() {
            shared.cancel();
        }
        shared.child_token()
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

/// [`StopToken::cancellation_token`].
#[cfg(feature = "tokio-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio-util")))]
impl From<StopToken> for tokio_util::sync::CancellationToken {
    fn from(token: StopToken) -> Self {
        token.cancellation_token()
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

    #[cfg(feature = "tokio-util")]
    #[tokio::test]
    async fn a_cancellation_token_follows_the_stop_token_and_not_the_other_way() {
        let token = StopToken::new();
        let (a, b) = (
            token.cancellation_token(),
            token.clone().cancellation_token(),
        );
        // Cancelling what one caller got touches nobody else.
        a.cancel();
        assert!(!b.is_cancelled() && !token.is_cancelled());
        let waiter = tokio::spawn(b.clone().cancelled_owned());
        tokio::task::yield_now().await;
        assert!(token.cancel());
        waiter.await.unwrap();
        assert!(b.is_cancelled());
        // One asked for after the cancel is cancelled already.
        assert!(tokio_util::sync::CancellationToken::from(token).is_cancelled());
    }

    /// The link and the cancel racing on two threads: the token is cancelled whichever wins.
    #[cfg(feature = "tokio-util")]
    #[test]
    fn a_link_made_while_cancelling_is_never_missed() {
        for _ in 0..2_000 {
            let token = StopToken::new();
            let canceller = {
                let token = token.clone();
                std::thread::spawn(move || token.cancel())
            };
            let linked = token.cancellation_token();
            canceller.join().unwrap();
            assert!(linked.is_cancelled());
        }
    }
}
