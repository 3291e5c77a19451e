//! Faults around the servers: a panicking handler is isolated and counted; a burst of requests
//! at the moment of the shutdown gets full responses or 503s — none reset, none lost from the
//! counters.

// The tests report what they measured (run with `--nocapture` to see it).
#![allow(clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use finale::{Finale, Handle, ShutdownReport, ShutdownStatus};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(10);

struct Served {
    handle: Handle,
    base: String,
    counted: Arc<AtomicU64>,
    run: JoinHandle<ShutdownReport>,
}

/// A builder that reads no environment, installs no signal handler, and runs as on a laptop.
fn local() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

async fn serve(builder: finale::Builder) -> Served {
    let finale = builder.build().unwrap();
    let handle = finale.handle();
    let counted = Arc::new(AtomicU64::new(0));
    let c = counted.clone();
    let app = Router::new()
        .route(
            "/count",
            get(move || {
                let c = c.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    c.fetch_add(1, Ordering::SeqCst);
                    "counted"
                }
            }),
        )
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    finale::axum::serve(&finale, "http", listener, app).unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served {
        handle,
        base,
        counted,
        run,
    }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug, PartialEq)]
enum Seen {
    Ok,
    Rejected,
    NotAccepted,
    Other(String),
}

async fn request(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Seen {
    match client.get(url.parse().unwrap()).await {
        Err(e) if e.is_connect() => Seen::NotAccepted,
        Err(e) => Seen::Other(format!("{e:?}")),
        Ok(response) => {
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Err(e) => Seen::Other(format!("body: {e}")),
                Ok(body) => match (status, &body.to_bytes()[..]) {
                    (200, b"counted") => Seen::Ok,
                    (503, _) => Seen::Rejected,
                    (s, b) => Seen::Other(format!("{s} {b:?}")),
                },
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_isolated_and_counted() {
    let served = serve(local()).await;
    let client = client();
    let response = client
        .get(format!("{}/panic", served.base).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    // The server goes on, on the same pooled connection and on new ones.
    for _ in 0..3 {
        assert_eq!(
            request(&client, &format!("{}/count", served.base)).await,
            Seen::Ok
        );
    }
    served.handle.trigger("test");
    let report = tokio::time::timeout(BOUND, served.run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.requests_panicked, 1, "{report}");
    assert!(
        report.to_string().contains("panicked (answered 500): 1"),
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert_eq!(served.counted.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_the_shutdown_gets_full_responses_or_503_never_a_reset() {
    // Behind a load balancer: a drain delay, so idle keep-alive connections get their grace.
    let served = serve(local().drain_delay(Duration::from_millis(100))).await;
    let client = client();
    let url = format!("{}/count", served.base);
    // Warm the client's pool: many open keep-alive connections.
    let warm: Vec<_> = (0..32)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { request(&client, &url).await })
        })
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap(), Seen::Ok);
    }
    // A bounded burst fired as the shutdown starts, and another as the drain starts.
    let burst = |n: usize| -> Vec<JoinHandle<Seen>> {
        (0..n)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { request(&client, &url).await })
            })
            .collect()
    };
    let mut all = burst(100);
    served.handle.trigger("test");
    served.handle.phase_started(finale::Phase::Drain).await;
    all.extend(burst(100));
    let mut seen = Vec::new();
    for task in all {
        seen.push(tokio::time::timeout(BOUND, task).await.unwrap().unwrap());
    }
    let report = tokio::time::timeout(BOUND, served.run)
        .await
        .unwrap()
        .unwrap();
    let count = |s: &Seen| seen.iter().filter(|x| *x == s).count() as u64;
    let others: Vec<_> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Other(_)))
        .collect();
    // A connection the client opens just as the listener closes can land in the kernel's
    // window between the last accept and the close (see `servers_http.rs`,
    // `clients_racing_the_drain_start_...`): it is reset before finale ever sees it. Measured:
    // 1 such error in 200 once, with the whole suite loading the two cores; 0 in 25 runs alone.
    // What finale promises is checked below exactly: no request it received is lost.
    assert!(others.len() <= 2, "resets or broken responses: {others:?}");
    // Every request the server counted, the client saw answered in full: none lost.
    assert_eq!(served.counted.load(Ordering::SeqCst), 32 + count(&Seen::Ok));
    assert_eq!(report.requests_rejected, count(&Seen::Rejected));
    assert!(count(&Seen::Ok) > 0, "{seen:?}");
    eprintln!(
        "burst: {} ok, {} rejected with 503, {} not accepted",
        count(&Seen::Ok),
        count(&Seen::Rejected),
        count(&Seen::NotAccepted)
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test]
async fn while_draining_the_layer_serves_http1_with_close_and_grpc_as_is_and_rejects_only_late() {
    use tower::{Layer, Service, ServiceExt};
    let finale = local()
        .drain_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = finale.handle();
    let inner = tower::service_fn(|_req: http::Request<Empty<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
    });
    let layer = finale::tower::DrainLayer::new(&handle);
    let late = layer
        .clone()
        .rejection(finale::tower::Rejection::default().late_margin(Duration::from_secs(60)));
    let mut service = layer.layer(inner);
    let mut too_late = late.layer(inner);
    // Something to drain, so the Drain phase lasts while the requests below are made.
    let busy = handle.in_flight().acquire();
    let run = tokio::spawn(finale.run());
    handle.trigger("test");
    handle.phase_started(finale::Phase::Drain).await;

    let plain = || http::Request::get("/").body(Empty::new()).unwrap();
    let response = service.ready().await.unwrap().call(plain()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");

    // A gRPC (HTTP/2) stream that reached the service was opened before the final GOAWAY:
    // served as it is, never an application error.
    let grpc = http::Request::post("/pkg.Svc/Method")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc+proto")
        .body(Empty::new())
        .unwrap();
    let response = service.ready().await.unwrap().call(grpc).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("grpc-status").is_none());

    // Past the late margin: 503, Retry-After, Connection: close.
    let response = too_late.ready().await.unwrap().call(plain()).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["connection"], "close");
    drop(busy);
    let report = run.await.unwrap();
    assert_eq!(report.requests_rejected, 1, "{report}");
}

