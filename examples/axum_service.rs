//! An HTTP API under finale: an axum router with `/livez` and `/readyz`, a background worker,
//! and the report at exit.
//!
//! ```sh
//! cargo run --example axum_service --features axum
//! curl http://127.0.0.1:3000/hello        # then Ctrl-C, or kill -TERM <pid>
//! ```
//!
//! - `GET /hello` answers after a little work; `GET /slow/N` after N ms (try it, then press
//!   Ctrl-C: the request completes before the process exits).
//! - `GET /readyz` is `200` while serving and `503` from the moment the shutdown starts;
//!   `GET /livez` stays `200` until exit.
//! - `AXUM_SERVICE_ADDR`: where to listen, `host:port` (default `127.0.0.1:3000`; `localhost:0`
//!   picks a free port, logged once bound). A port in use exits with code 3.
//! - `FINALE_*`: any budget setting, for example `FINALE_DRAIN_DELAY=5s` to keep serving for
//!   five seconds after SIGTERM while `/readyz` says 503 (the default is 0 outside Kubernetes/ECS).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use finale::{Finale, Task};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let finale = Finale::builder().build().unwrap_or_else(|e| {
        eprintln!("configuration error: {e}");
        std::process::exit(2)
    });
    // Resolved and bound by finale inside graceful start.
    let addr = std::env::var("AXUM_SERVICE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());

    // A background worker, stopped after the server has drained.
    finale
        .spawn(Task::worker("cache-refresher", |ctx| async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    () = ctx.stopped() => break,
                    _ = tick.tick() => tracing::debug!("cache refreshed"),
                }
            }
        }))
        .expect("unique name");

    let app = Router::new()
        .route(
            "/hello",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                "hello\n"
            }),
        )
        .route(
            "/slow/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("done after {ms} ms\n")
            }),
        )
        .merge(finale::axum::health_router(&finale.handle()));
    let listening = finale::axum::serve(&finale, "http", addr, app).expect("unique name");
    // Once bound, not before: the kernel's port when the address said 0. A bind that failed
    // ends `run()` below with exit code 3 and the error in the report.
    if let Ok(addr) = listening.local_addr().await {
        tracing::info!("listening on {addr}");
    }

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
