//! Upgraded connections and idle connections under the drain, attacked: many WebSockets cut at
//! once, clients gone right after the `101`, a `101` never taken, handlers that keep the socket,
//! upgrades racing the cut, slow uploads, HTTP/2 extended CONNECT, an HTTP/1 CONNECT tunnel, and
//! a request that reached a long-idle connection just before the drain.

#![cfg(unix)]
#![allow(clippy::print_stderr)]

mod common;

use common::served::{builder, finish, serve_axum, wait_in_flight, websockets_installed};

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::{any, get, post};
use bytes::Bytes;
use finale::testing::Process;
use finale::{Handle, ShutdownReport, ShutdownStatus};
use http::{Method, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(15);
const HANDSHAKE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Echo until the client ends the connection.
    Echo,
    /// Keep the socket for a minute, never reading it (ignores the client's close).
    Hold,
    /// Delay the 101 by `delay_ms` from the query, then echo.
    Delayed,
}

#[derive(Clone)]
struct App {
    mode: Mode,
}

async fn ws(upgrade: WebSocketUpgrade, State(app): State<App>, uri: http::Uri) -> Response {
    if app.mode == Mode::Delayed {
        let ms: u64 = uri
            .query()
            .and_then(|q| q.strip_prefix("delay_ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mode = app.mode;
    upgrade.on_upgrade(move |socket| session(socket, mode))
}

async fn session(mut socket: WebSocket, mode: Mode) {
    if mode == Mode::Hold {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
        return;
    }
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Text(text) = message
            && socket.send(Message::Text(text)).await.is_err()
        {
            return;
        }
    }
}

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
}

async fn serve(mode: Mode, drain: Duration) -> Served {
    let finale = builder(drain).build().unwrap();
    let handle = finale.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/ws", any(ws))
        .route("/", get(|| async { "ok" }))
        .route(
            "/upload",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .with_state(App { mode });
    finale::axum::serve(&finale, "ws", listener, app).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served { handle, addr, run }
}

async fn read_head(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "closed mid-head: {buf:?}");
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).to_ascii_lowercase()
}

/// 100 WebSockets from one real client process, cut at the deadline: exactly 100 in flight,
/// each named exactly once, every client sees its connection end, none left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_websockets_cut_at_the_deadline_are_each_named_once() {
    if !websockets_installed() {
        return;
    }
    const N: usize = 100;
    let served = serve(Mode::Echo, Duration::from_secs(1)).await;
    let script = r#"
import asyncio, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
async def one(url):
    ws = await connect(url, ping_interval=None, close_timeout=2)
    await ws.send("hello"); await ws.recv()
    return ws
async def wait(ws):
    try:
        async for _ in ws: pass
    except ConnectionClosed: pass
    return int(ws.close_code)
async def main(url, n):
    sockets = await asyncio.gather(*[one(url) for _ in range(n)])
    print("open", len(sockets), file=sys.stderr, flush=True)
    codes = await asyncio.gather(*[wait(ws) for ws in sockets])
    print("closed", sorted(set(codes)), len(codes), file=sys.stderr, flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;
    let mut command = Command::new("python3");
    command
        .arg("-c")
        .arg(script)
        .arg(format!("ws://{}/ws?token=s3cret", served.addr))
        .arg(N.to_string());
    let mut client = Process::spawn(command).unwrap();
    tokio::task::block_in_place(|| client.wait_for(&format!("open {N}"), BOUND));
    assert_eq!(wait_in_flight(&served.handle, N).await, N);
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    let elapsed = start.elapsed();
    let closed = tokio::task::block_in_place(|| client.wait_for("closed", BOUND));
    eprintln!("{N} websockets: run ended after {elapsed:?}; client: {closed}");
    assert_eq!(closed, format!("closed [1006] {N}"));
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    assert_eq!(report.cut.len(), N, "{report}");
    let peers: HashSet<&String> = report.cut.iter().collect();
    assert_eq!(peers.len(), N, "each named once: {report}");
    assert!(
        report
            .cut
            .iter()
            .all(|c| c.starts_with("GET /ws from 127.0.0.1:")
                && c.ends_with("(upgraded connection open at the drain deadline)"))
    );
    assert!(!report.to_string().contains("s3cret"));
    assert_eq!(served.handle.in_flight().count(), 0);
}

