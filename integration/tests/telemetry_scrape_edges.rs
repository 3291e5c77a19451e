//! The last scrape at its edges, in process with stand-in scrapers (plain sockets that scrape
//! at the instants a test needs: a real Prometheus cannot be told to be 80 ms late, or to send
//! a second signal mid-wait), and with real Prometheus servers behind haproxy where the edge is
//! theirs:
//!
//! - a second signal during the wait ends it, and the later Telemetry stages still run;
//! - a scrape a little late at the Telemetry phase's start is waited for, not skipped;
//! - the supervisor's takeover names the stage delivered only if a final scrape came.

#![cfg(unix)]
// The tests report what they saw (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use finale::prometheus::{MetricsEndpoint, ScrapeOutcome};
use finale::testing::Process;
use finale::{Hook, Phase, Signal};

const BOUND: Duration = Duration::from_secs(30);

/// One scrape on a new connection (`Connection: close`), read to the end.
fn get(addr: SocketAddr, ua: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nuser-agent: {ua}\r\n\
         x-prometheus-scrape-timeout-seconds: 0.5\r\nconnection: close\r\n\r\n"
    )?;
    let mut sink = Vec::new();
    s.read_to_end(&mut sink)?;
    if sink.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200"))
    }
}

/// One scrape on a kept-alive connection, as Prometheus does.
fn get_kept_alive(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nuser-agent: Prometheus/2.42.0\r\n\
          x-prometheus-scrape-timeout-seconds: 0.5\r\n\r\n",
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(())
}

/// The stand-in scraper's clock: it scrapes at set instants (a schedule, not a synchronisation).
fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// A second signal while the stage waits for a scrape predicted 3 s out: the wait ends at the
/// escalation and says so, and the later Telemetry stage (traces and logs) still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_wait_and_the_later_stages_still_run() {
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(20))
        .telemetry_reserve(Duration::from_secs(10))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .expected_interval(Duration::from_secs(3))
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let flushed = Arc::new(AtomicBool::new(false));
    let f = flushed.clone();
    finale
        .hook(
            Hook::new(Phase::Telemetry, "later-flush", move |_| {
                let f = f.clone();
                async move { f.store(true, Ordering::SeqCst) }
            })
            .order(finale::ORDER_TRACES_LOGS),
        )
        .unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    // One scrape; with the declared 3 s interval the next is predicted 3 s later, inside the
    // stage's share (~5 s): the stage waits.
    tokio::task::spawn_blocking(move || get(addr, "Prometheus/2.42.0"))
        .await
        .unwrap()
        .unwrap();
    handle.trigger("test");
    handle.phase_started(Phase::Telemetry).await;
    // Whether the stage is already waiting or about to, the outcome must be the same; 300 ms
    // makes the case of a wait under way the likely one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(handle.escalate(), "the second signal escalates");
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    eprintln!("{report}");
    assert!(
        flushed.load(Ordering::SeqCst),
        "after the second signal, the later telemetry stage never ran:\n{report}"
    );
    let line = report
        .final_scrapes
        .first()
        .unwrap_or_else(|| panic!("no line for the final-scrape stage:\n{report}"));
    assert_eq!(line.outcome, ScrapeOutcome::Escalated, "{line}");
    assert!(line.waited < Duration::from_secs(2), "{line}");
}

/// The clock edge: the Telemetry phase begins 20 ms after a scrape was due, and that scrape is
/// 80 ms late. The stage must wait for it, not predict the one an interval later and exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_slightly_late_at_the_telemetry_start_is_waited_for() {
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_millis(1800))
        .telemetry_reserve(Duration::from_millis(900))
        .escalation_budget(Duration::from_millis(500))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let base = Instant::now() + Duration::from_millis(100);
    let scraper = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for k in 0..4u32 {
            sleep_until(base + Duration::from_secs(1) * k);
            get_kept_alive(&mut s).unwrap();
        }
        // Due at 4.0 s; arrives at 4.08 s.
        sleep_until(base + Duration::from_millis(4080));
        get_kept_alive(&mut s)
    });
    tokio::time::sleep_until((base + Duration::from_millis(4020)).into()).await;
    handle.trigger("test");
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    let late = scraper.join().unwrap();
    eprintln!("{report}\nthe late scrape: {late:?}");
    let line = &report.final_scrapes[0];
    assert_eq!(line.outcome, ScrapeOutcome::Scraped, "{line}");
    assert!(late.is_ok(), "the late scrape got {late:?}");
}

/// A wedged runtime, nobody scraping: the takeover runs the stage, which does not wait (no
/// scrape was ever seen). The termination message must not name the stage delivered.
#[test]
fn the_takeover_names_the_stage_delivered_only_if_a_scrape_came() {
    let dir = std::env::temp_dir().join(format!(
        "finale-scrape-edges-{}-{}",
        std::process::id(),
        common::components::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let term = dir.join("termination-log");
    let mut cmd = Command::new(common::examples::example("full_service"));
    cmd.env("FULL_SERVICE_ADDR", "127.0.0.1:0")
        .env("FULL_SERVICE_LOG", dir.join("service.log"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("FULL_SERVICE_RUNTIME", "current_thread")
        .env("FULL_SERVICE_BLOCK_WORKERS_MS", "30000")
        .env("FINALE_TOTAL_BUDGET", "6s")
        .env("FINALE_TELEMETRY_RESERVE", "3s")
        .env("FINALE_DRAIN_DELAY", "0s")
        .env("FINALE_TERMINATION_LOG", &term)
        .env_remove("PUSHGATEWAY_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    let mut p = Process::spawn(cmd).unwrap();
    p.wait_for("started: ready", BOUND);
    p.signal(Signal::Terminate);
    let exit = p.wait_exit(BOUND);
    let message = std::fs::read_to_string(&term).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("exit {:?}\nmessage: {message}", exit.code());
    assert_eq!(exit.code(), Some(5), "{}", exit.output());
    assert!(
        exit.output().contains("no scrape was ever seen"),
        "{}",
        exit.output()
    );
    let list = |key: &str| -> Vec<String> {
        message
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .map(|v| v.trim_matches('"').split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    assert!(
        !list("delivered=").iter().any(|s| s == "final-scrape"),
        "named delivered though no scrape came: {message}"
    );
    assert!(
        list("not_delivered=").iter().any(|s| s == "final-scrape"),
        "{message}"
    );
}
