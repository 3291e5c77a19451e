//! Where finale's drain answers sit among the user's own layers, against real clients.
//!
//! `HttpServer::layer` puts a layer outside the requests finale answers itself (a rejection too
//! late in the drain, the `500` of a panicking handler), so the user's tracing or metrics see
//! them; the service's own layers (axum's `Router::layer`) stay inside. The in-flight tracking
//! covers both: a response held in a user layer holds the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use finale::{Finale, Handle, Phase, ShutdownReport, ShutdownStatus};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::util::MapResponseLayer;
use tower::{Layer, Service};

const BOUND: Duration = Duration::from_secs(10);

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

/// The statuses (and `grpc-status`, if any) a layer saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn layer<B>(&self) -> MapResponseLayer<impl Fn(Response<B>) -> Response<B> + Clone + use<B>> {
        let seen = self.clone();
        MapResponseLayer::new(move |response: Response<B>| {
            let grpc = response
                .headers()
                .get("grpc-status")
                .map(|v| format!(" grpc-status {}", v.to_str().unwrap()))
                .unwrap_or_default();
            seen.0
                .lock()
                .unwrap()
                .push(format!("{}{grpc}", response.status().as_u16()));
            response
        })
    }

    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
        .route("/grpc", post(|| async { "never served while too late" }))
}

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
}

async fn start(finale: Finale, addr: SocketAddr) -> Served {
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served { handle, addr, run }
}

async fn finish(served: Served) -> ShutdownReport {
    tokio::time::timeout(BOUND, served.run)
        .await
        .expect("the run ends")
        .unwrap()
}

fn listener() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{addr}{path}").parse().unwrap();
    let response = client.get(url).await.unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

/// Reads one HTTP/1.1 response head (and its Content-Length body) from a raw stream.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return head;
        }
        let n = stream.read(&mut chunk).await.expect("no reset");
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A kept-alive HTTP/1.1 connection that has been served once.
async fn kept_alive(addr: SocketAddr) -> TcpStream {
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    kept
}

