//! The report every run ends with: what every phase, hook and task did, and how to exit.

mod delivery;
#[cfg(feature = "serde")]
mod json;
mod outcome;
pub(crate) mod scrape;
mod status;

pub mod names;

use std::fmt;
use std::time::Duration;

use crate::phase::Phase;

pub use self::delivery::{Counts, Delivery, DeliveryPolicy, Items};
pub(crate) use self::delivery::{Tallied, Tally};
pub use self::outcome::{EntryKind, EntryReport, Outcome, PhaseOutcome, PhaseReport, Reason};
pub use self::scrape::{FinalScrape, ScrapeOutcome, ScrapeSeen};
pub use self::status::{ExitCodes, ShutdownStatus};

/// What happened during one run: why it stopped, what every phase, hook and task did, and how
/// the process should exit.
///
/// Its [`Display`](fmt::Display) is a readable timeline:
///
/// ```text
/// finale: shutdown after signal SIGTERM: clean, exit code 0, 12.4ms
///   announce   completed         0.1ms
///   drain      completed         3.0ms  (in flight at start: 2)
///     in-flight work         completed          2.9ms
///   workers    completed         8.1ms
///     task "ticker"          completed          0.2ms
///     hook "close-db"        completed          8.0ms
///   telemetry  completed         1.1ms
///     hook "otlp-traces"     completed          1.0ms
///   delivered  otlp-traces      spans         run: 488 exported, 512 failed, 0 dropped; at exit: 12 exported, 0 failed, 0 dropped
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Why the shutdown started.
    pub reason: Reason,
    /// Every phase, in order.
    pub phases: Vec<PhaseReport>,
    /// In-flight work ([`InFlight`](crate::InFlight)) when the Drain phase started.
    pub in_flight_at_drain_start: usize,
    /// When, after readiness turned off, the last new connection or request (health probes
    /// aside) arrived during the Announce phase: what tells whether the load balancer had let go
    /// by the end of the drain delay. `None` if none arrived.
    pub last_request_after_announce: Option<Duration>,
    /// When, after readiness turned off, the last "not ready" answer was served during the
    /// Announce phase. `None` if none was.
    pub last_probe_after_announce: Option<Duration>,
    /// Requests answered `503` because they arrived too late in the drain (near its deadline).
    pub requests_rejected: u64,
    /// Requests whose handler panicked during the run; each was answered `500`, the server kept
    /// serving.
    pub requests_panicked: u64,
    /// What was cut short at a deadline: connections and streams still open when their phase
    /// ended, named by the server that cut them.
    pub cut: Vec<String>,
    /// Upgrades that failed during the run, each in a line (feature `upgrade`): the process
    /// kept serving after each.
    pub upgrades_failed: Vec<String>,
    /// Whether a second signal cut the shutdown short.
    pub escalated: bool,
    /// From the trigger to the end of the Telemetry phase.
    pub total: Duration,
    /// Whether the sequence ended after its total budget (something blocked a thread past its
    /// deadline). Such a run is never [`Clean`](ShutdownStatus::Clean).
    pub over_budget: bool,
    /// What each telemetry stage that counts delivered, during the run and at exit (see
    /// [`Delivery`]); which losses make the run
    /// [`TelemetryNotDelivered`](ShutdownStatus::TelemetryNotDelivered) is the
    /// [`DeliveryPolicy`]'s choice.
    pub delivery: Vec<Delivery>,
    /// What each final-scrape stage did (feature `prometheus`'s
    /// [`MetricsEndpoint`](crate::prometheus::MetricsEndpoint)): when the final scrape came and
    /// who made it, or why the stage did not wait. Empty without one.
    pub final_scrapes: Vec<FinalScrape>,
    /// The ending's class.
    pub status: ShutdownStatus,
    /// The process exit code for [`status`](ShutdownReport::status), after the user's mapping.
    pub exit_code: i32,
}

impl ShutdownReport {
    /// The report of one phase.
    pub fn phase(&self, phase: Phase) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.phase == phase)
    }

    /// The report of the hook or task named `name`, in any phase.
    pub fn entry(&self, name: &str) -> Option<&EntryReport> {
        self.phases
            .iter()
            .flat_map(|p| &p.entries)
            .find(|e| e.name == name)
    }

    /// Whether every phase, hook and task completed.
    pub fn is_clean(&self) -> bool {
        self.status == ShutdownStatus::Clean
    }

    /// Ends the process with [`exit_code`](ShutdownReport::exit_code).
    ///
    /// Call this once the report is in hand, that is after the Telemetry phase delivered
    /// everything. See [`Finale::run_and_exit`](crate::Finale::run_and_exit) for why finale ends
    /// the process explicitly rather than returning from `main`.
    pub fn exit(&self) -> ! {
        std::process::exit(self.exit_code)
    }

    /// Sets [`status`](ShutdownReport::status) and [`exit_code`](ShutdownReport::exit_code)
    /// from everything else in the report.
    pub(crate) fn classify(&mut self, codes: &ExitCodes, policy: DeliveryPolicy) {
        self.status = self.status_from_parts(policy);
        self.exit_code = codes.code(self.status);
    }

    /// What `stage` delivered, if it counts.
    pub fn delivery(&self, stage: &str) -> Option<&Delivery> {
        self.delivery.iter().find(|d| d.stage == stage)
    }

    fn status_from_parts(&self, policy: DeliveryPolicy) -> ShutdownStatus {
        if self.escalated {
            return ShutdownStatus::Forced;
        }
        if matches!(self.reason, Reason::StartupFailed { .. }) {
            return ShutdownStatus::StartupFailure;
        }
        let non_telemetry = || {
            self.phases
                .iter()
                .filter(|p| p.phase != Phase::Telemetry)
                .flat_map(|p| &p.entries)
        };
        if matches!(
            self.reason,
            Reason::TaskFailed { .. } | Reason::Panic { .. }
        ) || non_telemetry()
            .any(|e| matches!(e.outcome, Outcome::Failed(_) | Outcome::Panicked(_)))
        {
            return ShutdownStatus::ComponentFailure;
        }
        if self.over_budget
            || !self.cut.is_empty()
            || non_telemetry().any(|e| {
                matches!(
                    e.outcome,
                    Outcome::TimedOut | Outcome::Overran | Outcome::Abandoned
                )
            })
            || self
                .phases
                .iter()
                .any(|p| p.phase != Phase::Telemetry && p.outcome == PhaseOutcome::DeadlineReached)
        {
            return ShutdownStatus::DeadlineOverrun;
        }
        if self
            .phases
            .iter()
            .filter(|p| p.phase == Phase::Telemetry)
            .flat_map(|p| &p.entries)
            .any(|e| !e.outcome.is_completed())
            || self.delivery.iter().any(|d| policy.is_lost(d))
        {
            return ShutdownStatus::TelemetryNotDelivered;
        }
        ShutdownStatus::Clean
    }
}

