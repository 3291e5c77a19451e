//! Flush and shut down the application's OpenTelemetry SDK providers in the Telemetry phase,
//! each on its own thread, in parallel, bounded, and find out what was really delivered.
//!
//! Hand finale the [`SdkTracerProvider`], [`SdkMeterProvider`] and [`SdkLoggerProvider`] as you
//! built them (clones: they are handles); finale installs no global provider or subscriber.
//!
//! # What happens in the Telemetry phase
//!
//! | hook | order | what |
//! |---|---|---|
//! | `otlp-metrics` | [`ORDER_METRICS`] | the meter provider, next to the Pushgateway push |
//! | `otlp-traces` | [`ORDER_TRACES_LOGS`] | the tracer provider |
//! | `otlp-logs` | [`ORDER_TRACES_LOGS`] | the logger provider, alongside the tracer |
//!
//! Each hook runs `force_flush` and then `shutdown_with_timeout` on a plain thread of its own and
//! waits for it until its stage must give up (see [`ORDER_METRICS`] for the
//! shares of the slot). The providers' calls block, and some of them ignore their timeout (the
//! meter's `shutdown` always waits up to 5 s, its `force_flush` as long as the export runs): a
//! thread still blocked when the wait ends is left behind and dies with the process. So a hung
//! collector costs the slot's share once, not 5 s per provider in a row.
//!
//! **finale's own metrics.** With a meter provider, finale records its shutdown metrics
//! ([`names`](crate::names): `finale_shutdowns_total`, `finale_shutdown_duration_seconds`,
//! `finale_phase_duration_seconds`, ...) through a `Meter` of that provider (scope `finale`) as
//! well as through the `metrics` facade, before the Telemetry phase starts, so a service that
//! exports only OTLP finds them in the final export. Same names and attributes, with units;
//! turn it off with [`Otlp::finale_metrics`]`(false)`.
//!
//! **What was delivered.** The tracer's and logger's `shutdown` return `Ok` even when their final
//! export failed. finale therefore calls `force_flush` first, which does report export errors: a
//! hook completes only when the flush (and then the shutdown) succeeded; otherwise it fails with
//! an [`OtlpError`] naming the provider and the cause, and the run's status becomes
//! [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered). The shutdown runs
//! even after a failed flush, with what is left of the stage's share: the SDK's flush gives up
//! after a fixed 5 s while a slow but healthy collector is still taking the export, and the
//! shutdown then waits for the batch thread to export the rest.
//!
//! **How much was delivered.** Wrap each exporter in [`Counted`] and hand its [`Counter`] to
//! [`Otlp`] (and, for spans and log records, to the provider as a processor): the report's
//! [`delivery`](crate::ShutdownReport::delivery) then says, per signal, how many items were
//! exported, failed and dropped during the run and at exit, so an export that failed a minute
//! before the shutdown, or a queue that overflowed, is visible, and the
//! [`DeliveryPolicy`](crate::DeliveryPolicy) decides whether it changes the exit code. With
//! a counter, a flush that only ran out of the SDK's fixed 5 s counts as delivered when the
//! shutdown then drained the queue without a failed export.
//!
//! An export still waiting for its answer when the flush gives up counts as unconfirmed (handed
//! to the exporter, no answer: whether its request was written is not known, a connection never
//! made counts here too), not as dropped. A collector's **partial success** (`200` with some items
//! rejected) is only logged by opentelemetry-otlp, which returns `Ok`: over OTLP/HTTP, send
//! through a [`CountingClient`](Counter::http_client) (feature `otlp-http`) and the rejected
//! items count as failed. Over OTLP/gRPC finale cannot read the answer (the exporter takes a
//! tonic `Channel` and its interceptors see requests only): a partial success counts as
//! exported.
//!
//! # Requirements and traps
//!
//! - **Use the SDK's default, thread-based processors** (`with_batch_exporter`,
//!   `PeriodicReader`). The `experimental_async_runtime` ones block forever on a
//!   `current_thread` runtime.
//! - **gRPC (tonic) exporters: build them with [`with_exporter_runtime`].** A tonic exporter's
//!   export makes progress only while the runtime it was built in polls tonic's connection.
//!   Built inside `with_exporter_runtime`, that is a runtime of finale's own on a thread of its
//!   own, so the exporters deliver even when your runtime is wedged and the supervisor flushes
//!   from its own threads. Built on your runtime instead, they deliver only while it runs:
//!   finale never blocks a runtime thread for them (the flushes run on their own threads and
//!   are awaited), so a `current_thread` or one-worker runtime that is healthy still works, but
//!   after a takeover of a wedged runtime they deliver nothing (the report says
//!   `not delivered`). Either way call [`Finale::run`](crate::Finale::run) from inside the
//!   runtime; do not drop the runtime first. [`Otlp::register`] warns about each provider
//!   whose exporter finale cannot tell delivers from a takeover (see there): building the
//!   exporters inside [`with_exporter_runtime`] silences it.
//! - **The async-client feature trap.** opentelemetry-otlp's HTTP exporter picks its client by
//!   cargo feature, and an async client wins: if *any* crate in the build enables
//!   `opentelemetry-otlp/reqwest-client` or `hyper-client`, the batch threads, which have no
//!   tokio reactor, panic with "there is no reactor running" and nothing is exported, while the
//!   tracer's `shutdown` still says `Ok`. Use `reqwest-blocking-client` and pass the client
//!   explicitly (`with_http_client(reqwest::blocking::Client)`, built outside any runtime), and
//!   check `cargo tree -e features -i opentelemetry-otlp`. finale's `force_flush`-first check
//!   reports such a build as not delivered instead of silently losing everything.
//! - **Spans are exported when they close.** A span still open at exit (a root span around
//!   `main`) is never exported; finale's own `finale.shutdown` span closes before the flush.
//! - **Filter the exporters' own events out of the OTLP layers** (`opentelemetry`, `hyper`,
//!   `h2`, `tonic`, `tower`, `reqwest` targets), or the export of logs about the export feeds
//!   itself.
//!
//! # Examples
//!
//! ```no_run
//! use finale::Finale;
//! use finale::otlp::Otlp;
//! use opentelemetry_sdk::trace::SdkTracerProvider;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     // Build the exporters inside the runtime; here a provider without one.
//!     let tracer_provider = SdkTracerProvider::builder().build();
//!     let finale = Finale::builder().build()?;
//!     Otlp::new()
//!         .tracer_provider(tracer_provider.clone())
//!         .register(&finale)?;
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::metrics::{
    Counter as OtelCounter, Gauge, MeterProvider as _, ObservableCounter,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::{
    LogBatch, LogExporter, LogProcessor, SdkLogRecord, SdkLoggerProvider,
};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use tokio::time::Instant;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::{Hook, HookContext};
use crate::phase::Phase;
use crate::report::names::{Kind, Labels, Metric, Recorder, metric};
use crate::report::{Counts, Items, Tally};
use crate::slot::{ORDER_METRICS, ORDER_TRACES_LOGS, Share, stage_deadline};
use crate::state::{EmergencyStage, Shared};
use crate::telemetry::stages::{Handoff, OffThread, run_until};

mod runtime;
pub use runtime::with_exporter_runtime;
mod takeover;

#[cfg(feature = "otlp-http")]
mod http;
#[cfg(feature = "otlp-http")]
#[cfg_attr(docsrs, doc(cfg(feature = "otlp-http")))]
pub use http::CountingClient;

/// The report name of the meter provider's hook.
pub const HOOK_METRICS: &str = "otlp-metrics";
/// The report name of the tracer provider's hook.
pub const HOOK_TRACES: &str = "otlp-traces";
/// The report name of the logger provider's hook.
pub const HOOK_LOGS: &str = "otlp-logs";

/// Which provider an [`OtlpError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// The [`SdkTracerProvider`]: spans.
    Tracer,
    /// The [`SdkMeterProvider`]: metrics.
    Meter,
    /// The [`SdkLoggerProvider`]: log records.
    Logger,
}