/// Starts the drain and waits until the listener refuses new connections.
async fn drain_started(served: &Served) {
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Drain).await;
    let deadline = Instant::now() + BOUND;
    while TcpStream::connect(served.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_passes_through_the_servers_layers_and_not_through_the_routers() {
    let (outside, inside) = (Seen::default(), Seen::default());
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    finale::axum::HttpServer::new("http")
        .layer(outside.layer())
        .serve(&finale, listener, app().layer(inside.layer()))
        .unwrap();
    let served = start(finale, addr).await;
    assert_eq!(get_status(addr, "/").await, 200);
    assert_eq!(get_status(addr, "/panic").await, 500);
    // The router's own layer sits inside finale's panic isolation: it never sees the 500.
    assert_eq!(inside.get(), ["200"]);
    assert_eq!(outside.get(), ["200", "500"]);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.requests_panicked, 1, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_late_in_the_drain_is_rejected_through_the_servers_layers() {
    let outside = Seen::default();
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    // A late margin longer than the drain: every HTTP/1 request during it is too late.
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .layer(outside.layer())
        .serve(&finale, listener, app())
        .unwrap();
    let served = start(finale, addr).await;
    let mut kept = kept_alive(addr).await;
    drain_started(&served).await;
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(outside.get(), ["200", "503"]);
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 1, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_request_too_late_in_the_drain_is_rejected_in_grpc_form() {
    let outside = Seen::default();
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .layer(outside.layer())
        .serve(&finale, listener, app())
        .unwrap();
    let served = start(finale, addr).await;
    let mut kept = kept_alive(addr).await;
    drain_started(&served).await;
    // gRPC-Web travels over HTTP/1.1: its clients read the status from `grpc-status`.
    let request = format!(
        "POST /grpc HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc-web+proto\r\n\
         content-length: 5\r\n\r\n\0\0\0\0\0"
    );
    kept.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 14"), "{head}");
    assert!(
        head.contains("grpc-message: shutting down, retry on another instance"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(outside.get(), ["200", "200 grpc-status 14"]);
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 1, "{report}");
}

/// A layer whose responses wait for `release` before they go out.
#[derive(Clone)]
struct Hold {
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl<S> Layer<S> for Hold {
    type Service = Held<S>;

    fn layer(&self, inner: S) -> Held<S> {
        Held {
            inner,
            hold: self.clone(),
        }
    }
}

#[derive(Clone)]
struct Held<S> {
    inner: S,
    hold: Hold,
}

impl<S, R> Service<R> for Held<S>
where
    S: Service<R> + Send,
    S::Future: Send + 'static,
    S::Response: Send,
    S::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        let hold = self.hold.clone();
        Box::pin(async move {
            let response = fut.await;
            hold.entered.notify_one();
            hold.release.notified().await;
            response
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_held_in_a_servers_layer_holds_the_drain() {
    let hold = Hold {
        entered: Arc::new(Notify::new()),
        release: Arc::new(Notify::new()),
    };
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    finale::axum::HttpServer::new("http")
        .layer(hold.clone())
        .serve(&finale, listener, app())
        .unwrap();
    let served = start(finale, addr).await;
    let response = tokio::spawn(get_status(addr, "/"));
    hold.entered.notified().await;
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Drain).await;
    assert_eq!(served.handle.in_flight().count(), 1);
    hold.release.notify_one();
    assert_eq!(response.await.unwrap(), 200);
    let report = finish(served).await;
    assert_eq!(report.in_flight_at_drain_start, 1, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_grpc_handler_is_answered_in_grpc_form_through_the_servers_layers() {
    let outside = Seen::default();
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    let service = tower::service_fn(|_req: Request<hyper::body::Incoming>| async {
        if true {
            panic!("gRPC handler bug");
        }
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
    });
    finale::tonic::HttpServer::new("grpc")
        .layer(outside.layer())
        .serve(&finale, listener, service)
        .unwrap();
    let served = start(finale, addr).await;
    // A real HTTP/2 client with prior knowledge, as gRPC clients connect.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::post(format!("http://{addr}/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "13");
    assert_eq!(outside.get(), ["200 grpc-status 13"]);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.requests_panicked, 1, "{report}");
}

/// A route that holds its request until the drain deadline cuts it.
fn with_slow(router: Router) -> Router {
    router.route(
        "/slow",
        get(|| async {
            std::future::pending::<()>().await;
            "never"
        }),
    )
}

/// Sends `GET /slow` on a fresh connection and waits until it is in flight.
async fn hold_slow(served: &Served) -> TcpStream {
    let mut slow = TcpStream::connect(served.addr).await.unwrap();
    slow.write_all(format!("GET /slow HTTP/1.1\r\nHost: {}\r\n\r\n", served.addr).as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while served.handle.in_flight().count() < 1 {
        assert!(Instant::now() < deadline, "/slow never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    slow
}

/// Reads until the end of the stream (or a reset); what came.
async fn read_to_end(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_late_is_answered_at_once_even_when_the_service_is_not_ready() {
    // A concurrency limit on the service, its one permit held by a request that never ends:
    // the late request is answered 503 at once, not after the limit (or at the cut).
    let finale = builder()
        .drain_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let (listener, addr) = listener();
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .serve(
            &finale,
            listener,
            tower::limit::ConcurrencyLimit::new(with_slow(app()), 1),
        )
        .unwrap();
    let served = start(finale, addr).await;
    let mut kept = kept_alive(addr).await;
    let _slow = hold_slow(&served).await;
    drain_started(&served).await;
    let asked = Instant::now();
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_to_end(&mut kept).await;
    let waited = asked.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 1, "{report}");
    assert_eq!(report.cut.len(), 1, "only /slow is cut: {report}");
    assert!(report.cut[0].starts_with("GET /slow"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_by_a_servers_limit_at_the_cut_is_named_once_and_not_counted_rejected() {
    // A limit given to `HttpServer::layer` holds finale's answers too (documented): the late
    // request waits for the permit, is cut at the deadline, and is reported exactly once.
    let finale = builder()
        .drain_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (listener, addr) = listener();
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .serve(&finale, listener, with_slow(app()))
        .unwrap();
    let served = start(finale, addr).await;
    let mut kept = kept_alive(addr).await;
    let _slow = hold_slow(&served).await;
    drain_started(&served).await;
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_to_end(&mut kept).await;
    let report = finish(served).await;
    let port = kept.local_addr().unwrap().port();
    let named = report
        .cut
        .iter()
        .filter(|c| c.contains(&format!(":{port} ")))
        .count();
    // Cut while it waits for the permit (named, no answer); or, when the cut of `/slow` frees
    // the permit a moment before its own connection is cut, answered 503 (counted rejected).
    // Never both, never neither.
    if answer.is_empty() {
        assert_eq!((report.requests_rejected, named), (0, 1), "{report}");
    } else {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        assert_eq!((report.requests_rejected, named), (1, 0), "{report}");
    }
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_request_a_layer_had_served_is_not_counted_rejected() {
    // A layer that rebuilds the request drops finale's mark: the request is served, and the
    // report does not call it a rejection.
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    let served_count = Arc::new(AtomicUsize::new(0));
    let app = app().route(
        "/count",
        get({
            let served_count = served_count.clone();
            move || async move {
                served_count.fetch_add(1, Ordering::SeqCst);
                "served"
            }
        }),
    );
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .layer(tower::util::MapRequestLayer::new(
            |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().clear();
                req
            },
        ))
        .serve(&finale, listener, app)
        .unwrap();
    let served = start(finale, addr).await;
    let mut kept = kept_alive(addr).await;
    drain_started(&served).await;
    kept.write_all(format!("GET /count HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(served_count.load(Ordering::SeqCst), 1);
    let report = finish(served).await;
    assert_eq!(report.requests_rejected, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_answers_keep_the_grpc_web_content_type() {
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    let app = app().route(
        "/gpanic",
        post(|| async {
            if true {
                panic!("gRPC-Web handler bug");
            }
            "unreachable"
        }),
    );
    finale::axum::HttpServer::new("http")
        // The kept connection waits out the drain's start (a loaded machine may take longer
        // than the default idle grace).
        .idle_grace(Duration::from_secs(5))
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)))
        .serve(&finale, listener, app)
        .unwrap();
    let served = start(finale, addr).await;
    // A panic: `grpc-status: 13` in gRPC-Web form.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(
        format!(
            "POST /gpanic HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc-web+proto\r\n\
             content-length: 5\r\n\r\n\0\0\0\0\0"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 13"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web\r\n"),
        "{head}"
    );
    // Too late in the drain, base64 flavour: `grpc-status: 14`, `application/grpc-web-text`.
    drain_started(&served).await;
    kept.write_all(
        format!(
            "POST /grpc HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc-web-text\r\n\
             content-length: 8\r\n\r\nAAAAAAA="
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut kept).await;
    assert!(head.contains("grpc-status: 14"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web-text"),
        "{head}"
    );
    let report = finish(served).await;
    assert_eq!(
        (report.requests_panicked, report.requests_rejected),
        (1, 1),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_services_call_itself_passes_through_the_servers_layers() {
    // A service that panics in `call`, before its future exists (work done before an `async`
    // block): still the handler's panic, answered inside the layers.
    let outside = Seen::default();
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    let service = tower::service_fn(|req: Request<hyper::body::Incoming>| {
        assert!(
            req.uri().path() != "/sync-panic",
            "a bug before the async block"
        );
        async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    finale::axum::HttpServer::new("http")
        .layer(outside.layer())
        .serve(&finale, listener, service)
        .unwrap();
    let served = start(finale, addr).await;
    assert_eq!(get_status(addr, "/").await, 200);
    assert_eq!(get_status(addr, "/sync-panic").await, 500);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.requests_panicked, 1, "{report}");
    assert_eq!(outside.get(), ["200", "500"]);
}

/// With no layer added the server calls the service itself: a panic in its `call` (before its
/// future exists) is still the handler's, answered `500` and counted once, and the server goes
/// on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_services_call_on_a_server_with_no_layer_is_answered_500() {
    let finale = builder().build().unwrap();
    let (listener, addr) = listener();
    let service = tower::service_fn(|req: Request<hyper::body::Incoming>| {
        assert!(
            req.uri().path() != "/sync-panic",
            "a bug before the async block"
        );
        async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    finale::axum::HttpServer::new("http")
        .serve(&finale, listener, service)
        .unwrap();
    let served = start(finale, addr).await;
    assert_eq!(get_status(addr, "/sync-panic").await, 500);
    assert_eq!(get_status(addr, "/").await, 200);
    served.handle.trigger("test");
    let report = finish(served).await;
    assert_eq!(report.requests_panicked, 1, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// Fails its readiness once, and panics if asked again (tower allows a service whose readiness
/// failed to).
#[derive(Clone)]
struct FailsOnce {
    failed: bool,
}

impl Service<Request<hyper::body::Incoming>> for FailsOnce {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        assert!(!self.failed, "poll_ready asked again after it failed");
        self.failed = true;
        Poll::Ready(Err(std::io::Error::other("backend gone")))
    }

    fn call(&mut self, _req: Request<hyper::body::Incoming>) -> Self::Future {
        unreachable!("never ready")
    }
}

/// A service whose readiness failed is not asked again, with or without layers around it: its
/// error is the answer (hyper closes the connection), not a panic counted as the handler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_readiness_is_not_asked_again_with_or_without_layers() {
    for layers in ["none", "identity", "buffer"] {
        let finale = builder().build().unwrap();
        let (listener, addr) = listener();
        let server = finale::axum::HttpServer::new("http");
        let service = FailsOnce { failed: false };
        match layers {
            "identity" => server
                .layer(tower::layer::util::Identity::new())
                .serve(&finale, listener, service),
            // One `Responder` for every request: the buffer's worker keeps it.
            "buffer" => server
                .layer(tower::buffer::BufferLayer::new(8))
                .serve(&finale, listener, service),
            _ => server.serve(&finale, listener, service),
        }
        .unwrap();
        let served = start(finale, addr).await;
        // Two requests, one after the other: the second must not find the failed service.
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(
                    format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
                .await
                .expect("the connection ends");
            assert!(
                answer.is_empty(),
                "layers {layers}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        served.handle.trigger("test");
        let report = finish(served).await;
        assert_eq!(report.requests_panicked, 0, "layers {layers}: {report}");
    }
}
