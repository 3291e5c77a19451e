//! What the telemetry integrations share: blocking work run off the runtime, and the work a
//! stage hands to the supervisor in case the user's runtime is wedged.
//!
//! # Why a plain thread
//!
//! The OpenTelemetry SDK's flushes and the `WorkerGuard`'s drop block their thread. On a tokio
//! worker they stall the runtime, which the gRPC exporter needs to make progress (a deadlock on a
//! `current_thread` or 1-worker runtime). `spawn_blocking` is no better: a blocking task that
//! outlives its wait still holds up the runtime's drop without limit. A plain `std::thread`
//! whose result comes back on a oneshot channel can be waited for with a deadline and, when the
//! deadline passes, simply left behind: it dies with the process.

#![cfg_attr(
    not(all(
        feature = "pushgateway",
        feature = "otlp",
        feature = "tracing-appender"
    )),
    allow(dead_code)
)]

use std::io;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// The outcome of work run on its own thread.
pub(crate) enum OffThread<T> {
    /// It finished.
    Done(T),
    /// It panicked; the panic message.
    Panicked(String),
    /// The deadline passed first; the thread is left behind.
    TimedOut,
}

/// Runs `work` on a new plain thread named `name` and waits for it until `deadline`.
///
/// The thread is never joined: when the deadline passes, it is left to finish (or to die with the
/// process) on its own.
///
/// # Cancel safety
///
/// Dropping the future leaves the thread running, detached.
pub(crate) async fn run_until<T, F>(
    name: &str,
    deadline: Instant,
    work: F,
) -> io::Result<OffThread<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            // The receiver is gone only when the waiter gave up; nobody needs the result then.
            let _ = tx.send(result);
        })?;
    Ok(match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(value))) => OffThread::Done(value),
        Ok(Ok(Err(payload))) => OffThread::Panicked(crate::hook::panic_message(&*payload)),
        // The sender is dropped without a send only if the thread died without unwinding
        // through `catch_unwind`, which cannot happen; treat it as a panic all the same.
        Ok(Err(_)) => OffThread::Panicked("the thread ended without a result".to_owned()),
        Err(_) => OffThread::TimedOut,
    })
}

/// A stage's resource (a provider, the log writer's guard), handed to whoever runs the stage
/// first: the Telemetry hook on the user's runtime or, if that runtime is wedged, the
/// supervisor's emergency stage. The other then waits for the first to finish and reports its
/// result: both sides say the same about what the stage delivered.
///
/// # Drop
///
/// A resource nobody took is dropped on a thread of its own: the last clone of an OTel provider
/// shuts it down on drop, which blocks (up to 5 s per provider, and forever on a runtime the
/// gRPC exporter needs).
pub(crate) struct Handoff<T: Send + 'static> {
    state: std::sync::Mutex<Held<T>>,
    done: std::sync::Condvar,
}

enum Held<T> {
    Ready(T),
    Taken,
    /// Done, with the taker's result.
    Done(Result<(), String>),
}

impl<T: Send + 'static> Handoff<T> {
    pub(crate) fn new(value: T) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            state: std::sync::Mutex::new(Held::Ready(value)),
            done: std::sync::Condvar::new(),
        })
    }

    /// Takes the resource, if nobody has.
    pub(crate) fn take(&self) -> Option<T> {
        let mut state = crate::state::lock(&self.state);
        match std::mem::replace(&mut *state, Held::Taken) {
            Held::Ready(value) => Some(value),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Whoever took the resource is done with it, with `result`.
    pub(crate) fn done(&self, result: Result<(), String>) {
        *crate::state::lock(&self.state) = Held::Done(result);
        self.done.notify_all();
    }

    /// Waits, until `deadline`, for whoever took the resource to be done; returns its result.
    /// Blocks its thread.
    pub(crate) fn wait(&self, deadline: std::time::Instant) -> Result<(), String> {
        let mut state = crate::state::lock(&self.state);
        loop {
            match &*state {
                Held::Done(result) => return result.clone(),
                // Nobody took it: it was never run.
                Held::Ready(_) => return Err("never run".to_owned()),
                Held::Taken => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err("still running on the other side at the deadline".to_owned());
            }
            state = self
                .done
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `work` on the resource if nobody took it; otherwise waits, until `deadline`, for
    /// whoever did. Blocks its thread.
    pub(crate) fn run_or_wait(
        &self,
        deadline: std::time::Instant,
        work: impl FnOnce(T) -> Result<(), String>,
    ) -> Result<(), String> {
        if let Some(value) = self.take() {
            let result = work(value);
            self.done(result.clone());
            return result;
        }
        self.wait(deadline)
            .map_err(|e| format!("the Telemetry phase's hook ran it: {e}"))
    }
}

impl<T: Send + 'static> Drop for Handoff<T> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Held::Ready(value) = std::mem::replace(state, Held::Done(Ok(()))) {
            // If no thread can start, the closure (and the value in it) drops here.
            let _ = std::thread::Builder::new()
                .name("finale-drop".to_owned())
                .spawn(move || drop(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_handoff_runs_once_and_the_other_side_waits() {
        let held = Handoff::new(7);
        let taken = held.take().expect("first taker gets it");
        assert_eq!(taken, 7);
        assert!(held.take().is_none());
        // The other side waits for the first; it gives up at its deadline.
        let soon = std::time::Instant::now() + Duration::from_millis(20);
        assert!(held.run_or_wait(soon, |_| Ok(())).is_err());
        let waiter = {
            let held = held.clone();
            std::thread::spawn(move || {
                let later = std::time::Instant::now() + Duration::from_secs(10);
                held.run_or_wait(later, |_| Err("must not run".to_owned()))
            })
        };
        held.done(Ok(()));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        // The waiting side reports the taker's result, not a success of its own.
        let held = Handoff::new(3);
        let _taken = held.take().unwrap();
        let waiter = {
            let held = held.clone();
            std::thread::spawn(move || {
                held.wait(std::time::Instant::now() + Duration::from_secs(10))
            })
        };
        held.done(Err("collector down".to_owned()));
        assert_eq!(waiter.join().unwrap(), Err("collector down".to_owned()));
        // Nobody took it: the emergency side runs it.
        let held = Handoff::new(1);
        let mut ran = None;
        let later = std::time::Instant::now() + Duration::from_secs(10);
        assert_eq!(
            held.run_or_wait(later, |v| {
                ran = Some(v);
                Ok(())
            }),
            Ok(())
        );
        assert_eq!(ran, Some(1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_thread_is_left_behind() {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let deadline = Instant::now() + Duration::from_millis(20);
        let outcome = run_until("blocked", deadline, move || {
            let _ = blocked.recv();
        })
        .await
        .unwrap();
        assert!(matches!(outcome, OffThread::TimedOut));
        drop(release);

        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = run_until("quick", deadline, || 7).await.unwrap();
        assert!(matches!(outcome, OffThread::Done(7)));

        let outcome = run_until("panics", deadline, || panic!("boom"))
            .await
            .unwrap();
        assert!(matches!(outcome, OffThread::Panicked(m) if m == "boom"));
    }
}
