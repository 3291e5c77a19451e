//! finale's servers on Unix domain sockets, against real clients (curl, hyper and tonic over
//! `UnixStream`): the same drain as on TCP (requests in flight complete, the accept queue is
//! answered, a listener that closed refuses, what is open at the deadline is cut and named by
//! its Unix peer), the frameworks' own connect info, and what happens to the socket file (a
//! stale one is replaced, a live one or a non-socket fails the start, finale's own is removed
//! when the server stops, one it did not create is left).
#![cfg(unix)]
// The tests report what they measured (run with `--no-capture` to see it).
#![allow(clippy::print_stderr)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use bytes::Bytes;
use finale::axum::{HttpServer, Listen};
use finale::{Finale, Handle, Phase, ShutdownReport, ShutdownStatus};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(10);
const BIG: usize = 256 * 1024;

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

/// A directory of its own for a test's socket, removed with everything in it at the end.
struct SockDir(PathBuf);

impl SockDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "finale-uds-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("http.sock")
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the test controls in the app.
#[derive(Default)]
struct Control {
    /// How many `/slow` requests reached the handler.
    entered: AtomicUsize,
    entered_changed: Notify,
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
            // What axum's `ConnectInfo` says on a Unix socket: the client's (unnamed) address.
            "/who",
            get(
                |ConnectInfo(peer): ConnectInfo<tokio::net::unix::SocketAddr>| async move {
                    format!(
                        "unnamed={} path={:?}",
                        peer.is_unnamed(),
                        peer.as_pathname()
                    )
                },
            ),
        )
        .route(
            // A slow request: 300 ms of work, then a big body.
            "/slow",
            get(move || {
                let control = control.clone();
                async move {
                    control.entered.fetch_add(1, Ordering::SeqCst);
                    control.entered_changed.notify_waiters();
                    tokio::time::sleep(Duration::from_millis(300)).await;
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

struct Served {
    handle: Handle,
    control: Arc<Control>,
    run: JoinHandle<ShutdownReport>,
}

/// A finale serving [`app`] on `listen`, started (ready) unless `started` is false.
async fn serve(builder: finale::Builder, listen: impl Into<Listen>) -> Served {
    let finale = builder.build().unwrap();
    let handle = finale.handle();
    let control = Arc::new(Control::default());
    HttpServer::new("http")
        .serve(&finale, listen, app(&handle, control.clone()))
        .unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served {
        handle,
        control,
        run,
    }
}

async fn finish(run: JoinHandle<ShutdownReport>) -> ShutdownReport {
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the run ends")
        .unwrap()
}

/// One HTTP/1.1 GET over a fresh Unix socket connection with hyper's client: status and body.
async fn get_unix(path: &Path, uri: &str) -> Result<(u16, Bytes), String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let request = http::Request::get(uri)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// curl's `--unix-socket`: the status line's code and the body, or `None` without curl outside
/// CI.
async fn curl(path: &Path, url: &str) -> Option<(String, String)> {
    let output = match tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--unix-socket",
        ])
        .arg(path)
        .args(["--write-out", "\n%{http_code}", url])
        .output()
        .await
    {
        Ok(output) => output,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED the curl half: curl not found ({e})");
            return None;
        }
        Err(e) => panic!("curl is needed under CI: {e}"),
    };
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = String::from_utf8(output.stdout).unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    Some((code.to_owned(), body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_service_on_a_unix_socket_answers_curl_and_hyper_with_the_uds_connect_info() {
    let dir = SockDir::new("basic");
    let path = dir.sock();
    let served = serve(builder(), Listen::unix(&path)).await;
    assert!(path.exists(), "finale bound the path");

    if let Some((code, body)) = curl(&path, "http://localhost/").await {
        assert_eq!((code.as_str(), body.as_str()), ("200", "ok"));
    }
    let (status, body) = get_unix(&path, "/who").await.unwrap();
    assert_eq!(status, 200);
    // A client socket has no path: the handler sees the unnamed address, as axum::serve on a
    // `UnixListener` would give it.
    assert_eq!(body, Bytes::from_static(b"unnamed=true path=None"));

    served.handle.trigger("test");
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(!path.exists(), "the socket file finale created is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_in_flight_complete_and_a_closed_listener_refuses() {
    const CLIENTS: usize = 16;
    let dir = SockDir::new("drain");
    let path = dir.sock();
    let served = serve(builder(), Listen::unix(&path)).await;

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { get_unix(&path, "/slow").await })
        })
        .collect();
    // Every request is in the handler (its 300 ms of work ahead) before the shutdown.
    tokio::time::timeout(BOUND, async {
        loop {
            let changed = served.control.entered_changed.notified();
            if served.control.entered.load(Ordering::SeqCst) == CLIENTS {
                break;
            }
            changed.await;
        }
    })
    .await
    .expect("every request reaches the handler");
    served.handle.trigger("test");

    // New connections until the listener is gone: each one that connects is answered in full;
    // then connecting fails (refused, or the file is gone), never a reset mid-response.
    let start = Instant::now();
    let mut answered_late = 0;
    let refused = loop {
        assert!(start.elapsed() < BOUND, "the listener closes");
        match UnixStream::connect(&path).await {
            Err(e) => break e,
            Ok(stream) => {
                drop(stream);
                match get_unix(&path, "/").await {
                    Ok((status, body)) => {
                        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
                        answered_late += 1;
                    }
                    Err(e) if e.starts_with("connect:") => {}
                    Err(e) => panic!("a connection made was not answered: {e}"),
                }
            }
        }
        tokio::task::yield_now().await;
    };
    eprintln!("answered after the trigger: {answered_late}; then connect said: {refused}");
    assert!(
        matches!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        ),
        "{refused}"
    );

    for client in clients {
        let (status, body) = client.await.unwrap().expect("a complete response");
        assert_eq!(status, 200);
        assert_eq!(body.len(), BIG);
    }
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.cut.is_empty(), "{report}");
    assert!(
        !path.exists(),
        "the socket file is removed once the server stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_at_the_drain_deadline_is_cut_and_named_by_its_unix_peer() {
    let dir = SockDir::new("cut");
    let path = dir.sock();
    let served = serve(
        builder()
            .drain_timeout(Duration::from_secs(1))
            .total_budget(Duration::from_secs(4))
            .telemetry_reserve(Duration::from_secs(1)),
        Listen::unix(&path),
    )
    .await;
    let stream = UnixStream::connect(&path).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            http::Request::get("/events?token=s3cret")
                .header(http::header::HOST, "localhost")
                .body(Empty::<Bytes>::new())
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

    served.handle.trigger("test");
    let report = finish(served.run).await;
    // The client is this process: the kernel's peer credentials name it.
    let name = format!(
        "GET /events from pid {} on unix:{} (stream open at the drain deadline)",
        std::process::id(),
        path.display()
    );
    assert_eq!(report.cut, vec![name], "{report}");
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    // The client saw the stream end (the connection closed), it did not hang.
    tokio::time::timeout(BOUND, reading).await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test(flavor = "current_thread")]
async fn connections_in_the_accept_queue_at_the_drain_start_get_an_answer() {
    // The runtime's only thread is held in an Announce hook while 16 clients connect and send
    // their request: the kernel queues them on the listener, nothing accepts them. Then the
    // Drain starts; closing the listener now would reset all 16. Each must get its 200.
    const CLIENTS: usize = 16;
    let dir = SockDir::new("queue");
    let path = dir.sock();
    let finale = builder().build().unwrap();
    let handle = finale.handle();
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
    HttpServer::new("http")
        .serve(
            &finale,
            Listen::unix(&path),
            app(&handle, Arc::new(Control::default())),
        )
        .unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");

    let clients = std::thread::spawn({
        let path = path.clone();
        move || {
            held_rx
                .recv_timeout(BOUND)
                .expect("the hook holds the runtime");
            let mut conns: Vec<std::os::unix::net::UnixStream> = (0..CLIENTS)
                .map(|_| {
                    let mut conn = std::os::unix::net::UnixStream::connect(&path)
                        .expect("the kernel queues it");
                    std::io::Write::write_all(
                        &mut conn,
                        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
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
        }
    });
    handle.trigger("test");
    let report = finish(run).await;
    let outcomes = tokio::task::spawn_blocking(move || clients.join().unwrap())
        .await
        .unwrap();
    assert_eq!(outcomes, vec!["ok".to_owned(); CLIENTS], "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// The health service, recording tonic's `UdsConnectInfo` and `remote_addr()` for each call.
#[derive(Clone)]
struct Peered<S> {
    inner: S,
    seen: tokio::sync::mpsc::UnboundedSender<(
        Option<tonic::transport::server::UdsConnectInfo>,
        Option<std::net::SocketAddr>,
    )>,
}

impl<S> tonic::server::NamedService for Peered<S> {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl<S> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Peered<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let mut probe = tonic::codegen::http::Request::new(());
        *probe.extensions_mut() = req.extensions().clone();
        let probe = tonic::Request::from_http(probe);
        let info = probe
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .cloned();
        let _ = self.seen.send((info, probe.remote_addr()));
        self.inner.call(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_unary_call_over_a_unix_socket_sees_uds_connect_info() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = SockDir::new("tonic");
    let path = dir.sock();
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let routes = tonic::service::Routes::new(Peered {
        inner: health,
        seen: seen_tx,
    });
    finale::tonic::serve(&finale, "grpc", Listen::unix(&path), routes).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .unwrap();

    // tonic's uds example: any URI, a connector that opens the socket.
    let channel =
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn({
                let path = path.clone();
                move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }
            }))
            .await
            .unwrap();
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(response.into_inner().status(), ServingStatus::Serving);

    let (info, remote) = tokio::time::timeout(BOUND, seen.recv())
        .await
        .unwrap()
        .unwrap();
    eprintln!("tonic handler saw {info:?}, remote_addr {remote:?}");
    let info = info.expect("UdsConnectInfo in the request's extensions");
    assert!(info.peer_addr.expect("the peer address").is_unnamed());
    let cred = info.peer_cred.expect("the peer's credentials");
    assert_eq!(cred.pid(), Some(i32::try_from(std::process::id()).unwrap()));
    // As with tonic's own server on a Unix socket: no socket address to give.
    assert_eq!(remote, None);

    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced_and_removed_at_the_end() {
    let dir = SockDir::new("stale");
    let path = dir.sock();
    // A previous instance that is gone: its socket file stays, nothing accepts on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::os::unix::net::UnixStream::connect(&path).is_err());

    let served = serve(builder(), Listen::unix(&path)).await;
    let (status, body) = get_unix(&path, "/").await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    served.handle.trigger("test");
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(!path.exists());
}

/// A finale serving [`app`] on `listen` whose start is expected to fail: its report.
async fn failed_start(listen: impl Into<Listen>) -> ShutdownReport {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    HttpServer::new("http")
        .serve(&finale, listen, app(&handle, Arc::new(Control::default())))
        .unwrap();
    finish(tokio::spawn(finale.run())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_another_process_accepts_on_fails_the_start_and_is_left_alone() {
    let dir = SockDir::new("live");
    let path = dir.sock();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();

    let report = failed_start(Listen::unix(&path)).await;
    assert_eq!(report.status, ShutdownStatus::StartupFailure, "{report}");
    let text = report.to_string();
    assert!(
        text.contains("another process accepts connections on it"),
        "{text}"
    );
    // The other process's socket still works.
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    other.set_nonblocking(true).unwrap();
    let (_accepted, _) = other
        .accept()
        .expect("the other server still gets connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_socket_fails_the_start_and_is_left_alone() {
    let dir = SockDir::new("file");
    let path = dir.sock();
    std::fs::write(&path, b"not a socket").unwrap();

    let report = failed_start(Listen::unix(&path)).await;
    assert_eq!(report.status, ShutdownStatus::StartupFailure, "{report}");
    assert!(report.to_string().contains("is not a socket"), "{report}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_bound_by_the_user_is_served_and_its_file_left() {
    let dir = SockDir::new("user");
    let path = dir.sock();
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let served = serve(builder(), listener).await;
    let (status, _) = get_unix(&path, "/").await.unwrap();
    assert_eq!(status, 200);
    served.handle.trigger("test");
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(path.exists(), "finale removes only the files it created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_file_replaced_while_serving_is_not_removed() {
    // Another instance removed finale's file and bound its own at the path: at its stop, finale
    // must not remove the other's socket.
    let dir = SockDir::new("replaced");
    let path = dir.sock();
    let served = serve(builder(), Listen::unix(&path)).await;
    std::fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(path.exists(), "the other instance's socket stays");
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    drop(other);
}

/// A finale serving `tag` on `listen`, run on its own task.
fn start_tagged(listen: Listen, tag: &'static str) -> (Handle, JoinHandle<ShutdownReport>) {
    let finale = builder().build().unwrap();
    let handle = finale.handle();
    HttpServer::new("http")
        .serve(
            &finale,
            listen,
            Router::new().route("/", get(move || async move { tag })),
        )
        .unwrap();
    (handle, tokio::spawn(finale.run()))
}

/// Graceful start completed, or the run ended (a failed start ends it).
async fn started_or_ended(
    handle: &Handle,
    run: &mut JoinHandle<ShutdownReport>,
) -> Option<ShutdownReport> {
    let health = handle.health();
    tokio::time::timeout(BOUND, async {
        tokio::select! {
            () = health.started() => None,
            report = &mut *run => Some(report.unwrap()),
        }
    })
    .await
    .expect("the start ends one way or the other")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_on_one_stale_file_never_both_start() {
    // Both see the stale file refused; without the start-up lock the second removed the socket
    // the first had just bound (both "started", the first unreachable), or failed with a bare
    // ENOENT when the file went between its steps.
    let dir = SockDir::new("race");
    let path = dir.sock();
    let (mut both, mut refused, mut other) = (0, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    while rounds < 300 && Instant::now() < deadline {
        rounds += 1;
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // stale
        let (h1, mut r1) = start_tagged(Listen::unix(&path), "one");
        let (h2, mut r2) = start_tagged(Listen::unix(&path), "two");
        let e1 = started_or_ended(&h1, &mut r1).await;
        let e2 = started_or_ended(&h2, &mut r2).await;
        h1.trigger("test");
        h2.trigger("test");
        let r1 = match e1 {
            Some(report) => report,
            None => finish(r1).await,
        };
        let r2 = match e2 {
            Some(report) => report,
            None => finish(r2).await,
        };
        let clean = |r: &ShutdownReport| r.status == ShutdownStatus::Clean;
        match (clean(&r1), clean(&r2)) {
            (true, true) => both += 1,
            (true, false) | (false, true) => {
                let failed = if clean(&r1) { &r2 } else { &r1 };
                let text = failed.to_string();
                if text.contains("another process accepts") || text.contains("accept queue full") {
                    refused += 1;
                } else {
                    other.push(text);
                }
            }
            (false, false) => other.push(format!("{r1}\n{r2}")),
        }
    }
    eprintln!(
        "{rounds} rounds: both started {both}, one refused cleanly {refused}, other {}",
        other.len()
    );
    // The lock closes the window between telling the file stale and removing it; under a full
    // test suite's load one round in 300 still saw both start (measured once): the race the
    // docs call narrowed, not closed. Without the lock: 2 of 300 and 6 bare ENOENT failures.
    assert!(
        both <= 3,
        "two instances started on one path in {both} of {rounds} rounds"
    );
    assert!(other.is_empty(), "{}", other[0]);
    assert_eq!(refused + both, rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_socket_path_is_removed_after_a_chdir() {
    // A daemon's `chdir` after the start: the file finale created is still the one removed.
    // (nextest runs each test in a process of its own: the working directory is this test's.)
    let (a, b) = (SockDir::new("chdir-a"), SockDir::new("chdir-b"));
    std::env::set_current_dir(&a.0).unwrap();
    let (handle, mut run) = start_tagged(Listen::unix("rel.sock"), "a");
    assert!(started_or_ended(&handle, &mut run).await.is_none());
    assert!(a.0.join("rel.sock").exists());
    std::env::set_current_dir(&b.0).unwrap();
    handle.trigger("test");
    let report = finish(run).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(
        !a.0.join("rel.sock").exists(),
        "finale's own socket file is left behind"
    );
}
