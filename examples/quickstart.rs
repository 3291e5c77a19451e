//! The smallest finale service: a background worker and a cleanup hook.
//!
//! ```sh
//! cargo run --example quickstart
//! # then press Ctrl-C (or `kill -TERM <pid>`): the sequence runs and the report is printed
//! ```
//!
//! Environment variables:
//! - `QUICKSTART_FAIL_START=1`: a service fails to start (exit code 3).
//! - `QUICKSTART_PANIC_AFTER_MS=N`: a worker panics after N ms; with the panic hook on, the
//!   panic triggers the shutdown (exit code 4).
//! - `QUICKSTART_SLOW_DRAIN=1`: a drain hook and a flush hook that never finish, so a second
//!   signal has something to cut short (exit code 7), and a third exits at once (exit code 8).
//! - `QUICKSTART_SLOW_START=1`: a service that is not ready until stopped, so a signal arrives
//!   during graceful start.
//! - `QUICKSTART_RUNTIME=current_thread|multi_thread_1|multi_thread`: the tokio runtime.
//! - `FINALE_*`: any budget setting (see the README's defaults table).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::time::Duration;

use finale::{Finale, Hook, Phase, Task};
use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            // finale's own log (target `finale`) is quiet by default: the report is printed once,
            // below. `RUST_LOG=info` shows finale's lines too, among them the report it records
            // before the Telemetry phase so that the final flush carries it.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,finale=warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut runtime = match std::env::var("QUICKSTART_RUNTIME").as_deref() {
        Ok("current_thread") => tokio::runtime::Builder::new_current_thread(),
        Ok("multi_thread_1") => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build().expect("a tokio runtime");
    runtime.block_on(run());
}

async fn run() -> ! {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let finale = match Finale::builder().panic_hook(true).build() {
        Ok(finale) => finale,
        Err(error) => {
            eprintln!("configuration error: {error}");
            std::process::exit(2);
        }
    };

    // A background worker: told to stop in the Workers phase, after the servers drained.
    finale
        .spawn(Task::worker("ticker", |ctx| async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut ticks = 0u64;
            loop {
                tokio::select! {
                    () = ctx.stopped() => break,
                    _ = tick.tick() => ticks += 1,
                }
            }
            tracing::info!(ticks, "ticker stopped");
        }))
        .expect("unique name");

    // A cleanup hook, bounded by its own timeout: it runs once the worker has ended.
    finale
        .hook(
            Hook::new(Phase::Workers, "close-db", |_| async {
                tracing::info!("connection pool closed");
            })
            .timeout(Duration::from_secs(2)),
        )
        .expect("unique name");

    if env("QUICKSTART_FAIL_START").is_some() {
        finale
            .spawn(Task::service("listener", |_| async {
                Err::<(), _>(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "address already in use",
                ))
            }))
            .expect("unique name");
    }
    if env("QUICKSTART_SLOW_START").is_some() {
        finale
            .spawn(Task::service("warming-cache", |ctx| async move {
                tracing::info!("warming the cache");
                ctx.stopped().await;
            }))
            .expect("unique name");
    }
    if let Some(ms) = env("QUICKSTART_PANIC_AFTER_MS").and_then(|v| v.parse().ok()) {
        finale
            .spawn(Task::worker("fragile", move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ms > 0 {
                    panic!("the fragile worker gave up");
                }
            }))
            .expect("unique name");
    }
    if env("QUICKSTART_SLOW_DRAIN").is_some() {
        finale
            .hook(Hook::new(Phase::Drain, "slow-drain", |_| {
                std::future::pending::<()>()
            }))
            .expect("unique name");
        finale
            .hook(Hook::new(Phase::Telemetry, "slow-flush", |_| {
                std::future::pending::<()>()
            }))
            .expect("unique name");
    }

    // finale logs "started: ready" (at info) once every service is ready; the signal handlers
    // were installed by `build()`.
    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
