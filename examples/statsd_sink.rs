//! A service whose metrics go to StatsD over UDP, with its final flush as a finale [`Sink`]:
//! the counters are kept in memory during the run and sent in one last burst in the Telemetry
//! phase, in the metrics stage, with half of the slot, on a thread of its own, counted in the
//! report.
//!
//! ```sh
//! nc -ulk 127.0.0.1 8125 &        # or any StatsD
//! cargo run --example statsd_sink
//! # then Ctrl-C: the counters arrive, the report says how many packets were sent
//! ```
//!
//! Environment variables:
//! - `STATSD_ADDR`: where to send (default `127.0.0.1:8125`).
//! - `STATSD_BLOCK_WORKERS_MS=N`: a Workers hook blocks the (single) runtime thread for N ms,
//!   so the Telemetry phase cannot start: finale's supervisor runs the blocking sink itself
//!   and exits with code 5.
//! - `FINALE_*`: any budget setting (see the README's defaults table).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use finale::{Finale, Hook, Items, ORDER_METRICS, Phase, Sink, SinkContext, Task};
use tracing_subscriber::EnvFilter;

/// The application's counters, as a StatsD client library would aggregate them.
type Stats = Arc<Mutex<BTreeMap<&'static str, u64>>>;

fn count(stats: &Stats, name: &'static str, n: u64) {
    *stats.lock().unwrap().entry(name).or_default() += n;
}

/// Sends every counter as one `name:value|c` packet, within the sink's deadline.
fn flush(stats: &Stats, addr: &str, ctx: &SinkContext) -> io::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    // Connected, so that an unreachable port comes back as an error on a later send.
    socket.connect(addr)?;
    socket.set_write_timeout(Some(ctx.remaining()))?;
    let snapshot = stats.lock().unwrap().clone();
    let mut failed = None;
    for (name, value) in snapshot {
        if std::time::Instant::now() >= ctx.deadline() {
            ctx.counter().dropped(1);
            continue;
        }
        match socket.send(format!("{name}:{value}|c").as_bytes()) {
            Ok(_) => ctx.counter().exported(1),
            Err(e) => {
                ctx.counter().failed(1);
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), finale::ConfigError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let addr = std::env::var("STATSD_ADDR").unwrap_or_else(|_| "127.0.0.1:8125".to_owned());
    let stats: Stats = Arc::default();
    let finale = Finale::builder().build()?;

    // The service: counts its work.
    let worker_stats = stats.clone();
    finale.spawn(Task::worker("worker", move |ctx| async move {
        count(&worker_stats, "app.started", 1);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tick.tick() => count(&worker_stats, "app.ticks", 1),
                () = ctx.stopped() => break,
            }
        }
        count(&worker_stats, "app.stopped", 1);
    }))?;

    if let Some(ms) = std::env::var("STATSD_BLOCK_WORKERS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        finale.hook(Hook::new(Phase::Workers, "blocker", move |_| async move {
            // Deliberately blocks the only runtime thread: a stuck driver call.
            std::thread::sleep(Duration::from_millis(ms));
        }))?;
    }

    // The final flush: in the metrics stage, half of the slot, counted in the report.
    let sink_stats = stats.clone();
    Sink::blocking("statsd", move |ctx| flush(&sink_stats, &addr, ctx))
        .order(ORDER_METRICS)
        .share(1, 2)
        .counts(Items::Other)
        .register(&finale)?;

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