impl Provider {
    /// What the provider exports: `traces`, `metrics` or `logs`.
    pub fn signal(self) -> &'static str {
        match self {
            Provider::Tracer => "traces",
            Provider::Meter => "metrics",
            Provider::Logger => "logs",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.signal())
    }
}

/// Why a provider's telemetry was not (or not surely) delivered.
///
/// [`source`](StdError::source) gives the SDK's error.
#[derive(Debug)]
#[non_exhaustive]
pub enum OtlpError {
    /// `force_flush` failed: the export was refused, failed or timed out inside the SDK.
    Flush {
        /// Which provider.
        provider: Provider,
        /// The SDK's error.
        source: OTelSdkError,
    },
    /// The flush succeeded but `shutdown` failed: what was recorded in between may be lost.
    Shutdown {
        /// Which provider.
        provider: Provider,
        /// The SDK's error.
        source: OTelSdkError,
    },
    /// The flush and shutdown did not finish before the stage had to give up; the thread was
    /// left behind.
    TimedOut {
        /// Which provider.
        provider: Provider,
        /// How long finale waited.
        waited: Duration,
    },
    /// The provider panicked while flushing.
    Panicked {
        /// Which provider.
        provider: Provider,
        /// The panic message.
        message: String,
    },
    /// The supervisor took the flush over (the runtime was wedged when the Telemetry phase was
    /// due) and it did not deliver, or had not finished at this stage's deadline.
    TakenOver {
        /// Which provider.
        provider: Provider,
        /// What the supervisor's flush said.
        message: String,
    },
    /// The flush thread could not be started.
    Thread {
        /// Which provider.
        provider: Provider,
        /// The OS error.
        source: io::Error,
    },
}

