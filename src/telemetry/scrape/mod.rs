//! The last scrape (feature `prometheus`): a metrics endpoint that outlives the drain, and a
//! Telemetry stage that lets the process exit once a scrape has read the final values.
//!
//! A scraped service loses everything recorded after its last scrape: the drain closes the
//! server that serves `/metrics`, and the process exits long before the next scrape, taking the
//! shutdown's own errors with it. [`MetricsEndpoint`] serves the registry at an address of its
//! own, from a thread of finale's own, until just before the exit; its final-scrape stage waits,
//! in the Telemetry phase, for a scrape that started after the phase began.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the builder, [`MetricsEndpoint`] |
//! | `address.rs`, `error.rs` | where it listens; why it could not be built |
//! | `server.rs` | the endpoint's thread and its small HTTP/1.1 server |
//! | `scrapers.rs` | who scrapes, how often, at which phase; the scrapes answered in full |
//! | `stage.rs` | the final-scrape stage: the prediction, the wait, the planner's check |
//!
//! # The endpoint
//!
//! - It serves `GET` (and `HEAD`) on its [`path`](MetricsEndpointBuilder::path) (`/metrics`)
//!   with what the registry renders: metrics-exporter-prometheus's `PrometheusHandle`
//!   ([`build`](MetricsEndpointBuilder::build)) or a closure for any other registry
//!   ([`build_with`](MetricsEndpointBuilder::build_with)). Other paths answer `404`, other
//!   methods `405`, a render that panics `500` (logged). It **never answers `503`**: Prometheus
//!   treats a failed scrape as an empty one and writes staleness markers. The body is sent
//!   uncompressed, whatever `Accept-Encoding` asks, so that its last byte is the end of the
//!   scrape.
//! - A request head must arrive in full within 10 s of its first byte, or the connection is
//!   closed; at most 256 connections are served at once, and past that new ones are closed at
//!   accept.
//! - It keeps answering through Announce, Drain, Workers and Telemetry: it is not one of the
//!   servers finale drains. It closes when the run's report exists (just before
//!   [`ShutdownReport::exit`](crate::ShutdownReport::exit)), when the `Finale` is dropped
//!   without running, or with the process.
//! - It runs on a plain thread (`finale-metrics`) with a `current_thread` tokio runtime of its
//!   own. A user runtime whose every worker is blocked does not stop it from answering, and
//!   the supervisor's takeover (see below) waits for the final scrape like the hook would.
//!   A render runs on that thread: a registry that takes long to render holds up other
//!   scrapers meanwhile, not the service.
//! - With [`build`](MetricsEndpointBuilder::build) it also runs the recorder's upkeep
//!   (`PrometheusHandle::run_upkeep`, every [`DEFAULT_UPKEEP_INTERVAL`]), which
//!   `install_recorder` does not start: histograms are drained and idle metrics expire.
//! - The address is bound by `build`: a bad address or one in use is a [`ScrapeConfigError`]
//!   there, never a panic. Port `0` picks a free port; [`local_addr`](MetricsEndpoint::local_addr)
//!   says which. `build` runs before the run, not inside graceful start, so finale does not
//!   turn that error into a start failure (exit code 3) by itself: the caller decides. The
//!   `full_service` example prints it and exits with code 3.
//!
//! # The final-scrape stage
//!
//! [`register`](MetricsEndpoint::register) adds the Telemetry hook `final-scrape` (renamed
//! with [`name`](MetricsEndpointBuilder::name)) at [`ORDER_METRICS`], with the metrics stage's
//! share of what is left of the slot (half, see [`ORDER_METRICS`]) unless
//! [`share`](MetricsEndpointBuilder::share) says otherwise; it never runs past the total
//! budget.
//!
//! - **What it waits for.** Once Workers has ended the values are final (finale's own shutdown
//!   metrics are recorded just before the Telemetry phase). The stage waits until a `GET` that
//!   arrived after the stage started (the Telemetry phase's beginning) has been answered `200`
//!   and its last byte written to the socket. Under [`ScrapePolicy::Any`] (the default) one such
//!   scrape by anyone is enough; under [`ScrapePolicy::Every`] every scraper seen recently
//!   (within two of its intervals and its timeout) whose next scrape is predicted in time must
//!   have made one (a highly available Prometheus pair scrapes independently). A scraper that
//!   stopped within that window cannot be told from one still to come: it is waited for, and
//!   the stage ends missed, naming it.
//! - **The prediction.** Prometheus scrapes each target at a fixed offset within its interval.
//!   The endpoint learns each scraper's interval (the median gap between its last scrapes) and
//!   phase (its last scrape), and the duration of its last scrape; a scraper is a keep-alive
//!   connection, continued across reconnects by address and `User-Agent`
//!   (`Prometheus/2.42.0`, `vm_promscrape`: hints, not a filter) when the new scrape lands on
//!   that scraper's phase (what can and cannot be told apart: the `scrapers` module).
//!   `X-Prometheus-Scrape-Timeout-Seconds` tells how long a scraper may still count as recent.
//!   The prediction is made when the Telemetry phase begins. A scrape due up to a tenth of the
//!   interval (at most 100 ms) before that moment that has not come yet is late, not past: it
//!   is the one predicted. The stage waits only when the predicted scrape ends at least that
//!   slack before its deadline.
//! - **When it does not wait**, the report says why ([`ScrapeOutcome`]): no scrape was ever
//!   seen (or none recently); only one scrape was seen and no interval was
//!   [declared](MetricsEndpointBuilder::expected_interval); or the next scrape would end after
//!   the stage's deadline. The hook then completes at once: waiting could not help.
//! - **When the scrape does not come** by the deadline (a scraper that stopped scraping, or
//!   stalled mid-body) the hook fails, saying which scrapers it waited for, and the run is
//!   [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered).
//! - **A second signal** ends the wait at once (or keeps it from starting): the outcome is
//!   [`Escalated`](ScrapeOutcome::Escalated), the hook completes, and the later Telemetry stages
//!   (traces and logs, the log writer) get what is left of the escalation budget.
//! - **The report** gets a line per endpoint ([`ShutdownReport::final_scrapes`](crate::ShutdownReport::final_scrapes)):
//!   when each final scrape came (after the trigger), who made it, the samples it carried and
//!   how long the stage waited; or why it did not wait. Its JSON and the Kubernetes termination
//!   message carry it too.
//!
//! # What holds when the user's runtime is wedged
//!
//! The endpoint answers scrapes whatever the user's runtime does; its state is on its own
//! thread. If the runtime is wedged and the supervisor takes over (see
//! [`Builder::build`](crate::Builder::build)), it runs the final-scrape stage itself, on its
//! own thread and its std clock, from the takeover with the same share of what is left; a
//! stage that the hook had started already is waited for, not run twice. The takeover's exit
//! then follows the final scrape, if one came in time. The takeover's report is not built (the
//! runtime that would build it is wedged), so the line is in the log, not in a report; the
//! takeover's termination message lists the stage under `delivered=` only if the final scrape
//! came, and under `not_delivered=` otherwise (whether it did not wait or missed).
//!
//! # Budget
//!
//! With a known grace period ([`Builder::grace_period`](crate::Builder::grace_period)) and an
//! [`expected_interval`](MetricsEndpointBuilder::expected_interval), `register` logs a warning
//! (target `finale`) when the grace period cannot hold the drain delay + the drain + one scrape
//! interval + the scrape timeout, or when the stage's share of the telemetry reserve cannot
//! hold one interval + the timeout: the stage then waits only when the prediction lands in
//! time. With a 15 s interval, give the telemetry reserve 2 × (15 s + timeout) + 0.1 s.
//!
//! # `/metrics` on your own axum router
//!
//! A route on a server that finale drains closes with that server, in the Drain phase: no
//! scrape can read what Workers and Telemetry record. Move it: drop the route, build a
//! `MetricsEndpoint` on another port with the same handle, and point the scrape config (the
//! `ServiceMonitor`'s or `PodMonitor`'s port, or the `prometheus.io/port` annotation) at it.
//!
//! # Examples
//!
//! ```no_run
//! use finale::Finale;
//! use finale::prometheus::MetricsEndpoint;
//! use metrics_exporter_prometheus::PrometheusBuilder;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let metrics = PrometheusBuilder::new().install_recorder()?;
//!     metrics::counter!("http_requests_total").absolute(0); // a series born before the end
//!     let finale = Finale::builder().build()?;
//!     let endpoint = MetricsEndpoint::builder("0.0.0.0:9090")
//!         .expected_interval(std::time::Duration::from_secs(15))
//!         .build(metrics)?;
//!     endpoint.register(&finale)?;
//!     // ... serve, then on SIGTERM: ... Telemetry waits for the final scrape.
//!     finale.run_and_exit().await
//! }
//! ```