struct Ms(Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1000.0;
        if ms >= 10_000.0 {
            write!(f, "{:.2}s", ms / 1000.0)
        } else {
            write!(f, "{ms:.1}ms")
        }
    }
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "finale: shutdown after {}: {}, exit code {}, {}",
            self.reason,
            self.status,
            self.exit_code,
            Ms(self.total)
        )?;
        if self.requests_rejected > 0 {
            write!(
                f,
                ", {} requests rejected near the drain deadline",
                self.requests_rejected
            )?;
        }
        if self.over_budget {
            f.write_str(", over its total budget")?;
        }
        if self.requests_panicked > 0 {
            write!(
                f,
                "\n  requests whose handler panicked (answered 500): {}",
                self.requests_panicked
            )?;
        }
        for c in &self.cut {
            write!(f, "\n  cut at deadline: {c}")?;
        }
        for u in &self.upgrades_failed {
            write!(f, "\n  upgrade failed: {u}")?;
        }
        for p in &self.phases {
            write!(
                f,
                "\n  {:<10} {:<16} {:>9}",
                p.phase.as_str(),
                p.outcome.as_str(),
                Ms(p.duration).to_string()
            )?;
            if p.phase == Phase::Announce
                && (self.last_request_after_announce.is_some()
                    || self.last_probe_after_announce.is_some())
            {
                let at = |what: &str, d: Option<Duration>| {
                    d.map_or(format!("no {what}"), |d| {
                        format!("last {what} at {}", Ms(d))
                    })
                };
                write!(
                    f,
                    "  ({}, {})",
                    at("request", self.last_request_after_announce),
                    at("probe", self.last_probe_after_announce)
                )?;
            }
            if p.phase == Phase::Drain && p.outcome != PhaseOutcome::Skipped {
                write!(
                    f,
                    "  (in flight at start: {})",
                    self.in_flight_at_drain_start
                )?;
            }
            for e in &p.entries {
                let label = match e.kind {
                    EntryKind::Hook => format!("hook {:?}", e.name),
                    EntryKind::Task => format!("task {:?}", e.name),
                    EntryKind::InFlight | EntryKind::DrainDelay | EntryKind::Upgrade => {
                        e.name.to_string()
                    }
                };
                write!(
                    f,
                    "\n    {:<28} {:<16} {:>9}",
                    label,
                    e.outcome.as_str(),
                    Ms(e.duration).to_string()
                )?;
                match &e.outcome {
                    Outcome::Failed(err) => write!(f, "  {err}")?,
                    Outcome::Panicked(msg) => write!(f, "  {msg}")?,
                    _ => {}
                }
            }
        }
        for d in &self.delivery {
            write!(
                f,
                "\n  delivered  {:<16} {:<13} run: {}; at exit: {}",
                d.stage,
                d.items.to_string(),
                d.run,
                d.at_exit
            )?;
        }
        for s in &self.final_scrapes {
            write!(f, "\n  scrape     {s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_line_says_no_probe_rather_than_none() {
        let report = ShutdownReport {
            reason: Reason::Requested("test".into()),
            phases: vec![PhaseReport {
                phase: Phase::Announce,
                outcome: PhaseOutcome::Completed,
                duration: Duration::from_millis(500),
                entries: Vec::new(),
            }],
            in_flight_at_drain_start: 0,
            last_request_after_announce: Some(Duration::from_millis(200)),
            last_probe_after_announce: None,
            requests_rejected: 0,
            requests_panicked: 0,
            cut: Vec::new(),
            upgrades_failed: Vec::new(),
            final_scrapes: Vec::new(),
            delivery: Vec::new(),
            escalated: false,
            total: Duration::from_millis(500),
            over_budget: false,
            status: ShutdownStatus::Clean,
            exit_code: 0,
        };
        let text = report.to_string();
        assert!(
            text.contains("(last request at 200.0ms, no probe)"),
            "{text}"
        );
        assert!(!text.contains("none"), "{text}");
    }
}
