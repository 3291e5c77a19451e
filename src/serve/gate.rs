//! A future polled only when one of its own wake-ups fired: a connection's task is woken for
//! every request, and the drain's signals next to the connection (the server's stage, the
//! slow-client timer, the connection's age) need looking at only when they fire.
//!
//! # Invariants
//!
//! - `woken` is set before the task is woken, and cleared before the inner future is polled:
//!   a wake-up during that poll sets it again, so none is lost.
//! - The inner future is polled with the gate's own waker, so its wake-ups set `woken`; only
//!   if the gate is polled from another task than the first (never, in finale's servers) is
//!   it polled with that task's waker, and then always (the gate stays open).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

/// See the [module docs](self).
pub(crate) struct Gate {
    /// Its waker is made when the inner future is polled (only after a wake-up of its own), not
    /// kept: a gate is in every connection's task.
    flag: Arc<Flag>,
}

struct Flag {
    woken: AtomicBool,
    /// The task that polls the gate, found at its first poll.
    task: OnceLock<Waker>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release: the task that sees the flag sees what the waker's owner did before waking.
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task.get() {
            task.wake_by_ref();
        }
    }
}

impl Gate {
    /// A gate, open for its first poll.
    pub(crate) fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: OnceLock::new(),
        });
        Self { flag }
    }

    /// Polls `fut` if one of its wake-ups fired since its last poll (or it was never polled
    /// under this gate); `Pending` otherwise.
    #[inline]
    pub(crate) fn poll<F: Future>(
        &self,
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        let task = self.flag.task.get_or_init(|| cx.waker().clone());
        if !task.will_wake(cx.waker()) {
            // Another task: its waker, and the gate stays open.
            self.flag.woken.store(true, Ordering::Relaxed);
            return fut.poll(cx);
        }
        if !self.flag.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.flag.clone());
        fut.poll(&mut Context::from_waker(&waker))
    }

    /// Opens the gate: the next poll polls the inner future (a new one, say).
    pub(crate) fn open(&self) {
        self.flag.woken.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_wake_up_of_the_inner_future_reaches_the_task() {
        let gate = Gate::new();
        let notify = Arc::new(tokio::sync::Notify::new());
        let inner = notify.notified();
        tokio::pin!(inner);
        let waiting = std::future::poll_fn(|cx| gate.poll(inner.as_mut(), cx));
        let notifier = notify.clone();
        let task = tokio::spawn(async move { notifier.notify_one() });
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken through the gate");
        task.await.unwrap();
    }
}
