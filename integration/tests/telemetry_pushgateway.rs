//! The Pushgateway integration in process, against a real Pushgateway and small recording
//! servers: the grouping key, the methods, authentication, periodic pushes that stop before the
//! final one, bounded retries, typed errors that chain to the client's, and https against a real
//! Pushgateway serving TLS (certificates made here with rcgen) with basic auth and mutual TLS.

mod common;

use std::error::Error as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::components::{Pushgateway as Gateway, free_port, parse_samples, wait_until};
use common::pki::pki;
use common::tls_gateway::{PASSWORD, PASSWORD_BCRYPT, TempDir, USER, tls_gateway};
use finale::pushgateway::{Method, PushError, Pushgateway, PushgatewayConfigError};
use finale::{Environment, Finale, Hook, Outcome, Phase, ShutdownStatus};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const BOUND: Duration = Duration::from_secs(10);

/// The one global recorder of this test binary (finale records its own metrics through the
/// `metrics` facade).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
        .clone()
}

fn finale(total: Duration, reserve: Duration) -> Finale {
    Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(total)
        .telemetry_reserve(reserve)
        .build()
        .unwrap()
}

/// One request as a recording server saw it.
#[derive(Clone, Debug)]
struct Seen {
    head: String,
    body: String,
    at: Instant,
}

/// How a recording server answers.
#[derive(Clone, Copy)]
enum Answer {
    /// At once, with this status line.
    Now(&'static str),
    /// Never: the connection is accepted and nothing is read.
    BlackHole,
    /// Never, but the request is read and recorded: a gateway that applied it and answers
    /// later than any request timeout.
    Late,
}

/// An HTTP server that records every request and answers `status`, or never answers if `None`.
fn recording(status: Option<&'static str>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    recording_as(status.map_or(Answer::BlackHole, Answer::Now))
}

/// An HTTP server that records requests and answers as `answer` says.
fn recording_as(answer: Answer) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(256) {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            let status = match answer {
                Answer::BlackHole => {
                    held.push(stream); // a black hole: accept, never answer
                    continue;
                }
                Answer::Now(status) => Some(status),
                Answer::Late => None,
            };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                // Keep-alive: several requests may come on one connection.
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then_some(v)
                        })
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let total = head_end + 4 + length;
                    while raw.len() < total {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&raw[head_end + 4..total]).into_owned();
                    raw.drain(..total);
                    log.lock().unwrap().push(Seen {
                        head,
                        body,
                        at: Instant::now(),
                    });
                    // Late: the connection stays open, unanswered, until the client drops it.
                    let Some(status) = status else { continue };
                    let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// The pushes a recording server saw, without the consistency check's reads of the API.
fn pushes(seen: &[Seen]) -> Vec<Seen> {
    seen.iter()
        .filter(|s| !s.head.starts_with("GET /api/v1/metrics "))
        .cloned()
        .collect()
}

#[tokio::test]
async fn grouping_labels_with_slashes_and_empty_values_reach_the_group() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    // Install the recorder before recording: each test may run in a process of its own.
    let handle = recorder();
    metrics::counter!("grouping_test_total").increment(3);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    let pushgateway = Pushgateway::builder(gateway.url(), "grouping")
        .label("instance", "host/1")
        .label("zone", "")
        .build(handle)
        .unwrap();
    assert!(
        pushgateway
            .url()
            .ends_with("/metrics/job/grouping/instance@base64/aG9zdC8x/zone@base64/="),
        "{}",
        pushgateway.url()
    );
    pushgateway.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(
        gateway.sample(
            "grouping_test_total",
            &[("job", "grouping"), ("instance", "host/1"), ("zone", "")]
        ),
        Some(3.0),
        "{}",
        gateway.metrics_text()
    );
    // finale's own metrics are in the same push.
    assert!(
        gateway
            .sample(
                "finale_shutdowns_total",
                &[("job", "grouping"), ("reason", "requested")]
            )
            .is_some()
    );
}

#[tokio::test]
async fn grouping_values_that_are_dots_reach_the_group() {
    // `.` and `..` are path segments that an HTTP server resolves (the Pushgateway answers a
    // path holding them with a redirect): sent as they are, the push never reaches the group.
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let handle = recorder();
    metrics::counter!("dots_test_total").increment(4);
    for (job, labels) in [
        ("..", vec![("instance", "."), ("zone", "..")]),
        (".", vec![("instance", "a..b"), ("zone", "...")]),
    ] {
        let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
        let mut builder = Pushgateway::builder(gateway.url(), job);
        for (name, value) in &labels {
            builder = builder.label(*name, *value);
        }
        builder
            .build(handle.clone())
            .unwrap()
            .register(&finale)
            .unwrap();
        finale.handle().trigger("test");
        let report = finale.run().await;
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
        let mut group = vec![("job", job)];
        group.extend(labels.iter().copied());
        assert_eq!(
            gateway.sample("dots_test_total", &group),
            Some(4.0),
            "{}",
            gateway.metrics_text()
        );
    }
}

#[test]
fn credentials_in_the_url_are_refused_without_being_shown() {
    let e = Pushgateway::builder("http://user:hunter2@gw:9091", "j")
        .build(recorder())
        .unwrap_err();
    let PushgatewayConfigError::InvalidUrl { url, .. } = &e else {
        panic!("{e:?}");
    };
    for shown in [e.to_string(), format!("{e:?}"), url.clone()] {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("gw:9091"), "{shown}");
    }
}

