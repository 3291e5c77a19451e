//! `serde::Serialize` for the report and its parts, and [`ShutdownReport::to_json`] (feature
//! `serde`).
//!
//! Written by hand rather than derived, so that the JSON is a stable, flat shape for log
//! pipelines whatever the Rust types look like: snake-case names for every enum, durations as
//! seconds in an `f64` (`*_seconds`, like the metrics), errors as their message.

use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

use super::names::reason_label;
use super::{
    Counts, Delivery, EntryKind, EntryReport, FinalScrape, Outcome, PhaseOutcome, PhaseReport,
    Reason, ScrapeOutcome, ScrapeSeen, ShutdownReport, ShutdownStatus,
};
use crate::phase::Phase;
use crate::signal::Signal;

impl ShutdownReport {
    /// The whole report as one line of JSON, for log pipelines.
    ///
    /// ```json
    /// {"reason":{"kind":"signal","signal":"SIGTERM","message":"signal SIGTERM"},
    ///  "status":"clean","exit_code":0,"total_seconds":0.0124,"over_budget":false,
    ///  "escalated":false,"in_flight_at_drain_start":2,"requests_rejected":0,
    ///  "requests_panicked":0,"cut":[],
    ///  "phases":[{"phase":"announce","outcome":"completed","duration_seconds":0.0001,
    ///             "entries":[]},
    ///            {"phase":"workers","outcome":"completed","duration_seconds":0.0081,
    ///             "entries":[{"name":"close-db","kind":"hook","outcome":"failed",
    ///                         "error":"connection refused","duration_seconds":0.008}]}],
    ///  "delivery":[{"stage":"otlp-traces","items":"spans",
    ///               "run":{"exported":488,"failed":512,"unconfirmed":0,"dropped":0},
    ///               "at_exit":{"exported":12,"failed":0,"unconfirmed":0,"dropped":0}}]}
    /// ```
    ///
    /// - `status`: `clean`, `startup_failure`, `component_failure`, `deadline_overrun`,
    ///   `telemetry_not_delivered`, `forced`, `immediate`.
    /// - `reason.kind`: `signal` (with `signal`), `requested` (with `why`), `startup_failed` and
    ///   `task_failed` (with `name` and `error`), `panic` (with `panic` and `location`); every
    ///   reason also has its readable `message`.
    /// - an entry's `kind`: `hook`, `task`, `in_flight`, `drain_delay`; its `outcome`:
    ///   `completed`, `failed` (with `error`), `panicked` (with `panic`), `timed_out`,
    ///   `overran`, `abandoned`; a phase's `outcome`: `completed`, `deadline_reached`,
    ///   `escalated`, `skipped`.
    /// - `delivery`: one object per telemetry stage that counts, `{"stage", "items", "run",
    ///   "at_exit"}`, `items` one of `spans`, `log_records`, `metric_points`, `log_lines`,
    ///   `samples`, `other`, and `run` and `at_exit` each `{"exported", "failed", "unconfirmed",
    ///   "dropped"}`.
    /// - `final_scrapes`: one object per final-scrape stage (feature `prometheus`), `{"stage",
    ///   "outcome", "why", "waited_seconds", "scrapes"}`, `outcome` one of `scraped`,
    ///   `no_scraper_seen`, `interval_unknown`, `too_late` (with `predicted_seconds` and
    ///   `deadline_seconds`), `missed` (with `waiting_for`); each scrape `{"at_seconds",
    ///   "duration_seconds", "peer", "user_agent", "samples"}`.
    /// - every duration in seconds, as a floating-point number.
    ///
    /// The same shape comes from `serde_json::to_string(&report)` or any other `serde` format.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// #[tokio::main]
    /// async fn main() -> Result<(), finale::ConfigError> {
    ///     let finale = finale::Finale::builder().build()?;
    ///     let report = finale.run().await;
    ///     // One line a log pipeline parses, next to the readable timeline.
    ///     tracing::info!(target: "shutdown", report = %report.to_json());
    ///     report.exit()
    /// }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn to_json(&self) -> String {
        // Nothing here can fail to serialize: no map has non-string keys and serde_json writes
        // a non-finite float as `null`.
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::Value::String(format!("report not serialized: {e}")).to_string()
        })
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for ShutdownReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("ShutdownReport", 16)?;
        r.serialize_field("reason", &self.reason)?;
        r.serialize_field("status", &self.status)?;
        r.serialize_field("exit_code", &self.exit_code)?;
        r.serialize_field("total_seconds", &self.total.as_secs_f64())?;
        r.serialize_field("over_budget", &self.over_budget)?;
        r.serialize_field("escalated", &self.escalated)?;
        r.serialize_field("in_flight_at_drain_start", &self.in_flight_at_drain_start)?;
        r.serialize_field(
            "last_request_after_announce_seconds",
            &self.last_request_after_announce.map(|d| d.as_secs_f64()),
        )?;
        r.serialize_field(
            "last_probe_after_announce_seconds",
            &self.last_probe_after_announce.map(|d| d.as_secs_f64()),
        )?;
        r.serialize_field("requests_rejected", &self.requests_rejected)?;
        r.serialize_field("requests_panicked", &self.requests_panicked)?;
        r.serialize_field("cut", &self.cut)?;
        r.serialize_field("upgrades_failed", &self.upgrades_failed)?;
        r.serialize_field("phases", &self.phases)?;
        r.serialize_field("delivery", &self.delivery)?;
        r.serialize_field("final_scrapes", &self.final_scrapes)?;
        r.end()
    }
}