mod address;
mod error;
mod scrapers;
mod server;
mod stage;

use std::borrow::Cow;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::{Hook, HookContext, HookError};
use crate::phase::Phase;
use crate::slot::{ORDER_METRICS, Share, stage_deadline};
use crate::state::EmergencyStage;
use crate::telemetry::stages::{Handoff, OffThread, run_until};

use address::AddressKind;
use scrapers::Scrapers;
use server::{App, Render, Server, Upkeep};
use stage::Wait;

pub use self::address::Address;
pub use self::error::ScrapeConfigError;
pub use crate::report::{FinalScrape, ScrapeOutcome, ScrapeSeen};

/// Default path the endpoint serves: `/metrics`.
pub const DEFAULT_PATH: &str = "/metrics";
/// Default name of the final-scrape stage's hook: `final-scrape`.
pub const DEFAULT_NAME: &str = "final-scrape";
/// Default period of the recorder's upkeep (with [`MetricsEndpointBuilder::build`]): 5 s, as
/// metrics-exporter-prometheus's own exporters.
pub const DEFAULT_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Default scrape timeout the planner assumes when none is declared: 10 s, Prometheus's
/// default (capped at the interval).
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which scrapers the final-scrape stage waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScrapePolicy {
    /// One scrape after the Telemetry phase began, by any scraper (the default).
    #[default]
    Any,
    /// One by every scraper seen recently whose next scrape is predicted in time: both servers
    /// of a highly available Prometheus pair.
    Every,
}

