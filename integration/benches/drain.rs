//! How soon the drain ends once the last in-flight response is out, with many idle keep-alive
//! connections open: finale's server against plain `axum::serve(..).with_graceful_shutdown(..)`
//! in the same run.
//!
//! Each round opens `IDLE` keep-alive connections (one request each, then idle), then `SLOW`
//! requests that each take `WORK` in their handler, and triggers the shutdown once all of them
//! are in the handler. Two scenarios: the idle connections last used `IDLE_FOR` (longer than
//! finale's idle grace, 1 s) before the drain, and used just before it ("warm": finale keeps
//! each for the rest of its grace, since a client's next request may be on its way). It measures, on the client side, when the last slow response arrived and
//! when the server's future returned (finale: `run()`, with its report; axum: `serve`), and
//! reports the gap (median and max over the rounds) and every client error.
//!
//! ```sh
//! cargo bench -p finale-integration --bench drain            # 2000 idle, 200 in flight, 5 rounds
//! cargo bench -p finale-integration --bench drain -- 1000 100 3
//! ```
//!
//! Needs about `2 × (IDLE + SLOW)` file descriptors. Loopback only; every wait is bounded.

// A bench reports; the library never prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use finale::Finale;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long each in-flight request takes in its handler.
const WORK: Duration = Duration::from_millis(300);
/// How long the idle connections have not been used when the slow requests start (the cold
/// scenario): longer than finale's idle grace.
const IDLE_FOR: Duration = Duration::from_millis(1200);
const BOUND: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let idle = args.first().copied().unwrap_or(2000);
    let slow = args.get(1).copied().unwrap_or(200);
    let rounds = args.get(2).copied().unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "drain of {idle} idle keep-alive connections + {slow} in-flight requests ({WORK:?} each), {rounds} rounds"
    );
    for warm in [false, true] {
        for variant in [Variant::Finale, Variant::Axum] {
            let mut gaps = Vec::new();
            let mut errors = 0;
            for _ in 0..rounds {
                let round = runtime.block_on(round(variant, idle, slow, warm));
                gaps.push(round.gap);
                errors += round.errors;
            }
            gaps.sort();
            println!(
                "{:<5} {:<7} drain end − last response: median {:.1} ms, max {:.1} ms; client errors {errors}",
                if warm { "warm" } else { "cold" },
                variant.name(),
                ms(gaps[gaps.len() / 2]),
                ms(*gaps.last().expect("at least one round")),
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy)]
enum Variant {
    Finale,
    Axum,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Finale => "finale",
            Variant::Axum => "axum",
        }
    }
}

struct Round {
    gap: Duration,
    errors: usize,
}

fn app(entered: Arc<AtomicUsize>) -> Router {
    Router::new().route("/", get(|| async { "ok" })).route(
        "/slow",
        get(move || {
            entered.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(WORK).await;
                "done"
            }
        }),
    )
}

async fn round(variant: Variant, idle: usize, slow: usize, warm: bool) -> Round {
    let entered = Arc::new(AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let (trigger, server) = match variant {
        Variant::Finale => {
            let finale = Finale::builder()
                .read_env(false)
                .no_signals()
                .environment(finale::Environment::Local)
                .build()
                .expect("a finale");
            let handle = finale.handle();
            finale::axum::serve(&finale, "http", listener, app(entered.clone()))
                .expect("registered");
            let server = tokio::spawn(async move {
                let report = finale.run().await;
                assert!(report.is_clean(), "{report}");
            });
            tokio::time::timeout(BOUND, handle.health().started())
                .await
                .expect("graceful start");
            let trigger: Box<dyn FnOnce() + Send> = Box::new(move || {
                handle.trigger("bench");
            });
            (trigger, server)
        }
        Variant::Axum => {
            listener.set_nonblocking(true).expect("non-blocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let router = app(entered.clone());
            let server = tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .expect("axum serves");
            });
            let trigger: Box<dyn FnOnce() + Send> = Box::new(move || {
                let _ = tx.send(());
            });
            (trigger, server)
        }
    };

    // Idle keep-alive connections: one request each, then nothing.
    let mut idle_conns = Vec::with_capacity(idle);
    for _ in 0..idle {
        let mut conn = TcpStream::connect(addr).await.expect("connects");
        let _ = http_get(&mut conn, "/").await;
        idle_conns.push(conn);
    }
    if !warm {
        // The scenario, not a synchronisation: the connections have been idle this long.
        tokio::time::sleep(IDLE_FOR).await;
    }
    let slow_calls: Vec<_> = (0..slow)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = TcpStream::connect(addr).await.ok()?;
                let ok = http_get(&mut conn, "/slow").await;
                Some((ok, Instant::now()))
            })
        })
        .collect();
    let deadline = Instant::now() + BOUND;
    while entered.load(Ordering::Relaxed) < slow && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    trigger();
    let mut last = None::<Instant>;
    let mut errors = 0;
    for call in slow_calls {
        match call.await.expect("the client task") {
            Some((true, at)) => last = Some(last.map_or(at, |l| l.max(at))),
            _ => errors += 1,
        }
    }
    tokio::time::timeout(BOUND, server)
        .await
        .expect("the server ends")
        .expect("the server task");
    let ended = Instant::now();
    drop(idle_conns);
    Round {
        gap: ended.saturating_duration_since(last.unwrap_or(ended)),
        errors,
    }
}

/// One HTTP/1.1 GET on `conn`; whether a complete `200` came back.
async fn http_get(conn: &mut TcpStream, path: &str) -> bool {
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    if conn.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(256);
    let read = async {
        loop {
            let mut chunk = [0u8; 512];
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return Some(head.starts_with("http/1.1 200"));
                }
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
