//! The shutdown observes itself: its spans are closed and its metrics recorded before the
//! Telemetry phase starts, so the final push and flush carry them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use finale::{Finale, Hook, Phase, Task};
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// Records the names of closed spans.
#[derive(Clone, Default)]
struct Closed(Arc<Mutex<Vec<String>>>);

impl<S> tracing_subscriber::Layer<S> for Closed
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            self.0.lock().unwrap().push(span.name().to_owned());
        }
    }
}

#[test]
fn spans_and_metrics_are_recorded_before_the_telemetry_phase() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let closed = Closed::default();
    let subscriber = tracing_subscriber::registry().with(closed.clone());
    // Thread-local recorder and subscriber: a current-thread runtime keeps every task here.
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let _tracing = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();

    let seen_at_flush = Arc::new(Mutex::new(None));
    let report = runtime.block_on(async {
        let finale = Finale::builder()
            .read_env(false)
            .no_signals()
            .build()
            .unwrap();
        let in_flight = finale.handle().in_flight();
        let guard = in_flight.acquire();
        finale
            .spawn(Task::worker(
                "ticker",
                |ctx| async move { ctx.stopped().await },
            ))
            .unwrap();
        finale
            .hook(Hook::new(Phase::Drain, "release", move |_| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(guard);
            }))
            .unwrap();
        finale
            .hook(Hook::new(Phase::Workers, "close-db", |_| async {
                Err::<(), _>("pool already closed")
            }))
            .unwrap();
        let (metrics, closed, seen) = (metrics.clone(), closed.clone(), seen_at_flush.clone());
        finale
            .hook(Hook::new(
                Phase::Telemetry,
                "final-push",
                move |_| async move {
                    *seen.lock().unwrap() =
                        Some((metrics.render(), closed.0.lock().unwrap().clone()));
                },
            ))
            .unwrap();
        finale.handle().trigger("test");
        finale.run().await
    });

    let (rendered, closed_spans) = seen_at_flush
        .lock()
        .unwrap()
        .take()
        .expect("flush hook ran");
    for needle in [
        "finale_shutting_down 1",
        "finale_shutdowns_total{reason=\"requested\"} 1",
        "finale_shutdown_duration_seconds ",
        "finale_in_flight_at_drain_start 1",
        "finale_phase_duration_seconds{phase=\"drain\",outcome=\"completed\"} 0.03",
        "finale_hook_duration_seconds{phase=\"workers\",name=\"close-db\",outcome=\"failed\"}",
        "finale_hook_duration_seconds{phase=\"workers\",name=\"ticker\",outcome=\"completed\"}",
    ] {
        assert!(rendered.contains(needle), "{needle} missing in\n{rendered}");
    }
    for span in [
        finale::names::SPAN_SHUTDOWN,
        finale::names::SPAN_PHASE,
        finale::names::SPAN_HOOK,
    ] {
        assert!(
            closed_spans.iter().any(|s| s == span),
            "{span} not closed before the flush: {closed_spans:?}"
        );
    }
    assert_eq!(
        closed_spans.iter().filter(|s| *s == "finale.phase").count(),
        3
    );
    assert_eq!(report.in_flight_at_drain_start, 1);
}