/// `{"stage": "final-scrape", "outcome": "scraped", "why": "...", "waited_seconds": 0.4,
/// "scrapes": [{"at_seconds", "duration_seconds", "peer", "user_agent", "samples"}]}`; a
/// `too_late` outcome also has `predicted_seconds` and `deadline_seconds`, a `missed` one
/// `waiting_for`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for FinalScrape {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_map(None)?;
        r.serialize_entry("stage", &*self.stage)?;
        r.serialize_entry("outcome", self.outcome.as_str())?;
        r.serialize_entry("why", &self.outcome.to_string())?;
        match &self.outcome {
            ScrapeOutcome::TooLate {
                predicted,
                deadline,
            } => {
                r.serialize_entry("predicted_seconds", &predicted.as_secs_f64())?;
                r.serialize_entry("deadline_seconds", &deadline.as_secs_f64())?;
            }
            ScrapeOutcome::Missed { waiting_for } => {
                r.serialize_entry("waiting_for", waiting_for)?;
            }
            _ => {}
        }
        r.serialize_entry("waited_seconds", &self.waited.as_secs_f64())?;
        r.serialize_entry("scrapes", &self.scrapes)?;
        r.end()
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for ScrapeSeen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("ScrapeSeen", 5)?;
        r.serialize_field("at_seconds", &self.at.as_secs_f64())?;
        r.serialize_field("duration_seconds", &self.duration.as_secs_f64())?;
        r.serialize_field("peer", &self.peer.to_string())?;
        r.serialize_field("user_agent", &self.user_agent)?;
        r.serialize_field("samples", &self.samples)?;
        r.end()
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for PhaseReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("PhaseReport", 4)?;
        r.serialize_field("phase", &self.phase)?;
        r.serialize_field("outcome", &self.outcome)?;
        r.serialize_field("duration_seconds", &self.duration.as_secs_f64())?;
        r.serialize_field("entries", &self.entries)?;
        r.end()
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for EntryReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_map(None)?;
        r.serialize_entry("name", &*self.name)?;
        r.serialize_entry("kind", &self.kind)?;
        outcome_entries(&self.outcome, &mut r)?;
        r.serialize_entry("duration_seconds", &self.duration.as_secs_f64())?;
        r.end()
    }
}

/// `{"stage": "otlp-traces", "items": "spans", "run": {..}, "at_exit": {..}}`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Delivery {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("Delivery", 4)?;
        r.serialize_field("stage", &*self.stage)?;
        r.serialize_field("items", self.items.as_str())?;
        r.serialize_field("run", &self.run)?;
        r.serialize_field("at_exit", &self.at_exit)?;
        r.end()
    }
}

/// `{"exported": 488, "failed": 512, "unconfirmed": 0, "dropped": 0}`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Counts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("Counts", 4)?;
        r.serialize_field("exported", &self.exported)?;
        r.serialize_field("failed", &self.failed)?;
        r.serialize_field("unconfirmed", &self.unconfirmed)?;
        r.serialize_field("dropped", &self.dropped)?;
        r.end()
    }
}

