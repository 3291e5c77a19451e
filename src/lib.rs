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
//! 3. **Workers**: tracked background tasks stop and are awaited; then cleanup hooks run (a hook
//!    that closes a pool never races a worker's last write; [`Hook::alongside_tasks`] opts out).
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
//!     // A cleanup hook, bounded by its own timeout: it runs once the Workers phase's tasks
//!     // have ended.
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
//! Each is proved by a test named in `ARCHITECTURE.md`; the fault-injection suite
//! (`tests/faults_process.rs`) sends real signals to real child processes on both runtime
//! flavours.
//!
//! - **One budget, whatever hangs.** [`Builder::total_budget`] counts from the trigger (the
//!   first signal, wherever the program is, also before [`Finale::run`]). Announce, Drain and
//!   Workers end by `total - reserve`, Telemetry by `total`; after a second signal, by the
//!   escalation plus the [escalation budget](Builder::escalation_budget), never past the total.
//!   If a thread of the runtime is blocked so that the sequence cannot keep its deadlines, the
//!   supervisor thread takes over (see below) and the process exits with the deadline-overrun
//!   code by `total + safety_margin / 2` at the latest (after a second signal: at most 250 ms
//!   past the escalation budget's end, with the forced code). A run that ended after its total
//!   is never reported clean.
//! - **A reserved telemetry slot.** What Announce, Drain and Workers leave unfinished is
//!   aborted and reported; a hook that blocks its thread past its deadline cannot be aborted,
//!   but is reported [`Overran`](Outcome::Overran), and the built-in telemetry stages (OTLP,
//!   the Pushgateway push, the log writer) and blocking [`Sink`]s still deliver from threads
//!   finale owns.
//! - **Delivery with counts.** [`ShutdownReport::delivery`] says, per telemetry stage that
//!   counts, what was exported, failed and dropped before the trigger and after it; the
//!   [`DeliveryPolicy`] says which losses make the run
//!   [`TelemetryNotDelivered`](ShutdownStatus::TelemetryNotDelivered).
//! - **Isolation.** A hook or task that errors, panics (before or after returning its future)
//!   or overruns is recorded and abandoned; the others and later phases still run.
//! - **Signals at every moment.** Received on the supervisor thread from [`Builder::build`] on:
//!   held before `run()`, honoured during the sequence, and a signal after `run()` returned ends
//!   the process with the report's code (unless another `Finale` of the process is still
//!   running). A second signal abandons the current phase and runs the Telemetry phase with the
//!   [escalation budget](Builder::escalation_budget); a third exits at once, also when every
//!   worker thread is blocked. Signals sent so close together that the first was not yet
//!   handled count as one: the kernel merges pending signals of one kind, and so does tokio.
//!   A `Finale` dropped without running leaves the signals to the next one.
//! - **Every path keeps the rules.** Readiness turns off and the drain flag is set on every path,
//!   and every phase's token fires even when a second signal skips the phase; a start that never
//!   became ready skips the drain delay; work acquired on the [`InFlight`] tracker during the
//!   drain is waited for ([`InFlight::try_acquire`] refuses it instead).
//! - **A report and an exit code** for every run that reaches its end; see [`ExitCodes`] for the
//!   table. (When the supervisor takes over, the process exits with its own code and a log line
//!   saying where it was stuck; `run()` does not return, unless the supervisor has not
//!   exited half a second past the process's last moment (then it returns the report, and
//!   the caller's exit code wins). If the runtime comes back and the
//!   sequence ends while the supervisor delivers, the report goes into the supervisor's
//!   termination message, before its line.)
//! - **No surprises.** Nothing global is installed unless asked; see below. finale never prints;
//!   it reports through `tracing` (target `finale`) and the [`metrics`] facade (see [`names`]),
//!   and through the OTLP meter provider you hand it, if any.
//!
//! ## Threading and process-wide effects
//!
//! Everything finale does to the process, in one place:
//!
//! - **The supervisor thread.** [`Builder::build`] starts one plain OS thread per `Finale`,
//!   `finale-supervisor`, with a small current-thread tokio runtime of its own (IO and time
//!   drivers). It receives the signals, watches the budget once the shutdown is requested, and,
//!   if the sequence misses the start of its Telemetry slot or its end by 250 ms (or a quarter
//!   of the reserve, if shorter), logs where it was stuck, runs the telemetry stages that need
//!   no user runtime on threads of its own (each within its share of what is left, at most half
//!   the safety margin past the total) and calls `std::process::exit` with the deadline-overrun
//!   code (forced, after a second signal). Without signals, the thread ends when the sequence
//!   finishes or the `Finale` is dropped; with signals it lives as long as the process, so that
//!   a signal after `run()` still ends it. It costs nothing on the request path.
//! - **Signal handlers.** For the [configured signals](Builder::signals) (SIGTERM and SIGINT by
//!   default), installed by [`Builder::build`] through tokio. tokio never uninstalls a handler:
//!   once installed, the signal no longer kills the process by default; finale's supervisor
//!   handles it for the life of the process. [`Builder::no_signals`] installs none.
//! - **The panic hook**, only with [`Builder::panic_hook`]: process-wide, chained after the
//!   previous one, for the life of the process.
//! - **The process-wide instance**, only with [`Builder::install`]: at most one per process,
//!   reachable through [`global`].
//! - **Threads of the telemetry stages.** The OTLP flushes, the log writer's release and
//!   blocking [`Sink`]s run on short-lived plain threads (`finale-otlp-*`, `finale-log-writer`,
//!   `finale-sink-*`), so that a blocking
//!   exporter never stalls the runtime; one that overruns is left behind and dies with the
//!   process.
//! - **The termination message.** At the end of [`Finale::run`] (or, when the supervisor took
//!   over first, by the supervisor: one of the two, never both), a summary of at most 4 KiB is
//!   written to the file [`Builder::termination_log`] names:
//!   by default `/dev/termination-log` when running on Kubernetes and that file is writable
//!   (the kubelet's file for exactly this), nowhere elsewhere. `FINALE_TERMINATION_LOG=off`
//!   turns it off. Each write runs on a short-lived thread (`finale-termination-log`), waited
//!   for at most 500 ms (a file system that hangs is left behind).
//! - **The wait for a supervisor that owns the end.** When the supervisor took over and the
//!   sequence still ends, [`Finale::run`] waits for the supervisor's exit on the real clock:
//!   one short-lived thread (`finale-exit-wait`) sleeps until the bound (half a second past the
//!   process's last moment) and wakes it; if that thread cannot start, the runtime's thread
//!   that runs `run()` sleeps to the bound itself. Dropping `run()` during the wait leaves the
//!   thread to end at its bound.
//! - **systemd notifications**, only with `Builder::systemd_notify(true)` (feature `systemd`)
//!   and when `$NOTIFY_SOCKET` is set: non-blocking datagrams to the service manager from the
//!   thread where each moment happens (an upgrade's `MAINPID=` alone waits for room in a full
//!   queue, at most 0.5 s), and, when `$WATCHDOG_USEC` is set, one task on your
//!   runtime that pings the watchdog from graceful start to the trigger.
//! - **Socket activation**, only when you call `finale::systemd::listener*` (feature
//!   `systemd`): the first call takes the sockets systemd passed for the whole process and
//!   removes `LISTEN_PID` and `LISTEN_FDS` from the process's environment (the `listenfd` crate
//!   does, so that child processes do not inherit them); make it early in `main`.
//! - **Upgrades**, only with [`Builder::upgrade`] (feature `upgrade`): a handler for the upgrade
//!   signal (`SIGUSR2` by default), received by the supervisor thread; per upgrade, one
//!   short-lived thread (`finale-upgrade`) that starts the successor (a child process with the
//!   servers' listening sockets at file descriptors 3, 4, … and `LISTEN_FDS`, `LISTEN_FDNAMES`,
//!   `FINALE_LISTEN_PARENT` in its environment), waits for it, and completes the hand-off
//!   (tells systemd, requests the shutdown) or stops it, whatever became of the caller (its
//!   log lines and counts come from that thread: a thread-local subscriber or recorder of the
//!   caller's does not see them). In a
//!   successor, the passed sockets are taken at [`Builder::build`]. See [`upgrade`].
//! - **The servers' timer threads** (features `axum`, `hyper`, `tonic`): each running server
//!   has one thread (`finale-slow-clients`) with a `current_thread` tokio runtime that does
//!   nothing but keep its connections' slow-client timers (the
//!   header-read timeout, `HttpServer::header_read_timeout`), so that they cost
//!   the user's runtime nothing per request; from the server's start until its last connection
//!   ends. On a paused clock (`start_paused`) the timers stay on the runtime and no thread
//!   starts.
//! - **The metrics endpoint**, only with a built `prometheus::MetricsEndpoint` (feature
//!   `prometheus`): one thread (`finale-metrics`) with a `current_thread` tokio runtime of its
//!   own and the listening socket, from `build` until the run's report exists (registered) or
//!   `close()` or the process's exit. Its final-scrape wait
//!   runs on a short-lived thread (`finale-final-scrape`).
//! - **`std::process::exit`** is called by [`ShutdownReport::exit`] and
//!   [`Finale::run_and_exit`] (by you), by the supervisor on a takeover, on a third signal and on
//!   a signal after `run()` returned.
//!
//! **What the user's runtime needs:** the time driver (`enable_time`, or `enable_all`;
//! `#[tokio::main]` has it), since every phase is bounded by tokio timers. Without it `run()`
//! returns a startup failure that says so instead of panicking (tokio offers no way to ask, so
//! finale probes once: the process's panic hook sees that one caught panic). The IO driver is
//! not needed by the core; the servers need it, as any tokio socket does. Both `current_thread`
//! and `multi_thread` runtimes work.
//!
//! ## Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | the core: phases, budget, signals, hooks, tasks, in-flight tracking, health, report |
//! | `tower` | a tower layer: in-flight tracking, HTTP/1 served with `Connection: close` while draining (`503` + `Retry-After` only near the deadline); `/livez` and `/readyz` |
//! | `axum` | serve an axum `Router` under finale (implies `tower`) |
//! | `hyper` | serve a hyper / hyper-util service under finale (implies `tower`) |
//! | `tonic` | serve tonic services under finale, tonic-health included (implies `tower`) |
//! | `prometheus` | the last scrape: a metrics endpoint on finale's own thread that outlives the drain, and a Telemetry stage that waits for a scrape of the final values (`finale::prometheus`) |
//! | `pushgateway` | final push to a Prometheus Pushgateway from metrics-exporter-prometheus |
//! | `pushgateway-tls` | the Pushgateway over `https://`: rustls with the ring provider (no global provider), webpki-roots, a custom CA, client certificates (implies `pushgateway`) |
//! | `pushgateway-gzip` | gzip-compressed Pushgateway pushes (`PushgatewayBuilder::gzip`; Pushgateway 1.5.0 or later), flate2's pure-Rust backend (implies `pushgateway`) |
//! | `otlp` | bounded, parallel flush and shutdown of OpenTelemetry SDK providers |
//! | `otlp-http` | `otlp::CountingClient`: an OTLP/HTTP exporter's partial successes count their rejected items as failed (implies `otlp`) |
//! | `tracing-appender` | release a tracing-appender `WorkerGuard` last, bounded |
//! | `tokio-util` | a phase's [`StopToken`] as a `CancellationToken` (`StopToken::cancellation_token`) and a cancelled `CancellationToken` as a trigger (`Handle::trigger_on_cancel`); a `TaskTracker` awaited in a phase (`Finale::track`) |
//! | `testing` | the testing kit (`finale::testing`): run a service in a test, virtual or real signals, bounded load, one-line assertions |
//! | `systemd` | Linux: `READY`/`STOPPING`/`STATUS`/`EXTEND_TIMEOUT_USEC`/`WATCHDOG` on `$NOTIFY_SOCKET`, socket activation for the servers (no libsystemd) |
//! | `serde` | `serde::Serialize` for the report and its parts; `ShutdownReport::to_json` for log pipelines |
//!
//! The Kubernetes termination message needs no feature: see [`Builder::termination_log`].
//!
//! ## Compatibility
//!
//! The crates whose types appear in finale's public API, and the versions finale is built and
//! tested against. Depend on the same ones: another major version (for semver 0.x, another
//! minor) is a different crate to the compiler, and its types do not fit. CI checks this table
//! against the versions the library and its tests resolve.
//!
//! <!-- compat:start -->
//! | crate | version | feature | where it appears in finale's API |
//! |---|---|---|---|
//! | `tokio` | 1 | (core) | `HookContext::deadline` (`tokio::time::Instant`), the runtime finale runs on |
//! | `metrics` | 0.24 | (core) | the facade finale records its own metrics through: your recorder must be built for the same version |
//! | `tower` | 0.5 | `tower` | `DrainLayer`, `HealthService`, `HttpServer::layer` |
//! | `http` | 1 | `tower` | requests and responses of the layer and the servers |
//! | `http-body` | 1 | `tower` | `DrainBody` implements `http_body::Body`; the servers' request and response bodies |
//! | `bytes` | 1 | `tower` | `Rejection::body` takes `impl Into<Bytes>`; `DrainBody`'s data |
//! | `hyper` | 1 | `hyper`, `axum`, `tonic` | `finale::hyper::serve` takes a hyper `Service` |
//! | `hyper-util` | 0.1 | `axum`, `hyper`, `tonic` | `HttpServer::hyper` configures its `auto::Builder` |
//! | `axum` | 0.8 | `axum` | `finale::axum::serve` takes a `Router` |
//! | `tonic`, `tonic-health` | 0.14 | `tonic` | `finale::tonic::serve` takes `Routes`; `report_health` a `HealthReporter` |
//! | `rustls` | 0.23 | `tls`, `pushgateway-tls` | `TlsConfig::from_rustls` takes a `ServerConfig` |
//! | `metrics-exporter-prometheus` | 0.18 | `pushgateway` | `Pushgateway::build` takes a `PrometheusHandle` |
//! | `opentelemetry`, `opentelemetry_sdk` | 0.33 | `otlp` | `Otlp` takes the SDK's tracer, meter and logger providers |
//! | `opentelemetry-http` | 0.33 | `otlp-http` | `CountingClient` wraps and implements its `HttpClient` |
//! | `tracing-appender` | 0.2 | `tracing-appender` | `finale::appender` wraps its `WorkerGuard` |
//! | `tokio-util` | 0.7 | `tokio-util` | `CancellationToken`, `TaskTracker` |
//! | `serde` | 1 | `serde` | the report and its parts implement `Serialize` |
//! <!-- compat:end -->
//!
//! ## Minimum supported Rust version
//!
//! Rust 1.89 (edition 2024).

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod config;
mod handle;
mod hook;
mod phase;
mod platform;
mod report;
mod run;
mod signal;
mod slot;
mod state;
mod task;
mod telemetry;
mod termination_log;
mod track;

