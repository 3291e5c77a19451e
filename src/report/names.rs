//! The names of the metrics and spans finale records about the shutdown itself.
//!
//! Metrics go through the [`metrics`] facade, so whatever recorder the application installed
//! (for example metrics-exporter-prometheus) receives them. The shutdown's own metrics are
//! recorded when the Workers phase ends, before the Telemetry phase starts, so the final push
//! carries them; the request counters as they happen.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `finale_shutting_down` | gauge | | 1 from the start of the sequence |
//! | `finale_shutdowns_total` | counter | `reason` | shutdowns, by [reason kind](reason_label) |
//! | `finale_shutdown_duration_seconds` | gauge | | trigger to the start of the Telemetry phase |
//! | `finale_phase_duration_seconds` | gauge | `phase`, `outcome` | each of Announce, Drain, Workers |
//! | `finale_hook_duration_seconds` | gauge | `phase`, `name`, `outcome` | each hook, task and wait |
//! | `finale_in_flight_at_drain_start` | gauge | | in-flight work when the Drain phase started |
//! | `finale_requests_rejected_total` | counter | | requests answered 503 while draining |
//! | `finale_request_panics_total` | counter | | requests whose handler panicked (answered 500) |
//! | `finale_supervisor_takeovers_total` | counter | | the supervisor ended a wedged shutdown (recorded just before its own flush) |
//! | `finale_upgrades_total` | counter | `outcome` | upgrades (feature `upgrade`): `ready`, `exited`, `not_ready`, `spawn_failed`, `refused` |
//!
//! | span | fields | covers |
//! |---|---|---|
//! | `finale.shutdown` | `reason` | Announce, Drain and Workers (closed before the flush) |
//! | `finale.phase` | `phase` | one phase |
//! | `finale.hook` | `phase`, `name` | one hook, task or wait |
//!
//! All of them use the `tracing` target `finale`.

use std::time::Duration;

use crate::report::{PhaseReport, Reason};

/// Gauge: 1 once the shutdown sequence started.
pub const SHUTTING_DOWN: &str = "finale_shutting_down";
/// Counter: shutdowns, labelled `reason`.
pub const SHUTDOWNS: &str = "finale_shutdowns_total";
/// Gauge: seconds from the trigger to the start of the Telemetry phase.
pub const SHUTDOWN_DURATION: &str = "finale_shutdown_duration_seconds";
/// Gauge: seconds per phase, labelled `phase` and `outcome`.
pub const PHASE_DURATION: &str = "finale_phase_duration_seconds";
/// Gauge: seconds per hook, task or wait, labelled `phase`, `name` and `outcome`.
pub const HOOK_DURATION: &str = "finale_hook_duration_seconds";
/// Gauge: in-flight work when the Drain phase started.
pub const IN_FLIGHT_AT_DRAIN_START: &str = "finale_in_flight_at_drain_start";
/// Counter: requests answered `503` while draining.
pub const REQUESTS_REJECTED: &str = "finale_requests_rejected_total";
/// Counter: requests whose handler panicked; the server answered `500` and kept serving.
pub const REQUEST_PANICS: &str = "finale_request_panics_total";
/// Counter: the supervisor took over a shutdown whose runtime was wedged, flushed what it could
/// reach and ended the process.
pub const SUPERVISOR_TAKEOVERS: &str = "finale_supervisor_takeovers_total";
/// Counter: upgrades (socket hand-off to a successor), labelled `outcome`: `ready`, `exited`,
/// `not_ready`, `spawn_failed` or `refused`.
pub const UPGRADES_TOTAL: &str = "finale_upgrades_total";

/// The span around Announce, Drain and Workers.
pub const SPAN_SHUTDOWN: &str = "finale.shutdown";
/// The span around one phase.
pub const SPAN_PHASE: &str = "finale.phase";
/// The span around one hook, task or wait.
pub const SPAN_HOOK: &str = "finale.hook";

/// The `reason` label of `finale_shutdowns_total`: `signal`, `requested`, `startup_failed`,
/// `task_failed`, `panic` or `upgrade`.
pub fn reason_label(reason: &Reason) -> &'static str {
    match reason {
        Reason::Signal(_) => "signal",
        Reason::Requested(_) => "requested",
        Reason::StartupFailed { .. } => "startup_failed",
        Reason::TaskFailed { .. } => "task_failed",
        Reason::Panic { .. } => "panic",
        Reason::Upgrade { .. } => "upgrade",
    }
}

pub(crate) fn record(
    reason: &Reason,
    phases: &[PhaseReport],
    in_flight_at_drain_start: usize,
    elapsed: Duration,
) {
    metrics::describe_gauge!(SHUTTING_DOWN, "1 once the shutdown sequence started");
    metrics::describe_counter!(SHUTDOWNS, "shutdowns by reason");
    metrics::describe_gauge!(
        SHUTDOWN_DURATION,
        metrics::Unit::Seconds,
        "trigger to the start of the telemetry phase"
    );
    metrics::describe_gauge!(
        PHASE_DURATION,
        metrics::Unit::Seconds,
        "duration of each phase"
    );
    metrics::describe_gauge!(
        HOOK_DURATION,
        metrics::Unit::Seconds,
        "duration of each hook, task and wait"
    );
    metrics::describe_gauge!(
        IN_FLIGHT_AT_DRAIN_START,
        "in-flight work when draining started"
    );
    metrics::counter!(SHUTDOWNS, "reason" => reason_label(reason)).increment(1);
    metrics::gauge!(SHUTDOWN_DURATION).set(elapsed.as_secs_f64());
    metrics::gauge!(IN_FLIGHT_AT_DRAIN_START).set(in_flight_at_drain_start as f64);
    for p in phases {
        metrics::gauge!(PHASE_DURATION, "phase" => p.phase.as_str(), "outcome" => p.outcome.as_str())
            .set(p.duration.as_secs_f64());
        for e in &p.entries {
            metrics::gauge!(
                HOOK_DURATION,
                "phase" => p.phase.as_str(),
                "name" => e.name.to_string(),
                "outcome" => e.outcome.as_str()
            )
            .set(e.duration.as_secs_f64());
        }
    }
}
