//! The last scrape at its edges, in process with stand-in scrapers (plain sockets that scrape
//! at the instants a test needs: a real Prometheus cannot be told to be 80 ms late, or to send
//! a second signal mid-wait), and with real Prometheus servers behind haproxy where the edge is
//! theirs:
//!
//! - a second signal during the wait ends it, and the later Telemetry stages still run;
//! - a scrape a little late at the Telemetry phase's start is waited for, not skipped;
//! - the supervisor's takeover names the stage delivered only if a final scrape came;
//! - scrapers behind one address (a proxy, a NAT) stay apart, a stranger never stands in for
//!   a scraper waited for, and what cannot be told apart is what the docs say;
//! - the endpoint bounds a half-sent request head and the number of connections.

#![cfg(unix)]
// The tests report what they saw (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finale::prometheus::{MetricsEndpoint, ScrapeOutcome, ScrapePolicy};
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

/// The clock edge: the Telemetry phase begins just after a scrape was due (within the 100 ms
/// slack at a 1 s interval), and that scrape comes late, 30 ms after the phase began. The stage
/// must wait for it, not predict the one an interval later and exit. The phase's start is
/// measured; on a machine so loaded that it began past the slack, the attempt cannot probe the
/// edge and is run again (at most three times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_slightly_late_at_the_telemetry_start_is_waited_for() {
    for attempt in 1..=3 {
        if let Some(line) = slightly_late_attempt().await {
            assert_eq!(line.outcome, ScrapeOutcome::Scraped, "{line}");
            return;
        }
        eprintln!("attempt {attempt}: the Telemetry phase began past the slack; again");
    }
    panic!("the Telemetry phase never began within 100 ms of the trigger");
}

/// One run; `None` if the Telemetry phase began more than 70 ms after the scrape was due.
async fn slightly_late_attempt() -> Option<finale::FinalScrape> {
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
    let due = base + Duration::from_secs(4);
    let (began_tx, began_rx) = std::sync::mpsc::channel::<Instant>();
    let scraper = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for k in 0..4u32 {
            sleep_until(base + Duration::from_secs(1) * k);
            get_kept_alive(&mut s).unwrap();
        }
        // Due at 4.0 s; comes 30 ms after the Telemetry phase began.
        let began = began_rx.recv().unwrap();
        sleep_until(began + Duration::from_millis(30));
        get_kept_alive(&mut s)
    });
    tokio::time::sleep_until((due + Duration::from_millis(10)).into()).await;
    handle.trigger("test");
    handle.phase_started(Phase::Telemetry).await;
    let began = Instant::now();
    began_tx.send(began).unwrap();
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    let late = scraper.join().unwrap();
    eprintln!(
        "{report}\nthe phase began {:?} after the due time; the late scrape: {late:?}",
        began.saturating_duration_since(due)
    );
    if began.saturating_duration_since(due) > Duration::from_millis(70) {
        return None;
    }
    assert!(late.is_ok(), "the late scrape got {late:?}");
    Some(report.final_scrapes[0].clone())
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

/// Two Prometheus servers behind one address (a NAT, a proxy that does not keep the
/// connection, `option http-server-close`), same version, a new connection per scrape.
/// `ScrapePolicy::Every`: "every scraper seen recently ... must have made one".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_with_two_scrapers_behind_one_address_waits_for_both() {
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(10))
        .telemetry_reserve(Duration::from_secs(5))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .policy(ScrapePolicy::Every)
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<(&str, Instant)>::new()));
    let base = Instant::now() + Duration::from_millis(100);
    let mut threads = Vec::new();
    for (name, offset) in [("A", 0u64), ("B", 400)] {
        let (stop, log) = (stop.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            for k in 0..12u32 {
                sleep_until(base + Duration::from_millis(offset) + Duration::from_secs(1) * k);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if get(addr, "Prometheus/2.42.0").is_ok() {
                    log.lock().unwrap().push((name, Instant::now()));
                }
            }
        }));
    }
    // Both seen 4 times; the trigger at 3.7 s: A is due at 4.0 s, B at 4.4 s.
    tokio::time::sleep_until((base + Duration::from_millis(3700)).into()).await;
    handle.trigger("test");
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    stop.store(true, Ordering::SeqCst);
    eprintln!("{report}");
    let line = &report.final_scrapes[0];
    assert_eq!(line.outcome, ScrapeOutcome::Scraped, "{report}");
    assert!(
        line.scrapes.len() >= 2,
        "Every waited for one scrape, not one per scraper (A and B were merged into one \
         scraper): {:?}\n{report}",
        line.scrapes
    );
    for t in threads {
        let _ = t.join();
    }
}

