//! The names of the metrics and spans finale records about the shutdown itself.
//!
//! Metrics go through the [`metrics`] facade, so whatever recorder the application installed
//! (for example metrics-exporter-prometheus) receives them. The shutdown's own metrics are
//! recorded when the Workers phase ends, before the Telemetry phase starts, so the final push
//! carries them; the request counters as they happen.
//!
//! With the `otlp` feature and a meter provider given to [`Otlp`](crate::otlp::Otlp), the same
//! metrics are recorded through an OpenTelemetry `Meter` of that provider as well (scope
//! `finale`), so that a service exporting only OTLP sees them in its final export: the same
//! names and attributes, with the units below (UCUM, as OpenTelemetry has them: `s`, and `{…}`
//! annotations for counts, which a collector's Prometheus exporter drops, so the names come out
//! unchanged there too). Counters are monotonic sums, gauges OpenTelemetry gauges; the two
//! request counters are observable counters read when the provider collects (nothing is added
//! to the request path).
//!
//! | metric | type | labels | unit | meaning |
//! |---|---|---|---|---|
//! | `finale_shutting_down` | gauge | | | 1 from the start of the sequence |
//! | `finale_shutdowns_total` | counter | `reason` | `{shutdown}` | shutdowns, by [reason kind](reason_label) |
//! | `finale_shutdown_duration_seconds` | gauge | | `s` | trigger to the start of the Telemetry phase |
//! | `finale_phase_duration_seconds` | gauge | `phase`, `outcome` | `s` | each of Announce, Drain, Workers |
//! | `finale_hook_duration_seconds` | gauge | `phase`, `name`, `outcome` | `s` | each hook, task and wait |
//! | `finale_in_flight_at_drain_start` | gauge | | `{request}` | in-flight work when the Drain phase started |
//! | `finale_requests_rejected_total` | counter | | `{request}` | requests answered 503 near the drain deadline |
//! | `finale_request_panics_total` | counter | | `{request}` | requests whose handler panicked (answered 500) |
//! | `finale_supervisor_takeovers_total` | counter | | `{takeover}` | the supervisor ended a wedged shutdown (recorded just before its own flush) |
//! | `finale_upgrades_total` | counter | `outcome` | `{upgrade}` | upgrades (feature `upgrade`): `ready`, `exited`, `not_ready`, `spawn_failed`, `refused` |
//!
//! | span | fields | covers |
//! |---|---|---|
//! | `finale.shutdown` | `reason` | Announce, Drain and Workers (closed before the flush) |
//! | `finale.phase` | `phase` | one phase |
//! | `finale.hook` | `phase`, `name` | one hook, task or wait |
//!
//! All of them use the `tracing` target `finale`.

use std::sync::Arc;
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
/// Counter: requests answered `503` near the drain deadline.
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

/// What finale records of a metric besides its name: for the facade's `describe_*` and for
/// recorders that declare instruments up front (OpenTelemetry).
#[derive(Debug)]
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    /// UCUM, as OpenTelemetry wants it; empty for none.
    pub(crate) unit: &'static str,
    pub(crate) description: &'static str,
}

/// How a metric's values combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Only goes up; recorded by adding.
    Counter,
    /// The last value set.
    Gauge,
}

impl Metric {
    const fn new(
        name: &'static str,
        kind: Kind,
        unit: &'static str,
        description: &'static str,
    ) -> Self {
        Self {
            name,
            kind,
            unit,
            description,
        }
    }
}

/// Every metric in the tables of the [module docs](self), with its unit and description.
pub(crate) mod metric {
    use super::{Kind, Metric};

    pub(crate) const SHUTTING_DOWN: Metric = Metric::new(
        super::SHUTTING_DOWN,
        Kind::Gauge,
        "",
        "1 once the shutdown sequence started",
    );
    pub(crate) const SHUTDOWNS: Metric = Metric::new(
        super::SHUTDOWNS,
        Kind::Counter,
        "{shutdown}",
        "shutdowns by reason",
    );
    pub(crate) const SHUTDOWN_DURATION: Metric = Metric::new(
        super::SHUTDOWN_DURATION,
        Kind::Gauge,
        "s",
        "trigger to the start of the telemetry phase",
    );
    pub(crate) const PHASE_DURATION: Metric = Metric::new(
        super::PHASE_DURATION,
        Kind::Gauge,
        "s",
        "duration of each phase",
    );
    pub(crate) const HOOK_DURATION: Metric = Metric::new(
        super::HOOK_DURATION,
        Kind::Gauge,
        "s",
        "duration of each hook, task and wait",
    );
    pub(crate) const IN_FLIGHT_AT_DRAIN_START: Metric = Metric::new(
        super::IN_FLIGHT_AT_DRAIN_START,
        Kind::Gauge,
        "{request}",
        "in-flight work when draining started",
    );
    pub(crate) const REQUESTS_REJECTED: Metric = Metric::new(
        super::REQUESTS_REJECTED,
        Kind::Counter,
        "{request}",
        "requests answered 503 near the drain deadline",
    );
    pub(crate) const REQUEST_PANICS: Metric = Metric::new(
        super::REQUEST_PANICS,
        Kind::Counter,
        "{request}",
        "requests whose handler panicked (answered 500)",
    );
    pub(crate) const SUPERVISOR_TAKEOVERS: Metric = Metric::new(
        super::SUPERVISOR_TAKEOVERS,
        Kind::Counter,
        "{takeover}",
        "the supervisor ended a wedged shutdown",
    );
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    pub(crate) const UPGRADES_TOTAL: Metric = Metric::new(
        super::UPGRADES_TOTAL,
        Kind::Counter,
        "{upgrade}",
        "upgrades by outcome",
    );