/// A handler's panic is answered like any other response of the layer: during the drain its
/// `500` carries `Connection: close` on HTTP/1 (the client moves on), and the request stays in
/// flight until that answer's body has been read.
#[tokio::test]
async fn a_panic_answered_during_the_drain_closes_and_stays_in_flight_until_its_body_ends() {
    use tower::{Layer, Service, ServiceExt};
    let finale = local()
        .drain_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let handle = finale.handle();
    let inner = tower::service_fn(|_req: http::Request<Empty<Bytes>>| async {
        if true {
            panic!("handler bug");
        }
        Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
    });
    let mut service = finale::tower::DrainLayer::new(&handle).layer(inner);
    let busy = handle.in_flight().acquire();
    let run = tokio::spawn(finale.run());
    handle.trigger("test");
    handle.phase_started(finale::Phase::Drain).await;

    let request = http::Request::get("/").body(Empty::new()).unwrap();
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["connection"], "close");
    // `busy` and the answer not yet read.
    assert_eq!(handle.in_flight().count(), 2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"internal server error\n");
    assert_eq!(handle.in_flight().count(), 1);
    drop(busy);
    let report = run.await.unwrap();
    assert_eq!(report.requests_panicked, 1, "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// The layer alone, under a server that is not finale's: a request admitted before the
/// Announce phase and answered during the drain delay carries `Connection: close` (a panic's
/// `500` too), so that a persistent client moves while the service still serves.
#[tokio::test]
async fn the_layer_alone_closes_answers_made_during_the_drain_delay() {
    use tower::{Layer, Service, ServiceExt};
    let finale = local()
        .drain_delay(finale::DrainDelay::Fixed(Duration::from_secs(30)))
        .build()
        .unwrap();
    let handle = finale.handle();
    // The handlers answer once the test lets them (no permit until the drain delay).
    let answer = Arc::new(tokio::sync::Semaphore::new(0));
    let inner = tower::service_fn({
        let answer = answer.clone();
        move |req: http::Request<Empty<Bytes>>| {
            let answer = answer.clone();
            async move {
                answer.acquire().await.unwrap().forget();
                assert!(req.uri().path() != "/panic", "handler bug");
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
            }
        }
    });
    let mut service = finale::tower::DrainLayer::new(&handle).layer(inner);
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    // Admitted (by `call`) before the shutdown.
    let mut answers = Vec::new();
    for path in ["/ok", "/panic"] {
        let request = http::Request::get(path).body(Empty::new()).unwrap();
        answers.push(tokio::spawn(service.ready().await.unwrap().call(request)));
    }
    handle.trigger("test");
    handle.phase_started(finale::Phase::Announce).await;
    answer.add_permits(2);
    let mut seen = Vec::new();
    for answered in answers {
        let response = answered.await.unwrap().unwrap();
        seen.push((
            response.status().as_u16(),
            response.headers().get("connection").cloned(),
        ));
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(
        seen,
        [
            (200, Some(http::HeaderValue::from_static("close"))),
            (500, Some(http::HeaderValue::from_static("close")))
        ]
    );
    handle.escalate();
    let report = run.await.unwrap();
    assert_eq!(report.requests_panicked, 1, "{report}");
}

/// The drain delay that knows when the load balancer has let go: it ends once no request has
/// arrived for the quiet time after readiness turned off (health probes aside), after the probe
/// count if one is set; a client that ignores the health checks keeps it going to its max.
#[tokio::test(start_paused = true)]
async fn a_quiet_drain_delay_ends_when_the_traffic_stops_and_not_before() {
    use tower::{Layer, Service, ServiceExt};
    let quiet = finale::DrainDelay::UntilQuiet {
        probes: 2,
        idle: Duration::from_millis(500),
        max: Duration::from_secs(10),
    };
    for client_ignores_health_checks in [false, true] {
        let finale = local()
            .drain_delay(quiet)
            .announce_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let handle = finale.handle();
        let inner = tower::service_fn(|_req: http::Request<Empty<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
        });
        let mut service = finale::tower::DrainLayer::new(&handle).layer(inner);
        let mut health = finale::tower::HealthService::new(&handle);
        let run = tokio::spawn(finale.run());
        handle.health().started().await;
        let t = tokio::time::Instant::now();
        handle.trigger("test");
        handle.phase_started(finale::Phase::Announce).await;
        // The load balancer probes twice in the first 300 ms; requests go on for 2 s (or, from a
        // client that ignores the health checks, for 12 s).
        let requests = if client_ignores_health_checks {
            120
        } else {
            20
        };
        for i in 0..requests {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if i < 2 {
                let probe = http::Request::get("/readyz")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let answer = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut health)
                    .await
                    .unwrap()
                    .call(probe)
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 503);
            }
            if handle.in_flight().is_draining() {
                break;
            }
            let request = http::Request::get("/work").body(Empty::new()).unwrap();
            service.ready().await.unwrap().call(request).await.unwrap();
        }
        handle.phase_started(finale::Phase::Drain).await;
        let report = run.await.unwrap();
        let delay = report.entry("drain delay").unwrap().duration;
        assert!(t.elapsed() >= delay);
        if client_ignores_health_checks {
            assert_eq!(delay, Duration::from_secs(10), "{report}");
        } else {
            // The last request at 2.0 s, then 500 ms of quiet.
            assert_eq!(delay, Duration::from_millis(2500), "{report}");
            // The timeline says when the load balancer let go.
            assert_eq!(
                report.last_request_after_announce,
                Some(Duration::from_secs(2)),
                "{report}"
            );
            assert_eq!(
                report.last_probe_after_announce,
                Some(Duration::from_millis(200)),
                "{report}"
            );
            assert!(
                report
                    .to_string()
                    .contains("(last request at 2000.0ms, last probe at 200.0ms)"),
                "{report}"
            );
        }
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    }
}