/// A client that closes right after the 101 (and one that closes before even reading it):
/// the handler's socket ends, the count goes back to 0, the drain is clean and immediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_right_after_the_101_leaves_nothing_in_flight() {
    let served = serve(Mode::Echo, Duration::from_secs(5)).await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(HANDSHAKE.as_bytes()).await.unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    drop(conn);
    let mut rude = TcpStream::connect(served.addr).await.unwrap();
    rude.write_all(HANDSHAKE.as_bytes()).await.unwrap();
    drop(rude); // before the 101 is read
    assert_eq!(wait_in_flight(&served.handle, 0).await, 0);
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    eprintln!(
        "after a client gone right after its 101: {:?}\n{report}",
        start.elapsed()
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A 101 whose upgrade the handler never takes (hyper service answering 101 without
/// `hyper::upgrade::on`), with and without the client asking for an upgrade: nothing leaks,
/// the drain does not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_never_taken_by_its_handler_does_not_leak_or_hold_the_drain() {
    let finale = builder(Duration::from_secs(5)).build().unwrap();
    let handle = finale.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let service = hyper::service::service_fn(|_req: Request<Incoming>| async move {
        let mut response = http::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert(http::header::UPGRADE, "websocket".parse().unwrap());
        response
            .headers_mut()
            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
        Ok::<_, Infallible>(response)
    });
    finale::hyper::serve(&finale, "h", listener, service).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .unwrap();
    let mut kept = Vec::new();
    for request in [
        HANDSHAKE.to_owned(),
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
    ] {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let mut rest = [0u8; 8];
        // The server dropped the socket: the client sees the end.
        let n = tokio::time::timeout(BOUND, conn.read(&mut rest))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        kept.push(conn);
    }
    assert_eq!(wait_in_flight(&handle, 0).await, 0);
    let start = Instant::now();
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A handler that keeps the upgraded socket after its client closed: in flight until the
/// deadline, then named once; the drain is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_keeping_the_socket_after_the_client_closed_is_named_at_the_deadline() {
    let served = serve(Mode::Hold, Duration::from_secs(1)).await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(HANDSHAKE.as_bytes()).await.unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await; // the scenario: the client is gone
    assert_eq!(served.handle.in_flight().count(), 1);
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    eprintln!("{:?}\n{report}", start.elapsed());
    assert_eq!(report.cut.len(), 1, "{report}");
    assert!(report.cut[0].ends_with("(upgraded connection open at the drain deadline)"));
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(served.handle.in_flight().count(), 0);
}

/// Upgrades racing the cut: 40 WebSocket requests whose 101 is delayed to land around the
/// cut (drain 500 ms, cut at 400 ms). Every one is either named exactly once or (101 before
/// the cut, socket shut down) named as an upgraded connection; none twice, none lost, and
/// nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_racing_the_cut_are_each_named_exactly_once() {
    const N: u64 = 40;
    let served = serve(Mode::Delayed, Duration::from_millis(500)).await;
    let mut conns = Vec::new();
    for i in 0..N {
        let mut conn = TcpStream::connect(served.addr).await.unwrap();
        // 300..500 ms after now: around the cut at ~400 ms after the trigger below.
        let request = HANDSHAKE.replace(
            "GET /ws ",
            &format!("GET /ws?delay_ms={} ", 300 + i * 200 / N),
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        conns.push(conn);
    }
    assert_eq!(wait_in_flight(&served.handle, N as usize).await, N as usize);
    served.handle.trigger("test");
    let report = finish(served.run).await;
    eprintln!("{report}");
    let kinds: Vec<&str> = report
        .cut
        .iter()
        .map(|c| &c[c.find('(').unwrap()..])
        .collect();
    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    for k in &kinds {
        *tally.entry(k).or_default() += 1;
    }
    eprintln!("racing the cut: {tally:?}");
    let peers: HashSet<&str> = report
        .cut
        .iter()
        .map(|c| &c[..c.find(" (").unwrap()])
        .collect();
    assert_eq!(report.cut.len(), N as usize, "{report}");
    assert_eq!(peers.len(), N as usize, "{report}");
    assert_eq!(served.handle.in_flight().count(), 0);
}

/// A slow upload (headers in, body trickling) on a connection idle for longer than the grace
/// before it: in flight, served with `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_at_the_drain_start_is_served() {
    let served = serve(Mode::Echo, Duration::from_secs(5)).await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await; // the scenario: idle past 1 s grace
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    assert_eq!(wait_in_flight(&served.handle, 1).await, 1);
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the scenario: a slow uploader
    conn.write_all(b"56789").await.unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

async fn h2_connect(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) -> hyper::upgrade::Upgraded {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{addr}/ws?token=s3cret"))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    hyper::upgrade::on(response).await.unwrap()
}

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // One plain request first: the server's SETTINGS (extended CONNECT) are in by then.
    let response = sender
        .send_request(
            Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let _ = response.into_body().collect().await;
    sender
}

/// HTTP/2 extended CONNECT (a WebSocket over HTTP/2): its connection holds the drain, and it is
/// named exactly once at the cut, never with the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_websocket_is_named_once_at_the_cut() {
    let served = serve(Mode::Echo, Duration::from_secs(1)).await;
    let mut sender = h2_client(served.addr).await;
    let _ws = h2_connect(&mut sender, served.addr).await;
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    eprintln!("{report}");
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "held to the cut: {report}"
    );
    assert_eq!(report.cut.len(), 1, "{report}");
    assert!(report.cut[0].starts_with("CONNECT /ws from 127.0.0.1:"));
    assert!(!report.to_string().contains("s3cret"));
    assert_eq!(served.handle.in_flight().count(), 0);
}

