//! tonic `Server` settings under finale's server, against tonic's client over loopback: a
//! client's `grpc-timeout` deadline is answered `DEADLINE_EXCEEDED` in gRPC form and the
//! handler is dropped; a malformed header is ignored; a server-side default applies without a
//! header and the shorter deadline wins; a concurrency limit around the routes holds.
//!
//! tonic's `Channel` enforces a request's deadline on its own side too (and then reports
//! `CANCELLED` itself), which would hide what the server does. So the deadline tests put
//! tonic's generated client on a bare hyper HTTP/2 connection: the client codec is tonic's,
//! and the only timer is the server's.
//!
//! The service under test is tonic-health's generated `Health` server with a handler of our
//! own, so no protoc is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use finale::tonic::GrpcTimeoutLayer;
use finale::{Finale, Handle, ShutdownReport, ShutdownStatus};
use http_body::Body as _;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::Layer;

mod common;

use common::served::{finish, wait_in_flight};

const BOUND: Duration = Duration::from_secs(10);

/// What the handlers tell the test: how many run now, the most that ran at once, and a
/// message per handler entered and per handler future dropped (returned or cancelled).
#[derive(Default)]
struct Probe {
    running: AtomicUsize,
    max: AtomicUsize,
}

/// A `Check` that holds until the test adds a permit to `release` (or, with `work`, for that
/// long), counting itself as running from entry until its future is dropped.
#[derive(Clone)]
struct Held {
    probe: Arc<Probe>,
    release: Arc<Semaphore>,
    work: Option<Duration>,
    entered: mpsc::UnboundedSender<()>,
    dropped: mpsc::UnboundedSender<()>,
}

/// Counts a handler as running; on drop, no longer, and says so.
struct Running {
    probe: Arc<Probe>,
    dropped: mpsc::UnboundedSender<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.probe.running.fetch_sub(1, Ordering::SeqCst);
        let _ = self.dropped.send(());
    }
}

#[tonic::async_trait]
impl Health for Held {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let now = self.probe.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.probe.max.fetch_max(now, Ordering::SeqCst);
        let _running = Running {
            probe: self.probe.clone(),
            dropped: self.dropped.clone(),
        };
        let _ = self.entered.send(());
        match self.work {
            Some(work) => tokio::time::sleep(work).await,
            None => self.release.acquire().await.unwrap().forget(),
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving.into(),
        }))
    }

    type WatchStream = tonic::codegen::tokio_stream::Pending<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not under test"))
    }
}

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
    probe: Arc<Probe>,
    release: Arc<Semaphore>,
    entered: mpsc::UnboundedReceiver<()>,
    dropped: mpsc::UnboundedReceiver<()>,
}

impl Served {
    /// Waits (bounded) for the next handler to be dropped.
    async fn handler_dropped(&mut self) {
        tokio::time::timeout(BOUND, self.dropped.recv())
            .await
            .expect("the handler's future is dropped")
            .unwrap();
    }

    /// Ends the run: nothing may be left in flight or cut.
    async fn finish_clean(self) {
        self.handle.trigger("test");
        let report = finish(self.run).await;
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
        assert!(report.cut.is_empty(), "{report}");
    }
}

/// `finale::tonic::serve`: the defaults.
fn tonic_serve(finale: &Finale, listener: std::net::TcpListener, routes: Routes) {
    finale::tonic::serve(finale, "grpc", listener, routes).unwrap();
}

async fn serve(
    work: Option<Duration>,
    how: impl FnOnce(&Finale, std::net::TcpListener, Routes),
) -> Served {
    let finale = Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .drain_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = finale.handle();
    let probe = Arc::new(Probe::default());
    let release = Arc::new(Semaphore::new(0));
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let routes = Routes::new(HealthServer::new(Held {
        probe: probe.clone(),
        release: release.clone(),
        work,
        entered: entered_tx,
        dropped: dropped_tx,
    }));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    how(&finale, listener, routes);
    let run = tokio::spawn(finale.run());
    Served {
        handle,
        addr,
        run,
        probe,
        release,
        entered,
        dropped,
    }
}

/// tonic's generated client on a bare hyper HTTP/2 connection: no client-side deadline.
type RawChannel = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<hyper::body::Incoming>,
    hyper::Error,
>;

async fn raw_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<tonic::body::Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

async fn raw_client(addr: SocketAddr) -> HealthClient<RawChannel> {
    let send = raw_connection(addr).await;
    let channel = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut send = send.clone();
        async move { send.send_request(req).await }
    });
    let origin = format!("http://{addr}").parse().unwrap();
    HealthClient::with_origin(RawChannel::new(channel), origin)
}

/// A `Check` with `grpc-timeout` set to `header` (as is, malformed or not), or none.
fn check(header: Option<&str>) -> Request<HealthCheckRequest> {
    let mut request = Request::new(HealthCheckRequest::default());
    if let Some(value) = header {
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
    }
    request
}