/// Builds a [`MetricsEndpoint`].
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`path`](MetricsEndpointBuilder::path) | [`DEFAULT_PATH`] (`/metrics`) |
/// | [`name`](MetricsEndpointBuilder::name) | [`DEFAULT_NAME`] (`final-scrape`) |
/// | [`policy`](MetricsEndpointBuilder::policy) | [`ScrapePolicy::Any`] |
/// | [`share`](MetricsEndpointBuilder::share) | 1/2 of what is left of the slot |
/// | [`expected_interval`](MetricsEndpointBuilder::expected_interval) | none: learned |
/// | [`expected_timeout`](MetricsEndpointBuilder::expected_timeout) | [`DEFAULT_SCRAPE_TIMEOUT`], at most the interval |
/// | [`upkeep_interval`](MetricsEndpointBuilder::upkeep_interval) | [`DEFAULT_UPKEEP_INTERVAL`] |
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct MetricsEndpointBuilder {
    address: Address,
    path: String,
    name: Cow<'static, str>,
    policy: ScrapePolicy,
    share: Share,
    expected_interval: Option<Duration>,
    expected_timeout: Option<Duration>,
    upkeep_interval: Duration,
}

impl MetricsEndpointBuilder {
    /// The path scrapes use. Default `/metrics`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// The final-scrape stage's hook name (and its name in the report). Default `final-scrape`.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Which scrapers the stage waits for. Default [`ScrapePolicy::Any`].
    pub fn policy(mut self, policy: ScrapePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How much of what is left of the slot when its stage starts the stage may wait:
    /// `num / den`. Default 1/2, as the metrics stage.
    ///
    /// # Panics
    ///
    /// If `num` is 0 or greater than `den`.
    pub fn share(mut self, num: u32, den: u32) -> Self {
        assert!(
            num > 0 && num <= den,
            "a stage's share is a fraction in (0, 1]: got {num}/{den}"
        );
        self.share = Share::new(num, den);
        self
    }

    /// The scrape interval you expect (the scrape config's `scrape_interval`): the planner
    /// checks the budget against it at [`register`](MetricsEndpoint::register), and the stage
    /// predicts with it until it has seen a scraper twice.
    pub fn expected_interval(mut self, interval: Duration) -> Self {
        self.expected_interval = Some(interval);
        self
    }

    /// The scrape timeout you expect (`scrape_timeout`), for the planner. Default 10 s, at most
    /// the interval.
    pub fn expected_timeout(mut self, timeout: Duration) -> Self {
        self.expected_timeout = Some(timeout);
        self
    }

    /// How often [`build`](MetricsEndpointBuilder::build)'s endpoint runs the recorder's upkeep.
    pub fn upkeep_interval(mut self, interval: Duration) -> Self {
        self.upkeep_interval = interval;
        self
    }

    /// Binds the address and serves `handle.render()`, running its upkeep.
    ///
    /// # Errors
    ///
    /// A [`ScrapeConfigError`] that says what to fix.
    pub fn build(self, handle: PrometheusHandle) -> Result<MetricsEndpoint, ScrapeConfigError> {
        let render = handle.clone();
        let period = self.upkeep_interval;
        let upkeep: Upkeep = Box::new(move || handle.run_upkeep());
        self.start(Arc::new(move || render.render()), Some((period, upkeep)))
    }

    /// Binds the address and serves what `render` returns: the Prometheus text format of any
    /// registry. `render` runs once per scrape on the endpoint's thread; it must not change what
    /// it renders.
    ///
    /// # Errors
    ///
    /// A [`ScrapeConfigError`] that says what to fix.
    pub fn build_with<F>(self, render: F) -> Result<MetricsEndpoint, ScrapeConfigError>
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        self.start(Arc::new(render), None)
    }

