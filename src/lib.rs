//! # finale
//!
//! A safe, observable last act for tokio services.
//!
//! When the platform stops a service (SIGTERM from Kubernetes, ECS, `docker stop`, systemd;
//! Ctrl-C in a terminal), finale runs one ordered sequence under one budget:
//!
//! 1. **Announce**: readiness off (`/readyz` answers 503, liveness stays OK); keep serving for
//!    the drain delay so the load balancer lets go first.
//! 2. **Drain**: servers stop accepting and finish in-flight work, in parallel.
//! 3. **Workers**: tracked background tasks stop and are awaited; cleanup hooks run.
//! 4. **Telemetry**: the final metrics push and telemetry flush, in a reserved slot of the budget
//!    that earlier overruns cannot eat.
//! 5. **Exit** with a documented exit code and a [`ShutdownReport`] of what happened.
//!
//! ## Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use finale::{Finale, Hook, Phase, Task};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     let finale = Finale::builder().build()?;
//!
//!     // A background worker: told to stop in the Workers phase, then awaited.
//!     finale.spawn(Task::worker("ticker", |ctx| async move {
//!         let mut tick = tokio::time::interval(Duration::from_secs(1));
//!         loop {
//!             tokio::select! {
//!                 _ = ctx.stopped() => break,
//!                 _ = tick.tick() => { /* work */ }
//!             }
//!         }
//!     }))?;
//!
//!     // A cleanup hook, bounded by its own timeout.
//!     finale.hook(
//!         Hook::new(Phase::Workers, "close-db", |_| async { /* pool.close().await */ })
//!             .timeout(Duration::from_secs(2)),
//!     )?;
//!
//!     // Waits for SIGTERM/SIGINT, runs the sequence, prints nothing, exits with the code.
//!     let report = finale.run().await;
//!     eprintln!("{report}");
//!     report.exit()
//! }
//! ```
//!
//! ## Guarantees
//!
//! - **One budget.** [`Builder::total_budget`] bounds the whole sequence, whatever hangs.
//! - **A reserved telemetry slot.** Announce, Drain and Workers end by `total - reserve`; what
//!   they leave unfinished is aborted and reported.
//! - **Isolation.** A hook or task that errors, panics or overruns is recorded and abandoned; the
//!   others and later phases still run.
//! - **Escalation.** A signal during the shutdown abandons the current phase and runs the
//!   Telemetry phase with the short [escalation budget](Builder::escalation_budget); another
//!   exits at once.
//! - **A report and an exit code** for every run; see [`ExitCodes`] for the table.
//! - **No surprises.** Nothing global is installed unless asked: signal handlers only by
//!   [`Finale::run`] (for the [configured signals](Builder::signals)), the panic hook only with
//!   [`Builder::panic_hook`]. finale never prints; it reports through `tracing` (target
//!   `finale`) and the [`metrics`] facade (see [`names`]).
//!
//! ## Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | the core: phases, budget, signals, hooks, tasks, in-flight tracking, health, report |
//! | `tower` | a tower layer: in-flight tracking, 503 while draining; `/livez` and `/readyz` |
//! | `axum` | serve an axum `Router` under finale (implies `tower`) |
//! | `hyper` | serve a hyper / hyper-util service under finale (implies `tower`) |
//! | `tonic` | serve tonic services under finale, tonic-health included (implies `tower`) |
//! | `pushgateway` | final push to a Prometheus Pushgateway from metrics-exporter-prometheus |
//! | `otlp` | bounded, parallel flush and shutdown of OpenTelemetry SDK providers |
//! | `tracing-appender` | release a tracing-appender `WorkerGuard` last, bounded |
//!
//! ## Minimum supported Rust version
//!
//! Rust 1.88 (edition 2024).

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod config;
mod handle;
mod hook;
mod phase;
mod report;
mod run;
mod signal;
mod slot;
mod state;
mod task;
mod track;

#[cfg(feature = "tower")]
mod serve;
#[cfg(any(
    feature = "pushgateway",
    feature = "otlp",
    feature = "tracing-appender"
))]
mod telemetry;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::serve::axum;
#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub use crate::serve::hyper;
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub use crate::serve::tonic;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use crate::serve::tower;

#[cfg(feature = "tracing-appender")]
#[cfg_attr(docsrs, doc(cfg(feature = "tracing-appender")))]
pub use crate::telemetry::appender;
#[cfg(feature = "otlp")]
#[cfg_attr(docsrs, doc(cfg(feature = "otlp")))]
pub use crate::telemetry::otlp;
#[cfg(feature = "pushgateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "pushgateway")))]
pub use crate::telemetry::pushgateway;

pub use crate::config::{
    Budget, ConfigError, DEFAULT_ANNOUNCE_TIMEOUT, DEFAULT_DRAIN_DELAY_LOCAL,
    DEFAULT_DRAIN_DELAY_ORCHESTRATED, DEFAULT_DRAIN_TIMEOUT, DEFAULT_ESCALATION_BUDGET,
    DEFAULT_SAFETY_MARGIN, DEFAULT_STARTUP_TIMEOUT, DEFAULT_TELEMETRY_RESERVE,
    DEFAULT_TOTAL_BUDGET, DEFAULT_WORKERS_TIMEOUT, DrainDelay, Environment, MAX_DURATION, Misfit,
    PlanMisfit, Setting,
};
pub use crate::handle::Handle;
pub use crate::hook::{Hook, HookContext, HookError, HookOutput};
pub use crate::phase::Phase;
pub use crate::report::names;
pub use crate::report::{
    EntryKind, EntryReport, ExitCodes, Outcome, PhaseOutcome, PhaseReport, Reason, ShutdownReport,
    ShutdownStatus,
};
pub use crate::run::builder::Builder;
pub use crate::run::finale::Finale;
pub use crate::run::global;
pub use crate::signal::{DEFAULT_SIGNALS, Signal};
pub use crate::slot::{ORDER_LOG_WRITER, ORDER_METRICS, ORDER_TRACES_LOGS};
pub use crate::state::State;
pub use crate::task::{Task, TaskContext};
pub use crate::track::{Cancelled, Health, InFlight, InFlightGuard, StopToken};
