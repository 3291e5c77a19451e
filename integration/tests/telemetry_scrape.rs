//! The last scrape end to end: the `full_service` example in pull mode as a child process, a real
//! Prometheus server (Debian `prometheus`) on a free loopback port scraping it every second, a
//! real SIGTERM; and, in process, a stand-in scraper for the one misbehaviour Prometheus cannot
//! produce on demand (stalling mid-body).
//!
//! - With the final-scrape stage, Prometheus's stored request counter equals the requests the
//!   clients saw answered 2xx, and finale's own shutdown metrics are stored too.
//! - Without it, the same run loses increments.
//! - An interval longer than the stage's share: no wait, and the report says why.
//! - Two Prometheus servers and the every-scraper policy: both store the final values.
//! - A wedged runtime: the supervisor's takeover still waits for the final scrape.
//! - A scraper that stalls mid-body: the wait ends at the stage's deadline, and says so.

#![cfg(unix)]
// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use std::process::{Command, ExitStatus};

use std::time::{Duration, Instant};

use finale::prometheus::{MetricsEndpoint, ScrapeOutcome};
use finale::testing::Process;
use finale::{Finale, Signal};

use common::components::{Prometheus, wait_until};
use common::load;
use common::scratch::{Scratch, full_service};

/// Wide bound for anything that should take a second or two.
const BOUND: Duration = Duration::from_secs(20);
const INTERVAL: Duration = Duration::from_secs(1);
const LOAD_RATE: u32 = 300;
const LOAD_MAX: u64 = 10_000;

/// `full_service` in pull mode (no Pushgateway, no OTLP).
struct Service {
    process: Process,
    addr: String,
    metrics: SocketAddr,
}

impl Service {
    fn start(scratch: &Scratch, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(full_service());
        cmd.env("FULL_SERVICE_ADDR", "127.0.0.1:0")
            .env("FULL_SERVICE_LOG", scratch.log())
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("PUSHGATEWAY_URL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = Process::spawn(cmd).unwrap();
        let line = process.wait_for("metrics on http://", BOUND);
        let metrics = line
            .split("metrics on http://")
            .nth(1)
            .unwrap()
            .trim()
            .trim_end_matches("/metrics")
            .parse()
            .unwrap();
        let line = process.wait_for("listening on ", BOUND);
        let addr = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        process.wait_for("started: ready", BOUND);
        Self {
            process,
            addr,
            metrics,
        }
    }

    /// SIGTERM, then the exit: status, stderr, time from the signal.
    fn stop(mut self) -> (ExitStatus, String, Duration) {
        self.process.signal(Signal::Terminate);
        let exit = self.process.wait_exit(BOUND);
        let status = exit
            .status
            .unwrap_or_else(|| panic!("did not exit within {BOUND:?}; saw:\n{}", exit.stderr));
        (status, exit.stderr, exit.elapsed)
    }
}

/// A steady keep-alive load on `/work` on its own thread until `stop` fires; the report.
fn start_load(
    url: String,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<load::LoadReport>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(load::steady(
                &url,
                LOAD_RATE,
                LOAD_MAX,
                Duration::from_secs(5),
                async {
                    let _ = stopped.await;
                },
            ))
    });
    (stop, thread)
}

/// One run under load across SIGTERM: the requests answered 2xx, what Prometheus stored of the
/// request counter once it saw the target go, the exit status and the report.
fn run_under_load(
    name: &str,
    env: &[(&str, &str)],
) -> Option<(u64, Option<f64>, ExitStatus, String)> {
    let scratch = Scratch::new(name);
    let service = Service::start(&scratch, env);
    let prometheus = Prometheus::start(&[service.metrics], INTERVAL)?;
    // The scrapers' interval and phase are learned from a few scrapes.
    assert!(
        wait_until(BOUND, || prometheus.successful_scrapes() >= 3),
        "{}",
        prometheus.diagnostics()
    );
    let (stop_load, load) = start_load(format!("{}/work", service.addr));
    assert!(
        wait_until(BOUND, || scratch.served() >= 300),
        "the load did not get going"
    );
    let (status, out, elapsed) = service.stop();
    let _ = stop_load.send(());
    let report = load.join().unwrap();
    let ok = report.ok();
    // Every scrape before the failed one is stored.
    assert!(
        wait_until(BOUND, || prometheus.saw_target_down()),
        "{}",
        prometheus.diagnostics()
    );
    let stored = prometheus.query("max_over_time(requests_total{job=\"svc\"}[10m])");
    eprintln!(
        "{name}: {ok} answered 2xx, Prometheus stored {stored:?}; exit {status} {elapsed:?} after SIGTERM"
    );
    if env.iter().all(|(k, _)| *k != "METRICS_FINAL_SCRAPE") {
        // finale's own shutdown metrics, recorded before the Telemetry phase, are stored too.
        assert_eq!(
            prometheus
                .query("max_over_time(finale_shutdowns_total{job=\"svc\",reason=\"signal\"}[10m])"),
            Some(1.0),
            "{out}"
        );
    }
    Some((ok, stored, status, out))
}

