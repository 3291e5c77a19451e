//! A complete service: an axum server, a background worker, a final Pushgateway push, OTLP
//! traces, metrics and logs, and a log file, all flushed in finale's Telemetry phase.
//!
//! ```sh
//! PUSHGATEWAY_URL=http://127.0.0.1:9091 \
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!   cargo run --example full_service --features axum,pushgateway,otlp,tracing-appender
//! curl http://127.0.0.1:3000/work   # then Ctrl-C, or kill -TERM <pid>
//! ```
//!
//! Every `GET /work` increments the counter `requests_total` (and the OTLP counter
//! `http.requests`), runs inside a span named
//! `request` and logs one `request served` line, to the log file and to OTLP logs.
//!
//! Environment variables (all optional: with none set it serves, and at exit flushes the log
//! file only):
//! - `FULL_SERVICE_ADDR`: where to listen (default `127.0.0.1:3000`; port `0` picks a free one).
//!   The address is printed on stderr as `listening on http://…`.
//! - `FULL_SERVICE_LOG`: the log file (default `full_service.log` in the current directory).
//! - `FULL_SERVICE_RUNTIME`: `multi_thread` (default), `current_thread` or `one_worker`.
//! - `FULL_SERVICE_WORK_MS`: how long each request works (default 20).
//! - `FULL_SERVICE_BLOCK_WORKERS_MS`: a Workers hook that blocks its thread that long (with
//!   `FULL_SERVICE_RUNTIME=current_thread`, the whole runtime): the supervisor's takeover then
//!   delivers the telemetry from its own threads.
//! - `FULL_SERVICE_PANIC_AFTER_MS`: turns on finale's panic hook and makes a worker panic after
//!   that many milliseconds: the panic starts the shutdown, the telemetry is still delivered, and
//!   the exit code is 4.
//! - `PUSHGATEWAY_URL`, `PUSHGATEWAY_JOB` (default `full_service`): without a URL, nothing is
//!   pushed (the run is not counted as a delivery failure: there is nowhere to deliver). The
//!   group's `instance` label is `POD_NAME` (set it from the downward API), else `HOSTNAME`
//!   (Kubernetes sets it to the pod's name), else the machine's host name: a name that stays
//!   the same when the process restarts, so a restart replaces its group instead of leaving a
//!   stale one behind (pushed groups live until deleted; a pid would make a new one each time).
//!   An `https://` URL is spoken over TLS (webpki roots, or only the CA in `PUSHGATEWAY_CA_FILE`);
//!   `PUSHGATEWAY_USER` and `PUSHGATEWAY_PASSWORD` add basic auth.
//! - `METRICS_ADDR`: the pull mode, beside the push: finale serves `/metrics` at this address
//!   (port `0` picks a free one; printed on stderr as `metrics on http://…/metrics`) from a
//!   thread of its own, through the whole shutdown, and the Telemetry phase waits for a scrape
//!   of the final values (the `final-scrape` stage). `METRICS_FINAL_SCRAPE=off` serves the
//!   endpoint without the stage; `METRICS_POLICY=every` waits for every recent scraper;
//!   `METRICS_INTERVAL` (e.g. `15s`) and `METRICS_TIMEOUT` (e.g. `1s`) declare the scrape
//!   interval and timeout, for the budget planner.
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL) and
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, as in the OpenTelemetry
//!   specification, or `grpc`): without an endpoint, no OTLP. Over gRPC, a collector that
//!   leaves Nagle's algorithm on (sets no `TCP_NODELAY` on the connections it accepts) makes the
//!   final flush on a fresh connection wait ~40 ms for the client's delayed ACK (see
//!   BENCHMARKS.md, "SIGTERM to exit"); the OpenTelemetry Collector sets it.
//! - `FINALE_*`: any budget setting, e.g. `FINALE_TOTAL_BUDGET=6s FINALE_TELEMETRY_RESERVE=3s`.
//!
//! The exit code is the report's: `0` when everything was delivered, `6` when some telemetry was
//! not (the report, printed on stderr, names what failed, and counts per signal what was
//! exported, failed and dropped during the run and at exit).
//!
//! The OTLP HTTP exporter uses opentelemetry-otlp's `reqwest-blocking-client`; no crate in this
//! build may enable its `reqwest-client` or `hyper-client` features, or the exporter's threads
//! panic and nothing is exported (see finale's `otlp` module docs).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use finale::otlp::{Counted, Counter, Otlp};
use finale::prometheus::{MetricsEndpoint, ScrapePolicy};
use finale::pushgateway::Pushgateway;
use finale::{Finale, Hook, Phase, Task};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{LogExporter, MetricExporter, Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A stable `instance` label: the pod's name, else the host's.
fn instance() -> String {
    env("POD_NAME")
        .or_else(|| env("HOSTNAME"))
        .or_else(|| {
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .find_map(|path| std::fs::read_to_string(path).ok())
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| "full_service".to_owned())
}

/// `15s`, `500ms`.
fn humantime(v: &str) -> Option<Duration> {
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    v.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

fn main() {
    let mut runtime = match env("FULL_SERVICE_RUNTIME").as_deref() {
        Some("current_thread") => tokio::runtime::Builder::new_current_thread(),
        Some("one_worker") => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build().expect("a tokio runtime");
    runtime.block_on(run());
}

/// The OpenTelemetry providers, built inside the runtime (the gRPC exporter needs it).
struct Providers {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
    logger: SdkLoggerProvider,
    /// What each exporter delivered, for the report.
    spans: Counter,
    points: Counter,
    records: Counter,
}

fn otlp_providers(endpoint: &str) -> Result<Providers, opentelemetry_otlp::ExporterBuildError> {
    let resource = Resource::builder()
        .with_service_name("full_service")
        .build();
    let grpc = matches!(env("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(), Some("grpc"));
    // On finale's exporter runtime: tonic's connection tasks then run on a thread of finale's,
    // and the supervisor can still deliver when this service's runtime is wedged. Harmless for
    // the HTTP exporters (a blocking client), and finale then knows the exporters are built the
    // way that delivers from a takeover (it warns at registration otherwise).
    let (spans, logs, metrics) = finale::otlp::with_exporter_runtime(|| {
        Ok::<_, opentelemetry_otlp::ExporterBuildError>(if grpc {
            (
                SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()?,
                LogExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()?,
                MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()?,
            )
        } else {
            // With HTTP the programmatic endpoint is used as is: add the signal's path.
            let base = endpoint.trim_end_matches('/');
            (
                SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{base}/v1/traces"))
                    .build()?,
                LogExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{base}/v1/logs"))
                    .build()?,
                MetricExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{base}/v1/metrics"))
                    .build()?,
            )
        })
    })?;
    // Counted, so the report says how many spans, log records and metric points went out; the
    // counters are processors too, so a full batch queue shows as dropped.
    let (spans, logs, metrics) = (
        Counted::new(spans),
        Counted::new(logs),
        Counted::new(metrics),
    );
    let (span_counter, record_counter, point_counter) =
        (spans.counter(), logs.counter(), metrics.counter());
    Ok(Providers {
        tracer: SdkTracerProvider::builder()
            .with_span_processor(span_counter.clone())
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build(),
        logger: SdkLoggerProvider::builder()
            .with_log_processor(record_counter.clone())
            .with_batch_exporter(logs)
            .with_resource(resource.clone())
            .build(),
        meter: SdkMeterProvider::builder()
            .with_periodic_exporter(metrics)
            .with_resource(resource)
            .build(),
        spans: span_counter,
        points: point_counter,
        records: record_counter,
    })
}

async fn run() -> ! {
    // Metrics: a Prometheus recorder whose handle the Pushgateway push renders.
    let metrics: PrometheusHandle = PrometheusBuilder::new()
        .install_recorder()
        .expect("no other global metrics recorder");
    // Counters start at 0, so that a scrape sees every increment, the first included.
    metrics::counter!("requests_total").absolute(0);

    // OTLP, if a collector is configured.
    let providers = env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|endpoint| {
        otlp_providers(&endpoint).unwrap_or_else(|e| {
            eprintln!("cannot build the OTLP exporters: {e}");
            std::process::exit(2)
        })
    });

    // Logs: a file through tracing-appender, stderr, and OTLP logs. The exporters' own events
    // stay out of the OTLP layers.
    let log_path = env("FULL_SERVICE_LOG").unwrap_or_else(|| "full_service.log".to_owned());
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| {
            eprintln!("cannot open the log file {log_path}: {e}");
            std::process::exit(2)
        });
    let (file_writer, log_guard) = finale::appender::non_blocking(log_file);
    let otel_filter = || EnvFilter::new("request=info,finale=info");
    let (otel_spans, otel_logs) = match &providers {
        Some(p) => (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(p.tracer.tracer("full_service"))
                    .with_filter(otel_filter()),
            ),
            Some(OpenTelemetryTracingBridge::new(&p.logger).with_filter(otel_filter())),
        ),
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(file_writer)
                .with_filter(EnvFilter::new("info")),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .with_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                ),
        )
        .with(otel_spans)
        .with(otel_logs)
        .init();

    // With FULL_SERVICE_PANIC_AFTER_MS set, a worker panics after that long and the panic hook
    // turns the panic into a shutdown whose telemetry is still delivered.
    let panic_after = env("FULL_SERVICE_PANIC_AFTER_MS").and_then(|v| v.parse::<u64>().ok());
    let finale = Finale::builder()
        .panic_hook(panic_after.is_some())
        .build()
        .unwrap_or_else(|e| {
            eprintln!("configuration error: {e}");
            std::process::exit(2)
        });

    if let Some(ms) = env("FULL_SERVICE_BLOCK_WORKERS_MS").and_then(|v| v.parse::<u64>().ok()) {
        finale
            .hook(Hook::new(
                Phase::Workers,
                "blocking-cleanup",
                move |_| async move {
                    tracing::warn!(ms, "a cleanup that blocks its thread");
                    std::thread::sleep(Duration::from_millis(ms));
                },
            ))
            .expect("unique names");
    }

    // Pull mode: an endpoint that outlives the drain, and a wait for the final scrape.
    if let Some(addr) = env("METRICS_ADDR") {
        let mut builder = MetricsEndpoint::builder(addr);
        if env("METRICS_POLICY").as_deref() == Some("every") {
            builder = builder.policy(ScrapePolicy::Every);
        }
        if let Some(interval) = env("METRICS_INTERVAL").and_then(|v| humantime(&v)) {
            builder = builder.expected_interval(interval);
        }
        if let Some(timeout) = env("METRICS_TIMEOUT").and_then(|v| humantime(&v)) {
            builder = builder.expected_timeout(timeout);
        }
        let endpoint = builder.build(metrics.clone()).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(3)
        });
        eprintln!("metrics on http://{}/metrics", endpoint.local_addr());
        if env("METRICS_FINAL_SCRAPE").as_deref() != Some("off") {
            endpoint.register(&finale).expect("unique names");
        }
    }

    // Telemetry, in the order finale flushes it: metrics, then traces and logs, the file last.
    match env("PUSHGATEWAY_URL") {
        Some(url) => {
            let job = env("PUSHGATEWAY_JOB").unwrap_or_else(|| "full_service".to_owned());
            let mut builder = Pushgateway::builder(url, job)
                .label("instance", instance())
                .push_interval(Duration::from_secs(10));
            if let Some(ca) = env("PUSHGATEWAY_CA_FILE") {
                builder = builder.tls_ca_file(ca);
            }
            if let (Some(user), Some(password)) =
                (env("PUSHGATEWAY_USER"), env("PUSHGATEWAY_PASSWORD"))
            {
                builder = builder.basic_auth(user, password);
            }
            builder
                .build(metrics)
                .unwrap_or_else(|e| {
                    eprintln!("{e}");
                    std::process::exit(2)
                })
                .register(&finale)
                .expect("unique names");
        }
        None => tracing::warn!("PUSHGATEWAY_URL is not set: metrics are not pushed"),
    }
    if let Some(p) = &providers {
        Otlp::new()
            .tracer_provider(p.tracer.clone())
            .meter_provider(p.meter.clone())
            .logger_provider(p.logger.clone())
            .span_counter(p.spans.clone())
            .metric_point_counter(p.points.clone())
            .log_record_counter(p.records.clone())
            .register(&finale)
            .expect("unique names");
    }
    log_guard.register(&finale).expect("unique names");

    if let Some(ms) = panic_after {
        finale
            .spawn(Task::worker("fragile", move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ms > 0 {
                    panic!("the fragile worker gave up");
                }
            }))
            .expect("unique name");
    }

    // A background worker, stopped after the server drained.
    finale
        .spawn(Task::worker("ticker", |ctx| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = ctx.stopped() => break,
                    _ = tick.tick() => metrics::counter!("ticks_total").increment(1),
                }
            }
        }))
        .expect("unique name");

    // The HTTP server: stops accepting when the Drain phase starts, finishes what is in flight.
    let work = Duration::from_millis(
        env("FULL_SERVICE_WORK_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    // The same count as an OpenTelemetry metric, so OTLP metrics have something to deliver.
    let otel_requests = providers.as_ref().map(|p| {
        p.meter
            .meter("full_service")
            .u64_counter("http.requests")
            .build()
    });
    let app = Router::new().route(
        "/work",
        get(move || {
            let otel_requests = otel_requests.clone();
            async move {
                tokio::time::sleep(work).await;
                metrics::counter!("requests_total").increment(1);
                if let Some(counter) = &otel_requests {
                    counter.add(1, &[]);
                }
                tracing::info!(target: "request", "request served");
                "done\n"
            }
            .instrument(tracing::info_span!(target: "request", "request"))
        }),
    );
    let addr: SocketAddr = env("FULL_SERVICE_ADDR")
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned())
        .parse()
        .expect("FULL_SERVICE_ADDR is host:port");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(2)
        });
    eprintln!(
        "listening on http://{}",
        listener.local_addr().expect("a bound address")
    );
    // finale's axum server: tracks requests in flight, stops accepting when the Drain phase
    // starts, finishes what is in flight and answers late keep-alive requests with 503.
    let app = app.merge(finale::axum::health_router(&finale.handle()));
    finale::axum::serve(&finale, "http", listener, app).expect("unique name");

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