impl OtlpError {
    /// The provider the error is about.
    pub fn provider(&self) -> Provider {
        match self {
            OtlpError::Flush { provider, .. }
            | OtlpError::Shutdown { provider, .. }
            | OtlpError::TimedOut { provider, .. }
            | OtlpError::Panicked { provider, .. }
            | OtlpError::TakenOver { provider, .. }
            | OtlpError::Thread { provider, .. } => *provider,
        }
    }
}

impl fmt::Display for OtlpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtlpError::Flush { provider, source } => {
                write!(f, "OTLP {provider} not delivered: flush failed: {source}")
            }
            OtlpError::Shutdown { provider, source } => write!(
                f,
                "OTLP {provider} flushed, but the shutdown failed (the last records may be lost): {source}"
            ),
            OtlpError::TimedOut { provider, waited } => write!(
                f,
                "OTLP {provider} not delivered: the flush did not finish within {waited:?} \
                 (collector unreachable or not answering)"
            ),
            OtlpError::Panicked { provider, message } => {
                write!(
                    f,
                    "OTLP {provider} not delivered: the flush panicked: {message}"
                )
            }
            OtlpError::TakenOver { provider, message } => write!(
                f,
                "OTLP {provider} not delivered by the supervisor, which took the flush over: \
                 {message}"
            ),
            OtlpError::Thread { provider, source } => write!(
                f,
                "OTLP {provider} not delivered: cannot start the flush thread: {source}"
            ),
        }
    }
}

impl StdError for OtlpError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            OtlpError::Flush { source, .. } | OtlpError::Shutdown { source, .. } => Some(source),
            OtlpError::Thread { source, .. } => Some(source),
            OtlpError::TimedOut { .. }
            | OtlpError::Panicked { .. }
            | OtlpError::TakenOver { .. } => None,
        }
    }
}

/// The OpenTelemetry providers finale flushes and shuts down in the Telemetry phase. See the
/// [module docs](self).
#[derive(Clone, Debug, Default)]
#[must_use = "nothing is flushed until `register` is called"]
pub struct Otlp {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    logger: Option<SdkLoggerProvider>,
    spans: Option<Counter>,
    points: Option<Counter>,
    records: Option<Counter>,
    /// Set by [`Otlp::finale_metrics`]`(false)`.
    without_finale_metrics: bool,
}

impl Otlp {
    /// No provider yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flushes and shuts down this tracer provider (hook `otlp-traces`).
    pub fn tracer_provider(mut self, provider: SdkTracerProvider) -> Self {
        self.tracer = Some(provider);
        self
    }

    /// Flushes and shuts down this meter provider (hook `otlp-metrics`), and records finale's
    /// own metrics through it (see [`finale_metrics`](Otlp::finale_metrics)).
    pub fn meter_provider(mut self, provider: SdkMeterProvider) -> Self {
        self.meter = Some(provider);
        self
    }

    /// Whether finale records its own metrics ([`names`](crate::names): the shutdown's
    /// duration, its phases and hooks, in-flight work, rejected requests, ...) through the
    /// [meter provider](Otlp::meter_provider) too, besides the `metrics` facade, so that a
    /// service exporting only OTLP finds them in the final export. They use a `Meter` of scope
    /// `finale` and the names, attributes and units listed in [`names`](crate::names).
    ///
    /// # Default values
    ///
    /// | setting | default |
    /// |---|---|
    /// | `finale_metrics` | `true` (when a meter provider is given) |
    pub fn finale_metrics(mut self, record: bool) -> Self {
        self.without_finale_metrics = !record;
        self
    }

    /// Flushes and shuts down this logger provider (hook `otlp-logs`).
    pub fn logger_provider(mut self, provider: SdkLoggerProvider) -> Self {
        self.logger = Some(provider);
        self
    }

    /// Reports what the tracer provider's [`Counted`] exporter counted (entry `otlp-traces` of
    /// [`ShutdownReport::delivery`](crate::ShutdownReport::delivery)).
    pub fn span_counter(mut self, counter: Counter) -> Self {
        self.spans = Some(counter);
        self
    }

    /// Reports what the meter provider's [`Counted`] exporter counted (entry `otlp-metrics`).
    pub fn metric_point_counter(mut self, counter: Counter) -> Self {
        self.points = Some(counter);
        self
    }

    /// Reports what the logger provider's [`Counted`] exporter counted (entry `otlp-logs`).
    pub fn log_record_counter(mut self, counter: Counter) -> Self {
        self.records = Some(counter);
        self
    }