/// `outcome`, and `error` or `panic` when it has one.
fn outcome_entries<M: SerializeMap>(outcome: &Outcome, m: &mut M) -> Result<(), M::Error> {
    m.serialize_entry("outcome", outcome.as_str())?;
    match outcome {
        Outcome::Failed(error) => m.serialize_entry("error", &error.to_string()),
        Outcome::Panicked(message) => m.serialize_entry("panic", message),
        _ => Ok(()),
    }
}

/// `{"outcome": "failed", "error": "..."}`, as in an entry.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        outcome_entries(self, &mut m)?;
        m.end()
    }
}

/// `{"kind": "signal", "signal": "SIGTERM", "message": "signal SIGTERM"}` and so on.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", reason_label(self))?;
        match self {
            Reason::Signal(signal) => m.serialize_entry("signal", signal)?,
            Reason::Requested(why) => m.serialize_entry("why", &**why)?,
            Reason::StartupFailed { name, error } | Reason::TaskFailed { name, error } => {
                m.serialize_entry("name", &**name)?;
                m.serialize_entry("error", &error.to_string())?;
            }
            Reason::Panic { message, location } => {
                m.serialize_entry("panic", message)?;
                m.serialize_entry("location", location)?;
            }
            Reason::Upgrade { successor_pid } => {
                m.serialize_entry("successor_pid", successor_pid)?;
            }
        }
        m.serialize_entry("message", &self.to_string())?;
        m.end()
    }
}

/// A string: `clean`, `startup_failure`, `component_failure`, `deadline_overrun`,
/// `telemetry_not_delivered`, `forced`, `immediate`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for ShutdownStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

/// A string: `announce`, `drain`, `workers`, `telemetry`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A string: `hook`, `task`, `in_flight`, `drain_delay`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for EntryKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

