//! The Pushgateway integration in process, against a real Pushgateway and small recording
//! servers: the grouping key, the methods, authentication, periodic pushes that stop before the
//! final one, bounded retries, and typed errors that chain to the client's.

mod common;

use std::error::Error as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::components::{Pushgateway as Gateway, free_port, wait_until};
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
}

/// An HTTP server that records every request and answers `status`, or never answers if `None`.
fn recording(status: Option<&'static str>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(256) {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            let Some(status) = status else {
                held.push(stream); // a black hole: accept, never answer
                continue;
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
                    log.lock().unwrap().push(Seen { head, body });
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
        assert_eq!(seen.len(), 1);
        let head = seen[0].head.to_ascii_lowercase();
        assert!(head.starts_with("put /metrics/job/auth http/1.1"), "{head}");
        assert!(head.contains(&expected.to_ascii_lowercase()), "{head}");
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
        let pushed = wait_until(BOUND, || running.lock().unwrap().len() >= 3);
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
    let seen = seen.lock().unwrap();
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

#[test]
fn settings_are_checked_at_build_time() {
    let build = |url: &str, job: &str, label: (&str, &str)| {
        Pushgateway::builder(url, job)
            .label(label.0, label.1)
            .build(recorder())
            .unwrap_err()
    };
    let e = build("https://gw:9091", "j", ("instance", "x"));
    assert!(matches!(e, PushgatewayConfigError::InvalidUrl { .. }));
    assert!(e.to_string().contains("https is not supported"), "{e}");
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