    /// Registers one Telemetry hook per provider given.
    ///
    /// **A warning for an exporter that may not deliver from a takeover.** When the runtime is
    /// wedged, the supervisor flushes the providers from its own threads; a gRPC (tonic)
    /// exporter built on your runtime delivers nothing then (see the [module docs](self)).
    /// finale cannot see the exporter inside a provider, so for each provider it logs a
    /// warning (target `finale`, field `stage`: `otlp-traces`, `otlp-metrics` or `otlp-logs`)
    /// unless it can tell that the exporter delivers:
    ///
    /// - its [`Counter`] made a [`CountingClient`](Counter::http_client) before this call
    ///   (feature `otlp-http`; per provider), or
    /// - [`with_exporter_runtime`] has run in this process (per process: finale cannot tell
    ///   which exporters it built, so build every gRPC exporter inside).
    ///
    /// Each is a sign finale can see, not proof: a counting client is taken to be the one the
    /// exporter sends OTLP/HTTP with, but finale cannot see which client an exporter was built
    /// with, so a counter whose client the exporter does not use (made up front, then a gRPC
    /// exporter picked at run time) silences the warning too. Make the counting client only for
    /// the OTLP/HTTP exporter that sends through it.
    ///
    /// Building the exporters inside [`with_exporter_runtime`] is harmless for any exporter and
    /// silences the warning. Whatever the warning said, the report says which stages the
    /// supervisor delivered.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`] if a hook name is taken (say, registered twice).
    pub fn register(self, finale: &Finale) -> Result<(), ConfigError> {
        if let Some(p) = self.meter {
            let own = (!self.without_finale_metrics)
                .then(|| Arc::new(FinaleMetrics::new(&p, Arc::downgrade(&finale.shared))));
            register_flush(
                finale,
                HOOK_METRICS,
                Provider::Meter,
                ORDER_METRICS,
                Share::METRICS,
                p,
                self.points.clone(),
            )?;
            takeover::warn_unless_known(HOOK_METRICS, self.points.as_ref());
            if let Some(own) = own {
                finale.shared.add_recorder(own);
            }
        }
        if let Some(p) = self.tracer {
            register_flush(
                finale,
                HOOK_TRACES,
                Provider::Tracer,
                ORDER_TRACES_LOGS,
                Share::TRACES_LOGS,
                p,
                self.spans.clone(),
            )?;
            takeover::warn_unless_known(HOOK_TRACES, self.spans.as_ref());
        }
        if let Some(p) = self.logger {
            register_flush(
                finale,
                HOOK_LOGS,
                Provider::Logger,
                ORDER_TRACES_LOGS,
                Share::TRACES_LOGS,
                p,
                self.records.clone(),
            )?;
            takeover::warn_unless_known(HOOK_LOGS, self.records.as_ref());
        }
        Ok(())
    }
}