#[tokio::test]
async fn delete_at_exit_removes_the_group() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    assert_eq!(
        gateway
            .put("leaving", "# TYPE stale gauge\nstale 1\n")
            .unwrap(),
        200
    );
    assert_eq!(gateway.sample("stale", &[("job", "leaving")]), Some(1.0));
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "leaving")
        .method(Method::Delete)
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    // DELETE is queued by the Pushgateway (202): wait, bounded, until it is applied.
    assert!(wait_until(BOUND, || gateway
        .sample("stale", &[("job", "leaving")])
        .is_none()));
}

#[tokio::test]
async fn delete_at_exit_lets_the_shutdown_metrics_be_scraped_first() {
    // A scrape during the shutdown must find this run's last metrics, finale's own included:
    // deleting the group straight away would lose exactly the errors of the shutdown.
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let gateway = Arc::new(gateway);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "scraped-then-deleted")
        .method(Method::Delete)
        .delete_delay(Duration::from_millis(800))
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    // A scraper: polls the Pushgateway from the trigger on, until it sees the final snapshot.
    let scraper = gateway.clone();
    let scraped = std::thread::spawn(move || {
        wait_until(BOUND, || {
            scraper
                .sample(
                    "finale_shutdowns_total",
                    &[("job", "scraped-then-deleted"), ("reason", "requested")],
                )
                .is_some()
        })
        .then(Instant::now)
    });
    finale.handle().trigger("test");
    let report = finale.run().await;
    let ended = Instant::now();
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let seen = scraped
        .join()
        .unwrap()
        .expect("the final snapshot was never there");
    assert!(seen < ended, "seen only after the run ended");
    // Then the group goes: DELETE is queued by the Pushgateway (202), so wait for it, bounded.
    assert!(wait_until(BOUND, || gateway
        .samples("finale_shutdowns_total", &[("job", "scraped-then-deleted")])
        .is_empty()));
}

#[tokio::test]
async fn a_delete_delay_longer_than_the_slot_is_cut_and_the_group_still_deleted() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let total = Duration::from_secs(4);
    let finale = finale(total, Duration::from_secs(2));
    Pushgateway::builder(gateway.url(), "cut-delay")
        .method(Method::Delete)
        .request_timeout(Duration::from_millis(300))
        .delete_delay(Duration::from_secs(60))
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(start.elapsed() < total, "{:?}", start.elapsed());
    assert!(wait_until(BOUND, || gateway
        .samples("finale_shutdowns_total", &[("job", "cut-delay")])
        .is_empty()));
}

