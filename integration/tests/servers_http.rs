//! axum and hyper servers drained by finale, against real clients over loopback.
//!
//! The numbered proofs of the server issue: (1) a request in flight completes, (2) `/readyz`
//! answers 503 during the drain delay while requests still succeed, (3) new connections are
//! refused and a request on a kept-alive HTTP/1.1 connection is served with `Connection: close`
//! (a 503 only past the late margin), never a reset, (4) an HTTP/2 client gets GOAWAY and its in-flight stream completes, (6) a stream that
//! never ends is cut at the drain deadline and named in the report, (7) a port in use fails the
//! start and the other server is shut down.

// The tests report what they measured (run with `--no-capture` to see it).
#![allow(clippy::print_stderr)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use finale::{Finale, Handle, Outcome, Phase, Reason, ShutdownReport, ShutdownStatus};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const BIG: usize = 256 * 1024;
const BOUND: Duration = Duration::from_secs(10);

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

/// What the test controls in the app.
#[derive(Default)]
struct Control {
    /// A `/slow` request has reached the handler.
    entered: Notify,
    /// Lets `/slow` answer.
    release: Notify,
}

/// An event stream that never ends: one frame every 50 ms.
struct Ticks(tokio::time::Interval);

impl http_body::Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_tick(cx).map(|_| {
            Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"data: tick\n\n",
            ))))
        })
    }
}

fn app(handle: &Handle, control: Arc<Control>) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(move || {
                let control = control.clone();
                async move {
                    control.entered.notify_one();
                    control.release.notified().await;
                    vec![b'x'; BIG]
                }
            }),
        )
        .route(
            "/events",
            get(|| async { Body::new(Ticks(tokio::time::interval(Duration::from_millis(50)))) }),
        )
        .merge(finale::axum::health_router(handle))
}

/// A finale running one axum server on a free loopback port.
struct Served {
    handle: Handle,
    addr: SocketAddr,
    control: Arc<Control>,
    run: JoinHandle<ShutdownReport>,
}

async fn serve(builder: finale::Builder) -> Served {
    serve_with(builder, |server| server).await
}