/// `ScrapePolicy::Every` and the model's bound: a scraper waited for (its connection closed,
/// as after each `Connection: close` scrape) is evicted by one-off clients during the wait, and
/// its slot is reused. A scrape by the stranger must not count for
/// the scraper waited for: the stage says `missed`, since the scraper waited for never came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_is_not_satisfied_by_a_stranger_that_took_the_scrapers_slot() {
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(4))
        .telemetry_reserve(Duration::from_secs(2))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .policy(ScrapePolicy::Every)
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let h = handle.clone();
    tokio::task::spawn_blocking(move || {
        let base = Instant::now();
        for k in 0..3u32 {
            sleep_until(base + Duration::from_millis(300) * k);
            get(addr, "Prometheus/A").unwrap();
        }
        h.trigger("test");
    })
    .await
    .unwrap();
    handle.phase_started(Phase::Telemetry).await;
    // 64 one-off clients (curl sessions, probes) while the stage waits for A.
    tokio::task::spawn_blocking(move || {
        for n in 0..64 {
            let _ = get(addr, &format!("stranger/{n}"));
        }
    })
    .await
    .unwrap();
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    eprintln!("{report}");
    let line = &report.final_scrapes[0];
    assert!(
        matches!(line.outcome, ScrapeOutcome::Missed { .. }),
        "A never scraped after the trigger, yet the stage says {:?}; scrapes: {:?}\n{report}",
        line.outcome,
        line.scrapes
            .iter()
            .map(|s| s.user_agent.clone())
            .collect::<Vec<_>>()
    );
}

/// Two scrapers behind one address at the same offset (an HA pair with one offset seed,
/// behind a proxy): a new connection each, the same `User-Agent`, 3 s interval, 5 ms apart. The stage's
/// share (~0.9 s) cannot hold a 3 s interval: the docs say it does not wait and the report says
/// why (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_longer_than_the_share_behind_one_address_does_not_wait() {
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(2))
        .telemetry_reserve(Duration::from_secs(1))
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
    let h = handle.clone();
    tokio::task::spawn_blocking(move || {
        let base = Instant::now();
        for k in 0..3u32 {
            sleep_until(base + Duration::from_secs(3) * k);
            get(addr, "Prometheus/2.42.0").unwrap();
            std::thread::sleep(Duration::from_millis(5));
            get(addr, "Prometheus/2.42.0").unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        h.trigger("test");
    })
    .await
    .unwrap();
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    eprintln!("{report}");
    let line = &report.final_scrapes[0];
    assert!(
        matches!(line.outcome, ScrapeOutcome::TooLate { .. }),
        "the next scrape is ~2.8 s away, past the stage's deadline, yet: {line} (exit {})",
        report.exit_code
    );
}

/// What `ScrapePolicy::Every` can and cannot tell: a scraper that stopped (its target was
/// dropped) looks, until two of its intervals and its timeout have passed, like one whose next
/// scrape is still to come. Scraper A stops 100 ms before the trigger; B goes on. The stage
/// waits for A, ends `missed` naming A, and the termination message's line says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waits_for_a_scraper_that_stopped_recently_and_names_it() {
    let term = std::env::temp_dir().join(format!(
        "finale-scrape-edges-term-{}-{}",
        std::process::id(),
        common::components::free_port()
    ));
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(4))
        .telemetry_reserve(Duration::from_secs(2))
        .termination_log(finale::TerminationLog::Path(term.clone()))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .policy(ScrapePolicy::Every)
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    endpoint.register(&finale).unwrap();
    let addr = endpoint.local_addr();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let base = Instant::now() + Duration::from_millis(100);
    let (a_addr_tx, a_addr) = std::sync::mpsc::channel();
    let a = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        a_addr_tx.send(s.local_addr().unwrap()).unwrap();
        for k in 0..4u32 {
            sleep_until(base + Duration::from_millis(300) * k);
            get_kept_alive(&mut s).unwrap();
        }
        // Stopped (the target was dropped); the connection stays idle.
        std::thread::sleep(Duration::from_secs(3));
    });
    let b = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        for k in 0..10u32 {
            sleep_until(base + Duration::from_millis(150) + Duration::from_millis(300) * k);
            if get_kept_alive(&mut s).is_err() {
                break;
            }
        }
    });
    // A's last scrape at 0.9 s; the trigger at 1.0 s; B at 1.05 s.
    tokio::time::sleep_until((base + Duration::from_millis(1000)).into()).await;
    handle.trigger("test");
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    let message = std::fs::read_to_string(&term).unwrap_or_default();
    let _ = std::fs::remove_file(&term);
    let _ = (a.join(), b.join());
    eprintln!("{report}\ntermination message:\n{message}");
    let a_addr = a_addr.recv().unwrap().to_string();
    let line = &report.final_scrapes[0];
    assert!(
        matches!(&line.outcome, ScrapeOutcome::Missed { waiting_for }
            if waiting_for.len() == 1 && waiting_for[0].starts_with(&a_addr)),
        "{line}"
    );
    assert!(!line.scrapes.is_empty(), "B's scrape is listed: {line}");
    let scrape_line = message.lines().find(|l| l.starts_with("scrape=")).unwrap();
    assert!(
        scrape_line.contains("outcome=missed") && scrape_line.contains(&a_addr),
        "{scrape_line}"
    );
}