/// finale's own metrics as OpenTelemetry instruments of the user's meter provider: the same
/// names and attributes as through the facade (see [`names`](crate::names)).
struct FinaleMetrics {
    counters: Vec<(&'static str, OtelCounter<u64>)>,
    gauges: Vec<(&'static str, Gauge<f64>)>,
    /// Read by the provider when it collects; kept with the rest.
    _observed: [ObservableCounter<u64>; 2],
}

impl FinaleMetrics {
    fn new(provider: &SdkMeterProvider, shared: Weak<Shared>) -> Self {
        let meter = provider.meter_with_scope(
            InstrumentationScope::builder("finale")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let mut counters = Vec::new();
        let mut gauges = Vec::new();
        for m in metric::RECORDED {
            match m.kind {
                Kind::Counter => counters.push((
                    m.name,
                    meter
                        .u64_counter(m.name)
                        .with_unit(m.unit)
                        .with_description(m.description)
                        .build(),
                )),
                Kind::Gauge => gauges.push((
                    m.name,
                    meter
                        .f64_gauge(m.name)
                        .with_unit(m.unit)
                        .with_description(m.description)
                        .build(),
                )),
            }
        }
        // The request counters are counted by the state (the tracker, the layer) already:
        // observed when the provider collects, they cost the request path nothing.
        let observed = |m: &Metric, read: fn(&Shared) -> u64| {
            let shared = shared.clone();
            meter
                .u64_observable_counter(m.name)
                .with_unit(m.unit)
                .with_description(m.description)
                .with_callback(move |observer| {
                    if let Some(shared) = shared.upgrade() {
                        observer.observe(read(&shared), &[]);
                    }
                })
                .build()
        };
        Self {
            counters,
            gauges,
            _observed: [
                observed(&metric::REQUESTS_REJECTED, Shared::requests_rejected),
                observed(&metric::REQUEST_PANICS, |s| s.in_flight.panicked()),
            ],
        }
    }
}

fn attributes(labels: Labels<'_>) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|&(key, value)| KeyValue::new(key, value.to_owned()))
        .collect()
}

impl Recorder for FinaleMetrics {
    fn add(&self, metric: &Metric, labels: Labels<'_>, value: u64) {
        if let Some((_, counter)) = self.counters.iter().find(|(n, _)| *n == metric.name) {
            counter.add(value, &attributes(labels));
        }
    }

    fn set(&self, metric: &Metric, labels: Labels<'_>, value: f64) {
        if let Some((_, gauge)) = self.gauges.iter().find(|(n, _)| *n == metric.name) {
            gauge.record(value, &attributes(labels));
        }
    }
}

/// The three providers' common calls.
trait Flush: Send + 'static {
    fn force_flush(&self) -> OTelSdkResult;
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult;
}

macro_rules! impl_flush {
    ($($t:ty),*) => {$(
        impl Flush for $t {
            fn force_flush(&self) -> OTelSdkResult {
                <$t>::force_flush(self)
            }
            fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
                <$t>::shutdown_with_timeout(self, timeout)
            }
        }
    )*};
}
impl_flush!(SdkTracerProvider, SdkMeterProvider, SdkLoggerProvider);

fn register_flush<P: Flush>(
    finale: &Finale,
    name: &'static str,
    provider: Provider,
    order: i32,
    share: Share,
    p: P,
    counter: Option<Counter>,
) -> Result<(), ConfigError> {
    let held = Handoff::new(p);
    let for_hook = held.clone();
    let for_hook_counter = counter.clone();
    finale.hook(
        Hook::new(Phase::Telemetry, name, move |ctx: HookContext| async move {
            let deadline = stage_deadline(&ctx, share);
            flush(provider, for_hook, for_hook_counter, deadline).await
        })
        .order(order),
    )?;
    if let Some(counter) = &counter {
        let items = match provider {
            Provider::Tracer => Items::Spans,
            Provider::Meter => Items::MetricPoints,
            Provider::Logger => Items::LogRecords,
        };
        finale.shared.add_tally(Arc::new(Tallied {
            stage: name,
            items,
            counter: counter.clone(),
        }));
    }
    // If the user's runtime is wedged, the supervisor flushes from its own thread.
    finale.shared.add_emergency(EmergencyStage {
        name: Cow::Borrowed(name),
        order,
        share,
        run: Box::new(move |deadline| {
            held.run_or_wait(deadline, |p| {
                flush_blocking(provider, &p, counter.as_ref(), deadline).map_err(|e| e.to_string())
            })
        }),
    });
    Ok(())
}

/// `force_flush`, then `shutdown` with what is left, on the calling thread.
fn flush_blocking<P: Flush>(
    provider: Provider,
    p: &P,
    counter: Option<&Counter>,
    deadline: std::time::Instant,
) -> Result<(), OtlpError> {
    let failed_before = counter.map(Counter::failed);
    // `force_flush` first: unlike the tracer's and logger's `shutdown`, it reports a failed
    // export. Its wait is the SDK's own (a fixed 5 s for traces and logs), not the stage's.
    let flushed = p.force_flush();
    // The shutdown runs whatever the flush said: after a flush that timed out (a slow but
    // healthy collector), the batch thread is still exporting and the shutdown waits, with
    // what is left of the share, for it to export the rest; after a refused export it tries
    // what is still queued once more and releases the exporter.
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let shut = p.shutdown_with_timeout(left.max(Duration::from_millis(1)));
    if let Some(counter) = counter {
        // A shutdown that returned in time found the queue exported: what the processors were
        // handed and the exporter never saw was dropped before, by a full queue.
        counter.inner.drained.store(shut.is_ok(), Ordering::Release);
    }
    match flushed {
        // The flush failed (typically it ran out of the SDK's fixed wait; with several
        // processors the provider folds their results into one message), yet the shutdown
        // that followed drained the queue in time without a failed export: the counts prove
        // the delivery that the shutdown's `Ok` alone cannot (it says `Ok` even when its
        // export failed).
        Err(_)
            if shut.is_ok()
                && failed_before.is_some()
                && counter.map(Counter::failed) == failed_before =>
        {
            Ok(())
        }
        Err(source) => Err(OtlpError::Flush { provider, source }),
        Ok(()) => shut.map_err(|source| OtlpError::Shutdown { provider, source }),
    }
}

/// Flushes, then shuts down, the provider on a thread of its own; waits until `deadline`.
async fn flush<P: Flush>(
    provider: Provider,
    held: Arc<Handoff<P>>,
    counter: Option<Counter>,
    deadline: Instant,
) -> Result<(), OtlpError> {
    let start = Instant::now();
    let thread = format!("finale-otlp-{}", provider.signal());
    // The thread has no runtime (and so no tokio clock): it measures on the std clock.
    let thread_deadline =
        std::time::Instant::now() + deadline.saturating_duration_since(Instant::now());
    let work = move || {
        // Taken here, not before: if the supervisor took it first (the runtime was wedged), it
        // is flushing already: this hook waits for it, bounded, and reports what it delivered.
        let Some(p) = held.take() else {
            return held
                .wait(thread_deadline)
                .map_err(|message| OtlpError::TakenOver { provider, message });
        };
        let result = flush_blocking(provider, &p, counter.as_ref(), thread_deadline);
        held.done(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        // The provider is dropped here, on this thread: a last clone's drop blocks.
        drop(p);
        result
    };
    let result = match run_until(&thread, deadline, work).await {
        Ok(OffThread::Done(result)) => result,
        Ok(OffThread::Panicked(message)) => Err(OtlpError::Panicked { provider, message }),
        Ok(OffThread::TimedOut) => Err(OtlpError::TimedOut {
            provider,
            waited: start.elapsed(),
        }),
        Err(source) => Err(OtlpError::Thread { provider, source }),
    };
    match &result {
        // Debug: an info event here would reach a logger provider already shut down.
        Ok(()) => tracing::debug!(
            target: "finale",
            signal = provider.signal(),
            elapsed = ?start.elapsed(),
            "OTLP flushed"
        ),
        Err(error) => tracing::error!(target: "finale", %error, "OTLP flush failed"),
    }
    result
}

/// Wraps an exporter to count what it delivered: for [`Otlp`] to put in the report (see
/// [`Delivery`](crate::Delivery)), per signal, before the trigger and at exit.
///
/// A [`SpanExporter`], [`LogExporter`] or [`PushMetricExporter`] itself: it forwards every call
/// to the exporter it wraps and counts each batch's items (spans, log records, metric data
/// points) as exported when the export succeeded and as failed when it did not. An export
/// that has not answered by the end (the flush gave up while the collector kept it waiting, or
/// kept answering `503`), or that was dropped before it answered, counts its items as
/// unconfirmed: handed to the exporter, with no answer. They may have arrived; nothing says so,
/// and they are not counted as dropped either. Whether the request was written at all is not
/// known (the exporter's client does not say): an export whose connection was never made
/// counts here too.
///
/// Items dropped before they reach the exporter (the batch processor's queue was full, or still
/// held them when the final flush gave up) are never seen by an exporter, and the SDK does not
/// expose its drop counter. Add the [`Counter`] as a processor too, ahead of the batch
/// processor: it then counts the spans or log records handed to the processors, and what was
/// handed but neither exported nor failed is counted as dropped. The split is known only at
/// exit: after a final flush that drained the queue those drops are the run's (a full queue),
/// otherwise they are the exit's (left in the queue). Metrics have no queue to overflow.
///
/// Metric data points are counted as sent: with cumulative temporality every export carries
/// every point again, so the count grows with each export (the final one included), not with
/// the number of distinct points.
///
/// # Examples
///
/// ```
/// use finale::otlp::{Counted, Otlp};
/// use opentelemetry_sdk::error::OTelSdkResult;
/// use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
///
/// // Any exporter; OTLP's in a service.
/// #[derive(Debug)]
/// struct Discard;
/// impl SpanExporter for Discard {
///     fn export(&self, _: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
///         std::future::ready(Ok(()))
///     }
/// }
///
/// # fn main() -> Result<(), finale::ConfigError> {
/// let exporter = Counted::new(Discard);
/// let spans = exporter.counter();
/// let tracer = SdkTracerProvider::builder()
///     .with_span_processor(spans.clone()) // sees what the batch processor drops
///     .with_batch_exporter(exporter)
///     .build();
/// let finale = finale::Finale::builder().no_signals().build()?;
/// Otlp::new()
///     .tracer_provider(tracer)
///     .span_counter(spans)
///     .register(&finale)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Counted<E> {
    inner: E,
    counter: Counter,
}

impl<E> Counted<E> {
    /// Counts what `exporter` delivers.
    pub fn new(exporter: E) -> Self {
        Self {
            inner: exporter,
            counter: Counter::default(),
        }
    }