#[cfg(any(feature = "tls", feature = "pushgateway-tls"))]
mod pem;
#[cfg(feature = "tower")]
mod serve;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::serve::axum;
#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub use crate::serve::hyper;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use crate::serve::tls;
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
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use crate::telemetry::scrape as prometheus;

#[cfg(all(feature = "systemd", unix))]
#[cfg_attr(docsrs, doc(cfg(feature = "systemd")))]
pub use crate::platform::systemd;
#[cfg(all(feature = "upgrade", unix))]
#[cfg_attr(docsrs, doc(cfg(feature = "upgrade")))]
pub use crate::platform::upgrade;

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
pub use crate::platform::TERMINATION_MESSAGE_MAX;
pub use crate::report::names;
pub use crate::report::{
    Counts, Delivery, DeliveryPolicy, EntryKind, EntryReport, ExitCodes, FinalScrape, Items,
    Outcome, PhaseOutcome, PhaseReport, Reason, ScrapeOutcome, ScrapeSeen, ShutdownReport,
    ShutdownStatus,
};
pub use crate::run::builder::Builder;
pub use crate::run::finale::Finale;
pub use crate::run::global;
pub use crate::signal::{DEFAULT_SIGNALS, Signal};
pub use crate::slot::{ORDER_LOG_WRITER, ORDER_METRICS, ORDER_TRACES_LOGS};
pub use crate::state::State;
pub use crate::task::{Task, TaskContext};
pub use crate::telemetry::sink::{Sink, SinkContext, SinkCounter};
pub use crate::termination_log::{DEFAULT_TERMINATION_LOG, TerminationLog};
pub use crate::track::{Cancelled, Health, InFlight, InFlightGuard, InFlightTracker, StopToken};
