//! The testing kit: run a service built on finale inside a test, stop it with a virtual signal
//! (or a real one, sent to a child process), drive a bounded load through it, and assert in a
//! few lines that nothing was dropped, how long each phase took and the exit code.
//!
//! - [`builder`]: a [`Builder`] for tests: no signal handlers, no environment
//!   variables, the local environment (no drain delay unless you set one).
//! - [`Run`]: the `Finale` running on the test's runtime; [`Run::sigterm`] sends a *virtual*
//!   `SIGTERM`, which the report records as [`Reason::Signal`](crate::Reason::Signal), exactly
//!   as a real one.
//! - [`Load`]: a bounded client loop, against any async closure (or, with a server feature,
//!   [`Load::spawn_get`] against a URL); its [`LoadReport`] counts what was served, refused and
//!   dropped.
//! - [`assert_clean`] and [`assert_nothing_dropped`]: one line each, with the whole report in
//!   the message when they fail.
//! - [`Process`]: the service as a child process, a real signal sent to it by PID, its exit code,
//!   stdout and stderr, every wait bounded.
//!
//! Everything in-process works on paused tokio time (`#[tokio::test(start_paused = true)]`):
//! drain delays and timeouts then take no real time and the report's durations are exact.
//!
//! # Examples
//!
//! A worker that needs a second to finish its batch, under a 5 s drain delay, on paused time:
//!
//! ```
//! use std::time::Duration;
//! use finale::{Phase, Task, testing};
//!
//! #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn main() {
//!     let finale = testing::builder()
//!         .drain_delay(Duration::from_secs(5))
//!         .build()
//!         .unwrap();
//!     finale
//!         .spawn(Task::worker("batch", |ctx| async move {
//!             ctx.stopped().await;
//!             tokio::time::sleep(Duration::from_secs(1)).await; // finishing the batch
//!         }))
//!         .unwrap();
//!
//!     let run = testing::Run::start(finale);
//!     run.started().await;
//!     run.sigterm();
//!     let report = run.report().await;
//!
//!     testing::assert_clean(&report);
//!     assert_eq!(report.exit_code, 0);
//!     let took = |phase| report.phase(phase).unwrap().duration;
//!     assert_eq!(took(Phase::Announce), Duration::from_secs(5));
//!     assert_eq!(took(Phase::Workers), Duration::from_secs(1));
//! }
//! ```
//!
//! A user's axum service under load, over real sockets on loopback (so on real time): every
//! request is either served, or refused once the drain started (a `503`, or a connection
//! refused once the listener closed), none dropped.
//!
#![cfg_attr(feature = "axum", doc = "```")]
#![cfg_attr(not(feature = "axum"), doc = "```ignore")]
//! use axum::{Router, routing::get};
//! use finale::axum::Listening;
//! use finale::{Finale, Phase, testing::{self, Load}};
//!
//! /// The service, as the user's crate builds it.
//! fn service(finale: &Finale, addr: &str) -> Result<Listening, finale::ConfigError> {
//!     let app = Router::new()
//!         .route("/hello", get(|| async { "hello" }))
//!         .merge(finale::axum::health_router(&finale.handle()));
//!     finale::axum::serve(finale, "http", addr, app)
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let finale = testing::builder().build().unwrap();
//!     // Port 0: the kernel picks a free one; the server says which once it has bound.
//!     let addr = service(&finale, "127.0.0.1:0").unwrap().local_addr().await.unwrap();
//!     let url = format!("http://{addr}/hello");
//!
//!     let run = testing::Run::start(finale);
//!     run.started().await;
//!     let load = Load::new(100_000).concurrency(4).spawn_get(&url);
//!     assert!(load.until_served(200).await);
//!     run.sigterm();
//!     let report = run.report().await;
//!     let load = load.stop().await;
//!
//!     testing::assert_clean(&report);
//!     testing::assert_nothing_dropped(&load);
//!     assert!(load.served >= 200, "{load}");
//!     assert!(report.entry("http").is_some(), "{report}");
//!     let drain = report.phase(Phase::Drain).unwrap().duration;
//!     assert!(drain < std::time::Duration::from_secs(2), "{report}");
//! }
//! ```
//!
//! A child process and a real `SIGTERM`, and the pattern for a binary-only service (no library
//! target to call `register(&finale)` from): see [`Process`](Process#testing-a-binary-only-service).

/// Items that need an HTTP client: hyper-util's, there with any server feature.
macro_rules! cfg_http {
    ($($item:item)*) => {
        $(
            #[cfg(any(feature = "hyper", feature = "axum", feature = "tonic"))]
            #[cfg_attr(
                docsrs,
                doc(cfg(any(feature = "hyper", feature = "axum", feature = "tonic")))
            )]
            $item
        )*
    };
}

mod load;
mod process;
mod run;

use crate::config::Environment;
use crate::report::{Outcome, PhaseOutcome, ShutdownReport, ShutdownStatus};
use crate::run::builder::Builder;
use crate::run::finale::Finale;

pub use self::load::{Call, DEFAULT_CALL_TIMEOUT, Load, LoadReport, LoadRun};
pub use self::process::{Exit, Process};
pub use self::run::{Run, SignalEffect};

/// A [`Builder`] for a `Finale` inside a test: [`no_signals`](Builder::no_signals) (no
/// process-wide handler; send virtual signals with [`Run::signal`]),
/// [`read_env(false)`](Builder::read_env) (the test's environment does not change the budget)
/// and [`Environment::Local`] (no orchestrator drain delay). Every setting can still be changed.
pub fn builder() -> Builder {
    Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
}

/// Asserts that the shutdown was clean: status [`Clean`](ShutdownStatus::Clean), every phase,
/// hook, task and wait completed, nothing cut at a deadline, no request handler panicked.
///
/// # Panics
///
/// If not: the message says what, followed by the report.
#[track_caller]
pub fn assert_clean(report: &ShutdownReport) {
    let mut problems = Vec::new();
    if report.status != ShutdownStatus::Clean {
        problems.push(format!("status {}", report.status));
    }
    for phase in &report.phases {
        if phase.outcome != PhaseOutcome::Completed {
            problems.push(format!("phase {} {}", phase.phase, phase.outcome.as_str()));
        }
        for entry in &phase.entries {
            if entry.outcome != Outcome::Completed {
                problems.push(format!("{:?} {}", entry.name, entry.outcome));
            }
        }
    }
    for cut in &report.cut {
        problems.push(format!("cut: {cut}"));
    }
    if report.requests_panicked > 0 {
        problems.push(format!(
            "{} request handlers panicked",
            report.requests_panicked
        ));
    }
    if report.over_budget {
        problems.push("over its total budget".to_owned());
    }
    assert!(
        problems.is_empty(),
        "the shutdown was not clean: {}\n{report}",
        problems.join("; ")
    );
}

/// Asserts that a load lost nothing: every call it started was served or refused (turned away
/// before any work started), none dropped, none still in flight.
///
/// # Panics
///
/// If not: the message holds the load's report, the dropped calls by cause.
#[track_caller]
pub fn assert_nothing_dropped(load: &LoadReport) {
    assert!(
        load.dropped == 0 && load.in_flight() == 0,
        "the load lost calls: {load}"
    );
}
