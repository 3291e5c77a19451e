//! axum and hyper servers drained by finale, against real clients over loopback.
//!
//! The numbered proofs of the server issue: (1) a request in flight completes, (2) `/readyz`
//! answers 503 during the drain delay while requests still succeed, (3) new connections are
//! refused and a kept-alive HTTP/1.1 connection gets a 503 with `Connection: close`, never a
//! reset, (4) an HTTP/2 client gets GOAWAY and its in-flight stream completes, (6) a stream that
//! never ends is cut at the drain deadline and named in the report, (7) a port in use fails the
//! start and the other server is shut down.

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
    let finale = builder.build().unwrap();
    let handle = finale.handle();
    let control = Arc::new(Control::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::serve(&finale, "http", listener, app(&handle, control.clone())).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof3_new_connections_are_refused_and_a_kept_alive_connection_gets_503_close() {
    // A drain delay is configured (as behind a load balancer), so idle keep-alive connections
    // get a grace period in which late requests are answered 503 instead of reset.
    let served = serve(builder().drain_delay(Duration::from_millis(200))).await;
    let mut kept = TcpStream::connect(served.addr).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr);
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"ok");

    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    // The listener closes right after the drain starts: new connections are refused.
    let deadline = Instant::now() + BOUND;
    while TcpStream::connect(served.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::task::yield_now().await;
    }
    // A request on the kept-alive connection: 503, Retry-After, Connection: close, then EOF.
    kept.write_all(request.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut kept).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(body, finale::tower::DEFAULT_REJECTION_BODY.as_bytes());
    let mut rest = [0u8; 16];
    assert_eq!(
        kept.read(&mut rest)
            .await
            .expect("a clean close, not a reset"),
        0
    );

    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 1);
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
        .get(format!("http://{}/events", served.addr).parse().unwrap())
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
