//! What the telemetry integrations share: the stages of the Telemetry slot, how each stage
//! bounds itself so the later ones still get time, and blocking work run off the runtime.
//!
//! # Why a stage does not use the whole slot
//!
//! Hooks of one order run as a group, and the next group starts only when the whole group has
//! finished. A metrics push against a hung backend would otherwise keep its group, and so the
//! trace, log and log-file flushes behind it, waiting until the phase deadline: nothing after it
//! would be delivered. So each stage gives up at a share of what is left when it starts:
//!
//! | stage | order | may use of what is left |
//! |---|---|---|
//! | metrics (Pushgateway, OTLP metrics) | [`ORDER_METRICS`] | 1/2 |
//! | traces and logs (OTLP) | [`ORDER_TRACES_LOGS`] | 3/4 |
//! | the log file (tracing-appender) | [`ORDER_LOG_WRITER`] | all of it |
//!
//! Each stage also ends a little before its limit, so that it returns its own error (which says
//! what failed) instead of being aborted by the phase deadline as an anonymous "abandoned".
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
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::hook::HookContext;

/// The order of the metrics stage of the Telemetry phase: the Pushgateway push and the OTLP
/// meter flush. The first stage.
///
/// # The stages of the Telemetry phase
///
/// finale's telemetry integrations register their hooks in three stages; hooks of a lower order
/// finish (as a group) before the next stage starts, so what the metrics push logs (an error, say)
/// is still exported with the logs, and what any stage logs is still written to the log file.
///
/// | stage | order | hooks | may use of what is left when it starts |
/// |---|---|---|---|
/// | metrics | [`ORDER_METRICS`] (0) | `pushgateway`, `otlp-metrics` | 1/2 |
/// | traces and logs | [`ORDER_TRACES_LOGS`] (100) | `otlp-traces`, `otlp-logs` | 3/4 |
/// | log file | [`ORDER_LOG_WRITER`] (200) | `log-writer` | all of it |
///
/// A stage gives up at its share, so a hung backend in one stage cannot starve the stages after
/// it: against a collector that never answers, the log file is still written. Each stage also
/// stops a little before its limit, so that its hooks fail with their own error (which says what
/// was not delivered) rather than being aborted as "abandoned".
///
/// Your own Telemetry hooks can slot in between, for example at order 50 to run after the metrics
/// and before the traces and logs. Give them a [`timeout`](crate::Hook::timeout): a group waits
/// for all of its hooks.
pub const ORDER_METRICS: i32 = 0;
/// The order of the traces-and-logs stage: the OTLP tracer and logger flushes. See
/// [`ORDER_METRICS`] for the stages.
pub const ORDER_TRACES_LOGS: i32 = 100;
/// The order of the log-file stage: the tracing-appender writer, released last. See
/// [`ORDER_METRICS`] for the stages.
pub const ORDER_LOG_WRITER: i32 = 200;

/// How much of what is left a stage may use, as a fraction `num / den`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Share {
    num: u32,
    den: u32,
}

impl Share {
    /// The metrics stage leaves half of the slot to the stages after it.
    pub(crate) const METRICS: Share = Share { num: 1, den: 2 };
    /// The traces-and-logs stage leaves a quarter to the log file.
    pub(crate) const TRACES_LOGS: Share = Share { num: 3, den: 4 };
    /// The log file is last: it may use everything.
    pub(crate) const ALL: Share = Share { num: 1, den: 1 };
}

/// How long before its limit a stage stops waiting, so it can still report why.
const REPORT_MARGIN: Duration = Duration::from_millis(50);

/// When a stage that starts now, with `ctx`'s deadline, should give up.
pub(crate) fn stage_deadline(ctx: &HookContext, share: Share) -> Instant {
    let now = Instant::now();
    let left = ctx.deadline().saturating_duration_since(now);
    let usable = left * share.num / share.den;
    // Keep the margin small next to a short slot, so a tiny slot is not all margin.
    let margin = REPORT_MARGIN.min(left / 10);
    now + usable.saturating_sub(margin)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;

    fn ctx_with(left: Duration) -> HookContext {
        HookContext {
            phase: Phase::Telemetry,
            deadline: Instant::now() + left,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stages_leave_time_for_later_ones() {
        let start = Instant::now();
        let ctx = ctx_with(Duration::from_secs(4));
        assert_eq!(
            stage_deadline(&ctx, Share::METRICS) - start,
            Duration::from_millis(1950)
        );
        assert_eq!(
            stage_deadline(&ctx, Share::TRACES_LOGS) - start,
            Duration::from_millis(2950)
        );
        assert_eq!(
            stage_deadline(&ctx, Share::ALL) - start,
            Duration::from_millis(3950)
        );
        // A tiny slot: the margin shrinks with it.
        let ctx = ctx_with(Duration::from_millis(100));
        assert_eq!(
            stage_deadline(&ctx, Share::ALL) - start,
            Duration::from_millis(90)
        );
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
