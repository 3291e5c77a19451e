//! The testing kit as a user would use it on an axum service: a real HTTP load over loopback
//! through a virtual SIGTERM, on both runtime flavours; nothing dropped, the report clean.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use finale::testing::{self, Load};
use finale::{Finale, Phase};

/// The user's service: one slow route and the health endpoints.
fn service(finale: &Finale, listener: std::net::TcpListener) -> Result<(), finale::ConfigError> {
    let app = Router::new()
        .route(
            "/work",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                "done"
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
    service(&finale, listener).unwrap();

    let run = testing::Run::start(finale);
    run.started().await;
    let load = Load::new(1_000_000)
        .concurrency(16)
        .timeout(Duration::from_secs(5))
        .spawn_get(&format!("{base}/work"));
    assert!(load.until_served(300).await, "{}", load.progress());
    // On a current_thread runtime the 16 clients run in lockstep (their 20 ms sleeps end on the
    // same tick), so the moment the 300th answer arrives can fall between two rounds with nothing
    // in flight. The signal comes while requests are in flight, as it does under real load
    // (checked and sent in the same poll, so no request can end in between).
    let in_flight = run.handle().in_flight();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_flight.count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request in flight within 5 s"
        );
        tokio::task::yield_now().await;
    }
    run.sigterm();
    let report = run.report().await;
    let load = load.stop().await;

    testing::assert_clean(&report);
    testing::assert_nothing_dropped(&load);
    assert!(load.served >= 300, "{load}");
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