/// The documented limit: finale cannot see one HTTP/2 upgraded stream end, so such a stream
/// counts in flight only until its `2xx`; a long-lived connection remembers the names of at most
/// 16 of them (no unbounded growth), and drains clean once they ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_websockets_that_ended_leave_nothing_in_flight_and_a_bounded_list() {
    let served = serve(Mode::Echo, Duration::from_secs(2)).await;
    let mut sender = h2_client(served.addr).await;
    for _ in 0..20 {
        let ws = h2_connect(&mut sender, served.addr).await;
        drop(ws);
    }
    let count = wait_in_flight(&served.handle, 0).await;
    eprintln!("in flight after 20 h2 websockets that all ended, connection open: {count}");
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    eprintln!("drain: {:?}\n{report}", start.elapsed());
    assert_eq!(count, 0);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// `finale::axum`'s WebSockets docs: at the deadline "the socket is shut down (the client sees
/// the connection end, the handler's next read ends)". A handler that ignores the drain and
/// waits on its read, with a client that sends nothing: its read ends after the cut, and
/// nothing the connection's task does at its end takes the handler's place as the socket's
/// reader to wake (one runtime thread: no other worker to notice the socket).
#[tokio::test(flavor = "current_thread")]
async fn a_websocket_handler_waiting_on_its_read_sees_it_end_after_the_cut() {
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let app = Router::new().route(
        "/ws",
        any(move |upgrade: WebSocketUpgrade| {
            let ended_tx = ended_tx.clone();
            async move {
                upgrade.on_upgrade(move |mut socket: WebSocket| async move {
                    let why = loop {
                        match socket.recv().await {
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break "error",
                            None => break "end",
                        }
                    };
                    let _ = ended_tx.send(why);
                })
            }
        }),
    );
    let (addr, handle, run) =
        serve_axum(builder(Duration::from_millis(800)).build().unwrap(), app).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(HANDSHAKE.as_bytes()).await.unwrap();
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.cut.len(), 1, "{report}");
    let why = tokio::time::timeout(BOUND, ended.recv()).await;
    assert!(
        matches!(why, Ok(Some(_))),
        "the handler's read never ended after the cut"
    );
}