#[test]
fn the_final_scrape_stores_every_request_answered() {
    let Some((ok, stored, status, out)) = run_under_load("lossless", &[]) else {
        return;
    };
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("scrape     final-scrape: scraped"), "{out}");
    assert!(
        out.contains("Prometheus/"),
        "the report names the scraper: {out}"
    );
    assert_eq!(stored, Some(ok as f64), "{out}");
}

#[test]
fn without_the_stage_the_last_increments_are_lost() {
    // A scrape may land by chance between the end of the drain and the exit (a few
    // milliseconds out of each second): up to three runs, one must lose.
    let mut runs = Vec::new();
    for run in 0..3 {
        let Some((ok, stored, status, out)) = run_under_load(
            &format!("no-stage-{run}"),
            &[("METRICS_FINAL_SCRAPE", "off")],
        ) else {
            return;
        };
        assert_eq!(status.code(), Some(0), "{out}");
        assert!(!out.contains("final-scrape"), "{out}");
        runs.push((ok, stored));
        if stored.is_some_and(|s| s < ok as f64) {
            return;
        }
    }
    panic!("no run lost an increment without the stage: {runs:?}");
}

#[test]
fn an_interval_longer_than_the_stage_share_does_not_wait_and_says_why() {
    let scratch = Scratch::new("too-late");
    // The stage may wait half of what is left of a 2 s total, under 1 s; Prometheus scrapes
    // every 3 s.
    let service = Service::start(
        &scratch,
        &[
            ("FINALE_TOTAL_BUDGET", "2s"),
            ("FINALE_TELEMETRY_RESERVE", "1s"),
            ("FINALE_DRAIN_DELAY", "0s"),
        ],
    );
    let Some(prometheus) = Prometheus::start(&[service.metrics], Duration::from_secs(3)) else {
        return;
    };
    assert!(wait_until(Duration::from_secs(30), || prometheus
        .successful_scrapes()
        >= 2));
    // SIGTERM just after a scrape: the next one is about 3 s away.
    let last = prometheus.last_scrape();
    assert!(wait_until(BOUND, || prometheus.last_scrape() != last));
    let (status, out, elapsed) = service.stop();
    eprintln!("too-late: exit {status} {elapsed:?} after SIGTERM");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(
        out.contains("final-scrape: did not wait: the next scrape would end"),
        "{out}"
    );
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[test]
fn two_prometheus_servers_with_the_every_scraper_policy_both_store_the_final_values() {
    let scratch = Scratch::new("every");
    let service = Service::start(&scratch, &[("METRICS_POLICY", "every")]);
    let (Some(a), Some(b)) = (
        Prometheus::start(&[service.metrics], INTERVAL),
        Prometheus::start(&[service.metrics], INTERVAL),
    ) else {
        return;
    };
    assert!(wait_until(BOUND, || a.successful_scrapes() >= 3
        && b.successful_scrapes() >= 3));
    let (status, out, elapsed) = service.stop();
    eprintln!("every: exit {status} {elapsed:?} after SIGTERM");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("final-scrape: scraped"), "{out}");
    assert!(out.contains("(+1 more)"), "both scrapers made one: {out}");
    for p in [&a, &b] {
        assert!(wait_until(BOUND, || p.saw_target_down()));
        assert_eq!(
            p.query("max_over_time(finale_shutdowns_total{job=\"svc\",reason=\"signal\"}[10m])"),
            Some(1.0),
            "{out}"
        );
    }
}

