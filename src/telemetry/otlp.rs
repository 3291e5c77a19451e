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
//! [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered).
//!
//! # Requirements and traps
//!
//! - **Use the SDK's default, thread-based processors** (`with_batch_exporter`,
//!   `PeriodicReader`). The `experimental_async_runtime` ones block forever on a
//!   `current_thread` runtime.
//! - **gRPC (tonic) exporters** must be built inside the tokio runtime that runs finale, and that
//!   runtime must be alive when the Telemetry phase runs: the export makes progress only while the
//!   runtime's threads poll tonic's connection. finale never blocks a runtime thread for it (the
//!   flushes run on their own threads and are awaited), so this works on a `current_thread`
//!   runtime and on a one-worker runtime. Call [`Finale::run`](crate::Finale::run) from inside the
//!   runtime; do not drop the runtime first.
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
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, MeterProvider as _, ObservableCounter};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::time::Instant;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::{Hook, HookContext};
use crate::phase::Phase;
use crate::report::names::{Kind, Labels, Metric, Sink, metric};
use crate::slot::{ORDER_METRICS, ORDER_TRACES_LOGS, Share, stage_deadline};
use crate::state::{EmergencyStage, Shared};
use crate::telemetry::stages::{Handoff, OffThread, run_until};

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
            OtlpError::TimedOut { .. } | OtlpError::Panicked { .. } => None,
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

    /// Registers one Telemetry hook per provider given.
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
            )?;
            if let Some(own) = own {
                finale.shared.add_sink(own);
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
            )?;
        }
        if let Some(p) = self.logger {
            register_flush(
                finale,
                HOOK_LOGS,
                Provider::Logger,
                ORDER_TRACES_LOGS,
                Share::TRACES_LOGS,
                p,
            )?;
        }
        Ok(())
    }
}

/// finale's own metrics as OpenTelemetry instruments of the user's meter provider: the same
/// names and attributes as through the facade (see [`names`](crate::names)).
struct FinaleMetrics {
    counters: Vec<(&'static str, Counter<u64>)>,
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

impl Sink for FinaleMetrics {
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
) -> Result<(), ConfigError> {
    let held = Handoff::new(p);
    let for_hook = held.clone();
    finale.hook(
        Hook::new(Phase::Telemetry, name, move |ctx: HookContext| async move {
            flush(provider, for_hook, stage_deadline(&ctx, share)).await
        })
        .order(order),
    )?;
    // If the user's runtime is wedged, the supervisor flushes from its own thread.
    finale.shared.add_emergency(EmergencyStage {
        name: Cow::Borrowed(name),
        order,
        share,
        run: Box::new(move |deadline| {
            held.run_or_wait(deadline, |p| {
                flush_blocking(provider, &p, deadline).map_err(|e| e.to_string())
            })
        }),
    });
    Ok(())
}

/// `force_flush`, then `shutdown` with what is left, on the calling thread.
fn flush_blocking<P: Flush>(
    provider: Provider,
    p: &P,
    deadline: std::time::Instant,
) -> Result<(), OtlpError> {
    // `force_flush` first: unlike the tracer's and logger's `shutdown`, it reports a failed
    // export. After a failed flush nothing more can be delivered: skip the shutdown, whose
    // own wait would only hold the thread longer.
    p.force_flush()
        .map_err(|source| OtlpError::Flush { provider, source })?;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    p.shutdown_with_timeout(left.max(Duration::from_millis(1)))
        .map_err(|source| OtlpError::Shutdown { provider, source })
}

/// Flushes, then shuts down, the provider on a thread of its own; waits until `deadline`.
async fn flush<P: Flush>(
    provider: Provider,
    held: Arc<Handoff<P>>,
    deadline: Instant,
) -> Result<(), OtlpError> {
    let start = Instant::now();
    let thread = format!("finale-otlp-{}", provider.signal());
    // The thread has no runtime (and so no tokio clock): it measures on the std clock.
    let thread_deadline =
        std::time::Instant::now() + deadline.saturating_duration_since(Instant::now());
    let work = move || {
        // Taken here, not before: if the supervisor took it first (the runtime was wedged), it
        // is flushing already and this hook has nothing left to do.
        let Some(p) = held.take() else {
            return Ok(());
        };
        let result = flush_blocking(provider, &p, thread_deadline);
        held.done();
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
