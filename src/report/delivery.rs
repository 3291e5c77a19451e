//! What each telemetry stage delivered: items exported, failed, handed to the exporter with no answer
//! (unconfirmed) and dropped, during the run and at exit, and the policy that decides which of
//! them the exit code depends on.

use std::borrow::Cow;
use std::fmt;
use std::ops::Sub;

/// What a [`Delivery`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Items {
    /// OTLP spans.
    Spans,
    /// OTLP log records.
    LogRecords,
    /// OTLP metric data points.
    MetricPoints,
    /// Lines for the log writer (tracing-appender).
    LogLines,
    /// Samples pushed to a Prometheus Pushgateway.
    Samples,
    /// Whatever a [`Sink`](crate::Sink) counts.
    Other,
}

impl Items {
    /// The snake-case name, as the JSON report writes it: `spans`, `log_records`,
    /// `metric_points`, `log_lines`, `samples`, `other`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Items::Spans => "spans",
            Items::LogRecords => "log_records",
            Items::MetricPoints => "metric_points",
            Items::LogLines => "log_lines",
            Items::Samples => "samples",
            Items::Other => "other",
        }
    }
}

impl fmt::Display for Items {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

/// Items exported, failed, unconfirmed and dropped over some stretch of the run.
///
/// Each item is in one bucket: the backend confirmed it (`exported`), refused it or could not
/// be reached (`failed`), was sent it and never answered (`unconfirmed`: it may have arrived,
/// nothing says so), or never got it (`dropped`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Handed to the backend, which took them (an export that succeeded, a line written).
    pub exported: u64,
    /// Handed to the backend, which refused them or could not be reached (an export that
    /// failed, a write error, the items a partial success rejected).
    pub failed: u64,
    /// Handed to the exporter, with no answer: an export still waiting for the backend's answer
    /// when the flush gave up. Whether its request was written is not known (the exporter's
    /// client does not say: a connection never made counts here too), so the backend may or may
    /// not have them; nothing confirmed it, so they are not counted as exported, and not as
    /// dropped either.
    pub unconfirmed: u64,
    /// Never handed to the backend: a full queue, or left queued when the flush gave up.
    pub dropped: u64,
}

impl Counts {
    /// Counts of `exported`, `failed` and `dropped` items, none unconfirmed.
    pub const fn new(exported: u64, failed: u64, dropped: u64) -> Self {
        Self {
            exported,
            failed,
            unconfirmed: 0,
            dropped,
        }
    }

    /// The same counts with `unconfirmed` items: handed to the exporter, with no answer.
    #[must_use]
    pub const fn with_unconfirmed(mut self, unconfirmed: u64) -> Self {
        self.unconfirmed = unconfirmed;
        self
    }

    /// Failed and dropped: what did not arrive.
    pub const fn lost(&self) -> u64 {
        self.failed + self.dropped
    }

    /// Failed, unconfirmed and dropped: what no answer of the backend confirmed. What a
    /// [`DeliveryPolicy`] looks at.
    pub const fn not_confirmed(&self) -> u64 {
        self.failed + self.unconfirmed + self.dropped
    }
}

impl Sub for Counts {
    type Output = Counts;

    fn sub(self, earlier: Counts) -> Counts {
        Counts {
            exported: self.exported.saturating_sub(earlier.exported),
            failed: self.failed.saturating_sub(earlier.failed),
            unconfirmed: self.unconfirmed.saturating_sub(earlier.unconfirmed),
            dropped: self.dropped.saturating_sub(earlier.dropped),
        }
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} exported, {} failed, ", self.exported, self.failed)?;
        if self.unconfirmed > 0 {
            write!(
                f,
                "{} handed to the exporter with no answer, ",
                self.unconfirmed
            )?;
        }
        write!(f, "{} dropped", self.dropped)
    }
}

/// What one telemetry stage delivered, split at the trigger of the shutdown: `run` is
/// everything before it, `at_exit` everything from it to the end of the Telemetry phase (the
/// shutdown sequence's own telemetry and the final flush).
///
/// Only stages that can count have one: the OTLP providers with a
/// [`Counted`](crate::otlp::Counted) exporter, the log writer made with
/// [`appender::non_blocking`](crate::appender::non_blocking) (or with an error counter), and
/// [`Sink`](crate::Sink)s with [`counts`](crate::Sink::counts).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The Telemetry hook it belongs to (`otlp-traces`, `log-writer`, ...).
    pub stage: Cow<'static, str>,
    /// What it counts.
    pub items: Items,
    /// Before the shutdown was triggered.
    pub run: Counts,
    /// From the trigger to the end of the Telemetry phase.
    pub at_exit: Counts,
}