#[tokio::test]
async fn credentials_are_sent() {
    for (auth, expected) in [
        ("basic", "authorization: Basic dXNlcjpwQHNz"),
        ("bearer", "authorization: Bearer s3cret"),
    ] {
        let (port, seen) = recording(Some("200 OK"));
        let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
        let builder = Pushgateway::builder(format!("http://127.0.0.1:{port}"), "auth");
        let builder = match auth {
            "basic" => builder.basic_auth("user", "p@ss"),
            _ => builder.bearer_token("s3cret"),
        };
        let pushgateway = builder.build(recorder()).unwrap();
        // Secrets stay out of debug output.
        assert!(!format!("{pushgateway:?}").contains("s3cret"));
        pushgateway.register(&finale).unwrap();
        finale.handle().trigger("test");
        let report = finale.run().await;
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
        let seen = seen.lock().unwrap();
        // Every request carries them: the push, and the consistency check's read if it came.
        for s in seen.iter() {
            let head = s.head.to_ascii_lowercase();
            assert!(head.contains(&expected.to_ascii_lowercase()), "{head}");
        }
        let seen = pushes(&seen);
        assert_eq!(seen.len(), 1);
        let head = seen[0].head.to_ascii_lowercase();
        assert!(head.starts_with("put /metrics/job/auth http/1.1"), "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn periodic_pushes_stop_before_the_final_one() {
    let (port, seen) = recording(Some("200 OK"));
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "periodic")
        .method(Method::Post)
        .push_interval(Duration::from_millis(20))
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    // Set just before the metrics stage: only pushes made after it carry the marker.
    finale
        .hook(
            Hook::new(Phase::Telemetry, "marker", |_| async {
                metrics::gauge!("periodic_test_final_marker").set(1.0);
            })
            .order(finale::ORDER_METRICS - 1),
        )
        .unwrap();
    let running = seen.clone();
    let handle = finale.handle();
    let waiter = tokio::task::spawn_blocking(move || {
        let pushed = wait_until(BOUND, || pushes(&running.lock().unwrap()).len() >= 3);
        handle.trigger("enough periodic pushes");
        pushed
    });
    let report = finale.run().await;
    assert!(waiter.await.unwrap(), "no periodic pushes");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(
        report.entry("pushgateway (periodic)").unwrap().outcome,
        Outcome::Completed
    );
    let seen = pushes(&seen.lock().unwrap());
    let last = seen.last().unwrap();
    // The last request is the final push: POST (periodic pushes use it too), with the marker.
    assert!(last.head.starts_with("POST "), "{}", last.head);
    assert!(
        last.body.contains("periodic_test_final_marker 1"),
        "{}",
        last.body
    );
    assert!(seen.len() >= 4);
}

/// A render that blocks its thread until another task of the same one-thread runtime lets it
/// go: the periodic pushes must render off the runtime's thread, or that task never runs.
#[tokio::test(flavor = "current_thread")]
async fn a_render_that_blocks_does_not_stall_the_runtime() {
    let (port, seen) = recording(Some("200 OK"));
    let started = Arc::new(tokio::sync::Notify::new());
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let blocking = Arc::new(AtomicBool::new(true));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let render = {
        let (started, blocking, outcomes) = (started.clone(), blocking.clone(), outcomes.clone());
        move || {
            if blocking.load(Ordering::SeqCst) {
                started.notify_one();
                // Released by the task below, or (if it cannot run) given up after the bound.
                let got = released.lock().unwrap().recv_timeout(BOUND).is_ok();
                outcomes.lock().unwrap().push(got);
            }
            "# TYPE blocking_render_test gauge\nblocking_render_test 1\n".to_owned()
        }
    };
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "blocking-render")
        .push_interval(Duration::from_millis(10))
        .build_with(render)
        .unwrap()
        .register(&finale)
        .unwrap();
    // On the runtime's only thread, between the periodic pusher's turns.
    let releaser = tokio::spawn(async move {
        for _ in 0..2 {
            started.notified().await;
            release.send(()).unwrap();
        }
        blocking.store(false, Ordering::SeqCst);
    });
    releaser.await.unwrap();
    let pushed = {
        let seen = seen.clone();
        tokio::task::spawn_blocking(move || {
            wait_until(BOUND, || {
                seen.lock().unwrap().iter().any(|s| {
                    s.head.starts_with("PUT ") && s.body.contains("blocking_render_test 1")
                })
            })
        })
        .await
        .unwrap()
    };
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(*outcomes.lock().unwrap(), [true, true], "{report}");
    assert!(pushed, "no periodic push");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A gzip push reaches the real Pushgateway intact, and is smaller than the same push in text.
/// What the library logs, as text: fmt's output, no colours.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's events up to `level` (a `current_thread` test runs every task on it).
    fn capture(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits, off the runtime's thread, until `n` lines hold `needle`.
    async fn wait_for(&self, needle: &'static str, n: usize) -> bool {
        let logs = self.clone();
        tokio::task::spawn_blocking(move || {
            wait_until(BOUND, || logs.lines_with(needle).len() >= n)
        })
        .await
        .unwrap()
    }
}

/// A metric another group holds with another type: the registration's check warns, naming
/// the metric, both types and the other group; the final push is refused with the
/// Pushgateway's message in the report, and the check after the refusal warns again.
#[tokio::test(flavor = "current_thread")]
async fn a_type_held_by_another_group_is_warned_of_and_its_refusal_explained() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let handle = recorder();
    assert_eq!(
        gateway
            .put(
                "other-job",
                "# TYPE type_clash_test_total gauge\ntype_clash_test_total 1\n"
            )
            .unwrap(),
        200
    );
    metrics::counter!("type_clash_test_total").increment(1);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "type-clash")
        .build(handle)
        .unwrap()
        .register(&finale)
        .unwrap();
    const WARNING: &str = "holds type_clash_test_total as a gauge for the group {job=\"other-job\"}, and this push has it as a counter";
    assert!(
        logs.wait_for(WARNING, 1).await,
        "no warning at registration"
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let error = push_error(&report);
    assert!(error.is_inconsistent(), "{error}");
    let PushError::Rejected { status, body, .. } = error else {
        panic!("{error}");
    };
    assert_eq!(status.as_u16(), 400);
    // The Pushgateway names the clash from either side (which group it checks first varies
    // from run to run): "... is not a GAUGE" or "... gauge ... is not a COUNTER".
    let clash = |text: &str| {
        text.contains("type_clash_test_total")
            && (text.contains("is not a GAUGE") || text.contains("is not a COUNTER"))
    };
    assert!(clash(body), "{body}");
    assert!(clash(&report.to_string()), "{report}");
    // Once at registration, once after the refusal.
    assert_eq!(
        logs.lines_with(WARNING).len(),
        2,
        "{:?}",
        logs.lines_with("WARN")
    );
}

/// A series another group holds already (the group {job,instance} holds what a group {job}
/// pushes with an instance label of the same value): warned of by the check of a periodic
/// pusher's registration, with the series and the other group's labels.
#[tokio::test(flavor = "current_thread")]
async fn a_series_held_by_another_group_is_warned_of() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let handle = recorder();
    let held = common::components::http_request(
        "PUT",
        &format!("{}/metrics/job/series-clash/instance/pod-1", gateway.url()),
        &[],
        b"# TYPE series_clash_test gauge\nseries_clash_test 1\n",
    )
    .unwrap();
    assert_eq!(held.status, 200);
    metrics::gauge!("series_clash_test", "instance" => "pod-1").set(2.0);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "series-clash")
        .push_interval(Duration::from_secs(3600))
        .build(handle)
        .unwrap()
        .register(&finale)
        .unwrap();
    const WARNING: &str = "holds the series series_clash_test{instance=\"pod-1\",job=\"series-clash\"} for the group {instance=\"pod-1\",job=\"series-clash\"} already";
    assert!(
        logs.wait_for(WARNING, 1).await,
        "{:?}",
        logs.lines_with("WARN")
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    let PushError::Rejected { body, .. } = push_error(&report) else {
        panic!("{report}");
    };
    assert!(
        body.contains("was collected before with the same name and label values"),
        "{body}"
    );
}

/// Consistent metrics (the same type and other labels in another group): no warning.
#[tokio::test(flavor = "current_thread")]
async fn consistent_metrics_are_not_warned_of() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let handle = recorder();
    assert_eq!(
        gateway
            .put(
                "other-job",
                "# TYPE agreed_test_total counter\nagreed_test_total{x=\"1\"} 1\n"
            )
            .unwrap(),
        200
    );
    metrics::counter!("agreed_test_total", "x" => "1").increment(1);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "agreed")
        .build(handle)
        .unwrap()
        .register(&finale)
        .unwrap();
    assert!(
        logs.wait_for("nothing the Pushgateway would refuse", 1)
            .await,
        "the check did not run"
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(logs.lines_with(" WARN "), Vec::<String>::new());
}

