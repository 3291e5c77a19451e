//! gRPC under finale against a real tonic client over loopback: tonic-health reports
//! NOT_SERVING during the Announce phase while calls still succeed; a unary call in flight when
//! the drain starts completes; a server-streaming call open at the drain deadline is cut and
//! named in the report; after the drain starts, new connections are refused.
//!
//! tonic-health's own service is the service under test: `Check` is unary and `Watch` is
//! server-streaming (it never ends by itself), so no protoc is needed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use finale::{Finale, Handle, Phase, ShutdownReport, ShutdownStatus};
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BOUND: Duration = Duration::from_secs(10);
const SERVICE: &str = "finale.test.Greeter";

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
}

async fn serve(builder: finale::Builder) -> Served {
    let finale = builder
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .build()
        .unwrap();
    let handle = finale.handle();
    let (reporter, health) = tonic_health::server::health_reporter();
    finale::tonic::report_health(&finale, reporter, [SERVICE]).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::tonic::serve(&finale, "grpc", listener, Routes::new(health)).unwrap();
    let run = tokio::spawn(finale.run());
    Served { handle, addr, run }
}

async fn client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn status(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

/// Polls (bounded) until the health service reports `want` for `service`.
async fn wait_status(client: &mut HealthClient<Channel>, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + BOUND;
    loop {
        if status(client, service).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "{service} never became {want:?}");
        tokio::task::yield_now().await;
    }
}

async fn finish(served: Served) -> ShutdownReport {
    tokio::time::timeout(BOUND, served.run)
        .await
        .expect("the run ends")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_during_announce_while_calls_still_succeed() {
    let served = serve(Finale::builder().drain_delay(Duration::from_millis(1500))).await;
    let mut client = client(served.addr).await;
    wait_status(&mut client, "", ServingStatus::Serving).await;
    wait_status(&mut client, SERVICE, ServingStatus::Serving).await;
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Announce).await;
    // The Announce hook runs at the start of the phase; the server still answers.
    wait_status(&mut client, "", ServingStatus::NotServing).await;
    wait_status(&mut client, SERVICE, ServingStatus::NotServing).await;
    assert!(
        !served.handle.in_flight().is_draining(),
        "still in the drain delay"
    );
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(
        report
            .entry(finale::tonic::HEALTH_HOOK)
            .unwrap()
            .outcome
            .is_completed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_in_flight_completes_and_new_connections_are_refused() {
    // A Watch stream opened before the shutdown delivers its first message at once; a unary
    // Check sent on the same connection while the drain starts must still complete.
    let served = serve(Finale::builder().drain_delay(Duration::from_millis(300))).await;
    let mut client = client(served.addr).await;
    wait_status(&mut client, "", ServingStatus::Serving).await;
    served.handle.trigger("test");
    served.handle.phase_started(Phase::Announce).await;
    wait_status(&mut client, SERVICE, ServingStatus::NotServing).await;
    // Sent during the delay, answered whatever the drain is doing: never an error.
    let call = {
        let mut client = client.clone();
        tokio::spawn(async move { status(&mut client, SERVICE).await })
    };
    served.handle.phase_started(finale::Phase::Drain).await;
    assert_eq!(
        call.await.unwrap(),
        ServingStatus::NotServing,
        "set at the start of Announce"
    );
    // The listener is closed: a new connection is refused, it does not hang.
    let deadline = Instant::now() + BOUND;
    while tokio::net::TcpStream::connect(served.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::task::yield_now().await;
    }
    let endpoint = Endpoint::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    assert!(
        tokio::time::timeout(BOUND, endpoint.connect())
            .await
            .unwrap()
            .is_err()
    );
    let report = finish(served).await;
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_open_at_the_drain_deadline_is_cut_and_named() {
    let served = serve(
        Finale::builder()
            .drain_timeout(Duration::from_secs(1))
            .total_budget(Duration::from_secs(4))
            .telemetry_reserve(Duration::from_secs(1)),
    )
    .await;
    let mut client = client(served.addr).await;
    wait_status(&mut client, SERVICE, ServingStatus::Serving).await;
    let mut stream = client
        .watch(HealthCheckRequest {
            service: SERVICE.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let start = Instant::now();
    served.handle.trigger("test");
    // The stream sees NOT_SERVING, then ends when the server cuts it at the deadline.
    let reading = tokio::spawn(async move {
        let mut statuses = Vec::new();
        while let Ok(Some(message)) = stream.message().await {
            statuses.push(message.status());
        }
        statuses
    });
    let report = finish(served).await;
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(
        report
            .cut
            .iter()
            .any(|c| c.contains("/grpc.health.v1.Health/Watch from 127.0.0.1:")),
        "{report}"
    );
    assert_eq!(report.status, ShutdownStatus::DeadlineOverrun, "{report}");
    let statuses = tokio::time::timeout(BOUND, reading).await.unwrap().unwrap();
    assert!(
        statuses.contains(&ServingStatus::NotServing),
        "{statuses:?}"
    );
}

/// The health service behind a gate: a `Check` call tells `entered`, then waits for the gate to
/// open before the health service answers. A unary call held in flight, without generated code.
#[derive(Clone)]
struct Gated<S> {
    inner: S,
    entered: tokio::sync::mpsc::UnboundedSender<()>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl<S> tonic::server::NamedService for Gated<S> {
    const NAME: &'static str = "grpc.health.v1.Health";
}

type GatedFuture<T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, std::convert::Infallible>> + Send + 'static>,
>;

impl<S> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Gated<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = GatedFuture<Self::Response>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let gated = req.uri().path().ends_with("/Check");
        let entered = self.entered.clone();
        let mut open = self.open.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            if gated {
                let _ = entered.send(());
                let _ = open.wait_for(|open| *open).await;
            }
            fut.await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_held_in_flight_across_the_drain_start_completes() {
    // Unlike a fast Check sent during the delay, this call is provably still running when the
    // drain starts and the listener closes: the run must wait for it and it must succeed.
    let finale = Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .drain_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = finale.handle();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (open_tx, open) = tokio::sync::watch::channel(false);
    let gated = Gated {
        inner: health,
        entered: entered_tx,
        open,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::tonic::serve(&finale, "grpc", listener, Routes::new(gated)).unwrap();
    let run = tokio::spawn(finale.run());

    let mut client = client(addr).await;
    let call = tokio::spawn(async move { status(&mut client, "").await });
    tokio::time::timeout(BOUND, entered.recv())
        .await
        .expect("the call reaches the service")
        .unwrap();

    handle.trigger("test");
    tokio::time::timeout(BOUND, handle.phase_started(finale::Phase::Drain))
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener never closed");
        tokio::task::yield_now().await;
    }
    assert!(!call.is_finished(), "the call ended before the gate opened");
    assert!(!run.is_finished(), "the run ended with a call in flight");

    open_tx.send(true).unwrap();
    let answered = tokio::time::timeout(BOUND, call)
        .await
        .expect("the call completes")
        .unwrap();
    assert_eq!(answered, ServingStatus::Serving);
    let report = tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.cut.is_empty(), "{report}");
    assert_eq!(report.in_flight_at_drain_start, 1, "{report}");
}