    /// Counts what `exporter` delivers in `counter`: one made before the exporter, for a
    /// [`CountingClient`] (feature `otlp-http`) that the exporter sends with.
    pub fn with_counter(exporter: E, counter: Counter) -> Self {
        Self {
            inner: exporter,
            counter,
        }
    }

    /// The counts, to hand to [`Otlp`] (and, for spans and log records, to the provider as a
    /// processor).
    pub fn counter(&self) -> Counter {
        self.counter.clone()
    }
}

/// One export's items while it waits for the backend's answer. Counted as exported or failed
/// by its answer; an export dropped before it answered (the flush gave up, the process is
/// leaving) counts its items as unconfirmed: handed to the exporter, with no answer (sent or
/// not: the exporter does not say).
struct Sending {
    counter: Counter,
    items: u64,
    answered: bool,
}

impl Sending {
    fn start(counter: Counter, items: u64) -> Self {
        counter.inner.sending.fetch_add(items, Ordering::Relaxed);
        Self {
            counter,
            items,
            answered: false,
        }
    }

    fn answered(mut self, result: &OTelSdkResult) {
        let c = &self.counter.inner;
        // What the counting client read from this export's answers, at most the batch: a
        // collector claiming more rejections than the batch held lowers no other batch.
        let rejected = c.rejected_answer.swap(0, Ordering::AcqRel).min(self.items);
        if result.is_ok() {
            c.rejected.fetch_add(rejected, Ordering::Relaxed);
            c.exported
                .fetch_add(self.items - rejected, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(self.items, Ordering::Relaxed);
        }
        self.answered = true;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        let c = &self.counter.inner;
        // After the answer's count, so that the sum of the buckets never dips below what was
        // handed in while an export finishes.
        if !self.answered {
            c.unconfirmed.fetch_add(self.items, Ordering::Relaxed);
        }
        c.sending.fetch_sub(self.items, Ordering::Relaxed);
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let items = batch.len() as u64;
        let export = self.inner.export(batch);
        let sending = Sending::start(self.counter.clone(), items);
        async move {
            let result = export.await;
            sending.answered(&result);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: LogExporter> LogExporter for Counted<E> {
    fn export(
        &self,
        batch: LogBatch<'_>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let items = batch.iter().count() as u64;
        let export = self.inner.export(batch);
        let sending = Sending::start(self.counter.clone(), items);
        async move {
            let result = export.await;
            sending.answered(&result);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn event_enabled(
        &self,
        level: opentelemetry::logs::Severity,
        target: &str,
        name: Option<&str>,
    ) -> bool {
        self.inner.event_enabled(level, target, name)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Counted<E> {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let items = data_points(metrics);
        let export = self.inner.export(metrics);
        let sending = Sending::start(self.counter.clone(), items);
        async move {
            let result = export.await;
            sending.answered(&result);
            result
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// How many data points an export carries.
fn data_points(metrics: &ResourceMetrics) -> u64 {
    fn count<T>(data: &MetricData<T>) -> usize {
        match data {
            MetricData::Gauge(g) => g.data_points().count(),
            MetricData::Sum(s) => s.data_points().count(),
            MetricData::Histogram(h) => h.data_points().count(),
            MetricData::ExponentialHistogram(h) => h.data_points().count(),
        }
    }
    metrics
        .scope_metrics()
        .flat_map(|s| s.metrics())
        .map(|m| match m.data() {
            AggregatedMetrics::F64(d) => count(d),
            AggregatedMetrics::U64(d) => count(d),
            AggregatedMetrics::I64(d) => count(d),
        })
        .sum::<usize>() as u64
}

/// What a [`Counted`] exporter counted; a cheap handle.
///
/// Also a [`SpanProcessor`] and a [`LogProcessor`] that only counts what it is handed: add it
/// to the provider next to the batch processor, so that the items the batch processor drops
/// are counted as dropped.
#[derive(Clone, Debug, Default)]
pub struct Counter {
    inner: Arc<CounterInner>,
}

#[derive(Debug, Default)]
struct CounterInner {
    /// Handed to the processors (only if the counter is one of them).
    handed: AtomicU64,
    /// Items of exports that answered `Ok`, less those the backend rejected in a partial
    /// success.
    exported: AtomicU64,
    failed: AtomicU64,
    /// Items of exports that answered `Ok` but that the backend rejected (a partial success),
    /// each export's at most its batch.
    rejected: AtomicU64,
    /// What the counting HTTP client read from the answers of the export in progress, taken
    /// (and clamped to the batch) when the export returns. The SDK's processors export one
    /// batch at a time per exporter; an export dropped before it returned leaves what its
    /// answer rejected to the next one, clamped to that batch.
    rejected_answer: AtomicU64,
    /// Items of exports waiting for their answer now.
    sending: AtomicU64,
    /// Items of exports dropped before they answered.
    unconfirmed: AtomicU64,
    /// The final flush's shutdown returned in time: nothing was left in the queue.
    drained: AtomicBool,
    /// A [`CountingClient`](Counter::http_client) was made from this counter: taken to mean
    /// that the exporter sends OTLP/HTTP with it from the SDK's own threads, which needs no
    /// runtime of the application's, so it delivers from a takeover too. Set when the client
    /// is made: whether an exporter sends through it is not observable before registration.
    counting_client: AtomicBool,
}

impl Counter {
    /// Items exported so far: in exports that succeeded, less those the backend rejected in a
    /// partial success (as far as it is known: see [`Counted`]).
    pub fn exported(&self) -> u64 {
        self.inner.exported.load(Ordering::Relaxed)
    }

    /// Items whose export failed so far, and those a partial success rejected.
    pub fn failed(&self) -> u64 {
        let c = &self.inner;
        c.failed.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed)
    }

    /// Items handed to the exporter with no answer so far (sent or not: the exporter does not
    /// say): in exports dropped before they answered, and
    /// (at exit) in exports still waiting for theirs.
    pub fn unconfirmed(&self) -> u64 {
        let c = &self.inner;
        c.unconfirmed.load(Ordering::Relaxed) + c.sending.load(Ordering::Relaxed)
    }

    /// Items handed to the processors so far (0 unless the counter is one of them).
    pub fn handed(&self) -> u64 {
        self.inner.handed.load(Ordering::Relaxed)
    }
}

impl SpanProcessor for Counter {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, _span: SpanData) {
        self.inner.handed.fetch_add(1, Ordering::Relaxed);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl LogProcessor for Counter {
    fn emit(&self, _record: &mut SdkLogRecord, _scope: &InstrumentationScope) {
        self.inner.handed.fetch_add(1, Ordering::Relaxed);
    }

    // The logger asks whether *any* processor wants an event: the counter never says yes on
    // its own, so it leaves that choice to the exporting processors it counts for.
    fn event_enabled(
        &self,
        _level: opentelemetry::logs::Severity,
        _target: &str,
        _name: Option<&str>,
    ) -> bool {
        false
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// A provider's counter as the report reads it.
struct Tallied {
    stage: &'static str,
    items: Items,
    counter: Counter,
}

impl Tally for Tallied {
    fn stage(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.stage)
    }

    fn items(&self) -> Items {
        self.items
    }

    fn counts(&self) -> Counts {
        let c = &self.counter;
        Counts::new(c.exported(), c.failed(), 0)
            .with_unconfirmed(c.inner.unconfirmed.load(Ordering::Relaxed))
    }

    fn late_drops(&self) -> (u64, bool) {
        let c = &self.counter;
        let unseen = c
            .handed()
            .saturating_sub(c.exported() + c.failed() + c.unconfirmed());
        (unseen, c.inner.drained.load(Ordering::Acquire))
    }

    fn late_unconfirmed(&self) -> u64 {
        self.counter.inner.sending.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;
    use opentelemetry::logs::{Logger as _, LoggerProvider as _, Severity};
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};

    /// A processor that wants no event at all, as an exporter filtering by level would.
    #[derive(Debug)]
    struct Nothing;

    impl LogProcessor for Nothing {
        fn emit(&self, _: &mut SdkLogRecord, _: &InstrumentationScope) {}
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
        fn event_enabled(&self, _: Severity, _: &str, _: Option<&str>) -> bool {
            false
        }
    }

    /// An exporter that says when an export starts and answers what the test sends it.
    #[derive(Debug)]
    struct Held {
        started: std::sync::mpsc::Sender<()>,
        answer: std::sync::Mutex<std::sync::mpsc::Receiver<OTelSdkResult>>,
    }

    impl SpanExporter for Held {
        fn export(
            &self,
            _: Vec<SpanData>,
        ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
            let _ = self.started.send(());
            let answer = self
                .answer
                .lock()
                .unwrap()
                .recv()
                .unwrap_or(Err(OTelSdkError::InternalFailure("no answer".into())));
            std::future::ready(answer)
        }
    }

    /// The supervisor took the flush over (its emergency stage is running it) when the runtime
    /// unblocks and the sequence reaches the hook: the hook reports the supervisor's outcome, it
    /// does not complete at once on its own.
    #[tokio::test(flavor = "current_thread")]
    async fn the_hook_reports_what_the_supervisors_flush_delivered() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (answer, answer_rx) = std::sync::mpsc::channel();
        let tracer = SdkTracerProvider::builder()
            .with_batch_exporter(Held {
                started: started_tx,
                answer: std::sync::Mutex::new(answer_rx),
            })
            .build();
        tracer.tracer("test").in_span("work", |_| {});
        let finale = Finale::builder()
            .no_signals()
            .read_env(false)
            .build()
            .unwrap();
        Otlp::new()
            .tracer_provider(tracer.clone())
            .finale_metrics(false)
            .register(&finale)
            .unwrap();
        drop(tracer);
        let stage = finale
            .shared
            .take_emergency()
            .into_iter()
            .find(|s| s.name == HOOK_TRACES)
            .unwrap();
        // The supervisor's side: it takes the provider and flushes; the export waits for the
        // test's answer.
        let supervisor = std::thread::spawn(move || {
            (stage.run)(std::time::Instant::now() + Duration::from_secs(10))
        });
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the supervisor's flush exports");
        answer
            .send(Err(OTelSdkError::InternalFailure("collector down".into())))
            .unwrap();
        finale.handle().trigger("test");
        let report = finale.run().await;
        assert!(supervisor.join().unwrap().is_err());
        let Outcome::Failed(error) = &report.entry(HOOK_TRACES).unwrap().outcome else {
            panic!("the hook claims a delivery the supervisor did not make:\n{report}");
        };
        assert!(
            error
                .to_string()
                .contains("not delivered by the supervisor"),
            "{error}"
        );
    }

    #[test]
    fn the_counter_never_enables_an_event_the_exporters_do_not_want() {
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(Counter::default())
            .with_log_processor(Nothing)
            .build();
        let logger = provider.logger("test");
        assert!(!logger.event_enabled(Severity::Info, "app", None));
        let _ = provider.shutdown();
    }
}