    /// The metrics recorded as they happen or once before the Telemetry phase. The request
    /// counters are not among them: they are counted by the state and read where needed.
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub(crate) const RECORDED: [&Metric; 8] = [
        &SHUTTING_DOWN,
        &SHUTDOWNS,
        &SHUTDOWN_DURATION,
        &PHASE_DURATION,
        &HOOK_DURATION,
        &IN_FLIGHT_AT_DRAIN_START,
        &SUPERVISOR_TAKEOVERS,
        &UPGRADES_TOTAL,
    ];
}

/// Labels as finale records them: fixed keys, values of the moment.
pub(crate) type Labels<'a> = &'a [(&'static str, &'a str)];

/// A recorder of finale's metrics besides the [`metrics`] facade: the meter provider given to
/// the OTLP integration. Set on the state before the sequence starts.
pub(crate) trait Recorder: Send + Sync {
    /// Adds `value` to a [`Kind::Counter`].
    fn add(&self, metric: &Metric, labels: Labels<'_>, value: u64);
    /// Sets a [`Kind::Gauge`].
    fn set(&self, metric: &Metric, labels: Labels<'_>, value: f64);
}

fn facade_labels(labels: Labels<'_>) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|&(key, value)| metrics::Label::new(key, value.to_owned()))
        .collect()
}

/// Adds `value` to a counter, through the facade and every sink.
pub(crate) fn add(sinks: &[Arc<dyn Recorder>], metric: &Metric, labels: Labels<'_>, value: u64) {
    debug_assert_eq!(metric.kind, Kind::Counter, "{}", metric.name);
    metrics::counter!(metric.name, facade_labels(labels)).increment(value);
    for sink in sinks {
        sink.add(metric, labels, value);
    }
}

/// Sets a gauge, through the facade and every sink.
pub(crate) fn set(sinks: &[Arc<dyn Recorder>], metric: &Metric, labels: Labels<'_>, value: f64) {
    debug_assert_eq!(metric.kind, Kind::Gauge, "{}", metric.name);
    metrics::gauge!(metric.name, facade_labels(labels)).set(value);
    for sink in sinks {
        sink.set(metric, labels, value);
    }
}

fn describe(metric: &Metric) {
    let unit = match metric.unit {
        "s" => Some(metrics::Unit::Seconds),
        _ => None,
    };
    match (metric.kind, unit) {
        (Kind::Counter, Some(unit)) => {
            metrics::describe_counter!(metric.name, unit, metric.description)
        }
        (Kind::Counter, None) => metrics::describe_counter!(metric.name, metric.description),
        (Kind::Gauge, Some(unit)) => {
            metrics::describe_gauge!(metric.name, unit, metric.description)
        }
        (Kind::Gauge, None) => metrics::describe_gauge!(metric.name, metric.description),
    }
}

/// Records the shutdown's own metrics, before the Telemetry phase flushes them.
pub(crate) fn record(
    sinks: &[Arc<dyn Recorder>],
    reason: &Reason,
    phases: &[PhaseReport],
    in_flight_at_drain_start: usize,
    elapsed: Duration,
) {
    for m in [
        &metric::SHUTTING_DOWN,
        &metric::SHUTDOWNS,
        &metric::SHUTDOWN_DURATION,
        &metric::PHASE_DURATION,
        &metric::HOOK_DURATION,
        &metric::IN_FLIGHT_AT_DRAIN_START,
    ] {
        describe(m);
    }
    add(
        sinks,
        &metric::SHUTDOWNS,
        &[("reason", reason_label(reason))],
        1,
    );
    set(
        sinks,
        &metric::SHUTDOWN_DURATION,
        &[],
        elapsed.as_secs_f64(),
    );
    set(
        sinks,
        &metric::IN_FLIGHT_AT_DRAIN_START,
        &[],
        in_flight_at_drain_start as f64,
    );
    for p in phases {
        let (phase, outcome) = (p.phase.as_str(), p.outcome.as_str());
        set(
            sinks,
            &metric::PHASE_DURATION,
            &[("phase", phase), ("outcome", outcome)],
            p.duration.as_secs_f64(),
        );
        for e in &p.entries {
            set(
                sinks,
                &metric::HOOK_DURATION,
                &[
                    ("phase", phase),
                    ("name", &e.name),
                    ("outcome", e.outcome.as_str()),
                ],
                e.duration.as_secs_f64(),
            );
        }
    }
}