#[tokio::test]
// Reports what it measured (run with `--no-capture` to see it).
#[allow(clippy::print_stderr)]
async fn a_gzip_push_arrives_intact_and_smaller() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let handle = recorder();
    // A registry of a realistic shape: labelled counters and a histogram.
    for route in 0..40 {
        for status in ["200", "404", "500"] {
            metrics::counter!("gzip_test_requests_total", "route" => format!("/api/v1/item/{route}"), "status" => status)
                .increment(route + 1);
        }
    }
    for ms in [3.0, 8.0, 21.0, 55.0, 144.0] {
        metrics::histogram!("gzip_test_latency_seconds").record(ms / 1000.0);
    }
    let build = |url: String, gzip: bool| {
        Pushgateway::builder(url, "gzip")
            .gzip(gzip)
            .build(handle.clone())
            .unwrap()
    };
    build(gateway.url(), true).push().await.unwrap();
    for route in [0u64, 39] {
        let path = format!("/api/v1/item/{route}");
        assert_eq!(
            gateway.sample(
                "gzip_test_requests_total",
                &[("job", "gzip"), ("route", &path), ("status", "500")]
            ),
            Some((route + 1) as f64),
            "{}",
            gateway.diagnostics()
        );
    }
    assert_eq!(
        gateway.sample("gzip_test_latency_seconds_count", &[("job", "gzip")]),
        Some(5.0)
    );

    // The same registry, once in text and once compressed, as a server sees them.
    let (port, seen) = recording(Some("200 OK"));
    let url = format!("http://127.0.0.1:{port}");
    build(url.clone(), false).push().await.unwrap();
    build(url, true).push().await.unwrap();
    let seen = seen.lock().unwrap();
    let length = |s: &Seen| -> usize {
        s.head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let (plain, gzip) = (&seen[0], &seen[1]);
    assert!(!plain.head.contains("content-encoding"), "{}", plain.head);
    assert!(
        gzip.head.contains("content-encoding: gzip"),
        "{}",
        gzip.head
    );
    eprintln!(
        "pushgateway: {} bytes in text, {} gzip-compressed",
        length(plain),
        length(gzip)
    );
    assert!(
        length(gzip) * 3 < length(plain),
        "{} vs {}",
        length(gzip),
        length(plain)
    );
}

/// Without `gzip`, pushes are plain text, as older Pushgateways need.
#[tokio::test]
async fn pushes_are_plain_text_unless_gzip_is_asked_for() {
    let (port, seen) = recording(Some("200 OK"));
    let handle = recorder();
    metrics::counter!("plain_test_total").increment(1);
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "plain")
        .build(handle)
        .unwrap()
        .push()
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        !seen[0].head.contains("content-encoding"),
        "{}",
        seen[0].head
    );
    assert!(
        seen[0].body.contains("plain_test_total 1"),
        "{}",
        seen[0].body
    );
}

#[tokio::test]
// Reports what it measured (run with `--no-capture` to see it).
#[allow(clippy::print_stderr)]
async fn periodic_pushes_of_instances_started_together_spread_out() {
    // A rollout starts many instances at once: their periodic pushes must not all hit the
    // Pushgateway in the same instant, every interval, for as long as they run.
    const N: usize = 12;
    let interval = Duration::from_secs(1);
    let (port, seen) = recording(Some("200 OK"));
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    let start = Instant::now();
    for i in 0..N {
        Pushgateway::builder(format!("http://127.0.0.1:{port}"), format!("spread-{i}"))
            .method(Method::None)
            .push_interval(interval)
            .name(format!("pushgateway-{i}"))
            .build(recorder())
            .unwrap()
            .register(&finale)
            .unwrap();
    }
    let first_pushes = |seen: &[Seen]| {
        (0..N)
            .filter_map(|i| {
                let path = format!(" /metrics/job/spread-{i} ");
                seen.iter().find(|s| s.head.contains(&path)).map(|s| s.at)
            })
            .collect::<Vec<_>>()
    };
    let running = seen.clone();
    let handle = finale.handle();
    let waiter = tokio::task::spawn_blocking(move || {
        let pushed = wait_until(BOUND, || first_pushes(&running.lock().unwrap()).len() == N);
        handle.trigger("every instance pushed once");
        pushed
    });
    let report = finale.run().await;
    assert!(waiter.await.unwrap(), "not every instance pushed");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let firsts = first_pushes(&seen.lock().unwrap());
    let earliest = *firsts.iter().min().unwrap() - start;
    let latest = *firsts.iter().max().unwrap() - start;
    eprintln!("first pushes between {earliest:?} and {latest:?} after the start");
    // Spread over the last fifth of the interval: 12 uniform draws over 200 ms all fall within
    // 50 ms of each other with a probability of about 3 in a million.
    assert!(
        latest - earliest >= Duration::from_millis(50),
        "{earliest:?}..{latest:?}"
    );
    // Never later than the interval (plus scheduling slack): the data stays as fresh as asked.
    assert!(earliest >= interval * 4 / 5, "{earliest:?}");
    assert!(
        latest <= interval + Duration::from_millis(500),
        "{latest:?}"
    );
}

