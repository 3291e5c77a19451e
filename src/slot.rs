//! The Telemetry slot: its stages, their order, and how much of what is left each may use.
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
//! | metrics (Pushgateway, OTLP metrics, the final scrape) | [`ORDER_METRICS`] | 1/2 |
//! | traces and logs (OTLP) | [`ORDER_TRACES_LOGS`] | 3/4 |
//! | the log file (tracing-appender) | [`ORDER_LOG_WRITER`] | all of it |
//!
//! Each stage also ends a little before its limit, so that it returns its own error (which says
//! what failed) instead of being aborted by the phase deadline as an anonymous "abandoned".
//!
//! The same shares apply when the supervisor runs the stages itself because the user's runtime
//! is wedged (see `run::supervisor`): then the deadlines are on the std clock.

#![cfg_attr(
    not(all(
        feature = "pushgateway",
        feature = "otlp",
        feature = "tracing-appender"
    )),
    allow(dead_code)
)]

use std::time::Duration;

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
/// | metrics | [`ORDER_METRICS`] (0) | `pushgateway`, `otlp-metrics`, `final-scrape` | 1/2 |
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    /// `num / den` of what is left; `0 < num <= den`.
    pub(crate) const fn new(num: u32, den: u32) -> Share {
        Share { num, den }
    }

    /// How long a stage that has `left` may wait, so that it still reports why it gave up.
    pub(crate) fn usable(self, left: Duration) -> Duration {
        let usable = left * self.num / self.den;
        // Keep the margin small next to a short slot, so a tiny slot is not all margin.
        let margin = REPORT_MARGIN.min(left / 10);
        usable.saturating_sub(margin)
    }
}

/// How long before its limit a stage stops waiting, so it can still report why.
const REPORT_MARGIN: Duration = Duration::from_millis(50);

/// When a stage that starts now, with `ctx`'s deadline, should give up.
pub(crate) fn stage_deadline(ctx: &HookContext, share: Share) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now + share.usable(ctx.deadline().saturating_duration_since(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;
    use tokio::time::Instant;

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
}
