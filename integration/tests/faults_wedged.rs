//! A wedged runtime still delivers its telemetry: the full service on a `current_thread`
//! runtime whose only thread a Workers hook blocks for 8 s, with a 3 s budget. The sequence
//! cannot reach its Telemetry slot; the supervisor takes over, pushes to the real Pushgateway on
//! a runtime of its own, flushes the OTLP providers to the real collector (HTTP exporter) and
//! releases the log file, then exits with the deadline-overrun code — well before the hook
//! would have let go. Over OTLP/HTTP and over gRPC (exporters built on finale's exporter
//! runtime). Its takeover counter reaches both the Pushgateway and the collector.

#![cfg(unix)]
#![allow(clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::components::{Collector, Pushgateway, full_service, wait_until};

#[test]
fn a_wedged_runtime_still_pushes_flushes_and_writes_its_log() {
    wedged("http/protobuf");
}

/// The same with the gRPC (tonic) exporters, built on finale's exporter runtime as the
/// full_service example does: their tasks do not live on the wedged runtime.
#[test]
fn a_wedged_runtime_still_delivers_over_grpc() {
    wedged("grpc");
}

fn wedged(protocol: &str) {
    let (Some(gateway), Some(collector)) = (Pushgateway::start(), Collector::start_with_metrics())
    else {
        return;
    };
    let endpoint = match protocol {
        "grpc" => collector.grpc_endpoint(),
        _ => collector.http_endpoint(),
    };
    let dir = std::env::temp_dir().join(format!("finale-wedged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("service.log");
    let mut child = full_service(&gateway, "wedged", &endpoint, &log)
        .env("FULL_SERVICE_RUNTIME", "current_thread")
        .env("FULL_SERVICE_BLOCK_WORKERS_MS", "8000")
        .env("FINALE_TOTAL_BUDGET", "3s")
        .env("FINALE_TELEMETRY_RESERVE", "2s")
        .env("FINALE_SAFETY_MARGIN", "1s")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("FINALE_TERMINATION_LOG", dir.join("termination.log"))
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("never ready:\n{}", seen.join("\n"))
            });
        let ready = line.contains("started: ready");
        seen.push(line);
        if ready {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let sent = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if sent.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("did not exit");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling a condition with a bound
    };
    let elapsed = sent.elapsed();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
        seen.push(line);
    }
    let out = seen.join("\n");
    let file = std::fs::read_to_string(&log).unwrap_or_default();
    let message = std::fs::read_to_string(dir.join("termination.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        code,
        Some(finale::ShutdownStatus::DeadlineOverrun.default_code()),
        "{out}"
    );
    // By total + safety margin / 2 (3.5 s), with room for a loaded machine; the hook blocks 8 s.
    assert!(elapsed < Duration::from_millis(5500), "{elapsed:?}\n{out}");
    assert!(out.contains("the shutdown overran its budget"), "{out}");
    // Pushed by the supervisor's own push: the counter exists only once it took over.
    assert_eq!(
        gateway.sample("finale_supervisor_takeovers_total", &[("job", "wedged")]),
        Some(1.0),
        "{}\n{out}",
        gateway.metrics_text()
    );
    // The takeover's log line reached the collector (OTLP logs) and the file (released last).
    assert!(
        wait_until(Duration::from_secs(5), || collector.log_record_count() > 0),
        "no log record at the collector\n{out}"
    );
    assert!(file.contains("the shutdown overran its budget"), "{file}");
    // The termination message says which stages the supervisor delivered (in the order they
    // ended, which within one order is a race).
    let mut delivered: Vec<&str> = message
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("delivered="))
        .unwrap_or_default()
        .split(',')
        .collect();
    delivered.sort_unstable();
    assert_eq!(
        delivered,
        [
            "log-writer",
            "otlp-logs",
            "otlp-metrics",
            "otlp-traces",
            "pushgateway"
        ],
        "{message}"
    );
    assert!(!message.contains("not_delivered="), "{message}");
    // Each stage's outcome is logged before the log writer is released: in the file too.
    for stage in ["pushgateway", "otlp-metrics", "otlp-traces", "otlp-logs"] {
        assert!(
            file.lines()
                .any(|l| l.contains("delivered by the supervisor") && l.contains(stage)),
            "{stage}:\n{file}"
        );
    }
    // The same counter through the OTLP meter provider, flushed by the supervisor too.
    let takeovers = |collector: &Collector| {
        collector
            .metrics()
            .iter()
            .rev()
            .find(|m| m.name == "finale_supervisor_takeovers_total")
            .and_then(|m| m.points.first().map(|p| p.value))
    };
    assert!(
        wait_until(Duration::from_secs(5), || takeovers(&collector).is_some()),
        "no takeover counter at the collector\n{out}"
    );
    assert_eq!(takeovers(&collector), Some(1.0), "{out}");
    eprintln!(
        "wedged runtime ({protocol}): exit code 5 after {elapsed:?}, telemetry delivered by the \
         supervisor"
    );
}
