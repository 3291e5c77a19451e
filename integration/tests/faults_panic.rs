//! A panic in a worker of the full service, with finale's panic hook on: the panic starts the
//! shutdown, the process exits with the component-failure code, and the telemetry is still
//! delivered (the Pushgateway has the shutdown's metrics, the collector its span).

#![cfg(unix)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::components::{Collector, Pushgateway, full_service, wait_until};

#[test]
fn a_panic_still_delivers_the_telemetry() {
    let (Some(gateway), Some(collector)) = (Pushgateway::start(), Collector::start()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("finale-panic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = full_service(
        &gateway,
        "panicking",
        &collector.grpc_endpoint(),
        &dir.join("service.log"),
    )
    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    .env("FULL_SERVICE_PANIC_AFTER_MS", "300")
    .spawn()
    .unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "did not exit");
        std::thread::sleep(Duration::from_millis(10)); // polling a condition with a bound
    };
    let mut out = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        code,
        Some(finale::ShutdownStatus::ComponentFailure.default_code()),
        "{out}"
    );
    assert!(out.contains("shutdown after panic at"), "{out}");
    assert!(out.contains("the fragile worker gave up"), "{out}");
    assert_eq!(
        gateway.sample(
            "finale_shutdowns_total",
            &[("job", "panicking"), ("reason", "panic")]
        ),
        Some(1.0),
        "{}",
        gateway.metrics_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || collector
            .span_names()
            .iter()
            .any(|n| n == "finale.shutdown")),
        "no finale.shutdown span at the collector: {:?}",
        collector.span_names()
    );
}
