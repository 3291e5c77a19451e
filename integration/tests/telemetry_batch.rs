//! The `batch_job` example against a real Pushgateway: its final metrics are pushed when it
//! succeeds and when it fails; without a Pushgateway it still runs and exits.

#![cfg(unix)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::components::{Pushgateway, free_port};

fn batch_job() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| common::examples::example("batch_job"))
        .clone()
}

/// Runs the job to its end (it ends by itself) and returns its output and duration.
fn run(env: &[(&str, &str)]) -> (Output, String, Duration) {
    let mut cmd = Command::new(batch_job());
    cmd.env("BATCH_ITEMS", "20")
        .env("BATCH_ITEM_MS", "1")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("PUSHGATEWAY_URL")
        .env_remove("BATCH_FAIL_AT")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("ECS_CONTAINER_METADATA_URI_V4")
        .env_remove("ECS_CONTAINER_METADATA_URI")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    // The job ends by itself within its budget; `output` waits for that.
    let out = cmd.output().unwrap();
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr, elapsed)
}

#[test]
fn pushes_its_metrics_when_done() {
    let Some(gateway) = Pushgateway::start() else {
        return;
    };
    let (out, stderr, _) = run(&[
        ("PUSHGATEWAY_URL", &gateway.url()),
        ("PUSHGATEWAY_JOB", "ok"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let job = [("job", "ok")];
    assert_eq!(
        gateway.sample("batch_items_processed_total", &job),
        Some(20.0),
        "{}",
        gateway.metrics_text()
    );
    assert!(
        gateway
            .sample("batch_last_success_timestamp_seconds", &job)
            .is_some()
    );
    assert_eq!(
        gateway.sample(
            "finale_shutdowns_total",
            &[("job", "ok"), ("reason", "requested")]
        ),
        Some(1.0)
    );
}

#[test]
fn pushes_its_metrics_when_it_fails() {
    let Some(gateway) = Pushgateway::start() else {
        return;
    };
    let (out, stderr, _) = run(&[
        ("PUSHGATEWAY_URL", &gateway.url()),
        ("PUSHGATEWAY_JOB", "failing"),
        ("BATCH_FAIL_AT", "5"),
    ]);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("item 5 could not be processed"), "{stderr}");
    let job = [("job", "failing")];
    assert_eq!(
        gateway.sample("batch_items_processed_total", &job),
        Some(4.0)
    );
    assert_eq!(
        gateway.sample("batch_last_success_timestamp_seconds", &job),
        None
    );
    assert_eq!(
        gateway.sample(
            "finale_shutdowns_total",
            &[("job", "failing"), ("reason", "task_failed")]
        ),
        Some(1.0)
    );
}

#[test]
fn a_failed_run_keeps_the_last_success_of_the_run_before() {
    // The alert "no success for a day" reads the last success timestamp: a failed run must not
    // erase the one an earlier run pushed (a PUT would replace the whole group).
    let Some(gateway) = Pushgateway::start() else {
        return;
    };
    let job = [("job", "nightly")];
    let (out, stderr, _) = run(&[
        ("PUSHGATEWAY_URL", &gateway.url()),
        ("PUSHGATEWAY_JOB", "nightly"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let success = gateway
        .sample("batch_last_success_timestamp_seconds", &job)
        .expect("the first run succeeded");
    let (out, stderr, _) = run(&[
        ("PUSHGATEWAY_URL", &gateway.url()),
        ("PUSHGATEWAY_JOB", "nightly"),
        ("BATCH_FAIL_AT", "5"),
    ]);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(
        gateway.sample("batch_last_success_timestamp_seconds", &job),
        Some(success),
        "{}",
        gateway.metrics_text()
    );
    // The failed run's own metrics replaced the earlier run's.
    assert_eq!(
        gateway.sample("batch_items_processed_total", &job),
        Some(4.0)
    );
    assert_eq!(
        gateway.sample(
            "finale_shutdowns_total",
            &[("job", "nightly"), ("reason", "task_failed")]
        ),
        Some(1.0)
    );
}

#[test]
fn runs_without_a_pushgateway() {
    let (out, stderr, elapsed) = run(&[]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("PUSHGATEWAY_URL is not set"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn an_unreachable_pushgateway_is_reported_not_hung_on() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let (out, stderr, elapsed) = run(&[("PUSHGATEWAY_URL", &url)]);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("Pushgateway unreachable"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}
