//! The testing kit as a user would use it on an axum service: a real HTTP load over loopback
//! through a virtual SIGTERM, on both runtime flavours; nothing dropped, the report clean.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use finale::testing::{self, Load};
use finale::{Finale, Phase};
use tokio::sync::Notify;

/// How long `/work` takes: the time the signal has, once it is sent with requests in flight, to
/// reach the drain's start before they end (the supervisor's thread may wait for a core on a
/// busy machine).
const WORK: Duration = Duration::from_millis(100);

/// The user's service: one slow route and the health endpoints. `started` is told of each
/// `/work` request as it starts.
fn service(
    finale: &Finale,
    listener: std::net::TcpListener,
    started: Arc<Notify>,
) -> Result<(), finale::ConfigError> {
    let app = Router::new()
        .route(
            "/work",
            get(move || {
                started.notify_waiters();
                async {
                    tokio::time::sleep(WORK).await;
                    "done"
                }
            }),
        )
        .merge(finale::axum::health_router(&finale.handle()));
    finale::axum::serve(finale, "http", listener, app)?;
    Ok(())
}

async fn sigterm_under_load(drain_delay: Duration) {
    let finale = testing::builder().drain_delay(drain_delay).build().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let started = Arc::new(Notify::new());
    service(&finale, listener, started.clone()).unwrap();

    let run = testing::Run::start(finale);
    run.started().await;
    let load = Load::new(1_000_000)
        .concurrency(16)
        .timeout(Duration::from_secs(5))
        .spawn_get(&format!("{base}/work"));
    assert!(load.until_served(100).await, "{}", load.progress());
    // The signal comes as a request starts, with all of its `WORK` ahead of it (on a
    // current_thread runtime the 16 clients run in lockstep, their sleeps ending on the same
    // tick: the moment the 100th answer arrives can be the end of a round, with nothing left in
    // flight), as it does under real load.
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("a request starts within 5 s");
    run.sigterm();
    let report = run.report().await;
    let load = load.stop().await;

    testing::assert_clean(&report);
    testing::assert_nothing_dropped(&load);
    assert!(load.served >= 100, "{load}");
    // Calls kept coming after the listener closed: refused, not dropped.
    assert!(load.refused > 0, "{load}");
    assert!(report.in_flight_at_drain_start > 0, "{report}");
    let took = |phase| report.phase(phase).unwrap().duration;
    assert!(took(Phase::Announce) >= drain_delay, "{report}");
    assert!(took(Phase::Drain) < Duration::from_secs(2), "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_axum_service_under_load_drops_nothing_on_current_thread() {
    sigterm_under_load(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_service_under_load_drops_nothing_through_a_drain_delay() {
    sigterm_under_load(Duration::from_millis(300)).await;
}