#[test]
fn a_wedged_runtime_still_waits_for_the_final_scrape() {
    // A Workers hook blocks the only runtime thread: the supervisor takes over, runs the
    // final-scrape stage on its own thread, and the endpoint (on finale's thread) answers.
    let Some((ok, stored, status, out)) = run_under_load(
        "wedged",
        &[
            ("FULL_SERVICE_RUNTIME", "current_thread"),
            ("FULL_SERVICE_BLOCK_WORKERS_MS", "30000"),
            ("FINALE_TOTAL_BUDGET", "6s"),
            ("FINALE_TELEMETRY_RESERVE", "3s"),
            // Keep the check of finale's own metrics out: the wedged sequence never records them.
            ("METRICS_FINAL_SCRAPE", "on"),
        ],
    ) else {
        return;
    };
    assert_eq!(status.code(), Some(5), "{out}");
    assert!(out.contains("final scrape: final-scrape: scraped"), "{out}");
    assert_eq!(stored, Some(ok as f64), "{out}");
}

/// A stand-in scraper: Prometheus cannot be made to stop reading mid-body on demand.
fn scrape(addr: SocketAddr, read_body: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(
        // A timeout within the 300 ms interval, as Prometheus requires of its config.
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nuser-agent: Prometheus/stand-in\r\n\
          x-prometheus-scrape-timeout-seconds: 0.25\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    if read_body {
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).unwrap();
    } else {
        let mut head = [0u8; 64];
        let _ = s.read(&mut head).unwrap();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraper_that_stalls_mid_body_is_bounded_and_named() {
    // 32 MiB: more than the kernel's socket buffers on both sides hold.
    let line = "stall_total{i=\"0123456789\"} 1\n";
    let body: std::sync::Arc<str> = line.repeat(32 * 1024 * 1024 / line.len()).into();
    let finale = Finale::builder()
        .no_signals()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(3))
        .telemetry_reserve(Duration::from_secs(2))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .build_with(move || body.to_string())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let scraper = tokio::task::spawn_blocking(move || {
        // Two full scrapes 300 ms apart teach the interval; the trigger comes right after the
        // second, and the third (predicted 300 ms later, inside the stage's ~1.4 s) stalls.
        let first = Instant::now();
        drop(scrape(addr, true));
        std::thread::sleep(Duration::from_millis(300).saturating_sub(first.elapsed()));
        drop(scrape(addr, true));
        handle.trigger("test");
        std::thread::sleep(Duration::from_millis(600).saturating_sub(first.elapsed()));
        let stalled = scrape(addr, false);
        (stalled, Instant::now())
    });
    let report = run.await.unwrap();
    let (_stalled, _) = scraper.await.unwrap();
    eprintln!("{report}");
    let line = &report.final_scrapes[0];
    assert!(
        matches!(&line.outcome, ScrapeOutcome::Missed { waiting_for } if waiting_for.iter().any(|w| w.contains("Prometheus/stand-in"))),
        "{report}"
    );
    assert!(line.scrapes.is_empty(), "{report}");
    assert_eq!(report.status, finale::ShutdownStatus::TelemetryNotDelivered);
    let telemetry = report.phase(finale::Phase::Telemetry).unwrap();
    assert!(telemetry.duration < Duration::from_secs(2), "{report}");
}

#[test]
fn the_endpoint_answers_while_the_runtime_that_built_it_is_blocked() {
    let (built, endpoint) = std::sync::mpsc::channel();
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let owner = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let e = MetricsEndpoint::builder("127.0.0.1:0")
                    .build_with(|| "up 1\n".to_owned())
                    .unwrap();
                built.send(e.clone()).unwrap();
                // The runtime's only thread blocks.
                let _ = blocked.recv();
                e
            })
    });
    let endpoint: MetricsEndpoint = endpoint.recv().unwrap();
    let r = common::components::http_request(
        "GET",
        &format!("http://{}/metrics", endpoint.local_addr()),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "up 1\n");
    // Other paths are 404, never 503.
    let r = common::components::http_request(
        "GET",
        &format!("http://{}/other", endpoint.local_addr()),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 404);
    drop(release);
    let _ = owner.join();
}

#[test]
fn a_bad_or_taken_address_is_a_typed_error_at_build() {
    use finale::prometheus::ScrapeConfigError;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = MetricsEndpoint::builder(taken.local_addr().unwrap())
        .build_with(String::new)
        .unwrap_err();
    assert!(matches!(err, ScrapeConfigError::Bind { .. }), "{err}");
    let err = MetricsEndpoint::builder("not an address")
        .build_with(String::new)
        .unwrap_err();
    assert!(
        matches!(err, ScrapeConfigError::InvalidAddress { .. }),
        "{err}"
    );
    let e = MetricsEndpoint::builder("localhost:0")
        .build_with(String::new)
        .unwrap();
    assert_ne!(e.local_addr().port(), 0);
}

