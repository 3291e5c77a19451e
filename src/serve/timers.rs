//! The slow-client timers of a server's connections, on a thread of the server's own.
//!
//! Each connection keeps one timer for slow clients (the header-read timeout), moved only when
//! it fires. Kept on the user's runtime, that one pending timer makes every park of the
//! runtime's worker compute a timeout and read the clock: one park per request on a
//! keep-alive connection that waits for its next request, about 300 instructions each, which
//! `axum::serve` (no timer at all) does not pay. The timers live instead on a `current_thread`
//! runtime that only keeps time (`finale-slow-clients`, one thread per server): the connection
//! task still awaits its timer, which wakes it across threads when it fires.
//!
//! A timer made here may outlive the thread only if it is never polled again: every
//! connection task holds the [`SlowTimers`] (an `Arc`) while it holds a timer made by it, and
//! the thread stops when the last one is dropped.

use std::sync::Arc;

use tokio::time::{Instant, Sleep};

/// Where a server's connections make their slow-client timers: a runtime of the server's own
/// when its thread started, the user's runtime otherwise.
#[derive(Clone, Debug)]
pub(super) struct SlowTimers(Option<Arc<Thread>>);

#[derive(Debug)]
struct Thread {
    handle: tokio::runtime::Handle,
    /// Dropped with the last connection: the thread's runtime returns and stops there, on its
    /// own thread (never inside an async context).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl SlowTimers {
    /// Starts the timers' thread of the server `server`. If the thread cannot start (the
    /// process is out of threads or memory), the timers stay on the user's runtime: the
    /// server serves as before, with one pending timer on its runtime per connection.
    pub(super) fn start(server: &str) -> Self {
        match Self::spawn() {
            Ok(thread) => Self(Some(Arc::new(thread))),
            Err(error) => {
                tracing::warn!(
                    target: "finale",
                    server,
                    %error,
                    "could not start the slow-client timer thread; the timers stay on the runtime"
                );
                Self(None)
            }
        }
    }

    fn spawn() -> std::io::Result<Thread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("finale-slow-clients".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        Ok(Thread {
            handle,
            _stop: stop,
        })
    }

    /// A timer due at `deadline`, kept by the timers' thread.
    pub(super) fn sleep_until(&self, deadline: Instant) -> Sleep {
        match &self.0 {
            Some(thread) => {
                let _entered = thread.handle.enter();
                tokio::time::sleep_until(deadline)
            }
            None => tokio::time::sleep_until(deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_timer_of_the_thread_wakes_a_task_of_another_runtime() {
        let timers = SlowTimers::start("test");
        assert!(timers.0.is_some(), "the thread started");
        let started = std::time::Instant::now();
        let sleep = timers.sleep_until(Instant::now() + std::time::Duration::from_millis(20));
        tokio::time::timeout(std::time::Duration::from_secs(10), sleep)
            .await
            .expect("woken by the timers' thread");
        assert!(started.elapsed() >= std::time::Duration::from_millis(20));
    }
}