    fn start(
        self,
        render: Render,
        upkeep: Option<(Duration, Upkeep)>,
    ) -> Result<MetricsEndpoint, ScrapeConfigError> {
        if !self.path.starts_with('/') {
            return Err(ScrapeConfigError::InvalidPath { path: self.path });
        }
        for (setting, d) in [
            ("upkeep interval", Some(self.upkeep_interval)),
            ("expected interval", self.expected_interval),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(ScrapeConfigError::ZeroDuration { setting });
            }
        }
        let address = self.address.to_string();
        let candidates: Vec<SocketAddr> = match &self.address.0 {
            AddressKind::Socket(a) => vec![*a],
            AddressKind::Text(s) => s
                .to_socket_addrs()
                .map_err(|source| ScrapeConfigError::InvalidAddress {
                    address: address.clone(),
                    source,
                })?
                .collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "resolves to no address");
        let mut bound = None;
        for candidate in candidates {
            match std::net::TcpListener::bind(candidate) {
                Ok(listener) => {
                    bound = Some(listener);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let listener = bound.ok_or(ScrapeConfigError::Bind {
            address,
            source: last,
        })?;
        let local_addr = listener.local_addr().map_err(ScrapeConfigError::Start)?;
        let scrapers = Arc::new(Scrapers::default());
        let app = App {
            path: self.path,
            render,
            scrapers: scrapers.clone(),
        };
        let server = Server::start(listener, app, upkeep).map_err(ScrapeConfigError::Start)?;
        let interval = self.expected_interval;
        Ok(MetricsEndpoint {
            inner: Arc::new(Inner {
                local_addr,
                scrapers,
                server,
                wait: Wait {
                    stage: self.name,
                    policy: self.policy,
                    expected_interval: interval,
                },
                share: self.share,
                expected_timeout: self.expected_timeout,
            }),
        })
    }
}

/// A metrics endpoint that outlives the drain, and its final-scrape stage: see the
/// [module](self) docs. A cheap handle; the endpoint serves from [`build`] until it closes:
/// a registered one just before the exit (see the module docs), one that is not registered on
/// [`close`](MetricsEndpoint::close) or with the process, even once every handle is dropped.
///
/// [`build`]: MetricsEndpointBuilder::build
#[derive(Clone, Debug)]
pub struct MetricsEndpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    local_addr: SocketAddr,
    scrapers: Arc<Scrapers>,
    server: Server,
    wait: Wait,
    share: Share,
    expected_timeout: Option<Duration>,
}

impl MetricsEndpoint {
    /// A builder for an endpoint at `address`.
    pub fn builder(address: impl Into<Address>) -> MetricsEndpointBuilder {
        MetricsEndpointBuilder {
            address: address.into(),
            path: DEFAULT_PATH.to_owned(),
            name: Cow::Borrowed(DEFAULT_NAME),
            policy: ScrapePolicy::Any,
            share: Share::METRICS,
            expected_interval: None,
            expected_timeout: None,
            upkeep_interval: DEFAULT_UPKEEP_INTERVAL,
        }
    }

    /// The address it listens on (the port picked for port `0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Stops serving now: closes the listener and every connection. Returns whether this call
    /// closed it. Registered endpoints close by themselves just before the exit.
    pub fn close(&self) -> bool {
        self.inner.server.close()
    }