#[tokio::test]
async fn a_refused_push_chains_to_the_client_error() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(url, "refused")
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::TelemetryNotDelivered);
    let Outcome::Failed(error) = &report.entry("pushgateway").unwrap().outcome else {
        panic!("{report}");
    };
    let push = error
        .source()
        .and_then(|e| e.downcast_ref::<PushError>())
        .expect("a PushError");
    assert!(
        matches!(push, PushError::Unreachable { attempts: 3, .. }),
        "{push}"
    );
    assert!(push.is_transient());
    assert!(push.source().is_some(), "chains to the client's error");
    let shown = push.to_string();
    assert!(shown.contains("Connection refused"), "{shown}");
}

#[tokio::test]
async fn the_samples_pushed_are_counted_as_the_gateway_holds_them() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let handle = recorder();
    for shard in ["a", "b", "c"] {
        metrics::counter!("counted_test_total", "shard" => shard).increment(1);
    }
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "counted")
        .build(handle)
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let delivery = report.delivery("pushgateway").expect("counted");
    assert_eq!(delivery.items, finale::Items::Samples);
    // The group as the Pushgateway holds it, less the two series it adds itself.
    let held = parse_samples(&gateway.metrics_text())
        .into_iter()
        .filter(|s| s.has_labels(&[("job", "counted")]))
        .filter(|s| !s.name.starts_with("push_time_seconds"))
        .filter(|s| !s.name.starts_with("push_failure_time_seconds"))
        .count() as u64;
    #[allow(clippy::print_stderr)]
    {
        eprintln!("pushgateway: {held} samples held; {delivery}");
    }
    assert!(held >= 3, "{held}");
    assert_eq!(delivery.at_exit.exported, held, "{report}");
    assert_eq!(delivery.total().failed, 0, "{report}");
}

#[tokio::test]
async fn a_refused_push_counts_its_samples_as_failed_once() {
    let (port, seen) = recording(Some("400 Bad Request"));
    metrics::counter!("refused_count_test_total").increment(1);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "refused-count")
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let body = pushes(&seen.lock().unwrap()).last().unwrap().body.clone();
    let sent = parse_samples(&body).len() as u64;
    let delivery = report.delivery("pushgateway").expect("counted");
    assert!(sent > 0);
    assert_eq!(delivery.at_exit.failed, sent, "{report}");
    assert_eq!(delivery.total().exported, 0, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

#[tokio::test]
async fn a_408_is_retried_like_a_5xx() {
    // A proxy or the server giving up on a slow request: the next attempt may well get through.
    let (port, seen) = recording(Some("408 Request Timeout"));
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "slow")
        .retry_backoff(Duration::from_millis(10))
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::TelemetryNotDelivered);
    let push = push_error(&report);
    assert!(
        matches!(push, PushError::Rejected { status, attempts: 3, .. } if status.as_u16() == 408),
        "{push}"
    );
    assert!(push.is_transient());
    assert_eq!(pushes(&seen.lock().unwrap()).len(), 3);
}

#[tokio::test]
async fn a_pushgateway_that_never_answers_costs_at_most_the_slot() {
    let (port, _) = recording(None);
    let total = Duration::from_secs(3);
    let finale = finale(total, Duration::from_secs(2));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "hung")
        .request_timeout(Duration::from_millis(400))
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let Outcome::Failed(error) = &report.entry("pushgateway").unwrap().outcome else {
        panic!("{report}");
    };
    let shown = error.to_string();
    assert!(shown.contains("did not answer PUT"), "{shown}");
    // The metrics stage gives up at half the slot, so the rest still has time.
    assert!(elapsed < total, "{elapsed:?}");
}

#[tokio::test]
async fn a_slow_pushgateway_still_gets_the_delete() {
    // A stand-in: a real Pushgateway cannot be made to apply a request and answer it late.
    // Every PUT times out, so the PUT's retries would use the whole share if let them; the DELETE
    // must still go out with one request timeout of its own, or the group stays forever.
    let (port, seen) = recording_as(Answer::Late);
    let finale = finale(Duration::from_secs(3), Duration::from_secs(2));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "slow")
        .method(Method::Delete)
        .request_timeout(Duration::from_millis(200))
        .attempts(100)
        .retry_backoff(Duration::from_millis(10))
        .delete_delay(Duration::from_millis(10))
        .check(false)
        .build(recorder())
        .unwrap()
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    assert!(start.elapsed() < Duration::from_secs(3), "{report}");
    let deleted = || {
        pushes(&seen.lock().unwrap())
            .iter()
            .any(|s| s.head.starts_with("DELETE /metrics/job/slow "))
    };
    assert!(wait_until(BOUND, deleted), "{report}");
    let Outcome::Failed(error) = &report.entry("pushgateway").unwrap().outcome else {
        panic!("{report}");
    };
    let shown = error.to_string();
    assert!(shown.contains("did not answer DELETE"), "{shown}");
}