/// A string: `completed`, `deadline_reached`, `escalated`, `skipped`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for PhaseOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A string: `SIGTERM`, `SIGINT`, ...
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::hook::HookError;
    use crate::report::ExitCodes;

    fn report() -> ShutdownReport {
        let entry = |name: &'static str, kind, outcome, ms| EntryReport {
            name: Cow::Borrowed(name),
            kind,
            outcome,
            duration: Duration::from_millis(ms),
        };
        let mut report = ShutdownReport {
            reason: Reason::Signal(Signal::Terminate),
            phases: vec![
                PhaseReport {
                    phase: Phase::Drain,
                    outcome: PhaseOutcome::Completed,
                    duration: Duration::from_millis(3),
                    entries: vec![entry(
                        "in-flight work",
                        EntryKind::InFlight,
                        Outcome::Completed,
                        3,
                    )],
                },
                PhaseReport {
                    phase: Phase::Workers,
                    outcome: PhaseOutcome::Completed,
                    duration: Duration::from_millis(8),
                    entries: vec![
                        entry(
                            "close-db",
                            EntryKind::Hook,
                            Outcome::Failed(HookError::msg("connection \"refused\"")),
                            8,
                        ),
                        entry(
                            "ticker",
                            EntryKind::Task,
                            Outcome::Panicked("boom".into()),
                            1,
                        ),
                    ],
                },
            ],
            in_flight_at_drain_start: 2,
            last_request_after_announce: None,
            last_probe_after_announce: None,
            requests_rejected: 1,
            requests_panicked: 0,
            cut: vec!["GET /events".into()],
            upgrades_failed: Vec::new(),
            delivery: vec![Delivery {
                stage: "otlp-traces".into(),
                items: crate::Items::Spans,
                run: Counts::new(488, 512, 0),
                at_exit: Counts::new(12, 0, 3),
            }],
            final_scrapes: Vec::new(),
            escalated: false,
            total: Duration::from_millis(1500),
            over_budget: false,
            status: ShutdownStatus::Clean,
            exit_code: 0,
        };
        report.classify(&ExitCodes::default(), crate::DeliveryPolicy::default());
        report
    }

    #[test]
    fn report_json_parses_back_with_every_field() {
        let json: Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(json["status"], "component_failure");
        assert_eq!(json["exit_code"], 4);
        assert_eq!(json["total_seconds"], 1.5);
        assert_eq!(json["reason"]["kind"], "signal");
        assert_eq!(json["reason"]["signal"], "SIGTERM");
        assert_eq!(json["reason"]["message"], "signal SIGTERM");
        assert_eq!(json["in_flight_at_drain_start"], 2);
        assert_eq!(json["requests_rejected"], 1);
        assert_eq!(json["cut"][0], "GET /events");
        let phases = json["phases"].as_array().unwrap();
        assert_eq!(phases[0]["phase"], "drain");
        assert_eq!(phases[0]["entries"][0]["kind"], "in_flight");
        assert_eq!(phases[1]["duration_seconds"], 0.008);
        let db = &phases[1]["entries"][0];
        assert_eq!(db["name"], "close-db");
        assert_eq!(db["kind"], "hook");
        assert_eq!(db["outcome"], "failed");
        assert_eq!(db["error"], "connection \"refused\"");
        let ticker = &phases[1]["entries"][1];
        assert_eq!(ticker["outcome"], "panicked");
        assert_eq!(ticker["panic"], "boom");
        assert!(ticker.get("error").is_none());
        let spans = &json["delivery"][0];
        assert_eq!(spans["stage"], "otlp-traces");
        assert_eq!(spans["items"], "spans");
        assert_eq!(spans["run"]["failed"], 512);
        assert_eq!(spans["at_exit"]["exported"], 12);
        assert_eq!(spans["at_exit"]["dropped"], 3);
    }

    #[test]
    fn report_json_and_display_carry_the_final_scrape() {
        let mut report = report();
        report.final_scrapes = crate::report::scrape::samples();
        let json: Value = serde_json::from_str(&report.to_json()).unwrap();
        let came = &json["final_scrapes"][0];
        assert_eq!(came["stage"], "final-scrape");
        assert_eq!(came["outcome"], "scraped");
        assert_eq!(came["waited_seconds"], 0.412);
        assert_eq!(came["scrapes"][0]["at_seconds"], 0.905);
        assert_eq!(came["scrapes"][0]["peer"], "10.0.0.7:51234");
        assert_eq!(came["scrapes"][0]["user_agent"], "Prometheus/2.42.0");
        assert_eq!(came["scrapes"][0]["samples"], 143);
        let late = &json["final_scrapes"][1];
        assert_eq!(late["outcome"], "too_late");
        assert_eq!(late["predicted_seconds"], 14.0);
        assert_eq!(late["deadline_seconds"], 2.4);
        assert!(late["why"].as_str().unwrap().contains("did not wait"));
        let text = report.to_string();
        assert!(
            text.contains(
                "\n  scrape     final-scrape: scraped, waited 412.0ms; first at 0.905s by \
             10.0.0.7:51234 (Prometheus/2.42.0), 143 samples in 2.0ms"
            ),
            "{text}"
        );
        assert!(text.contains("second: did not wait: the next scrape would end 14.000s"));
    }

    #[test]
    fn report_json_names_every_status_and_reason_kind() {
        let statuses = [
            ShutdownStatus::Clean,
            ShutdownStatus::StartupFailure,
            ShutdownStatus::ComponentFailure,
            ShutdownStatus::DeadlineOverrun,
            ShutdownStatus::TelemetryNotDelivered,
            ShutdownStatus::Forced,
            ShutdownStatus::Immediate,
        ];
        let names: Vec<String> = statuses
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "\"clean\"",
                "\"startup_failure\"",
                "\"component_failure\"",
                "\"deadline_overrun\"",
                "\"telemetry_not_delivered\"",
                "\"forced\"",
                "\"immediate\""
            ]
        );
        let reason = Reason::StartupFailed {
            name: "http".into(),
            error: HookError::msg("address in use"),
        };
        let json: Value = serde_json::to_value(&reason).unwrap();
        assert_eq!(json["kind"], "startup_failed");
        assert_eq!(json["name"], "http");
        assert_eq!(json["error"], "address in use");
        let json: Value = serde_json::to_value(Reason::Requested("deploy".into())).unwrap();
        assert_eq!(json["why"], "deploy");
        let json: Value = serde_json::to_value(Outcome::TimedOut).unwrap();
        assert_eq!(json, serde_json::json!({"outcome": "timed_out"}));
    }
}
