//! A gRPC server under finale: tonic-health reports `SERVING` once started and `NOT_SERVING`
//! from the moment the shutdown starts; streams still open at the drain deadline are cut and
//! named in the report.
//!
//! ```sh
//! cargo run --example tonic_service --features tonic
//! # then Ctrl-C, or kill -TERM <pid>
//! ```
//!
//! - `TONIC_SERVICE_ADDR`: where to listen (default `127.0.0.1:50051`).
//! - `FINALE_*`: any budget setting, for example `FINALE_DRAIN_DELAY=5s`.

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::Duration;

use finale::{Finale, Task};
use tonic::service::Routes;
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
    let addr: SocketAddr = std::env::var("TONIC_SERVICE_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".to_owned())
        .parse()
        .unwrap_or_else(|e| {
            eprintln!("TONIC_SERVICE_ADDR must be host:port: {e}");
            std::process::exit(2)
        });

    // The health service is the service here; add yours with `.add_service(..)`.
    let (reporter, health) = tonic_health::server::health_reporter();
    finale::tonic::report_health(&finale, reporter, ["grpc.health.v1.Health"])
        .expect("unique names");
    finale::tonic::serve(&finale, "grpc", addr, Routes::new(health)).expect("unique name");

    // A background worker, stopped after the server has drained.
    finale
        .spawn(Task::worker("metrics-flusher", |ctx| async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = ctx.stopped() => break,
                    _ = tick.tick() => tracing::debug!("tick"),
                }
            }
        }))
        .expect("unique name");

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