#[test]
fn settings_are_checked_at_build_time() {
    let build = |url: &str, job: &str, label: (&str, &str)| {
        Pushgateway::builder(url, job)
            .label(label.0, label.1)
            .build(recorder())
            .unwrap_err()
    };
    let e = build("ftp://gw:9091", "j", ("instance", "x"));
    assert!(matches!(e, PushgatewayConfigError::InvalidUrl { .. }));
    // With the `pushgateway-tls` feature https builds; its files are read and checked here.
    assert!(
        Pushgateway::builder("https://gw:9091", "j")
            .build(recorder())
            .is_ok()
    );
    let missing = PathBuf::from("/nonexistent/finale-ca.pem");
    let e = Pushgateway::builder("https://gw:9091", "j")
        .tls_ca_file(&missing)
        .build(recorder())
        .unwrap_err();
    let PushgatewayConfigError::InvalidTls { what, path, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(
        (*what, path.as_deref()),
        ("CA certificate", Some(&*missing))
    );
    assert!(e.to_string().contains("/nonexistent/finale-ca.pem"), "{e}");
    let e = Pushgateway::builder("https://gw:9091", "j")
        .tls_ca_pem("not a certificate")
        .build(recorder())
        .unwrap_err();
    assert!(
        matches!(
            e,
            PushgatewayConfigError::InvalidTls {
                what: "CA certificate",
                ..
            }
        ),
        "{e}"
    );
    // TLS settings on a plain URL would send the credentials in clear text.
    let e = Pushgateway::builder("http://gw:9091", "j")
        .tls_ca_pem("x")
        .build(recorder())
        .unwrap_err();
    assert!(
        matches!(e, PushgatewayConfigError::TlsWithoutHttps { .. }),
        "{e}"
    );
    assert_eq!(
        build("http://gw:9091", "", ("instance", "x")),
        PushgatewayConfigError::EmptyJob
    );
    assert!(matches!(
        build("http://gw:9091", "j", ("job", "x")),
        PushgatewayConfigError::InvalidLabelName { .. }
    ));
    let e = Pushgateway::builder("http://gw:9091", "j")
        .request_timeout(Duration::ZERO)
        .build(recorder())
        .unwrap_err();
    assert_eq!(
        e,
        PushgatewayConfigError::ZeroDuration {
            setting: "request timeout"
        }
    );
}

// ---------------------------------------------------------------------------
// https: a real Pushgateway serving TLS, with basic auth and client certificates
// ---------------------------------------------------------------------------

/// Runs a shutdown whose only Telemetry stage is `pushgateway`; returns the report.
async fn push_once(pushgateway: Pushgateway) -> finale::ShutdownReport {
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    pushgateway.register(&finale).unwrap();
    finale.handle().trigger("test");
    finale.run().await
}

/// The [`PushError`] the report's `pushgateway` entry failed with.
fn push_error(report: &finale::ShutdownReport) -> &PushError {
    let Outcome::Failed(error) = &report.entry("pushgateway").unwrap().outcome else {
        panic!("{report}");
    };
    error
        .source()
        .and_then(|e| e.downcast_ref::<PushError>())
        .unwrap_or_else(|| panic!("not a PushError: {error}"))
}

#[tokio::test]
async fn https_with_the_right_ca_and_basic_auth_delivers() {
    let Some(tls) = tls_gateway(false) else {
        return;
    };
    let handle = recorder();
    metrics::counter!("tls_test_pushed_total").increment(7);
    let pushgateway = Pushgateway::builder(tls.gateway.url(), "tls")
        .label("instance", "a")
        .basic_auth(USER, PASSWORD)
        .tls_ca_pem(tls.pki.ca.clone())
        .build(handle)
        .unwrap();
    assert!(
        pushgateway.url().starts_with("https://127.0.0.1:"),
        "{}",
        pushgateway.url()
    );
    let report = push_once(pushgateway).await;
    assert_eq!(
        report.status,
        ShutdownStatus::Clean,
        "{report}\n{}",
        tls.gateway.diagnostics()
    );
    // The Pushgateway itself has the metrics, finale's own included.
    assert_eq!(
        tls.sample(
            false,
            "tls_test_pushed_total",
            &[("job", "tls"), ("instance", "a")]
        ),
        Some(7.0)
    );
    assert!(
        tls.sample(false, "finale_shutdowns_total", &[("job", "tls")])
            .is_some()
    );
}

#[tokio::test]
async fn https_with_the_wrong_ca_is_not_delivered_and_not_retried() {
    let Some(tls) = tls_gateway(false) else {
        return;
    };
    let other = pki("wrong");
    let dir = TempDir::new("wrong-ca");
    for pushgateway in [
        // Another CA than the one that signed the Pushgateway's certificate.
        Pushgateway::builder(tls.gateway.url(), "tls-wrong-ca")
            .basic_auth(USER, PASSWORD)
            .tls_ca_file(dir.write("other-ca.pem", &other.ca)),
        // No CA at all: Mozilla's roots do not know the test CA either.
        Pushgateway::builder(tls.gateway.url(), "tls-wrong-ca").basic_auth(USER, PASSWORD),
    ] {
        let report = push_once(pushgateway.build(recorder()).unwrap()).await;
        assert_eq!(
            report.status,
            ShutdownStatus::TelemetryNotDelivered,
            "{report}"
        );
        let push = push_error(&report);
        let PushError::Unreachable {
            attempts, source, ..
        } = push
        else {
            panic!("{push:?}");
        };
        assert!(source.is_tls(), "{push}");
        assert!(!push.is_transient());
        // A certificate the client refuses is not retried: the next attempt would fail alike.
        assert_eq!(*attempts, 1, "{push}");
        let shown = push.to_string();
        assert!(
            shown.contains("invalid peer certificate: UnknownIssuer"),
            "{shown}"
        );
    }
    assert_eq!(
        tls.sample(false, "finale_shutdowns_total", &[("job", "tls-wrong-ca")]),
        None
    );
}

#[tokio::test]
async fn https_with_the_wrong_password_is_reported_401() {
    let Some(tls) = tls_gateway(false) else {
        return;
    };
    let report = push_once(
        Pushgateway::builder(tls.gateway.url(), "tls-wrong-password")
            .basic_auth(USER, "not-the-password")
            .tls_ca_pem(tls.pki.ca.clone())
            .build(recorder())
            .unwrap(),
    )
    .await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let push = push_error(&report);
    let PushError::Rejected {
        status, attempts, ..
    } = push
    else {
        panic!("{push:?}");
    };
    assert_eq!(status.as_u16(), 401, "{push}");
    assert_eq!(*attempts, 1, "a 4xx is final: {push}");
    assert!(push.to_string().contains("401 Unauthorized"), "{push}");
}

#[tokio::test]
async fn https_with_a_client_certificate() {
    let Some(tls) = tls_gateway(true) else {
        return;
    };
    let dir = TempDir::new("client-cert");
    // Without a client certificate the Pushgateway refuses the connection.
    let report = push_once(
        Pushgateway::builder(tls.gateway.url(), "mtls")
            .basic_auth(USER, PASSWORD)
            .tls_ca_pem(tls.pki.ca.clone())
            .build(recorder())
            .unwrap(),
    )
    .await;
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    let push = push_error(&report);
    let PushError::Unreachable { source, .. } = push else {
        panic!("{push:?}");
    };
    assert!(source.is_tls(), "{push}");
    assert!(!push.is_transient());
    assert!(push.to_string().contains("BadCertificate"), "{push}");
    // With it (from files), the push is delivered.
    let report = push_once(
        Pushgateway::builder(tls.gateway.url(), "mtls")
            .basic_auth(USER, PASSWORD)
            .tls_ca_pem(tls.pki.ca.clone())
            .tls_client_cert_files(
                dir.write("client.pem", &tls.pki.client.0),
                dir.write("client-key.pem", &tls.pki.client.1),
            )
            .build(recorder())
            .unwrap(),
    )
    .await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(
        tls.sample(true, "finale_shutdowns_total", &[("job", "mtls")])
            .is_some()
    );
    // A key that is not the certificate's is refused at build time.
    let e = Pushgateway::builder(tls.gateway.url(), "mtls")
        .tls_client_cert_pem(tls.pki.client.0.clone(), tls.pki.server.1.clone())
        .build(recorder())
        .unwrap_err();
    assert!(
        matches!(
            e,
            PushgatewayConfigError::InvalidTls {
                what: "client certificate",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn plain_http_with_basic_auth_still_works() {
    let dir = TempDir::new("pushgateway-auth");
    let web_config = dir.write(
        "web.yml",
        &format!("basic_auth_users:\n  {USER}: {PASSWORD_BCRYPT}\n"),
    );
    let Some(gateway) = Gateway::start_with_web_config(&web_config, false) else {
        return;
    };
    assert!(gateway.url().starts_with("http://"));
    let report = push_once(
        Pushgateway::builder(gateway.url(), "plain-auth")
            .basic_auth(USER, PASSWORD)
            .build(recorder())
            .unwrap(),
    )
    .await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// Periodic pushes whose render panicked sent nothing: under `DeliveryPolicy::WholeRun` they
/// make the run not delivered, even though the final push went through.
#[tokio::test]
async fn unrendered_periodic_pushes_count_as_failed_under_the_whole_run_policy() {
    let (port, _seen) = recording(Some("200 OK"));
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let _ = recorder();
    let finale = Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(Duration::from_secs(10))
        .telemetry_reserve(Duration::from_secs(5))
        .delivery_policy(finale::DeliveryPolicy::WholeRun)
        .build()
        .unwrap();
    let render = {
        let (failing, calls) = (failing.clone(), calls.clone());
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            assert!(!failing.load(Ordering::SeqCst), "registry poisoned");
            "# TYPE unrendered_test gauge\nunrendered_test 1\n".to_owned()
        }
    };
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "unrendered")
        .check(false)
        .push_interval(Duration::from_millis(10))
        .build_with(render)
        .unwrap()
        .register(&finale)
        .unwrap();
    // A push is counted before the next one renders: three renders, two counted at least.
    let rendered = {
        let calls = calls.clone();
        tokio::task::spawn_blocking(move || wait_until(BOUND, || calls.load(Ordering::SeqCst) >= 3))
            .await
            .unwrap()
    };
    assert!(rendered, "no periodic pushes");
    failing.store(false, Ordering::SeqCst);
    finale.handle().trigger("test");
    let report = finale.run().await;
    let delivery = report.delivery("pushgateway").expect("counted");
    assert!(delivery.run.failed >= 2, "{report}");
    assert!(delivery.at_exit.exported > 0, "{report}");
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
}

/// A render that does not return: the pushes after it do not start another render thread
/// each, they fail at once (and count as failed), the final push included.
#[tokio::test(flavor = "current_thread")]
async fn a_render_that_never_returns_is_not_started_again() {
    let (port, _seen) = recording(Some("200 OK"));
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let entered = Arc::new(AtomicUsize::new(0));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let render = {
        let entered = entered.clone();
        move || {
            entered.fetch_add(1, Ordering::SeqCst);
            let _ = released.lock().unwrap().recv_timeout(BOUND);
            String::new()
        }
    };
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "stuck-render")
        .check(false)
        .push_interval(Duration::from_millis(20))
        .request_timeout(Duration::from_millis(30))
        .build_with(render)
        .unwrap()
        .register(&finale)
        .unwrap();
    assert!(
        logs.wait_for("periodic push failed", 5).await,
        "{:?}",
        logs.lines_with("WARN")
    );
    assert_eq!(entered.load(Ordering::SeqCst), 1, "render threads started");
    assert_eq!(
        logs.lines_with("the previous render has not returned")
            .len(),
        logs.lines_with("periodic push failed").len() - 1,
        "{:?}",
        logs.lines_with("WARN")
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    release.send(()).unwrap();
    assert_eq!(entered.load(Ordering::SeqCst), 1, "render threads started");
    let error = push_error(&report);
    assert!(matches!(error, PushError::NotRendered { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("the previous render has not returned"),
        "{error}"
    );
    let delivery = report.delivery("pushgateway").expect("counted");
    assert!(delivery.run.failed >= 5, "{report}");
    assert!(delivery.at_exit.failed >= 1, "{report}");
}

/// A server that answers every request whose method is (`GET`) or is not (anything else)
/// `get` with `status` and a body of `size` bytes, written 1 MiB at a time, and every other
/// request with `200 OK`. Sends, for each large answer, whether all of it was written (`false`:
/// the client closed the connection first).
fn large_answers(
    status: &'static str,
    get: bool,
    size: usize,
) -> (u16, std::sync::mpsc::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(BOUND));
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then_some(v)
                        })
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let total = head_end + 4 + length;
                    while raw.len() < total {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    }
                    raw.drain(..total);
                    if head.starts_with("GET ") != get {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(ok).is_err() {
                            return;
                        }
                        continue;
                    }
                    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {size}\r\n\r\n");
                    let mut whole = stream.write_all(head.as_bytes()).is_ok();
                    let chunk = vec![b'x'; 1 << 20];
                    let mut sent = 0;
                    while whole && sent < size {
                        let n = chunk.len().min(size - sent);
                        whole = stream.write_all(&chunk[..n]).is_ok();
                        sent += n;
                    }
                    let _ = tx.send(whole);
                    if !whole {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// A refusal with a huge body: the push fails with the body's first bytes, and the client
/// stops reading (closes the connection) instead of taking the whole body into memory.
#[tokio::test]
async fn a_huge_error_body_is_not_read_whole() {
    let (port, written) = large_answers("400 Bad Request", false, 64 << 20);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    let pushgateway = Pushgateway::builder(format!("http://127.0.0.1:{port}"), "huge-error")
        .check(false)
        .build_with(|| "# TYPE huge_error_test gauge\nhuge_error_test 1\n".to_owned())
        .unwrap();
    pushgateway.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let PushError::Rejected { status, body, .. } = push_error(&report) else {
        panic!("{report}");
    };
    assert_eq!(status.as_u16(), 400);
    assert!(
        body.starts_with("xxxx") && body.len() <= 2048 + 4,
        "{}",
        body.len()
    );
    let whole = tokio::task::spawn_blocking(move || written.recv_timeout(BOUND))
        .await
        .unwrap()
        .expect("the server answered");
    assert!(!whole, "the client read the whole 64 MiB body");
}

/// A consistency check whose answer is larger than the bound gives up (logged at debug level)
/// and stops reading it.
#[tokio::test(flavor = "current_thread")]
async fn a_huge_consistency_answer_is_not_read_whole() {
    let (port, written) = large_answers("200 OK", true, 64 << 20);
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(format!("http://127.0.0.1:{port}"), "huge-check")
        .request_timeout(Duration::from_secs(5))
        .build_with(|| "# TYPE huge_check_test gauge\nhuge_check_test 1\n".to_owned())
        .unwrap()
        .register(&finale)
        .unwrap();
    assert!(
        logs.wait_for("no consistency check", 1).await,
        "the check did not end"
    );
    assert_eq!(
        logs.lines_with("the answer is larger than").len(),
        1,
        "{:?}",
        logs.lines_with("consistency")
    );
    let whole = tokio::task::spawn_blocking(move || written.recv_timeout(BOUND))
        .await
        .unwrap()
        .expect("the server answered");
    assert!(!whole, "the check read the whole 64 MiB answer");
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A histogram owns the names `_bucket`, `_count` and `_sum` derive from it: a plain metric
/// of such a name in this push, where another group holds the histogram, is refused, and so
/// is a histogram whose derived name another group holds as a metric. The check warns of both.
#[tokio::test(flavor = "current_thread")]
async fn a_name_a_histogram_of_another_group_derives_is_warned_of() {
    let Some(gateway) = Gateway::start() else {
        return;
    };
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let held = "# TYPE derived_h histogram\nderived_h_bucket{le=\"+Inf\"} 1\nderived_h_sum 1\n\
                derived_h_count 1\n# TYPE derived_g_sum gauge\nderived_g_sum 1\n";
    assert_eq!(gateway.put("derived-other", held).unwrap(), 200);
    let ours = "# TYPE derived_h_count gauge\nderived_h_count 7\n# TYPE derived_g histogram\n\
                derived_g_bucket{le=\"+Inf\"} 1\nderived_g_sum 2\nderived_g_count 1\n";
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    Pushgateway::builder(gateway.url(), "derived-mine")
        .build_with(|| ours.to_owned())
        .unwrap()
        .register(&finale)
        .unwrap();
    const PLAIN: &str = "the Pushgateway holds the histogram derived_h for the group {job=\"derived-other\"}, and this push has a gauge derived_h_count";
    const DERIVED: &str = "the Pushgateway holds the gauge derived_g_sum for the group {job=\"derived-other\"}, and this push has a histogram derived_g";
    assert!(
        logs.wait_for(PLAIN, 1).await,
        "{:?}",
        logs.lines_with("WARN")
    );
    assert!(
        logs.wait_for(DERIVED, 1).await,
        "{:?}",
        logs.lines_with("WARN")
    );
    finale.handle().trigger("test");
    let report = finale.run().await;
    let error = push_error(&report);
    assert!(error.is_inconsistent(), "{error}");
    assert!(error.to_string().contains("collide"), "{error}");
}
