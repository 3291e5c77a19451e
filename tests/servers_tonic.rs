//! gRPC under finale against a real tonic client over loopback: tonic-health reports
//! NOT_SERVING during the Announce phase while calls still succeed; a unary call in flight when
//! the drain starts completes; a server-streaming call open at the drain deadline is cut and
//! named in the report; after the drain starts, new connections are refused.
//!
//! tonic-health's own service is the service under test: `Check` is unary and `Watch` is
//! server-streaming (it never ends by itself), so no protoc is needed.

#![cfg(feature = "tonic")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use finale::{ExitStatus, Finale, Handle, Phase, ShutdownReport};
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
    assert!(!served.handle.is_draining(), "still in the drain delay");
    let report = finish(served).await;
    assert_eq!(report.status, ExitStatus::Clean, "{report}");
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
    served.handle.drain_started().await;
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
    assert_eq!(report.status, ExitStatus::Clean, "{report}");
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
    assert_eq!(report.status, ExitStatus::DeadlineOverrun, "{report}");
    let statuses = tokio::time::timeout(BOUND, reading).await.unwrap().unwrap();
    assert!(
        statuses.contains(&ServingStatus::NotServing),
        "{statuses:?}"
    );
}
