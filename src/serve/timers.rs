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
//!
//! On a paused clock (`tokio::time::pause`, `#[tokio::test(start_paused = true)]`: a
//! `current_thread` runtime) the timers stay on the user's runtime: the thread's clock is the
//! real one, and a timer there would neither see the paused clock's jumps nor let the runtime
//! jump to it when idle. A server started before the clock is paused keeps the thread; its
//! timers then fire on the real clock, and a connection found not yet due waits at least a
//! quarter of the header-read timeout of real time before it looks again (no busy loop).

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
    /// Starts the timers' thread of the server `server`, unless the runtime's clock is paused
    /// (see the [module docs](self)). If the thread cannot start (the process is out of threads
    /// or memory), the timers stay on the user's runtime: the server serves as before, with one
    /// pending timer on its runtime per connection.
    pub(super) fn start(server: &str) -> Self {
        if clock_paused() {
            return Self(None);
        }
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
        let runtime = Background(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?,
        ));
        let handle = runtime.0.as_ref().expect("just built").handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // If the thread does not start, the closure (and the runtime in it) is dropped here,
        // in the server's task: `Background` shuts the runtime down without blocking.
        std::thread::Builder::new()
            .name("finale-slow-clients".into())
            .spawn(move || {
                if let Some(runtime) = &runtime.0 {
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                }
            })?;
        Ok(Thread {
            handle,
            _stop: stop,
        })
    }

    /// Whether the timers are kept by the thread (on the real clock).
    #[cfg(test)]
    fn on_thread(&self) -> bool {
        self.0.is_some()
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

/// A runtime that, wherever it is dropped (an async context included), shuts down without
/// blocking.
struct Background(Option<tokio::runtime::Runtime>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Whether the current runtime's clock is paused. Only a `current_thread` runtime can pause
/// its clock; a paused clock does not move while this thread spins for 50 µs of real time (it
/// moves only when the runtime is idle, or when told to).
fn clock_paused() -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::try_current().map_or(true, |h| h.runtime_flavor() != RuntimeFlavor::CurrentThread) {
        return false;
    }
    let (tokio_start, real_start) = (Instant::now(), std::time::Instant::now());
    while real_start.elapsed() < std::time::Duration::from_micros(50) {
        std::hint::spin_loop();
    }
    Instant::now() == tokio_start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn on_a_paused_clock_the_timers_stay_on_the_runtime() {
        let timers = SlowTimers::start("test");
        assert!(!timers.on_thread());
        // The paused clock jumps to the timer when the runtime is idle: no real time passes.
        let real = std::time::Instant::now();
        timers
            .sleep_until(Instant::now() + std::time::Duration::from_secs(3600))
            .await;
        assert!(real.elapsed() < std::time::Duration::from_secs(60));
    }

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

    /// The runtime built for the thread is dropped in the server's task if the thread cannot
    /// start; a tokio runtime dropped in an async context panics, `Background` does not.
    #[tokio::test(flavor = "current_thread")]
    async fn a_background_runtime_dropped_in_a_task_does_not_panic() {
        let runtime = Background(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap(),
        ));
        drop(runtime);
    }
}
