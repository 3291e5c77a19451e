//! WebSockets served by finale's axum server through a drain, against a real WebSocket client
//! (the Python `websockets` library, pinned in `scripts/install-components.sh`).
//!
//! An upgraded connection counts as in flight for as long as it is open; a handler that watches
//! the Drain phase sends its close frame (1001, going away) and the run ends clean; a handler
//! that ignores the drain has its connection shut down at the deadline, and the report names it.

#![cfg(unix)]
// The tests report what they measured (run with `--no-capture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use common::served::{finish, wait_in_flight, websockets_installed};

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::any;
use finale::testing::Process;
use finale::{Finale, Handle, Phase, ShutdownReport, ShutdownStatus};
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(10);

/// A client written by no one here: connects, sends `hello`, prints the echo, then every message
/// until the connection ends, and how it ended (the close code the server sent, 1006 when the
/// connection dropped without a close frame). Lines go to stderr, which [`Process`] reads.
const CLIENT: &str = r#"
import asyncio, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

async def main(url):
    async with connect(url, ping_interval=None, close_timeout=2) as ws:
        await ws.send("hello")
        print("echo", await ws.recv(), file=sys.stderr, flush=True)
        try:
            async for message in ws:
                print("message", message, file=sys.stderr, flush=True)
        except ConnectionClosed:
            pass
        print("closed", ws.close_code, ws.close_reason or "-", file=sys.stderr, flush=True)

asyncio.run(main(sys.argv[1]))
"#;

#[derive(Clone)]
struct App {
    handle: Handle,
    /// Whether the handler sends a close frame when the drain starts.
    polite: bool,
}

/// The documented pattern: take the Drain phase's token before the upgrade, and on it send a
/// close frame (1001 "going away") and let the client finish the closing handshake.
async fn ws(upgrade: WebSocketUpgrade, State(app): State<App>) -> Response {
    let draining = app.handle.phase_started(Phase::Drain);
    upgrade.on_upgrade(move |socket| session(socket, draining, app.polite))
}

async fn session(mut socket: WebSocket, draining: finale::Cancelled, polite: bool) {
    tokio::pin!(draining);
    loop {
        tokio::select! {
            () = &mut draining, if polite => {
                let close = CloseFrame { code: 1001, reason: "shutting down".into() };
                if socket.send(Message::Close(Some(close))).await.is_ok() {
                    // The client's close frame ends the handshake.
                    while let Some(Ok(_)) = socket.recv().await {}
                }
                return;
            }
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
}

async fn serve(polite: bool) -> Served {
    let finale = Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .drain_timeout(Duration::from_secs(1))
        .total_budget(Duration::from_secs(4))
        .telemetry_reserve(Duration::from_secs(1))
        .build()
        .unwrap();
    let handle = finale.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/ws", any(ws)).with_state(App {
        handle: handle.clone(),
        polite,
    });
    finale::axum::serve(&finale, "ws", listener, app).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served { handle, addr, run }
}

/// Starts the client on `/ws?token=…` (the report must not carry the query) and waits for its
/// echo: the connection is upgraded and open.
fn connect(addr: SocketAddr) -> Process {
    let mut command = Command::new("python3");
    command
        .arg("-c")
        .arg(CLIENT)
        .arg(format!("ws://{addr}/ws?token=s3cret"));
    let mut client = Process::spawn(command).expect("python3 starts");
    tokio::task::block_in_place(|| client.wait_for("echo hello", BOUND));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_counts_in_flight_and_gets_a_close_frame_when_the_drain_starts() {
    if !websockets_installed() {
        return;
    }
    let served = serve(true).await;
    let mut client = connect(served.addr);
    // Upgraded and idle: still one in flight, the drain must wait for it.
    assert_eq!(wait_in_flight(&served.handle, 1).await, 1);

    let start = Instant::now();
    served.handle.trigger("test");
    let closed = tokio::task::block_in_place(|| client.wait_for("closed", BOUND));
    let report = finish(served.run).await;
    let elapsed = start.elapsed();
    eprintln!("websocket closed by its handler: run ended {elapsed:?} after the trigger");
    assert_eq!(closed, "closed 1001 shutting down", "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.cut.is_empty(), "{report}");
    assert_eq!(served.handle.in_flight().count(), 0);
    // Ended by the close, not by the deadline (drain timeout 1 s).
    assert!(elapsed < Duration::from_millis(900), "took {elapsed:?}");
    let exit = tokio::task::block_in_place(|| client.wait_exit(BOUND));
    assert_eq!(exit.code(), Some(0), "{}", exit.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_ignores_the_drain_is_cut_at_the_deadline_and_named() {
    if !websockets_installed() {
        return;
    }
    let served = serve(false).await;
    let mut client = connect(served.addr);
    assert_eq!(wait_in_flight(&served.handle, 1).await, 1);

    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    let elapsed = start.elapsed();
    // The socket was shut down at the cut: the client sees the connection end (no close frame,
    // 1006), it does not hang until the process exits.
    let closed = tokio::task::block_in_place(|| client.wait_for("closed", BOUND));
    eprintln!(
        "websocket ignoring the drain: run ended {elapsed:?} after the trigger; client: {closed}"
    );
    assert_eq!(closed, "closed 1006 -");
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    assert_eq!(report.cut.len(), 1, "{report}");
    let cut = &report.cut[0];
    assert!(
        cut.starts_with("GET /ws from 127.0.0.1:")
            && cut.ends_with("(upgraded connection open at the drain deadline)"),
        "{report}"
    );
    assert!(!report.to_string().contains("s3cret"), "{report}");
    // Held to the Drain deadline (1 s, less the cut margin), not ended at once.
    assert!(elapsed >= Duration::from_millis(800), "took {elapsed:?}");
    assert_eq!(served.handle.in_flight().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_names_an_open_websocket_and_closes_it() {
    if !websockets_installed() {
        return;
    }
    let served = serve(false).await;
    let mut client = connect(served.addr);
    assert_eq!(wait_in_flight(&served.handle, 1).await, 1);

    served.handle.trigger("test");
    served.handle.phase_started(Phase::Drain).await;
    // The drain is abandoned: the server's task and its connections are aborted. The
    // WebSocket's handler still holds its socket; the connection names it and shuts it down.
    assert!(served.handle.escalate());
    let report = finish(served.run).await;
    let closed = tokio::task::block_in_place(|| client.wait_for("closed", BOUND));
    assert_eq!(closed, "closed 1006 -");
    assert_eq!(report.cut.len(), 1, "{report}");
    let cut = &report.cut[0];
    assert!(
        cut.starts_with("GET /ws from 127.0.0.1:")
            && cut.ends_with("(upgraded connection open when a second signal abandoned the drain)"),
        "{report}"
    );
    assert!(!report.to_string().contains("s3cret"), "{report}");
    assert_eq!(served.handle.in_flight().count(), 0);
}