async fn serve_with(
    builder: finale::Builder,
    configure: impl FnOnce(finale::axum::HttpServer) -> finale::axum::HttpServer,
) -> Served {
    let finale = builder.build().unwrap();
    let handle = finale.handle();
    let control = Arc::new(Control::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(&handle, control.clone());
    configure(finale::axum::HttpServer::new("http"))
        .serve(&finale, listener, router)
        .unwrap();
    let run = tokio::spawn(finale.run());
    // Graceful start: ready once bound.
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served {
        handle,
        addr,
        control,
        run,
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_text(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: String,
) -> (u16, Bytes) {
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

async fn finish(served: Served) -> ShutdownReport {
    tokio::time::timeout(BOUND, served.run)
        .await
        .expect("the run ends")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof1_a_request_in_flight_completes_with_its_full_body() {
    let served = serve(builder()).await;
    let url = format!("http://{}/slow", served.addr);
    let response = tokio::spawn(async move { get_text(&client(), url).await });
    served.control.entered.notified().await;
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    assert_eq!(served.handle.in_flight().count(), 1);
    served.control.release.notify_one();
    let (status, body) = response.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), BIG);
    let report = finish(served).await;
    assert_eq!(report.in_flight_at_drain_start, 1);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(report.entry("http").unwrap().outcome, Outcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof2_readyz_is_503_during_the_drain_delay_while_requests_succeed() {
    let served = serve(builder().drain_delay(Duration::from_millis(1500))).await;
    let client = client();
    let base = format!("http://{}", served.addr);
    assert_eq!(get_text(&client, format!("{base}/readyz")).await.0, 200);
    assert_eq!(get_text(&client, format!("{base}/livez")).await.0, 200);
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Announce).await;
    let (status, body) = get_text(&client, format!("{base}/readyz")).await;
    assert_eq!((status, &body[..]), (503, &b"not ready\n"[..]));
    assert_eq!(get_text(&client, format!("{base}/livez")).await.0, 200);
    let (status, body) = get_text(&client, format!("{base}/")).await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert!(
        !served.handle.in_flight().is_draining(),
        "still in the drain delay"
    );
    assert!(served.handle.health().not_ready_answers() >= 1);
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// Reads one HTTP/1.1 response (headers and a Content-Length body) from a raw stream.
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut body = buf[end + 4..].to_vec();
            while body.len() < len {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                body.extend_from_slice(&chunk[..n]);
            }
            return (head, body);
        }
        let n = stream.read(&mut chunk).await.expect("no reset");
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request on `kept` once the listener has closed; returns the response's head.
async fn request_after_the_listener_closed(served: &Served, kept: &mut TcpStream) -> String {
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    // The listener closes right after the drain starts: new connections are refused.
    let deadline = Instant::now() + BOUND;
    while TcpStream::connect(served.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::task::yield_now().await;
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(kept).await;
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = [0u8; 16];
    assert_eq!(
        kept.read(&mut rest)
            .await
            .expect("a clean close, not a reset"),
        0
    );
    format!("{head}\n{}", String::from_utf8_lossy(&body))
}

async fn kept_alive(served: &Served) -> TcpStream {
    let mut kept = TcpStream::connect(served.addr).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, b"ok");
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof3_new_connections_are_refused_and_a_kept_alive_connection_is_served_then_closed() {
    // No drain delay (a lone instance at default settings): a request that arrives on an
    // already-open HTTP/1 connection during the drain is served, then the connection closes.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("finale=debug,hyper=trace")
        .with_test_writer()
        .try_init();
    let served = serve(builder()).await;
    let mut kept = kept_alive(&served).await;
    let answer = request_after_the_listener_closed(&served, &mut kept).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 0, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof3_a_request_past_the_late_margin_gets_503_close() {
    // A late margin longer than the drain: every HTTP/1 request during it is too late.
    let served = serve_with(builder(), |server| {
        server.rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
    })
    .await;
    let mut kept = kept_alive(&served).await;
    let answer = request_after_the_listener_closed(&served, &mut kept).await;
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(
        answer.ends_with(finale::tower::DEFAULT_REJECTION_BODY),
        "{answer}"
    );
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 1);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_http1_responses_carry_connection_close() {
    // Persistent clients are moved politely while they are still served.
    let served = serve(builder().drain_delay(Duration::from_millis(500))).await;
    let mut kept = kept_alive(&served).await;
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Announce).await;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"ok");
    assert!(
        !served.handle.in_flight().is_draining(),
        "still in the delay"
    );
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof4_an_http2_client_gets_goaway_and_its_stream_completes() {
    let served = serve(builder()).await;
    let stream = TcpStream::connect(served.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let request = |path: &str| {
        http::Request::get(format!("http://{}{path}", served.addr))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let in_flight = sender.send_request(request("/slow"));
    let in_flight = tokio::spawn(in_flight);
    served.control.entered.notified().await;
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    served.control.release.notify_one();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len(),
        BIG
    );
    // After GOAWAY the connection takes no new stream and ends cleanly.
    tokio::time::timeout(BOUND, conn)
        .await
        .expect("the connection ended after GOAWAY")
        .unwrap()
        .expect("a clean end, not an error");
    assert!(sender.send_request(request("/")).await.is_err());
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof6_a_stream_that_never_ends_is_cut_at_the_drain_deadline_and_named() {
    let served = serve(
        builder()
            .drain_timeout(Duration::from_secs(1))
            .total_budget(Duration::from_secs(4))
            .telemetry_reserve(Duration::from_secs(1)),
    )
    .await;
    let client = client();
    let response = client
        // A token in the query: the report must not carry it (logs, OTLP log records).
        .get(
            format!("http://{}/events?token=s3cret", served.addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: tick\n\n")
    );
    let reading = tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });

    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served).await;
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(
        report
            .cut
            .iter()
            .any(|c| c.starts_with("GET /events from 127.0.0.1:")),
        "{report}"
    );
    assert!(!report.to_string().contains("s3cret"), "{report}");
    assert_eq!(
        report.cut.len(),
        1,
        "the stream, not also its connection: {report}"
    );
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    // The client saw the stream end (the connection closed), it did not hang.
    tokio::time::timeout(BOUND, reading).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof7_a_port_in_use_fails_the_start_and_stops_the_other_server() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free_addr = free.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "ok" }));
    finale::axum::serve(&finale, "api", free, app).unwrap();
    finale::axum::serve(&finale, "admin", taken_addr, Router::new()).unwrap();
    let report = tokio::time::timeout(BOUND, finale.run()).await.unwrap();
    match &report.reason {
        Reason::StartupFailed { name, error } => {
            assert_eq!(name, "admin");
            assert!(
                error.to_string().to_lowercase().contains("address"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.status, ShutdownStatus::StartupFailure);
    assert_eq!(
        report.exit_code,
        finale::ShutdownStatus::StartupFailure.default_code()
    );
    assert_eq!(report.entry("api").unwrap().outcome, Outcome::Completed);
    assert!(!handle.health().is_ready());
    assert!(
        TcpStream::connect(free_addr).await.is_err(),
        "the other server was stopped"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_connection_gets_an_answer_without_a_drain_delay() {
    // Accepted before the drain, its request written just after the drain started: the local
    // default (no drain delay) used to close it unanswered.
    let served = serve(builder()).await;
    let mut fresh = TcpStream::connect(served.addr).await.unwrap();
    // The server accepted it once the kernel answered the handshake and the loop ran; make
    // sure it did before the drain by serving a request on another connection after it.
    drop(kept_alive(&served).await);
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    fresh.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut fresh).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"ok");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_for_longer_than_the_grace_is_closed_at_the_drain_start() {
    // The grace is for a request on its way: a connection not used for longer than it is closed
    // at once (the drain does not wait), one used within it keeps the rest of it.
    const GRACE: Duration = Duration::from_millis(500);
    let served = serve_with(builder().drain_timeout(Duration::from_secs(8)), |server| {
        server.idle_grace(GRACE)
    })
    .await;
    let mut cold = kept_alive(&served).await;
    // The scenario, not a synchronisation: the connection stays unused past the grace.
    tokio::time::sleep(GRACE + Duration::from_millis(100)).await;
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served).await;
    let elapsed = start.elapsed();
    eprintln!("a connection idle past the grace: the drain ended {elapsed:?} after the trigger");
    assert!(
        elapsed < GRACE - Duration::from_millis(200),
        "took {elapsed:?}: {report}"
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let mut rest = [0u8; 16];
    assert_eq!(
        tokio::time::timeout(BOUND, cold.read(&mut rest))
            .await
            .unwrap()
            .expect("a clean close, not a reset"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_used_within_the_grace_is_kept_for_the_rest_of_it() {
    const GRACE: Duration = Duration::from_millis(500);
    let served = serve_with(builder().drain_timeout(Duration::from_secs(8)), |server| {
        server.idle_grace(GRACE)
    })
    .await;
    let mut warm = kept_alive(&served).await;
    let start = Instant::now();
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    // Its next request, sent once the drain started, is served, with `Connection: close`.
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    warm.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut warm).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"ok");
    let report = finish(served).await;
    eprintln!(
        "a warm connection: served, the drain ended {:?} after the trigger",
        start.elapsed()
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_hold_the_drain() {
    // Partial headers and nothing more (slowloris): the connection holds no request, so it is
    // closed after the idle grace, not kept to the drain deadline.
    let served = serve(builder().drain_timeout(Duration::from_secs(8))).await;
    let mut slow = TcpStream::connect(served.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .unwrap();
    drop(kept_alive(&served).await);
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served).await;
    let elapsed = start.elapsed();
    eprintln!("slow client: drain ended after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(4),
        "took {elapsed:?}: {report}"
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn connections_in_the_accept_queue_at_the_drain_start_get_an_answer() {
    // The runtime's only thread is held in an Announce hook (after the drain delay, right before
    // the Drain starts) while 16 clients connect and send their request: the kernel completes
    // the handshakes into the listener's accept queue, nothing accepts them. Then the Drain
    // starts; closing the listener now would reset all 16. Each must get its 200.
    const CLIENTS: usize = 16;
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    finale
        .hook(
            finale::Hook::new(Phase::Announce, "hold the runtime", move |_| async move {
                let _ = held_tx.send(());
                // Blocks the runtime's only thread on purpose: nothing accepts meanwhile.
                let _ = go_rx.recv_timeout(BOUND);
            })
            .order(1),
        )
        .unwrap();
    finale::axum::HttpServer::new("http")
        .serve(
            &finale,
            listener,
            app(&handle, Arc::new(Control::default())),
        )
        .unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");

    let clients = std::thread::spawn(move || {
        held_rx
            .recv_timeout(BOUND)
            .expect("the hook holds the runtime");
        let mut conns: Vec<std::net::TcpStream> = (0..CLIENTS)
            .map(|_| {
                let mut conn = std::net::TcpStream::connect(addr).expect("the kernel completes it");
                std::io::Write::write_all(
                    &mut conn,
                    format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
                )
                .unwrap();
                conn.set_read_timeout(Some(BOUND)).unwrap();
                conn
            })
            .collect();
        go_tx.send(()).unwrap();
        conns
            .iter_mut()
            .map(|conn| {
                let mut buf = Vec::new();
                match std::io::Read::read_to_end(conn, &mut buf) {
                    Ok(_) if buf.starts_with(b"HTTP/1.1 200") => "ok".to_owned(),
                    Ok(_) => format!("answer {:?}", String::from_utf8_lossy(&buf)),
                    Err(e) => format!("read: {e}"),
                }
            })
            .collect::<Vec<_>>()
    });
    handle.trigger("test");
    let report = finish_run(run).await;
    let outcomes = clients.join().unwrap();
    eprintln!("queued at the drain start: {outcomes:?}");
    assert_eq!(outcomes, vec!["ok".to_owned(); CLIENTS], "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_racing_the_drain_start_get_an_answer_or_a_refusal_never_a_reset() {
    // Connections completed by the kernel just before the listener closes sit in its accept
    // queue: they are accepted and answered, not reset. Five shutdowns, 24 racing clients each.
    // One window stays: a handshake that completes in the microseconds between the last accept
    // and the close is reset by the kernel (the backlog is shrunk to nothing first, which makes
    // it rare). Before the accept queue was drained, 11 of 24 clients of one round were reset.
    let mut resets = 0;
    for round in 0..5 {
        let served = serve(builder()).await;
        let addr = served.addr;
        let clients: Vec<_> = (0..24)
            .map(|_| {
                tokio::spawn(async move {
                    let mut conn = match TcpStream::connect(addr).await {
                        Ok(conn) => conn,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            return "refused".to_owned();
                        }
                        Err(e) => return format!("connect: {e}"),
                    };
                    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                    if let Err(e) = conn.write_all(request.as_bytes()).await {
                        return format!("write: {e}");
                    }
                    let mut buf = Vec::new();
                    match tokio::time::timeout(BOUND, conn.read_to_end(&mut buf)).await {
                        Ok(Ok(_)) if buf.starts_with(b"HTTP/1.1 200") => "ok".to_owned(),
                        Ok(Ok(_)) if buf.starts_with(b"HTTP/1.1 503") => "503".to_owned(),
                        Ok(Ok(_)) => format!("answer {:?}", String::from_utf8_lossy(&buf)),
                        Ok(Err(e)) => format!("read: {e}"),
                        Err(_) => "hung".to_owned(),
                    }
                })
            })
            .collect();
        served.handle.trigger("test");
        let mut outcomes = std::collections::BTreeMap::new();
        for c in clients {
            *outcomes.entry(c.await.unwrap()).or_insert(0) += 1;
        }
        let report = finish(served).await;
        eprintln!("round {round}: {outcomes:?}");
        let bad: Vec<_> = outcomes
            .keys()
            .filter(|k| !matches!(k.as_str(), "ok" | "refused") && !k.contains("reset"))
            .collect();
        assert!(bad.is_empty(), "round {round}: {outcomes:?}\n{report}");
        resets += outcomes
            .iter()
            .filter(|(k, _)| k.contains("reset"))
            .map(|(_, n)| n)
            .sum::<u32>();
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    }
    eprintln!("clients racing the drain start: {resets} resets of 120");
    // The kernel's window (a handshake completing between the last accept and the close) is
    // measured here, not bounded tightly: it widens when the machine is busy (9 in one round
    // with the whole suite running on 2 cores, 0–1 in 120 alone). What the drain promises,
    // that queued connections are answered, is proven exactly by the test above.
    assert!(resets <= 24, "{resets} of 120 clients were reset");
}

/// `h2load` (nghttp2), a client no one here wrote: 8 HTTP/2 connections with 16 streams each,
/// the drain started under them once 2000 requests were served. Streams are served or refused
/// by h2 (h2load, which does not retry, counts refused ones as errored); none is answered with
/// an HTTP error status: 0 × 5xx (the old drain answered 99–129 of them 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_across_the_drain_start_sees_no_error_status() {
    let Some(h2load) = which("h2load") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "h2load (Debian package nghttp2-client) is missing under CI"
        );
        eprintln!("!! h2load not found: skipping (install nghttp2-client)");
        return;
    };
    for round in 0..3 {
        let finale = builder().build().unwrap();
        let handle = finale.handle();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        let app = Router::new().route(
            "/",
            get(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { "ok" }
            }),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        finale::axum::serve(&finale, "http", listener, app).unwrap();
        let run = tokio::spawn(finale.run());
        handle.health().started().await;
        let child = tokio::process::Command::new(&h2load)
            .args(["-n", "200000", "-c", "8", "-m", "16", "-t", "1"])
            .arg(format!("http://{addr}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Bounded poll: the load is running once 2000 requests were served.
        let deadline = Instant::now() + BOUND;
        while served.load(std::sync::atomic::Ordering::Relaxed) < 2000 {
            assert!(Instant::now() < deadline, "h2load never got going");
            tokio::task::yield_now().await;
        }
        handle.trigger("test");
        let output = tokio::time::timeout(BOUND, child.wait_with_output())
            .await
            .expect("h2load ends once the server is gone")
            .unwrap();
        let report = finish_run(run).await;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let (requests, codes) = (line("requests:"), line("status codes:"));
        eprintln!("h2load round {round}: {requests} | {codes}");
        let five = codes
            .split(',')
            .find(|c| c.trim_end().ends_with("5xx"))
            .and_then(|c| c.split_whitespace().next()?.parse::<u64>().ok());
        assert_eq!(five, Some(0), "{text}");
        assert_eq!(report.requests_rejected, 0, "{report}");
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

async fn finish_run(run: JoinHandle<ShutdownReport>) -> ShutdownReport {
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the run ends")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_during_the_drain_keeps_connection_upgrade() {
    // A WebSocket handshake that arrives on a kept-alive connection during the drain: the 101
    // must carry `Connection: upgrade`, not the drain's `Connection: close` (a broken handshake).
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let app = Router::new().route("/", get(|| async { "ok" })).route(
        "/ws",
        get(|| async {
            http::Response::builder()
                .status(http::StatusCode::SWITCHING_PROTOCOLS)
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "websocket")
                .body(Body::empty())
                .unwrap()
        }),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::serve(&finale, "http", listener, app).unwrap();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    handle.trigger("test");
    handle.phase_started(Phase::Drain).await;
    kept.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(BOUND, kept.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    drop(kept);
    finish_run(run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_disconnects_a_slow_client() {
    // Partial headers and nothing more, while the service runs normally: hyper's header-read
    // timeout (here 300 ms) closes the connection; nothing of the shutdown is involved.
    let served = serve_with(builder(), |server| {
        server.header_read_timeout(Duration::from_millis(300))
    })
    .await;
    let mut slow = TcpStream::connect(served.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    // The server ends the connection (EOF, possibly after a 408): the read returns.
    let read = tokio::time::timeout(BOUND, slow.read_to_end(&mut buf)).await;
    let elapsed = start.elapsed();
    assert!(read.is_ok(), "the slow client was never disconnected");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    eprintln!("slow client disconnected after {elapsed:?}");
    // A prompt client on another connection is unaffected.
    drop(kept_alive(&served).await);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// `HttpServer::header_read_timeout` is finale's own, one timer per connection: an idle
/// HTTP/1 keep-alive connection is closed after it (as hyper's per-request timer did), an
/// HTTP/2 connection with no stream open is idle, not slow, and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_closes_idle_http1_connections_and_leaves_http2_alone() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let served = serve_with(builder(), |server| server.header_read_timeout(TIMEOUT)).await;
    let mut kept = kept_alive(&served).await;
    let mut h2 = TcpStream::connect(served.addr).await.unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame; no stream.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(BOUND, kept.read_to_end(&mut buf))
        .await
        .expect("the idle keep-alive connection is closed")
        .unwrap();
    let elapsed = start.elapsed();
    eprintln!("idle HTTP/1 connection closed after {elapsed:?}");
    assert!(
        elapsed >= TIMEOUT - Duration::from_millis(50),
        "{elapsed:?}"
    );
    // By now the HTTP/2 connection has been idle for longer than the timeout, three times
    // over once this read gives up: it is still open (its frames come, no end of file).
    let mut frames = [0u8; 256];
    let ended = tokio::time::timeout(3 * TIMEOUT, async {
        loop {
            match h2.read(&mut frames).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_err(), "the idle HTTP/2 connection was closed");
    drop(h2);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// How long until the server ends `stream` (end of file or an error), `None` if not within
/// `within`.
async fn closed_within(mut stream: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut buf))
        .await
        .ok()
        .map(|_| start.elapsed())
}

/// Every connection not known to be HTTP/2 is bounded by the header-read timeout while
/// serving, whatever it sent: nothing at all, `P`, the HTTP/2 preface's first line only (not
/// the whole preface), a partial request head, or `P` again and again. Before, only a
/// connection whose first read differed from the preface's start was: the first three stayed
/// open (the `P` dribble too, each read compared with the preface's start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_bounds_silent_clients_and_partial_prefaces() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let served = serve_with(builder(), |server| server.header_read_timeout(TIMEOUT)).await;
    let addr = served.addr;
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut p = TcpStream::connect(addr).await.unwrap();
    p.write_all(b"P").await.unwrap();
    let mut line = TcpStream::connect(addr).await.unwrap();
    line.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x")
        .await
        .unwrap();
    // `P` every 100 ms, bounded: 30 writes.
    let dribble = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        for _ in 0..30 {
            if s.write_all(b"P").await.is_err() {
                return Some(start.elapsed());
            }
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await
            {
                return Some(start.elapsed());
            }
        }
        None
    });
    let within = Duration::from_secs(3);
    let closed = tokio::join!(
        closed_within(silent, within),
        closed_within(p, within),
        closed_within(line, within),
        closed_within(partial, within),
    );
    let dribble = dribble.await.unwrap();
    eprintln!(
        "closed after: silent, P, preface line, partial head: {closed:?}; P dribble: {dribble:?}"
    );
    for (what, after) in [
        ("silent", closed.0),
        ("P", closed.1),
        ("the preface's first line", closed.2),
        ("a partial head", closed.3),
        ("a P every 100 ms", dribble),
    ] {
        assert!(
            after.is_some_and(|t| t < Duration::from_secs(2)),
            "{what}: not closed within 2 s: {after:?}"
        );
    }
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// An h2c prior-knowledge client whose preface arrives in two writes (30 ms apart) is HTTP/2:
/// idle with no stream open, it is left alone, not closed at the header-read timeout. Before,
/// the second read was compared with the preface's start, and the connection closed at
/// ~300 ms, with no GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_split_across_writes_is_http2_and_left_alone_when_idle() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let served = serve_with(builder(), |server| server.header_read_timeout(TIMEOUT)).await;
    let mut h2 = TcpStream::connect(served.addr).await.unwrap();
    h2.write_all(b"PRI * ").await.unwrap();
    // Two writes the server reads apart (the rest is what the client sends later).
    tokio::time::sleep(Duration::from_millis(30)).await;
    h2.write_all(b"HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let closed = closed_within(h2, 4 * TIMEOUT).await;
    assert_eq!(closed, None, "the idle HTTP/2 connection was closed");
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// During the drain a partial request head does not hold the connection to the cut: the
/// header-read timeout bounds it there too. 16 fresh connections; the drain starts (idle grace
/// 300 ms, header-read timeout 500 ms, drain timeout 3 s); the runtime's two workers are kept
/// busy from ~50 ms to ~800 ms (as load does: the connection tasks do not run when the grace
/// ends); a partial head arrives on every connection at ~450 ms. Before, 5 of 16 stayed open
/// until the cut (exit "forced").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_head_during_the_drain_is_closed_at_the_header_read_timeout() {
    let served = serve_with(builder().drain_timeout(Duration::from_secs(3)), |server| {
        server
            .idle_grace(Duration::from_millis(300))
            .header_read_timeout(Duration::from_millis(500))
    })
    .await;
    let conns: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(served.addr).unwrap())
        .collect();
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Drain).await;
    let t0 = Instant::now();
    // The input: the workers busy (blocked threads), then the partial heads, on a timeline.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..2 {
        tokio::spawn(async { std::thread::sleep(Duration::from_millis(750)) });
    }
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let mut conns = conns;
        for c in &mut conns {
            use std::io::Write;
            let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x");
        }
        conns
    });
    let conns = tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    let report = finish(served).await;
    let took = t0.elapsed();
    eprintln!("drain to the end: {took:?}; {report}");
    drop(conns);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    // The last head at ~450 ms, the timeout 500 ms after the accept: closed well before the
    // cut (3 s less the cut margin).
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A drain shortened by the total budget (total 2 s, telemetry reserve 900 ms: the drain has
/// at most 1.1 s, though its timeout is 10 s) leaves no time outside the late margin (1 s)
/// plus the cut margin (100 ms): registering the server warns, and the `503` a request gets
/// 50 ms into the drain is counted in the report (its status stays clean: a `503` with
/// `Retry-After` is an answer). Before, the check looked at the drain timeout only: no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_shortened_by_the_total_budget_warns_of_its_503s() {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let served = serve(
        builder()
            .total_budget(Duration::from_secs(2))
            .telemetry_reserve(Duration::from_millis(900)),
    )
    .await;
    drop(guard);
    let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("answered 503"), "no warning: {logged}");
    let mut kept = kept_alive(&served).await;
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Drain).await;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut kept).await;
    let report = finish(served).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert_eq!(report.requests_rejected, 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_handlers_get_connect_info() {
    // axum's `ConnectInfo<SocketAddr>` extractor answers 500 unless the server provides it:
    // finale's does, with the client's end of the connection.
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/who",
        get(
            |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| async move {
                peer.to_string()
            },
        ),
    );
    finale::axum::serve(&finale, "http", listener, app).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .unwrap();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let client_addr = conn.local_addr().unwrap();
    let request = format!("GET /who HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(String::from_utf8_lossy(&body), client_addr.to_string());
    handle.trigger("test");
    let report = finish_run(run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_settings_apply_to_the_connections() {
    // Keep-alive off through hyper's own builder: the first response closes its connection.
    let served = serve_with(builder(), |server| {
        server.hyper(|builder| {
            builder.http1().keep_alive(false);
        })
    })
    .await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    conn.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"ok");
    let mut rest = [0u8; 16];
    assert_eq!(conn.read(&mut rest).await.expect("a clean close"), 0);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_concurrency_limit_holds_under_finales_server() {
    // The documented way to limit concurrency: a tower limit around the whole service (axum's
    // `Router::layer` does not keep `poll_ready`'s permit: use it outside the router); a request
    // too late in the drain is still answered at once (`servers_layers.rs`).
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let control = Arc::new(Control::default());
    let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let (control, entered) = (control.clone(), entered.clone());
        Router::new().route(
            "/slow",
            get(move || {
                let (control, entered) = (control.clone(), entered.clone());
                async move {
                    entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    control.entered.notify_one();
                    control.release.notified().await;
                    "done"
                }
            }),
        )
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::HttpServer::new("http")
        .serve(
            &finale,
            listener,
            tower::limit::ConcurrencyLimit::new(app, 1),
        )
        .unwrap();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    let url = format!("http://{addr}/slow");
    let first = tokio::spawn({
        let url = url.clone();
        async move { get_text(&client(), url).await }
    });
    tokio::time::timeout(BOUND, control.entered.notified())
        .await
        .unwrap();
    let second = tokio::spawn(async move { get_text(&client(), url).await });
    // The second request is in (counted in flight) but waits for the limit.
    let deadline = Instant::now() + BOUND;
    while handle.in_flight().count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(entered.load(std::sync::atomic::Ordering::SeqCst), 1);
    control.release.notify_one();
    assert_eq!(first.await.unwrap().0, 200);
    tokio::time::timeout(BOUND, control.entered.notified())
        .await
        .unwrap();
    assert_eq!(entered.load(std::sync::atomic::Ordering::SeqCst), 2);
    control.release.notify_one();
    assert_eq!(second.await.unwrap().0, 200);
    handle.trigger("test");
    let report = finish_run(run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// On a paused clock (`start_paused`) the header-read timeout is virtual time like every other
/// finale timeout: a partial head is closed at 200 ms of it, and no real time passes. Before,
/// the connection's timer lived on the server's timer thread (the real clock) while its
/// deadline came from the paused one: fired on the real clock, found not due on the paused
/// one, re-armed in the past, the connection task spun at full CPU and the runtime never went
/// idle, so the paused clock never moved (the read below never returned). A real-time guard on
/// the blocking pool ends the test instead of hanging it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn on_a_paused_clock_a_partial_head_is_closed_at_the_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(200);
    let served = serve_with(builder(), |server| server.header_read_timeout(TIMEOUT)).await;
    let mut slow = TcpStream::connect(served.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .unwrap();
    let virtual_start = tokio::time::Instant::now();
    let real_start = Instant::now();
    // A plain thread, not the blocking pool (a blocking task holds the paused clock still).
    let (expired, guard) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(BOUND);
        let _ = expired.send(());
    });
    let mut buf = Vec::new();
    tokio::select! {
        read = slow.read_to_end(&mut buf) => {
            read.unwrap();
        }
        _ = guard => panic!("not closed within {BOUND:?} of real time"),
    }
    let virtual_elapsed = virtual_start.elapsed();
    eprintln!(
        "closed after {virtual_elapsed:?} of virtual time, {:?} of real time",
        real_start.elapsed()
    );
    assert!(virtual_elapsed >= TIMEOUT, "{virtual_elapsed:?}");
    assert!(virtual_elapsed < 5 * TIMEOUT, "{virtual_elapsed:?}");
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// `max_connection_age` moves an HTTP/2 connection known as such by its preface even when it
/// never opened a stream: GOAWAY at its age. Before, the age was looked at once and only a
/// connection that had made an HTTP/2 request counted: an idle one was never told. (This
/// client never answers the server's PING, so the server's graceful close waits for it; the
/// GOAWAY frame is what is looked for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_moves_an_idle_http2_connection() {
    const AGE: Duration = Duration::from_millis(300);
    let served = serve_with(builder(), |server| server.max_connection_age(AGE)).await;
    let mut h2 = TcpStream::connect(served.addr).await.unwrap();
    let start = Instant::now();
    // The HTTP/2 preface and an empty SETTINGS frame; no stream, ever.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // Frames until a GOAWAY (a frame header: length at least 8, type 7) comes, bounded.
    let mut received = Vec::new();
    let goaway = |r: &[u8]| {
        r.windows(4)
            .any(|w| w[..2] == [0, 0] && w[2] >= 8 && w[3] == 7)
    };
    let told = tokio::time::timeout(BOUND, async {
        let mut chunk = [0u8; 1024];
        while !goaway(&received) {
            match h2.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    let elapsed = start.elapsed();
    assert_eq!(told, Ok(true), "no GOAWAY: {received:?}");
    assert!(elapsed >= AGE - Duration::from_millis(50), "{elapsed:?}");
    eprintln!("idle HTTP/2 connection moved after {elapsed:?}");
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A timeout or an age too large for the clock means none: the server serves. Before, the
/// deadline's addition overflowed, the connection task panicked and every client got a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_too_large_for_the_clock_mean_none() {
    let served = serve_with(builder(), |server| {
        server
            .header_read_timeout(Duration::MAX)
            .max_connection_age(Duration::MAX)
            .idle_grace(Duration::MAX)
    })
    .await;
    let (status, body) = get_text(&client(), format!("http://{}/", served.addr)).await;
    assert_eq!(status, 200, "{body:?}");
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// A server's name is the name its listening socket is passed under (`LISTEN_FDNAMES`:
/// systemd's socket activation, an upgrade's hand-off), where `:` separates the names. A name
/// with `:` or a NUL byte, or the upgrade's own `finale.ready`, would make every upgrade fail
/// (the successor finds one name too many and takes no socket; the successor cannot be
/// started; it takes the server's socket for its ready socket): each is refused when the
/// server is registered.
#[tokio::test]
async fn a_server_name_its_socket_cannot_be_passed_under_is_refused() {
    let finale = builder().build().unwrap();
    for name in ["http:main", "a\0b", "finale.ready"] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = finale::axum::serve(&finale, name, listener, Router::new());
        assert!(
            matches!(&refused, Err(finale::ConfigError::ServerName { name: n, .. }) if n == name),
            "{name:?}: {:?}",
            refused.err()
        );
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(finale::axum::serve(&finale, "http-main", listener, Router::new()).is_ok());
}
