//! An HTTP service under systemd: `Type=notify` readiness, `STATUS=` through the shutdown,
//! `EXTEND_TIMEOUT_USEC=` sized to the budget, watchdog pings, and the listening socket passed
//! by a socket unit (see `deploy/finale.service` and `deploy/finale.socket`).
//!
//! ```sh
//! cargo build --example systemd_service --features systemd,axum
//! # socket activation without systemd: listens on :3000, starts the service on the first
//! # connection and hands it the socket as "http"
//! systemd-socket-activate -l 127.0.0.1:3000 --fdname=http -E RUST_LOG=info \
//!     target/debug/examples/systemd_service
//! curl http://127.0.0.1:3000/hello        # then kill -TERM <pid>
//! ```
//!
//! - The listener is the socket systemd passed under the name `http`; without one (started by
//!   hand) it binds `SYSTEMD_SERVICE_ADDR` (default `127.0.0.1:3000`).
//! - `GET /hello` answers at once; `GET /slow/N` after N ms (it logs `slow request started`).
//! - `GET /block/N` blocks the runtime's only thread for N ms, as a wedged handler would: the
//!   watchdog pings (`WatchdogSec=` in the unit) stop meanwhile, and systemd would restart a
//!   service that stays stuck.
//! - `FINALE_*`: any budget setting. `FINALE_GRACE_PERIOD` should be the unit's
//!   `TimeoutStopSec=` (systemd does not tell the service).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use finale::axum::Listen;
use finale::systemd::ListenError;
use finale::{Finale, Task};
use tracing_subscriber::EnvFilter;

// One thread: a handler that blocks it stops everything, the watchdog pings included.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // First, before the service does anything else: this takes LISTEN_FDS from the environment.
    let listen: Listen = match finale::systemd::listener_named("http") {
        Ok(listener) => {
            tracing::info!(addr = ?listener.local_addr().ok(), "serving on the socket systemd passed (http)");
            listener.into()
        }
        Err(ListenError::NotActivated) => {
            let addr: SocketAddr = std::env::var("SYSTEMD_SERVICE_ADDR")
                .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
                .parse()
                .unwrap_or_else(|e| {
                    eprintln!("SYSTEMD_SERVICE_ADDR must be host:port: {e}");
                    std::process::exit(2)
                });
            tracing::info!(%addr, "not socket-activated: binding");
            addr.into()
        }
        Err(e) => {
            eprintln!("socket activation: {e}");
            std::process::exit(2)
        }
    };

    let finale = Finale::builder()
        .systemd_notify(true)
        .build()
        .unwrap_or_else(|e| {
            eprintln!("configuration error: {e}");
            std::process::exit(2)
        });

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
        .route("/hello", get(|| async { "hello\n" }))
        .route(
            "/slow/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tracing::info!(ms, "slow request started");
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("done after {ms} ms\n")
            }),
        )
        .route(
            "/block/{ms}",
            get(|Path(ms): Path<u64>| async move {
                // Deliberately wrong: blocks the runtime's thread, as a stuck handler would.
                std::thread::sleep(Duration::from_millis(ms));
                format!("blocked the runtime for {ms} ms\n")
            }),
        )
        .merge(finale::axum::health_router(&finale.handle()));
    finale::axum::serve(&finale, "http", listen, app).expect("unique name");

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
