//! A plain hyper service under finale (`finale::hyper::serve`): HTTP/1.1 and HTTP/2 on one port,
//! a request in flight completes, a request on a kept-alive connection during the drain is served
//! with `Connection: close`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use finale::{Finale, ShutdownStatus};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyper_service_drains_over_http1_and_http2() {
    let finale = Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .drain_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let handle = finale.handle();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (e, r) = (entered.clone(), release.clone());
    let service = service_fn(move |req: Request<Incoming>| {
        let (e, r) = (e.clone(), r.clone());
        async move {
            if req.uri().path() == "/slow" {
                e.notify_one();
                r.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hyper"))))
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::hyper::serve(&finale, "hyper", listener, service).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    let uri = |path: &str| format!("http://{addr}{path}");
    let get = |path: &str| Request::get(uri(path)).body(Empty::<Bytes>::new()).unwrap();

    // HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
    let (mut h1, c1) = hyper::client::conn::http1::handshake(TokioIo::new(
        TcpStream::connect(addr).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(c1);
    let (mut h2, c2) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(TcpStream::connect(addr).await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(c2);
    let response = h1.send_request(get("/")).await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "hyper"
    );

    // An HTTP/2 request in flight when the shutdown starts completes.
    let slow = tokio::spawn(h2.send_request(get("/slow")));
    entered.notified().await;
    handle.trigger("test");
    handle.phase_started(finale::Phase::Drain).await;
    release.notify_one();
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "hyper"
    );

    // A request on the kept-alive HTTP/1.1 connection during the drain: served, with
    // Connection: close (a 503 only past the late margin near the deadline).
    let response = h1.send_request(get("/")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");

    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    assert_eq!(report.requests_rejected, 0);
    assert_eq!(report.in_flight_at_drain_start, 1);
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}
