//! Whether a stage's exporter can deliver from a takeover, as far as finale can tell when the
//! provider is registered, and the warning when it cannot tell.
//!
//! The supervisor flushes the providers from its own threads when the application's runtime is
//! wedged. A gRPC (tonic) exporter's export makes progress only while the runtime it was built
//! on polls its channel: built on the wedged runtime, it delivers nothing then. finale cannot
//! see the exporter inside a provider (the SDK keeps it behind its processor), and
//! opentelemetry-otlp 0.33 does not say which transport an exporter uses (its client is a
//! private field; the metric exporter's `Debug` prints no field at all), so it decides from
//! what it can see:
//!
//! - **per stage**, the [`Counter`] handed to [`Otlp`](super::Otlp): one that made a
//!   [`CountingClient`](Counter::http_client) (feature `otlp-http`) before registration is
//!   taken to count an OTLP/HTTP exporter that sends through it from the SDK's own threads,
//!   which delivers. That is what finale sees, not what the exporter does: the client is
//!   moved into the exporter's builder and used only once an export runs, so nothing before
//!   registration shows whether an exporter took it. A counter whose client went unused (made
//!   up front, then a gRPC exporter picked at run time) silences the warning all the same;
//! - **per process**, [`with_exporter_runtime`](super::with_exporter_runtime): once it has run,
//!   the exporters are taken to be built inside it, as the docs show (finale cannot tell which
//!   exporters a closure built).
//!
//! Every other stage is named at registration: a warning, not an error (an exporter of another
//! kind, or a gRPC one on a runtime of the application's own that nothing blocks, may deliver
//! all the same). So the warning is silent for the two signs above, whether or not the
//! exporter is the kind they stand for, and only for them.

use super::Counter;
use super::runtime;

/// Whether finale can tell that the exporter of the stage `counter` counts (if any) delivers
/// from a takeover.
fn delivers_from_takeover(counter: Option<&Counter>) -> bool {
    counter.is_some_and(Counter::sends_through_counting_client) || runtime::used()
}

impl Counter {
    /// A [`CountingClient`](Counter::http_client) was made from this counter (whether an
    /// exporter sends through it is not observable here).
    fn sends_through_counting_client(&self) -> bool {
        self.inner
            .counting_client
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Warns (target `finale`) that the exporter of `stage` may deliver nothing from a takeover,
/// unless finale can tell that it does.
pub(super) fn warn_unless_known(stage: &'static str, counter: Option<&Counter>) {
    if delivers_from_takeover(counter) {
        return;
    }
    tracing::warn!(
        target: "finale",
        stage,
        "{stage}: finale cannot tell that this exporter delivers when the supervisor takes \
         the flush over from a wedged runtime; a gRPC (tonic) exporter built on your runtime \
         delivers nothing then: build it inside finale::otlp::with_exporter_runtime (harmless \
         for any exporter), or send OTLP/HTTP through Counter::http_client (feature otlp-http)"
    );
}
