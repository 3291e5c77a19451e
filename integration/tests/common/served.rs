//! What the server tests share: the end of a run, the in-flight count, the WebSocket client.

// Each test binary uses only part of this module.
#![allow(dead_code)]
// A skipped test says so on stderr.
#![allow(clippy::print_stderr)]

use std::process::Command;
use std::time::Duration;

use finale::{Handle, ShutdownReport};
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(15);

/// A server test's configuration: no signals, no environment, the Drain phase's timeout `drain`
/// and room for the rest around it.
pub(crate) fn builder(drain: Duration) -> finale::Builder {
    finale::Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .drain_timeout(drain)
        .total_budget(drain + Duration::from_secs(3))
        .telemetry_reserve(Duration::from_secs(1))
}

/// The run of `finale`, started: its graceful start complete (within a bound).
pub(crate) async fn started(finale: finale::Finale) -> (Handle, JoinHandle<ShutdownReport>) {
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    (handle, run)
}

/// `app` served by `finale` (`finale::axum::serve`) on a fresh loopback port, the run started.
pub(crate) async fn serve_axum(
    finale: finale::Finale,
    app: axum::Router,
) -> (std::net::SocketAddr, Handle, JoinHandle<ShutdownReport>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::serve(&finale, "http", listener, app).unwrap();
    let (handle, run) = started(finale).await;
    (addr, handle, run)
}

/// The run's report, within a bound.
pub(crate) async fn finish(run: JoinHandle<ShutdownReport>) -> ShutdownReport {
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the run ends")
        .expect("the run task")
}

/// The count of requests in flight, polled until it is `want` (bounded).
pub(crate) async fn wait_in_flight(handle: &Handle, want: usize) -> usize {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let count = handle.in_flight().count();
        if count == want || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the Python `websockets` library (pinned in `scripts/install-components.sh`) is
/// there. Under `CI=true` its absence fails the test; elsewhere the test says so and skips.
pub(crate) fn websockets_installed() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !super::components::in_ci(),
            "the Python `websockets` library is missing; under CI=true a missing component is a \
             failure (scripts/install-components.sh installs it)"
        );
        eprintln!("SKIPPING: the Python `websockets` library is not installed");
    }
    ok
}