impl Delivery {
    /// Both stretches together.
    pub fn total(&self) -> Counts {
        Counts {
            exported: self.run.exported + self.at_exit.exported,
            failed: self.run.failed + self.at_exit.failed,
            unconfirmed: self.run.unconfirmed + self.at_exit.unconfirmed,
            dropped: self.run.dropped + self.at_exit.dropped,
        }
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): run {}; at exit {}",
            self.stage, self.items, self.run, self.at_exit
        )
    }
}

/// Which lost telemetry makes a run [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered).
///
/// Whatever the policy, a Telemetry hook that did not complete (a flush that failed or ran out
/// of time) makes the run not delivered, and every count is in the report
/// ([`ShutdownReport::delivery`](crate::ShutdownReport::delivery)).
///
/// # Default values
///
/// [`AtExit`](DeliveryPolicy::AtExit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeliveryPolicy {
    /// What was recorded from the trigger on must arrive: an item that failed, was sent with
    /// no answer or was dropped at exit ([`Delivery::at_exit`]) makes the run not delivered. Losses before the trigger
    /// (a collector down for a minute last week, a burst that overflowed a queue) are reported
    /// but do not change the exit code: they were the run's, and a rollout that went well
    /// should not look like a failed one.
    #[default]
    AtExit,
    /// Nothing may be lost over the whole run: any failed, unconfirmed or dropped item, before
    /// or after the trigger, makes the run not delivered. For batch jobs, whose output is their telemetry.
    WholeRun,
}

impl DeliveryPolicy {
    /// Whether `delivery` lost what this policy requires.
    pub fn is_lost(self, delivery: &Delivery) -> bool {
        match self {
            DeliveryPolicy::AtExit => delivery.at_exit.not_confirmed() > 0,
            DeliveryPolicy::WholeRun => delivery.total().not_confirmed() > 0,
        }
    }
}

/// A stage's running counts, read at the trigger and at the end of the Telemetry phase.
pub(crate) trait Tally: Send + Sync {
    /// The Telemetry hook it belongs to.
    fn stage(&self) -> Cow<'static, str>;
    fn items(&self) -> Items;
    /// The counts so far.
    fn counts(&self) -> Counts;
    /// Drops known only at the end (what was handed in but neither exported nor failed), and
    /// whether they belong to the run rather than to the exit.
    fn late_drops(&self) -> (u64, bool) {
        (0, false)
    }
    /// Items known only at the end to have been handed to the exporter with no answer (an export still waiting
    /// when the flush gave up); they belong to the exit.
    fn late_unconfirmed(&self) -> u64 {
        0
    }
}

/// A tally and what it read at the trigger.
pub(crate) struct Tallied {
    pub(crate) tally: std::sync::Arc<dyn Tally>,
    pub(crate) at_trigger: Option<Counts>,
}

impl Tallied {
    /// The delivery as of now.
    pub(crate) fn delivery(&self) -> Delivery {
        let now = self.tally.counts();
        let run = self.at_trigger.unwrap_or(now);
        let mut delivery = Delivery {
            stage: self.tally.stage(),
            items: self.tally.items(),
            run,
            at_exit: now - run,
        };
        let (late, in_run) = self.tally.late_drops();
        if in_run {
            delivery.run.dropped += late;
        } else {
            delivery.at_exit.dropped += late;
        }
        delivery.at_exit.unconfirmed += self.tally.late_unconfirmed();
        delivery
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(run: Counts, at_exit: Counts) -> Delivery {
        Delivery {
            stage: Cow::Borrowed("s"),
            items: Items::Spans,
            run,
            at_exit,
        }
    }

    #[test]
    fn the_policy_says_which_losses_count() {
        let early = delivery(Counts::new(488, 512, 0), Counts::new(10, 0, 0));
        assert!(!DeliveryPolicy::AtExit.is_lost(&early));
        assert!(DeliveryPolicy::WholeRun.is_lost(&early));
        let late = delivery(Counts::new(10, 0, 0), Counts::new(0, 0, 1));
        assert!(DeliveryPolicy::AtExit.is_lost(&late));
        assert!(DeliveryPolicy::WholeRun.is_lost(&late));
        let unanswered = delivery(
            Counts::new(10, 0, 0),
            Counts::new(0, 0, 0).with_unconfirmed(4),
        );
        assert!(DeliveryPolicy::AtExit.is_lost(&unanswered));
        assert_eq!(unanswered.total().lost(), 0);
        assert_eq!(unanswered.total().not_confirmed(), 4);
        assert_eq!(
            unanswered.at_exit.to_string(),
            "0 exported, 0 failed, 4 handed to the exporter with no answer, 0 dropped"
        );
        let clean = delivery(Counts::new(10, 0, 0), Counts::new(5, 0, 0));
        assert!(!DeliveryPolicy::WholeRun.is_lost(&clean));
        assert_eq!(
            clean.to_string(),
            "s (spans): run 10 exported, 0 failed, 0 dropped; at exit 5 exported, 0 failed, 0 dropped"
        );
    }
}