    /// Registers the final-scrape stage (a Telemetry hook at [`ORDER_METRICS`], and the
    /// supervisor's takeover), its line in the report, and the endpoint's closing when the run
    /// ends; checks the budget (see the module docs).
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`] if a hook of that name exists.
    pub fn register(&self, finale: &Finale) -> Result<(), ConfigError> {
        let inner = &self.inner;
        let shared = finale.shared.clone();
        let outcome: stage::Outcome = Arc::new(Mutex::new(None));
        let held = Handoff::new(());
        let share = inner.share;

        let (hook_inner, hook_held, hook_outcome, hook_shared) =
            (inner.clone(), held.clone(), outcome.clone(), shared.clone());
        finale.hook(
            Hook::new(
                Phase::Telemetry,
                inner.wait.stage.clone(),
                move |ctx: HookContext| {
                    let deadline = stage_deadline(&ctx, share);
                    let hard = ctx.deadline();
                    let start = std::time::Instant::now();
                    let std_deadline =
                        start + deadline.saturating_duration_since(tokio::time::Instant::now());
                    let trigger = hook_shared.life.trigger().unwrap_or(start);
                    let life = hook_shared.life.clone();
                    let (inner, held, outcome) = (hook_inner, hook_held, hook_outcome);
                    async move {
                        let name = format!("finale-{}", inner.wait.stage);
                        let scrapers = inner.scrapers.clone();
                        let escalated = life.clone();
                        // If the supervisor took the wait first, this reports what its wait
                        // said (bounded by the stage's deadline), not a success of its own.
                        let work = move || {
                            held.run_or_wait(std_deadline, |()| {
                                let result = stage::final_scrape(
                                    &inner.scrapers,
                                    &inner.wait,
                                    trigger,
                                    start,
                                    std_deadline,
                                    &|| escalated.escalated.is_cancelled(),
                                );
                                stage::conclude(&outcome, result)
                            })
                        };
                        let waiting = run_until(&name, hard, work);
                        tokio::pin!(waiting);
                        // A second signal ends the wait at once: the phase's deadline is then
                        // the escalation's, and the later stages need what is left of it.
                        let ended = tokio::select! {
                            ended = &mut waiting => ended,
                            () = life.escalated.cancelled() => {
                                scrapers.wake();
                                waiting.await
                            }
                        };
                        match ended {
                            Ok(OffThread::Done(result)) => result.map_err(HookError::msg),
                            Ok(OffThread::Panicked(m)) => Err(HookError::msg(m)),
                            Ok(OffThread::TimedOut) => Err(HookError::msg(
                                "the final-scrape wait did not return by the phase deadline",
                            )),
                            Err(e) => Err(HookError::new(e)),
                        }
                    }
                },
            )
            .order(ORDER_METRICS),
        )?;

        let (em_inner, em_outcome, em_life) = (inner.clone(), outcome.clone(), shared.life.clone());
        shared.add_emergency(EmergencyStage {
            name: inner.wait.stage.clone(),
            order: ORDER_METRICS,
            share,
            run: Box::new(move |deadline| {
                held.run_or_wait(deadline, |()| {
                    let start = std::time::Instant::now();
                    let trigger = em_life.trigger().unwrap_or(start);
                    let result = stage::final_scrape(
                        &em_inner.scrapers,
                        &em_inner.wait,
                        trigger,
                        start,
                        deadline,
                        &|| em_life.escalated.is_cancelled(),
                    );
                    stage::conclude(&em_outcome, result)
                })
                // The takeover names the stage delivered only if the final scrape came.
                .and_then(|()| stage::delivered(&em_outcome))
            }),
        });
        shared.add_final_scrape(Box::new(move || crate::state::lock(&outcome).clone()));

        // Close just before the exit: when the report exists, or the Finale was dropped.
        let closer = inner.clone();
        let life = shared.clone();
        inner.server.runtime().spawn(async move {
            tokio::select! {
                () = life.life.finished.cancelled() => {}
                () = life.life.dropped.cancelled() => {}
            }
            closer.server.close();
        });

        if let Some(interval) = inner.wait.expected_interval {
            let timeout = inner
                .expected_timeout
                .unwrap_or(DEFAULT_SCRAPE_TIMEOUT)
                .min(interval);
            let usable = share.usable(shared.budget.telemetry_reserve);
            for misfit in stage::plan(&shared.budget, usable, interval, timeout) {
                tracing::warn!(target: "finale", stage = %inner.wait.stage, "{misfit}");
            }
        }
        Ok(())
    }
}
