//! Users' own telemetry stages ([`Sink`]): a blocking flush to a real UDP socket is counted in
//! the report, a hung one is abandoned at its share while the next stage still delivers, an
//! async one runs under the same deadline, and the `statsd_sink` example delivers on SIGTERM and,
//! from the supervisor, when its runtime is wedged.

#![allow(clippy::print_stderr)]

mod common;

use std::net::UdpSocket;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use finale::{Environment, Finale, Items, ORDER_METRICS, Outcome, ShutdownStatus, Sink};

fn finale(total: Duration, reserve: Duration) -> Finale {
    Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(Environment::Local)
        .total_budget(total)
        .telemetry_reserve(reserve)
        .build()
        .unwrap()
}

/// A UDP listener on a free loopback port, standing in for StatsD.
fn listener() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    (socket, addr)
}

/// The packets `socket` receives until `n` arrived or none came for `quiet` (a bound, not a
/// synchronisation: the sender is done when this is called).
fn received(socket: &UdpSocket, n: usize, quiet: Duration) -> Vec<String> {
    socket.set_read_timeout(Some(quiet)).unwrap();
    let mut packets = Vec::new();
    let mut buf = [0u8; 1500];
    while packets.len() < n {
        match socket.recv(&mut buf) {
            Ok(len) => packets.push(String::from_utf8_lossy(&buf[..len]).into_owned()),
            Err(_) => break,
        }
    }
    packets
}

