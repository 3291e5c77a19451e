//! Fault injection for `tests/faults_process.rs`: a small service that misbehaves on purpose, so
//! the tests can check that signals are honoured at every moment of the process's life and that
//! one budget bounds the whole sequence whatever hangs.
//!
//! ```sh
//! FAULT=block-workers FAULT_RUNTIME=current_thread FINALE_TOTAL_BUDGET=2s \
//!     cargo run --example faults
//! # then `kill -TERM <pid>`
//! ```
//!
//! Environment variables:
//! - `FAULT=<scenario>`: what goes wrong (see [`Fault`]); unset or `none` is a plain service.
//! - `FAULT_RUNTIME=current_thread|multi_thread_2`: the tokio runtime (default `current_thread`).
//! - `FAULT_BLOCK_TELEMETRY=1`: also Telemetry-phase hooks that block their thread for 8 s, so
//!   that the process cannot finish the sequence on its own after a second signal.
//! - `FAULT_TRIGGER=<reason>`: the shutdown is triggered with this reason right before `run()`,
//!   instead of waiting for a signal.
//! - `FINALE_*`: any budget setting (see the README's defaults table).
//!
//! Markers written to stderr: `built` (the `Finale` is built and its tasks spawned), `blocker
//! started in <phase>` (a blocking hook now holds a runtime thread), and the
//! report after `run()` returns; finale itself logs `started: ready`, `shutdown requested`,
//! `second signal`...

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::time::{Duration, Instant};

use finale::{Finale, Hook, Phase, Task};
use tracing_subscriber::EnvFilter;

/// The scenarios.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// A plain service: a worker that stops when told.
    None,
    /// Workers-phase hooks that block their thread for 6 s (one per runtime worker thread).
    BlockWorkers,
    /// Drain-phase hooks that block their thread for 8 s (one per runtime worker thread).
    BlockDrain,
    /// Telemetry-phase hooks that block their thread for 8 s (one per runtime worker thread).
    BlockTelemetry,
    /// A Drain hook that never finishes (asynchronously), so a second signal has something to cut.
    PendingDrain,
    /// Before `run()`, wait (up to 10 s) for the shutdown to be requested: a slow initialisation.
    SignalBeforeRun,
    /// Before `run()`, block the thread for 8 s: an initialisation longer than the budget.
    SlowInit,
    /// After `run()`: a blocking task that never ends, and a return from main without exiting.
    StuckAfterRun,
    /// A service that fails before it is ever ready.
    FailedStart,
    /// A runtime built without the time driver.
    NoTimeDriver,
    /// A runtime built without the IO driver.
    NoIoDriver,
}

impl Fault {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "none" => Self::None,
            "block-workers" => Self::BlockWorkers,
            "block-drain" => Self::BlockDrain,
            "block-telemetry" => Self::BlockTelemetry,
            "pending-drain" => Self::PendingDrain,
            "signal-before-run" => Self::SignalBeforeRun,
            "slow-init" => Self::SlowInit,
            "stuck-after-run" => Self::StuckAfterRun,
            "failed-start-k8s" | "failed-start" => Self::FailedStart,
            "no-time-driver" => Self::NoTimeDriver,
            "no-io-driver" => Self::NoIoDriver,
            _ => return None,
        })
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let fault_name = std::env::var("FAULT").unwrap_or_default();
    let Some(fault) = Fault::parse(&fault_name) else {
        eprintln!("unknown FAULT={fault_name:?}");
        std::process::exit(2);
    };
    let (mut runtime, threads) = match std::env::var("FAULT_RUNTIME").as_deref() {
        Ok("current_thread") | Err(_) => (tokio::runtime::Builder::new_current_thread(), 1),
        Ok("multi_thread_2") => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            (b, 2)
        }
        Ok(other) => {
            eprintln!("unknown FAULT_RUNTIME={other:?}");
            std::process::exit(2);
        }
    };
    match fault {
        Fault::NoTimeDriver => runtime.enable_io(),
        Fault::NoIoDriver => runtime.enable_time(),
        _ => runtime.enable_all(),
    };
    let runtime = runtime.build().expect("a tokio runtime");
    runtime.block_on(run(fault, threads));
    // Only `stuck-after-run` gets here: dropping the runtime now waits for its blocking task.
    eprintln!("dropping the runtime");
}

/// Blocks the calling thread: the runtime thread that polls it can do nothing else meanwhile.
fn blockers(finale: &Finale, phase: Phase, count: usize, secs: u64) {
    for i in 0..count {
        // "blocker", "blocker-2" in Workers; "drain-blocker", ... elsewhere (names are unique).
        let prefix = match phase {
            Phase::Workers => String::new(),
            other => format!("{}-", other.as_str()),
        };
        let name = match i {
            0 => format!("{prefix}blocker"),
            _ => format!("{prefix}blocker-{}", i + 1),
        };
        finale
            .hook(Hook::new(phase, name, move |ctx| async move {
                // The marker tells the test that this runtime thread is now held.
                eprintln!("blocker started in {}", ctx.phase().as_str());
                std::thread::sleep(Duration::from_secs(secs));
            }))
            .expect("unique name");
    }
}

async fn run(fault: Fault, threads: usize) {
    let finale = match Finale::builder().build() {
        Ok(finale) => finale,
        Err(error) => {
            eprintln!("configuration error: {error}");
            std::process::exit(2);
        }
    };
    let handle = finale.handle();

    finale
        .spawn(Task::worker("ticker", |ctx| async move {
            ctx.stopped().await;
            tracing::info!("ticker stopped");
        }))
        .expect("unique name");

    match fault {
        Fault::BlockWorkers => blockers(&finale, Phase::Workers, threads, 6),
        Fault::BlockDrain => blockers(&finale, Phase::Drain, threads, 8),
        Fault::BlockTelemetry => blockers(&finale, Phase::Telemetry, threads, 8),
        Fault::PendingDrain => finale
            .hook(Hook::new(Phase::Drain, "pending-drain", |_| {
                std::future::pending::<()>()
            }))
            .expect("unique name"),
        Fault::FailedStart => finale
            .spawn(Task::service("listener", |_| async {
                Err::<(), _>(std::io::Error::other("address already in use"))
            }))
            .expect("unique name"),
        _ => {}
    }
    if std::env::var_os("FAULT_BLOCK_TELEMETRY").is_some_and(|v| !v.is_empty()) {
        blockers(&finale, Phase::Telemetry, threads, 8);
    }

    eprintln!("built");
    match fault {
        Fault::SignalBeforeRun => {
            // A slow initialisation that gives up early once the shutdown is requested. It blocks
            // the thread on purpose: this is the scenario, not synchronisation.
            let start = Instant::now();
            while !handle.is_shutdown_requested() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            eprintln!(
                "initialised (shutdown requested: {})",
                handle.is_shutdown_requested()
            );
        }
        Fault::SlowInit => {
            std::thread::sleep(Duration::from_secs(8));
            eprintln!("initialised");
        }
        _ => {}
    }

    if let Ok(reason) = std::env::var("FAULT_TRIGGER") {
        handle.trigger(reason);
    }
    let report = finale.run().await;
    eprintln!("{report}");
    if fault == Fault::StuckAfterRun {
        // A blocking task that outlives the service: returning from main drops the runtime, which
        // waits for it.
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(60)));
        eprintln!("returning from main");
        return;
    }
    report.exit()
}