/// The call's error code and how long it took (bounded: no answer at all fails the test).
async fn call_code(
    client: &mut HealthClient<RawChannel>,
    request: Request<HealthCheckRequest>,
) -> (Code, Duration) {
    let start = Instant::now();
    let answer = tokio::time::timeout(BOUND, client.check(request))
        .await
        .expect("the server answers the call");
    let code = answer.map_or_else(|status| status.code(), |_| Code::Ok);
    (code, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_is_answered_deadline_exceeded_and_the_handler_is_dropped() {
    let mut served = serve(None, tonic_serve).await;
    let mut client = raw_client(served.addr).await;
    let mut request = check(None);
    // What a tonic client sends for a 200 ms deadline (`grpc-timeout: 200000u`).
    request.set_timeout(Duration::from_millis(200));
    let (code, elapsed) = call_code(&mut client, request).await;
    assert_eq!(code, Code::DeadlineExceeded, "after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    // The handler was cancelled, not left running for nobody.
    served.handler_dropped().await;
    assert_eq!(served.probe.running.load(Ordering::SeqCst), 0);
    assert_eq!(wait_in_flight(&served.handle, 0).await, 0);
    served.finish_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_at_the_deadline_is_a_trailers_only_grpc_status() {
    let served = serve(None, tonic_serve).await;
    let mut send = raw_connection(served.addr).await;
    let request = http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        served.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "100m")
    // An empty HealthCheckRequest: uncompressed, length 0.
    .body(tonic::body::Body::new(http_body_util::Full::new(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
    )))
    .unwrap();
    let response = tokio::time::timeout(BOUND, send.send_request(request))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["grpc-status"], "4", "{headers:?}");
    // Percent-encoded, as the gRPC spec has it.
    assert_eq!(headers["grpc-message"], "Timeout%20expired", "{headers:?}");
    // Trailers-only: the headers end the stream; no message, no separate trailers.
    assert!(response.body().is_end_stream(), "{headers:?}");
    served.finish_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_grpc_timeout_is_ignored() {
    // Each handler works 300 ms; a malformed deadline read as a short one (a lax parser: 1 ns,
    // or `123456789n` cut to 8 digits) would cut it, one read as absent does not.
    let mut served = serve(Some(Duration::from_millis(300)), tonic_serve).await;
    let mut client = raw_client(served.addr).await;
    for header in ["1x", "123456789n", "m", "-1m", "1.5S", "1 m", "1h"] {
        let (code, elapsed) = call_code(&mut client, check(Some(header))).await;
        assert_eq!(code, Code::Ok, "grpc-timeout: {header:?} after {elapsed:?}");
        served.handler_dropped().await;
    }
    // A well-formed one on the same server is honoured.
    let (code, _) = call_code(&mut client, check(Some("1m"))).await;
    assert_eq!(code, Code::DeadlineExceeded);
    served.finish_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_default_applies_without_a_header_and_the_shorter_deadline_wins() {
    const DEFAULT: Duration = Duration::from_secs(1);
    let mut served = serve(None, |finale, listener, routes| {
        let service = GrpcTimeoutLayer::new(Some(DEFAULT)).layer(routes.prepare());
        finale::tonic::HttpServer::new("grpc")
            .serve(finale, listener, service)
            .unwrap();
    })
    .await;
    let mut client = raw_client(served.addr).await;
    // No header, and a longer client deadline: the server's default.
    for header in [None, Some("10S")] {
        let (code, elapsed) = call_code(&mut client, check(header)).await;
        assert_eq!(code, Code::DeadlineExceeded, "{header:?}");
        assert!(
            elapsed >= DEFAULT && elapsed < DEFAULT + Duration::from_secs(2),
            "{header:?}: answered after {elapsed:?}"
        );
        served.handler_dropped().await;
    }
    // A shorter client deadline: the client's.
    let (code, elapsed) = call_code(&mut client, check(Some("100m"))).await;
    assert_eq!(code, Code::DeadlineExceeded);
    assert!(elapsed < DEFAULT, "answered after {elapsed:?}");
    served.handler_dropped().await;
    assert_eq!(wait_in_flight(&served.handle, 0).await, 0);
    served.finish_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_around_the_routes_holds() {
    const LIMIT: usize = 3;
    let mut served = serve(None, |finale, listener, routes| {
        let service = tower::limit::ConcurrencyLimitLayer::new(LIMIT)
            .layer(GrpcTimeoutLayer::new(None).layer(routes.prepare()));
        finale::tonic::HttpServer::new("grpc")
            .serve(finale, listener, service)
            .unwrap();
    })
    .await;
    // A real tonic channel: LIMIT + 1 concurrent calls on one HTTP/2 connection.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let calls: Vec<_> = (0..=LIMIT)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            tokio::spawn(async move { client.check(HealthCheckRequest::default()).await })
        })
        .collect();
    // Every call has reached the server (the in-flight count is taken before the limit) and
    // LIMIT handlers run.
    assert_eq!(wait_in_flight(&served.handle, LIMIT + 1).await, LIMIT + 1);
    for _ in 0..LIMIT {
        tokio::time::timeout(BOUND, served.entered.recv())
            .await
            .expect("a handler runs")
            .unwrap();
    }
    // Without the limit the last call's handler would run now, next to the others: give it
    // the chance (a bounded wait for what must not happen).
    let extra = tokio::time::timeout(Duration::from_millis(300), served.entered.recv()).await;
    assert!(extra.is_err(), "a handler beyond the limit ran");
    assert_eq!(served.probe.max.load(Ordering::SeqCst), LIMIT);
    // Released one at a time, the waiting call gets the freed permit; all succeed.
    served.release.add_permits(1);
    tokio::time::timeout(BOUND, served.entered.recv())
        .await
        .expect("the last call's handler runs once a permit is free")
        .unwrap();
    served.release.add_permits(LIMIT);
    for call in calls {
        let answer = tokio::time::timeout(BOUND, call).await.unwrap().unwrap();
        assert_eq!(
            answer.unwrap().into_inner().status(),
            ServingStatus::Serving
        );
    }
    assert_eq!(served.probe.max.load(Ordering::SeqCst), LIMIT);
    assert_eq!(wait_in_flight(&served.handle, 0).await, 0);
    served.finish_clean().await;
}
