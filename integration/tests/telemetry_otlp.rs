//! The OTLP integration in process: the three providers flush in parallel and in bounded time
//! against a collector that never answers, refused exports are reported with the SDK's error,
//! a second signal shortens the flush to the escalation budget, finale's own metrics reach a
//! real collector (rotel) through the meter provider.

// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

use std::error::Error as _;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

mod common;

use common::components::{Collector, ReceivedMetric, Verbosity, wait_until};
use finale::otlp::{Counted, HOOK_LOGS, HOOK_METRICS, HOOK_TRACES, Otlp, OtlpError, Provider};
use finale::{
    DeliveryPolicy, Environment, Finale, Hook, Outcome, Phase, ShutdownReport, ShutdownStatus,
};
use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{
    LogExporter, MetricExporter, SpanExporter, WithExportConfig, WithHttpConfig,
};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData};

/// A TCP server that accepts connections and never answers.
fn blackhole() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(256) {
            held.push(stream);
        }
    });
    port
}

/// A stand-in collector (rotel cannot be made to take a request and never answer, or answer a
/// partial success, on demand): it reads each HTTP request whole, records its path, and answers
/// `answer` (status line and protobuf body), or never if `None`.
fn stand_in(answer: Option<(&'static str, Vec<u8>)>) -> (u16, Arc<Mutex<Vec<String>>>) {
    stand_in_typed("application/x-protobuf", answer)
}

/// [`stand_in`], its answers of `Content-Type` `content_type`.
fn stand_in_typed(
    content_type: &'static str,
    answer: Option<(&'static str, Vec<u8>)>,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let (log, answer) = (log.clone(), answer.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then_some(v)
                        })
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while raw.len() < end + 4 + length {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    }
                    raw.drain(..end + 4 + length);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    log.lock().unwrap().push(path);
                    let Some((status, body)) = &answer else {
                        continue; // received, never answered: the connection stays open
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n\
                         content-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(head.as_bytes()).is_err() || stream.write_all(body).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// An OTLP/HTTP tracer provider exporting to `port`, counted, with `spans` spans recorded.
fn http_tracer(port: u16, spans: usize) -> (SdkTracerProvider, finale::otlp::Counter) {
    let exporter = Counted::new(
        SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("http://127.0.0.1:{port}/v1/traces"))
            .build()
            .unwrap(),
    );
    let counter = exporter.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(counter.clone())
        .with_batch_exporter(exporter)
        .build();
    let t = tracer.tracer("test");
    for _ in 0..spans {
        t.in_span("work", |_| {});
    }
    (tracer, counter)
}

/// `ExportTraceServiceResponse { partial_success { rejected_spans: n, error_message: "…" } }`,
/// as protobuf.
fn partial_success(n: u8) -> Vec<u8> {
    let message = b"over quota";
    let inner_len = 2 + 2 + message.len();
    let mut body = vec![0x0a, inner_len as u8, 0x08, n, 0x12, message.len() as u8];
    body.extend_from_slice(message);
    body
}

#[tokio::test(flavor = "current_thread")]
async fn spans_a_partial_success_rejected_are_counted_as_failed() {
    let (port, seen) = stand_in(Some(("200 OK", partial_success(10))));
    // The exporter's own blocking client, wrapped so the answer is read; built off the runtime.
    let counter = finale::otlp::Counter::default();
    let client = std::thread::spawn(reqwest::blocking::Client::new)
        .join()
        .unwrap();
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(counter.http_client(client))
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("http://127.0.0.1:{port}/v1/traces"))
        .build()
        .unwrap();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(counter.clone())
        .with_batch_exporter(Counted::with_counter(exporter, counter.clone()))
        .build();
    let t = tracer.tracer("test");
    for _ in 0..10 {
        t.in_span("work", |_| {});
    }
    let finale = finale(Duration::from_secs(5), Duration::from_secs(3));
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(counter)
        .finale_metrics(false)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(seen.lock().unwrap().len(), 1, "one export");
    let spans = report.delivery(HOOK_TRACES).unwrap().total();
    assert_eq!(
        (spans.exported, spans.failed, spans.dropped),
        (0, 10, 0),
        "{report}"
    );
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn spans_a_collector_received_but_never_answered_are_unconfirmed_not_dropped() {
    let (port, seen) = stand_in(None);
    let (tracer, counter) = http_tracer(port, 10);
    let finale = finale(Duration::from_secs(3), Duration::from_secs(2));
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(counter)
        .finale_metrics(false)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(
        seen.lock().unwrap().iter().any(|p| p == "/v1/traces"),
        "the stand-in received the export"
    );
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let spans = report.delivery(HOOK_TRACES).unwrap().total();
    assert_eq!(
        (
            spans.exported,
            spans.failed,
            spans.unconfirmed,
            spans.dropped
        ),
        (0, 0, 10, 0),
        "{report}"
    );
    assert!(
        report
            .to_string()
            .contains("10 handed to the exporter with no answer"),
        "{report}"
    );
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// gRPC providers for `endpoint`, each with one item recorded so there is something to deliver.
/// Must run inside the runtime (tonic needs it).
fn providers(endpoint: &str) -> Otlp {
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(
            SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    let logger = SdkLoggerProvider::builder()
        .with_batch_exporter(
            LogExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    let meter = SdkMeterProvider::builder()
        .with_periodic_exporter(
            MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    tracer.tracer("test").in_span("work", |_| {});
    let log = logger.logger("test");
    let mut record = log.create_log_record();
    record.set_body("hello".into());
    log.emit(record);
    meter.meter("test").u64_counter("work").build().add(1, &[]);
    Otlp::new()
        .tracer_provider(tracer)
        .meter_provider(meter)
        .logger_provider(logger)
}

fn finale(total: Duration, reserve: Duration) -> Finale {
    finale_with(total, reserve, DeliveryPolicy::AtExit)
}

fn finale_with(total: Duration, reserve: Duration, policy: DeliveryPolicy) -> Finale {
    Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(total)
        .telemetry_reserve(reserve)
        .delivery_policy(policy)
        .build()
        .unwrap()
}

fn otlp_error<'r>(report: &'r ShutdownReport, hook: &str) -> &'r OtlpError {
    let Outcome::Failed(error) = &report.entry(hook).unwrap().outcome else {
        panic!("{hook} did not fail:\n{report}");
    };
    error
        .source()
        .and_then(|e| e.downcast_ref::<OtlpError>())
        .expect("an OtlpError")
}

#[tokio::test(flavor = "current_thread")]
async fn a_hung_collector_costs_one_share_of_the_slot_not_three_timeouts() {
    let endpoint = format!("http://127.0.0.1:{}", blackhole());
    let total = Duration::from_secs(4);
    let finale = finale(total, Duration::from_secs(3));
    providers(&endpoint).register(&finale).unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    eprintln!("hung collector: {elapsed:?}\n{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    for (hook, provider) in [
        (HOOK_METRICS, Provider::Meter),
        (HOOK_TRACES, Provider::Tracer),
        (HOOK_LOGS, Provider::Logger),
    ] {
        let error = otlp_error(&report, hook);
        assert_eq!(error.provider(), provider);
        assert!(
            error.to_string().contains("not delivered"),
            "{hook}: {error}"
        );
    }
    // Three providers one after the other would wait 5 s each (and the meter's flush 10 s);
    // finale waits at most what the budget leaves.
    assert!(elapsed < total, "{elapsed:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_export_is_reported_with_the_sdk_error() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    providers(&endpoint).register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let error = otlp_error(&report, HOOK_TRACES);
    assert!(
        matches!(
            error,
            OtlpError::Flush {
                provider: Provider::Tracer,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.source().is_some(), "chains to the SDK's error");
    assert!(error.to_string().contains("flush failed"), "{error}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_signal_cuts_the_flush_to_the_escalation_budget() {
    let endpoint = format!("http://127.0.0.1:{}", blackhole());
    let finale = Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(Duration::from_secs(20))
        .telemetry_reserve(Duration::from_secs(10))
        .escalation_budget(Duration::from_millis(500))
        .build()
        .unwrap();
    providers(&endpoint).register(&finale).unwrap();
    let handle = finale.handle();
    handle.trigger("test");
    let escalate = tokio::spawn(async move {
        handle.phase_started(Phase::Telemetry).await;
        handle.escalate()
    });
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    assert!(escalate.await.unwrap());
    assert_eq!(report.status, ShutdownStatus::Forced, "{report}");
    // The hooks are abandoned at the shortened deadline, and nothing they leave behind (a
    // provider whose last clone drops, a flush thread) holds up the end.
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}\n{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_provider_shut_down_by_the_application_is_not_counted_as_delivered() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(
            SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    // An early shutdown elsewhere in the application (its result ignored, as is common).
    let early = tracer.clone();
    let _ =
        std::thread::spawn(move || early.shutdown_with_timeout(Duration::from_millis(100))).join();
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Otlp::new()
        .tracer_provider(tracer)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let error = otlp_error(&report, HOOK_TRACES);
    assert!(matches!(error, OtlpError::Flush { .. }), "{error}");
}

/// A span exporter standing in for a collector that half-works: each export takes `delay`, the
/// first `fail_first` exports fail, and an export waits for `gate` (if set) to open, that is for
/// its sender to be dropped. `exported` counts the spans of the exports that succeeded; each
/// export's size and outcome is sent on `exports`.
#[derive(Debug)]
struct TestSpans {
    delay: Duration,
    fail_first: usize,
    gate: Option<Mutex<mpsc::Receiver<()>>>,
    calls: AtomicUsize,
    exported: Arc<AtomicUsize>,
    exports: mpsc::Sender<(usize, bool)>,
}

impl TestSpans {
    fn new(delay: Duration) -> (Self, Arc<AtomicUsize>, mpsc::Receiver<(usize, bool)>) {
        let exported = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let exporter = Self {
            delay,
            fail_first: 0,
            gate: None,
            calls: AtomicUsize::new(0),
            exported: exported.clone(),
            exports: tx,
        };
        (exporter, exported, rx)
    }
}

impl opentelemetry_sdk::trace::SpanExporter for TestSpans {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // The SDK runs the export on its batch thread (`block_on`): blocking here is what a
        // slow collector does to that thread.
        if let Some(gate) = &self.gate {
            let _ = gate.lock().unwrap().recv();
        }
        std::thread::sleep(self.delay);
        let n = batch.len();
        let ok = self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_first;
        if ok {
            self.exported.fetch_add(n, Ordering::SeqCst);
        }
        let _ = self.exports.send((n, ok));
        std::future::ready(if ok {
            Ok(())
        } else {
            Err(OTelSdkError::InternalFailure(
                "refused by the test".to_owned(),
            ))
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_collector_still_gets_the_shutdown_after_the_flush_times_out() {
    // A healthy collector that takes 6 s per export: the SDK's `force_flush` gives up at its
    // fixed 5 s while the first batch is still on its way.
    let (exporter, exported, _exports) = TestSpans::new(Duration::from_secs(6));
    let exporter = Counted::new(exporter);
    let spans = exporter.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .with_batch_exporter(exporter)
        .build();
    let t = tracer.tracer("test");
    // 512 spans start an export at once; the rest wait in the queue behind it (two or three
    // exports in all, as the batch thread happens to pick them up: 12 to 18 s).
    for _ in 0..600 {
        t.in_span("work", |_| {});
    }
    let finale = finale(Duration::from_secs(40), Duration::from_secs(35));
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(spans)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    let exported = exported.load(Ordering::SeqCst);
    eprintln!("slow collector: {exported} of 600 spans exported in {elapsed:?}\n{report}");
    // The shutdown, given what was left of the share, waited for the second export.
    assert_eq!(exported, 600, "{report}");
    assert!(elapsed < Duration::from_secs(35), "{elapsed:?}");
    // The counts prove what the flush's timeout could not: everything arrived.
    let delivery = report.delivery(HOOK_TRACES).expect("counted");
    assert_eq!(delivery.total().exported, 600, "{report}");
    assert_eq!(delivery.total().lost(), 0, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A tracer whose exporter fails its first export, and 1000 spans: the first 512 go out at once
/// and fail, the other 488 wait for the final flush. Returns once the first export failed.
fn first_export_fails() -> (Otlp, mpsc::Receiver<(usize, bool)>) {
    let (mut exporter, _, exports) = TestSpans::new(Duration::ZERO);
    exporter.fail_first = 1;
    let exporter = Counted::new(exporter);
    let spans = exporter.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .with_batch_exporter(exporter)
        .build();
    let t = tracer.tracer("test");
    for _ in 0..1000 {
        t.in_span("work", |_| {});
    }
    assert_eq!(exports.recv().unwrap(), (512, false));
    let otlp = Otlp::new().tracer_provider(tracer).span_counter(spans);
    (otlp, exports)
}

#[tokio::test(flavor = "current_thread")]
async fn an_earlier_export_failure_is_in_the_report_and_the_policy_decides() {
    // The default policy: what was recorded from the trigger on arrived; the earlier loss is
    // reported, and the exit code stays clean.
    let (otlp, _exports) = first_export_fails();
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    otlp.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    eprintln!("earlier failure, at-exit policy:\n{report}");
    let delivery = report.delivery(HOOK_TRACES).expect("counted");
    // The other 488 went out as the batch thread got to them, before or after the trigger.
    assert_eq!(delivery.run.failed, 512, "{report}");
    assert_eq!(delivery.at_exit.failed, 0, "{report}");
    assert_eq!(delivery.total().exported, 488, "{report}");
    assert_eq!(delivery.total().dropped, 0, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["delivery"][0]["stage"], "otlp-traces");
    assert_eq!(json["delivery"][0]["run"]["failed"], 512);

    // The whole-run policy: any loss is a delivery failure.
    let (otlp, _exports) = first_export_fails();
    let finale = finale_with(
        Duration::from_secs(10),
        Duration::from_secs(5),
        DeliveryPolicy::WholeRun,
    );
    otlp.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert!(report.entry(HOOK_TRACES).unwrap().outcome.is_completed());
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_queue_overflow_is_counted_as_dropped() {
    // A collector that holds the first export until 5000 spans were recorded: the default
    // queue (2048) overflows.
    let (mut exporter, exported, _exports) = TestSpans::new(Duration::ZERO);
    let (open, gate) = mpsc::channel();
    exporter.gate = Some(Mutex::new(gate));
    let exporter = Counted::new(exporter);
    let spans = exporter.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .with_batch_exporter(exporter)
        .build();
    let t = tracer.tracer("test");
    for _ in 0..5000 {
        t.in_span("work", |_| {});
    }
    drop(open);
    let finale = finale_with(
        Duration::from_secs(10),
        Duration::from_secs(5),
        DeliveryPolicy::WholeRun,
    );
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(spans)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let exported = exported.load(Ordering::SeqCst) as u64;
    eprintln!("queue overflow: {exported} of 5000 exported\n{report}");
    let delivery = report.delivery(HOOK_TRACES).expect("counted");
    let total = delivery.total();
    // The export in flight (up to 512) plus a full queue (2048) got through; the rest was
    // dropped, and the drained queue says when: during the run.
    assert_eq!(total.exported, exported, "{report}");
    assert!(exported <= 512 + 2048, "{report}");
    assert_eq!(total.exported + total.dropped, 5000, "{report}");
    assert_eq!(delivery.run.dropped, total.dropped, "{report}");
    assert!(report.entry(HOOK_TRACES).unwrap().outcome.is_completed());
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counts_match_what_a_real_collector_received() {
    let Some(collector) = Collector::start_with(Verbosity::Basic) else {
        return;
    };
    let endpoint = collector.grpc_endpoint();
    let spans = Counted::new(
        SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .build()
            .unwrap(),
    );
    let span_counter = spans.counter();
    let records = Counted::new(
        LogExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .build()
            .unwrap(),
    );
    let record_counter = records.counter();
    let points = Counted::new(
        MetricExporter::builder()
            .with_tonic()
            .with_endpoint(&endpoint)
            .build()
            .unwrap(),
    );
    let point_counter = points.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(span_counter.clone())
        .with_batch_exporter(spans)
        .build();
    let logger = SdkLoggerProvider::builder()
        .with_log_processor(record_counter.clone())
        .with_batch_exporter(records)
        .build();
    let meter = SdkMeterProvider::builder()
        .with_periodic_exporter(points)
        .build();
    let t = tracer.tracer("test");
    let log = logger.logger("test");
    let m = meter.meter("test");
    for i in 0..1500u64 {
        t.in_span("work", |_| {});
        let mut record = log.create_log_record();
        record.set_body("hello".into());
        log.emit(record);
        m.u64_counter("work")
            .build()
            .add(1, &[opentelemetry::KeyValue::new("shard", (i % 7) as i64)]);
    }
    let finale = finale(Duration::from_secs(20), Duration::from_secs(10));
    Otlp::new()
        .tracer_provider(tracer)
        .logger_provider(logger)
        .meter_provider(meter)
        .span_counter(span_counter)
        .log_record_counter(record_counter)
        .metric_point_counter(point_counter)
        // Only the test's own counter: finale's shutdown metrics would add their points.
        .finale_metrics(false)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let spans = report.delivery(HOOK_TRACES).unwrap().total();
    let records = report.delivery(HOOK_LOGS).unwrap().total();
    let points = report.delivery(HOOK_METRICS).unwrap().total();
    assert!(
        wait_until(Duration::from_secs(10), || {
            collector.span_count() == spans.exported
                && collector.log_record_count() == records.exported
        }),
        "collector: {} spans, {} log records\n{report}",
        collector.span_count(),
        collector.log_record_count()
    );
    eprintln!(
        "real collector: {} spans and {} log records received; report: {spans}, {records}; \
         metric points: {points}",
        collector.span_count(),
        collector.log_record_count()
    );
    assert_eq!(spans.exported, 1500, "{report}");
    assert_eq!(records.exported, 1500, "{report}");
    // One counter, seven attribute sets: seven points per export; the meter exports at the
    // flush and again (cumulative) at its shutdown.
    assert!(points.exported >= 7 && points.exported % 7 == 0, "{report}");
}

/// A meter provider exporting over gRPC to `collector`, as a service that uses only OTLP has.
/// Must run inside the runtime (tonic needs it).
fn meter_provider(collector: &Collector) -> SdkMeterProvider {
    SdkMeterProvider::builder()
        .with_periodic_exporter(
            MetricExporter::builder()
                .with_tonic()
                .with_endpoint(collector.grpc_endpoint())
                .build()
                .unwrap(),
        )
        .build()
}

/// The last dump of `name` the collector received (the flush and the shutdown both export).
fn received<'m>(metrics: &'m [ReceivedMetric], name: &str) -> &'m ReceivedMetric {
    metrics
        .iter()
        .rev()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} not received; got {:?}", names(metrics)))
}

fn names(metrics: &[ReceivedMetric]) -> Vec<&str> {
    metrics.iter().map(|m| m.name.as_str()).collect()
}

fn value(metric: &ReceivedMetric, attributes: &[(&str, &str)]) -> f64 {
    metric
        .points
        .iter()
        .find(|p| p.has(attributes))
        .unwrap_or_else(|| panic!("{}: no point with {attributes:?}: {metric:?}", metric.name))
        .value
}

#[tokio::test(flavor = "current_thread")]
async fn finale_metrics_reach_an_otlp_only_collector_in_the_final_export() {
    let Some(collector) = Collector::start_with_metrics() else {
        return;
    };
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    finale
        .hook(Hook::new(Phase::Workers, "close-pool", |_| async {}))
        .unwrap();
    Otlp::new()
        .meter_provider(meter_provider(&collector))
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");

    // No recorder is installed for the `metrics` facade here: whatever arrives came through
    // the meter provider.
    let wanted = [
        finale::names::SHUTTING_DOWN,
        finale::names::SHUTDOWNS,
        finale::names::SHUTDOWN_DURATION,
        finale::names::PHASE_DURATION,
        finale::names::HOOK_DURATION,
        finale::names::IN_FLIGHT_AT_DRAIN_START,
        finale::names::REQUESTS_REJECTED,
        finale::names::REQUEST_PANICS,
    ];
    let arrived = wait_until(Duration::from_secs(10), || {
        let metrics = collector.metrics();
        wanted.iter().all(|w| metrics.iter().any(|m| m.name == *w))
    });
    let metrics = collector.metrics();
    assert!(
        arrived,
        "got {:?}\n{}",
        names(&metrics),
        collector.diagnostics()
    );

    let shutdowns = received(&metrics, finale::names::SHUTDOWNS);
    assert_eq!(shutdowns.scope, "finale");
    assert_eq!(
        (shutdowns.data_type.as_str(), shutdowns.monotonic),
        ("Sum", true)
    );
    assert_eq!(shutdowns.unit, "{shutdown}");
    assert_eq!(value(shutdowns, &[("reason", "requested")]), 1.0);

    let total = received(&metrics, finale::names::SHUTDOWN_DURATION);
    assert_eq!(
        (total.data_type.as_str(), total.unit.as_str()),
        ("Gauge", "s")
    );
    let total = value(total, &[]);
    assert!((0.0..10.0).contains(&total), "{total}");

    let phases = received(&metrics, finale::names::PHASE_DURATION);
    assert_eq!(phases.unit, "s");
    for phase in ["announce", "drain", "workers"] {
        value(phases, &[("phase", phase), ("outcome", "completed")]);
    }
    let hooks = received(&metrics, finale::names::HOOK_DURATION);
    value(
        hooks,
        &[
            ("phase", "workers"),
            ("name", "close-pool"),
            ("outcome", "completed"),
        ],
    );
    assert_eq!(
        value(received(&metrics, finale::names::SHUTTING_DOWN), &[]),
        1.0
    );
    assert_eq!(
        value(
            received(&metrics, finale::names::IN_FLIGHT_AT_DRAIN_START),
            &[]
        ),
        0.0
    );
    for counter in [
        finale::names::REQUESTS_REJECTED,
        finale::names::REQUEST_PANICS,
    ] {
        let m = received(&metrics, counter);
        assert_eq!((m.data_type.as_str(), m.monotonic), ("Sum", true), "{m:?}");
        assert_eq!(value(m, &[]), 0.0, "{m:?}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn finale_metrics_can_be_kept_out_of_the_meter_provider() {
    let Some(collector) = Collector::start_with_metrics() else {
        return;
    };
    let provider = meter_provider(&collector);
    // The application's own metric, so that the final export has something to carry.
    provider
        .meter("app")
        .u64_counter("app_jobs_total")
        .build()
        .add(3, &[]);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Otlp::new()
        .meter_provider(provider)
        .finale_metrics(false)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let arrived = wait_until(Duration::from_secs(10), || {
        collector
            .metrics()
            .iter()
            .any(|m| m.name == "app_jobs_total")
    });
    let metrics = collector.metrics();
    assert!(
        arrived,
        "got {:?}\n{}",
        names(&metrics),
        collector.diagnostics()
    );
    assert_eq!(value(received(&metrics, "app_jobs_total"), &[]), 3.0);
    assert!(
        metrics.iter().all(|m| !m.name.starts_with("finale_")),
        "{:?}",
        names(&metrics)
    );
}

/// An export whose connection is never made (the collector's accept queue is full, so the
/// kernel drops the SYN: nothing can have arrived) cannot be told apart from one the collector
/// received and never answered: the exporter's client says neither. Both count as unconfirmed,
/// which the report words as what is known: handed to the exporter, no answer; never "sent".
/// (No real collector can be made to hold its accept queue full on demand: a plain listener
/// that never accepts stands in for one.)
#[tokio::test(flavor = "current_thread")]
async fn spans_never_connected_are_reported_as_handed_with_no_answer_not_as_sent() {
    use std::net::TcpStream;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..1024 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the accept queue did not fill ({} held)",
        held.len()
    );
    let (tracer, counter) = http_tracer(addr.port(), 10);
    let finale = finale(Duration::from_secs(3), Duration::from_secs(2));
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(counter)
        .finale_metrics(false)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let spans = report.delivery(HOOK_TRACES).unwrap().total();
    assert_eq!((spans.exported, spans.unconfirmed), (0, 10), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("10 handed to the exporter with no answer"),
        "{report}"
    );
    assert!(!text.contains("sent"), "{report}");
    drop(held);
}

/// A JSON partial success is read whatever its spelling: a media type in capitals with a
/// parameter (media types are case-insensitive) and the original snake_case field names (which
/// proto3 JSON parsers accept): the 10 rejected spans count as failed, not exported.
#[test]
fn spans_a_json_partial_success_rejected_are_failed_in_either_spelling() {
    for (content_type, body) in [
        (
            "Application/JSON; charset=utf-8",
            br#"{"partialSuccess":{"rejectedSpans":"10","errorMessage":"over quota"}}"#.to_vec(),
        ),
        (
            "application/json",
            br#"{"partial_success":{"rejected_spans":"10","error_message":"over quota"}}"#.to_vec(),
        ),
    ] {
        let (port, seen) = stand_in_typed(content_type, Some(("200 OK", body)));
        let counter = finale::otlp::Counter::default();
        let exporter = SpanExporter::builder()
            .with_http()
            .with_http_client(counter.http_client(reqwest::blocking::Client::new()))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!("http://127.0.0.1:{port}/v1/traces"))
            .build()
            .unwrap();
        let tracer = SdkTracerProvider::builder()
            .with_span_processor(counter.clone())
            .with_batch_exporter(Counted::with_counter(exporter, counter.clone()))
            .build();
        let t = tracer.tracer("test");
        for _ in 0..10 {
            t.in_span("work", |_| {});
        }
        tracer.force_flush().unwrap();
        let _ = tracer.shutdown();
        assert_eq!(seen.lock().unwrap().len(), 1, "{content_type}: one export");
        assert_eq!(
            (counter.exported(), counter.failed()),
            (0, 10),
            "{content_type}"
        );
    }
}

/// An exporter that cannot deliver from a takeover is named when it is registered: a gRPC
/// (tonic) exporter built on the application's runtime has its channel's tasks there, so the
/// supervisor's flush, which runs exactly when that runtime is wedged, delivers nothing. One
/// built inside `with_exporter_runtime`, and an OTLP/HTTP exporter that sends through the
/// counting client (a blocking client, no runtime needed), deliver: no warning for them.
///
/// In a child process (this test re-run with `FINALE_WARNING_CHILD` set): whether the exporter
/// runtime was used is known per process, and the steps before the last need it unused.
#[test]
fn an_exporter_that_cannot_deliver_from_a_takeover_is_named_at_registration() {
    if std::env::var_os("FINALE_WARNING_CHILD").is_some() {
        warning_child();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_exporter_that_cannot_deliver_from_a_takeover_is_named_at_registration",
            "--nocapture",
        ])
        .env("FINALE_WARNING_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("WARNING-CHILD-DONE"), "{stdout}\n{stderr}");
}

/// The child's three registrations, each with its own subscriber: what it warned.
fn warning_child() {
    // Registration only: nothing is exported, the endpoint is never reached.
    let grpc = "http://127.0.0.1:1";
    // 1. OTLP/HTTP through the counting client, outside any runtime (the blocking client's own
    //    runtime must not be dropped inside another).
    let counter = finale::otlp::Counter::default();
    let exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(counter.http_client(reqwest::blocking::Client::new()))
        .with_endpoint("http://127.0.0.1:1/v1/traces")
        .build()
        .unwrap();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(counter.clone())
        .with_batch_exporter(Counted::with_counter(exporter, counter.clone()))
        .build();
    let warned = registration_warnings(Otlp::new().tracer_provider(tracer).span_counter(counter));
    assert!(
        warned.is_empty(),
        "a false alarm for an HTTP exporter:\n{warned}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    // 2. gRPC on the application's runtime, counted or not: every stage is named.
    let warned = registration_warnings(grpc_providers(grpc));
    for stage in [HOOK_TRACES, HOOK_LOGS, HOOK_METRICS] {
        assert!(
            warned.lines().any(|l| l.contains("WARN")
                && l.contains(stage)
                && l.contains("with_exporter_runtime")),
            "{stage} not named:\n{warned}"
        );
    }
    // 3. gRPC built on finale's exporter runtime, as the docs show: no warning.
    let warned =
        registration_warnings(finale::otlp::with_exporter_runtime(|| grpc_providers(grpc)));
    assert!(
        warned.is_empty(),
        "a false alarm for exporters built on the exporter runtime:\n{warned}"
    );
    eprintln!("WARNING-CHILD-DONE");
}

/// gRPC providers for `endpoint`, built where the caller is: the tracer's exporter counted,
/// the others not.
fn grpc_providers(endpoint: &str) -> Otlp {
    let spans = Counted::new(
        SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .unwrap(),
    );
    let counter = spans.counter();
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(counter.clone())
        .with_batch_exporter(spans)
        .build();
    let logger = SdkLoggerProvider::builder()
        .with_batch_exporter(
            LogExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    let meter = SdkMeterProvider::builder()
        .with_periodic_exporter(
            MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .unwrap(),
        )
        .build();
    Otlp::new()
        .tracer_provider(tracer)
        .span_counter(counter)
        .logger_provider(logger)
        .meter_provider(meter)
        .finale_metrics(false)
}

/// What registering `otlp` with a new `Finale` logged at the warning level, on this thread.
fn registration_warnings(otlp: Otlp) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let finale = Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .build()
        .unwrap();
    otlp.register(&finale).unwrap();
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

/// A buffer a test's log lines go to.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