fn send_packets(addr: &str, n: u64, ctx: &finale::SinkContext) -> std::io::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(addr)?;
    socket.set_write_timeout(Some(ctx.remaining()))?;
    for i in 0..n {
        socket.send(format!("test.packet:{i}|c").as_bytes())?;
        ctx.counter().exported(1);
    }
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn a_blocking_sink_delivers_to_a_real_socket_and_is_counted() {
    let (socket, addr) = listener();
    let finale = finale(Duration::from_secs(10), Duration::from_secs(5));
    let sink = Sink::blocking("udp", move |ctx| send_packets(&addr, 100, ctx)).counts(Items::Other);
    // Counts the application makes during the run land in the run's column.
    sink.counter().exported(7);
    sink.register(&finale).unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    let packets = received(&socket, 100, Duration::from_secs(5));
    eprintln!("udp sink: {} packets received\n{report}", packets.len());
    assert_eq!(packets.len(), 100);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.entry("udp").unwrap().outcome.is_completed());
    let delivery = report.delivery("udp").expect("counted");
    assert_eq!(delivery.items, Items::Other);
    assert_eq!(delivery.run.exported, 7, "{report}");
    assert_eq!(delivery.at_exit.exported, 100, "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_hung_sink_is_abandoned_at_its_share_and_the_next_stage_still_delivers() {
    let (socket, addr) = listener();
    let total = Duration::from_secs(4);
    let finale = finale(total, Duration::from_secs(3));
    // A backend that never answers: the flush blocks its thread for good.
    let (_never, hang) = mpsc::channel::<()>();
    Sink::blocking("hung", move |_ctx| {
        let _ = hang.recv();
    })
    .order(ORDER_METRICS)
    .share(1, 2)
    .register(&finale)
    .unwrap();
    Sink::blocking("after", move |ctx| send_packets(&addr, 1, ctx))
        .order(150)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let start = Instant::now();
    let report = finale.run().await;
    let elapsed = start.elapsed();
    eprintln!("hung sink: {elapsed:?}\n{report}");
    let Outcome::Failed(error) = &report.entry("hung").unwrap().outcome else {
        panic!("{report}");
    };
    assert!(error.to_string().contains("did not finish"), "{error}");
    assert!(report.entry("after").unwrap().outcome.is_completed());
    assert_eq!(received(&socket, 1, Duration::from_secs(5)).len(), 1);
    assert_eq!(
        report.status,
        ShutdownStatus::TelemetryNotDelivered,
        "{report}"
    );
    // Half of the 3 s slot, then the next stage: well within the total.
    assert!(elapsed < total, "{elapsed:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_async_sink_runs_on_the_runtime_under_its_deadline() {
    let (socket, addr) = listener();
    let finale = finale(Duration::from_secs(4), Duration::from_secs(3));
    Sink::future("async-udp", move |ctx| async move {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(&addr).await?;
        for i in 0..10 {
            socket.send(format!("async:{i}|c").as_bytes()).await?;
            ctx.counter().exported(1);
        }
        Ok::<(), std::io::Error>(())
    })
    .counts(Items::Other)
    .register(&finale)
    .unwrap();
    Sink::future("pending", |_ctx| std::future::pending::<()>())
        .share(1, 3)
        .register(&finale)
        .unwrap();
    finale.handle().trigger("test");
    let report = finale.run().await;
    assert_eq!(received(&socket, 10, Duration::from_secs(5)).len(), 10);
    assert_eq!(
        report.delivery("async-udp").unwrap().at_exit.exported,
        10,
        "{report}"
    );
    let Outcome::Failed(error) = &report.entry("pending").unwrap().outcome else {
        panic!("{report}");
    };
    assert!(error.to_string().contains("deadline"), "{error}");
}

#[cfg(unix)]
mod example {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::Duration;

    use finale::Signal;
    use finale::testing::Process;

    use super::{listener, received};

    fn statsd_sink() -> PathBuf {
        static PATH: OnceLock<PathBuf> = OnceLock::new();
        PATH.get_or_init(|| crate::common::examples::example("statsd_sink"))
            .clone()
    }

    fn start(addr: &str, env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(statsd_sink());
        cmd.env("STATSD_ADDR", addr).env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Process::spawn(cmd).unwrap()
    }

    #[test]
    fn the_statsd_example_flushes_its_counters_on_sigterm() {
        let (socket, addr) = listener();
        let mut s = start(&addr, &[]);
        s.wait_for("started: ready", Duration::from_secs(10));
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(Duration::from_secs(30));
        let packets = received(&socket, 3, Duration::from_secs(5));
        eprintln!("statsd example: {exit}, packets {packets:?}");
        assert_eq!(exit.code(), Some(0), "{}", exit.stderr);
        for name in ["app.started:1|c", "app.stopped:1|c"] {
            assert!(packets.iter().any(|p| p == name), "{name}: {packets:?}");
        }
        let exported = format!("at exit: {} exported, 0 failed", packets.len());
        assert!(
            exit.stderr
                .lines()
                .any(|l| l.contains("delivered  statsd") && l.contains(&exported)),
            "{}",
            exit.stderr
        );
    }

    #[test]
    fn the_supervisor_runs_the_blocking_sink_when_the_runtime_is_wedged() {
        let (socket, addr) = listener();
        let mut s = start(
            &addr,
            &[
                ("STATSD_BLOCK_WORKERS_MS", "8000"),
                ("FINALE_TOTAL_BUDGET", "2s"),
                ("FINALE_TELEMETRY_RESERVE", "1s"),
                ("FINALE_SAFETY_MARGIN", "500ms"),
            ],
        );
        s.wait_for("started: ready", Duration::from_secs(10));
        s.signal(Signal::Terminate);
        let exit = s.wait_exit(Duration::from_secs(12));
        let packets = received(&socket, 3, Duration::from_secs(5));
        eprintln!(
            "wedged statsd example: {exit} after {} ms, packets {packets:?}",
            exit.elapsed.as_millis()
        );
        // The deadline-overrun code, from the supervisor, long before the 8 s block ends.
        assert_eq!(exit.code(), Some(5), "{}", exit.stderr);
        assert!(exit.elapsed < Duration::from_millis(4000), "{exit}");
        assert!(
            packets.iter().any(|p| p == "app.started:1|c"),
            "{packets:?}\n{}",
            exit.stderr
        );
    }
}