/// A child killed on drop (by this process's own handle to it).
struct Child(std::process::Child, std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "finale-scrape-edges-{name}-{}-{}",
        std::process::id(),
        common::components::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ready(url: &str) -> bool {
    common::components::http_request("GET", url, &[], &[]).is_ok_and(|r| r.status == 200)
}

fn prometheus(target: SocketAddr, replica: &str) -> (Child, u16) {
    let dir = scratch(&format!("prom-{replica}"));
    let port = common::components::free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n  external_labels:\n    replica: {replica}\n\
         scrape_configs:\n  - job_name: svc\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child, dir);
    assert!(common::components::wait_until(BOUND, || ready(&format!(
        "http://127.0.0.1:{port}/-/ready"
    ))));
    (child, port)
}

fn query(port: u16, promql: &str) -> Option<f64> {
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        common::components::url_encode(promql)
    );
    let r = common::components::http_request("GET", &url, &[], &[]).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    json["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

/// The HA pair for real: two Prometheus 2.42 servers (replica a and b) scrape the endpoint
/// through haproxy (`mode http`, `option http-server-close`: one address, a new upstream
/// connection per scrape, the same `User-Agent`). `ScrapePolicy::Every` must let the process
/// exit only once both have read the final values: both store `final_marker 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_with_a_real_prometheus_pair_behind_haproxy_stores_the_final_value_in_both() {
    if !common::components::require("haproxy") || !common::components::require("prometheus") {
        return;
    }
    let marker = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let m = marker.clone();
    let finale = finale::testing::builder()
        .drain_delay(Duration::ZERO)
        .total_budget(Duration::from_secs(10))
        .telemetry_reserve(Duration::from_secs(5))
        .build()
        .unwrap();
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .policy(ScrapePolicy::Every)
        .build_with(move || {
            format!(
                "# TYPE final_marker gauge\nfinal_marker {}\n",
                m.load(Ordering::SeqCst)
            )
        })
        .unwrap();
    endpoint.register(&finale).unwrap();
    // The shutdown records its final value in Workers, as a service's shutdown errors would be.
    let m = marker.clone();
    finale
        .hook(Hook::new(Phase::Workers, "record", move |_| {
            let m = m.clone();
            async move { m.store(1, Ordering::SeqCst) }
        }))
        .unwrap();
    let dir = scratch("haproxy");
    let front = common::components::free_port();
    let cfg = format!(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n  \
         option http-server-close\nfrontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n\
         backend b\n  server s1 {}\n",
        endpoint.local_addr()
    );
    std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
    let haproxy = Child(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        dir,
    );
    let target: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let ((_a, pa), (_b, pb)) =
        tokio::task::spawn_blocking(move || (prometheus(target, "a"), prometheus(target, "b")))
            .await
            .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    let learned = tokio::task::spawn_blocking(move || {
        common::components::wait_until(BOUND, || {
            [pa, pb]
                .iter()
                .all(|p| query(*p, "sum_over_time(up{job=\"svc\"}[10m])").is_some_and(|v| v >= 4.0))
        })
    })
    .await
    .unwrap();
    assert!(learned, "both Prometheus servers scrape through haproxy");
    handle.trigger("test");
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    eprintln!("{report}");
    let stored = tokio::task::spawn_blocking(move || {
        for p in [pa, pb] {
            common::components::wait_until(BOUND, || {
                query(p, "min_over_time(up{job=\"svc\"}[10m])") == Some(0.0)
            });
        }
        [pa, pb].map(|p| query(p, "max_over_time(final_marker{job=\"svc\"}[10m])"))
    })
    .await
    .unwrap();
    drop(haproxy);
    eprintln!("final_marker stored by replica a, b: {stored:?}");
    assert_eq!(
        stored,
        [Some(1.0), Some(1.0)],
        "under ScrapePolicy::Every one replica of the pair never read the final value:\n{report}"
    );
}

/// Half a request head, then nothing: the endpoint closes the connection at the head timeout
/// (10 s), as finale's own servers do.
#[test]
fn a_half_sent_request_head_is_closed_at_the_head_timeout() {
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    let mut s = TcpStream::connect(endpoint.local_addr()).unwrap();
    let sent = Instant::now();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    let after = sent.elapsed();
    eprintln!("closed after {after:?}: {r:?}");
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "still open after {after:?}: {r:?}"
    );
    assert!(after >= Duration::from_secs(9), "{after:?}");
    endpoint.close();
}

/// 256 connections that send nothing hold every slot: the next one is closed at accept, and a
/// slot freed serves a scrape again.
#[test]
fn connections_past_the_bound_are_closed_at_accept() {
    let endpoint = MetricsEndpoint::builder("127.0.0.1:0")
        .build_with(|| "up 1\n".to_owned())
        .unwrap();
    let addr = endpoint.local_addr();
    let mut held: Vec<TcpStream> = (0..256)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Each held connection is served (its slot taken) once a scrape on it is answered.
    for s in held.iter_mut().take(1) {
        get_kept_alive(s).unwrap();
    }
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    let r = extra.read(&mut buf);
    assert!(
        matches!(r, Ok(0))
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the 257th connection was not closed: {r:?}"
    );
    drop(held.pop());
    let served = common::components::wait_until(Duration::from_secs(10), || {
        get(addr, "Prometheus/2.42.0").is_ok()
    });
    assert!(served, "a freed slot does not serve again");
    endpoint.close();
}