#[test]
fn the_planner_warns_at_start_when_the_grace_period_cannot_hold_a_scrape_interval() {
    // A 30 s grace period, a 25 s budget, and a declared 60 s interval: no final scrape can fit.
    let scratch = Scratch::new("planner");
    let service = Service::start(
        &scratch,
        &[
            ("FINALE_GRACE_PERIOD", "30s"),
            ("FINALE_SAFETY_MARGIN", "2s"),
            ("FINALE_TOTAL_BUDGET", "25s"),
            ("METRICS_INTERVAL", "60s"),
        ],
    );
    let (status, out, _) = service.stop();
    assert!(
        out.contains("cannot hold the drain delay") && out.contains("one scrape interval 60s"),
        "{out}"
    );
    assert!(out.contains("raise the telemetry reserve"), "{out}");
    assert_eq!(status.code(), Some(0), "{out}");
    // Nobody scraped: the stage did not wait, and the report says why.
    assert!(
        out.contains("final-scrape: did not wait: no scrape was ever seen"),
        "{out}"
    );
}

/// The operations guide's worked example (15 s interval, 1 s timeout, grace period 45 s), with
/// its settings as the guide gives them: the planner neither fails the build nor warns.
#[test]
fn the_guides_worked_example_passes_the_planner() {
    let scratch = Scratch::new("guide");
    let service = Service::start(
        &scratch,
        &[
            ("METRICS_INTERVAL", "15s"),
            ("METRICS_TIMEOUT", "1s"),
            ("FINALE_GRACE_PERIOD", "45s"),
            ("FINALE_TOTAL_BUDGET", "43s"),
            ("FINALE_SAFETY_MARGIN", "2s"),
            ("FINALE_DRAIN_DELAY", "5s"),
            ("FINALE_ANNOUNCE_TIMEOUT", "1s"),
            ("FINALE_DRAIN_TIMEOUT", "2s"),
            ("FINALE_WORKERS_TIMEOUT", "2s"),
            ("FINALE_TELEMETRY_RESERVE", "33s"),
        ],
    );
    let (_, out, _) = service.stop();
    let warned: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.contains("cannot hold")
                || l.contains("raise the telemetry reserve")
                || l.contains("does not fit")
        })
        .collect();
    assert!(warned.is_empty(), "{warned:#?}\n{out}");
    assert!(out.contains("final-scrape"), "{out}");
}

#[test]
fn full_service_with_its_metrics_address_taken_exits_3_without_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let scratch = Scratch::new("taken");
    let mut cmd = Command::new(full_service());
    cmd.env("FULL_SERVICE_ADDR", "127.0.0.1:0")
        .env("FULL_SERVICE_LOG", scratch.log())
        .env("METRICS_ADDR", taken.local_addr().unwrap().to_string())
        .env("NO_COLOR", "1");
    let exit = Process::spawn(cmd).unwrap().wait_exit(BOUND);
    assert_eq!(exit.code(), Some(3), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("metrics endpoint cannot bind"),
        "{}",
        exit.stderr
    );
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_through_the_shutdown_and_closes_when_the_run_ends() {
    let finale = Finale::builder()
        .no_signals()
        .drain_delay(Duration::ZERO)
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let get = move || {
        common::components::http_request("GET", &format!("http://{addr}/metrics"), &[], &[])
            .map(|r| r.status)
    };
    // Answers in every phase: a Workers hook asks it.
    let in_workers = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = in_workers.clone();
    finale
        .hook(finale::Hook::new(
            finale::Phase::Workers,
            "ask",
            move |_| {
                let seen = seen.clone();
                async move {
                    let status = tokio::task::spawn_blocking(get).await.unwrap();
                    *seen.lock().unwrap() = Some(status.ok());
                }
            },
        ))
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.trigger("test");
    let report = run.await.unwrap();
    assert_eq!(*in_workers.lock().unwrap(), Some(Some(200)), "{report}");
    // The hook's GET was the only scrape: no interval to predict with, so the stage did not
    // wait, and says so.
    assert_eq!(
        report.final_scrapes[0].outcome,
        ScrapeOutcome::IntervalUnknown,
        "{report}"
    );
    // Once the report exists the endpoint closes.
    assert!(
        wait_until(BOUND, || TcpStream::connect(addr).is_err()),
        "still accepting after the run"
    );
}
