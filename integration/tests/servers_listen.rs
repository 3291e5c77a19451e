//! Addresses as strings: resolved and bound inside graceful start, the bound address readable
//! once the server has bound (port 0 resolved), and a bind that fails (a port in use, an
//! address without a port) a startup failure with a typed error, for every server kind.

use std::io::ErrorKind;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use finale::axum::{BindError, LocalAddr};
use finale::{Finale, Reason, ShutdownStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(10);

fn builder() -> finale::Builder {
    Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
}

fn app() -> Router {
    Router::new().route("/hello", get(|| async { "hello" }))
}

/// One HTTP/1.1 request on a fresh connection; the whole answer.
async fn get_hello(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(BOUND, stream.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    answer
}

/// The bind error behind a startup failure's reason.
fn bind_error(reason: &Reason) -> BindError {
    let Reason::StartupFailed { error, .. } = reason else {
        panic!("not a startup failure: {reason}");
    };
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<BindError>())
        .unwrap_or_else(|| panic!("not a BindError: {error:?}"))
        .clone()
}

#[tokio::test]
async fn a_host_port_string_is_bound_and_its_address_readable_before_run() {
    let finale = builder().build().unwrap();
    let listening = finale::axum::serve(&finale, "http", "127.0.0.1:0", app()).unwrap();
    let by_name = finale::axum::serve(&finale, "by-name", "localhost:0", app()).unwrap();
    let v6 = finale::hyper::serve(
        &finale,
        "v6",
        String::from("[::1]:0"),
        hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"hello"),
            )))
        }),
    )
    .unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let grpc = finale::tonic::serve(
        &finale,
        "grpc",
        "127.0.0.1:0",
        tonic::service::Routes::new(health),
    )
    .unwrap();
    // Bound before `run()`: the app can log "listening on …" now, with the kernel's port.
    let addr = tokio::time::timeout(BOUND, listening.local_addr())
        .await
        .unwrap()
        .unwrap();
    let LocalAddr::Tcp(tcp) = addr else {
        panic!("{addr}")
    };
    assert!(tcp.ip().is_loopback() && tcp.port() != 0, "{addr}");
    assert_eq!(addr.to_string(), tcp.to_string());
    let by_name = by_name.local_addr().await.unwrap().tcp().unwrap();
    assert!(by_name.ip().is_loopback() && by_name.port() != 0);

    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    assert!(get_hello(tcp).await.ends_with("hello"));
    assert!(get_hello(by_name).await.ends_with("hello"));
    let grpc = grpc.local_addr().await.unwrap().tcp().unwrap();
    assert!(
        get_hello(grpc).await.starts_with("HTTP/1.1 "),
        "a gRPC server on {grpc}"
    );
    // IPv6 loopback may be missing in a container: then the bind error says so.
    match v6.local_addr().await {
        Ok(v6) => assert!(get_hello(v6.tcp().unwrap()).await.ends_with("hello")),
        Err(e) => panic!("[::1] not bindable here: {e}"),
    }
    handle.trigger("test");
    let report = run.await.unwrap();
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

/// The `main` of the README's servers section and of `Listening`'s example, with `run()` for
/// `run_and_exit()`: the exit code the process would end with, or the error `main` returns
/// (exit code 1, no report).
async fn documented_main(finale: Finale, bind: String) -> Result<i32, Box<dyn std::error::Error>> {
    let listening = finale::axum::serve(&finale, "http", bind, app())?;
    // A bind error is the run's to report: `run()` ends the start with exit code 3.
    if let Ok(addr) = listening.local_addr().await {
        tracing::info!("listening on {addr}");
    }
    Ok(finale.run().await.exit_code)
}

#[tokio::test]
async fn the_documented_main_exits_with_the_startup_failure_code_on_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let finale = builder().build().unwrap();
    let code = tokio::time::timeout(BOUND, documented_main(finale, bind))
        .await
        .unwrap();
    assert_eq!(code.map_err(|e| e.to_string()), Ok(3));
}

#[test]
fn a_server_stopped_before_it_bound_says_so() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    // `block_on` returns on the block's first poll: the server's task never runs.
    let (finale, listening) = first.block_on(async {
        let finale = builder().build().unwrap();
        let listening = finale::axum::serve(&finale, "http", "127.0.0.1:0", app()).unwrap();
        (finale, listening)
    });
    // The runtime drops the task, and with it the server's side of the `Listening`.
    drop(first);
    drop(finale);
    let error = runtime()
        .block_on(async { tokio::time::timeout(BOUND, listening.local_addr()).await })
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Interrupted, "{error}");
    assert_eq!(error.server(), "http");
    assert_eq!(error.address(), "(not bound)");
}

#[tokio::test]
async fn a_port_in_use_given_as_a_string_fails_the_start_with_a_typed_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let finale = builder().build().unwrap();
    let other = finale::axum::serve(&finale, "other", "127.0.0.1:0", app()).unwrap();
    // Not `localhost:PORT`: it resolves to ::1 too, which may still be free on that port.
    let taken_v4 = format!("127.0.0.1:{}", taken.local_addr().unwrap().port());
    let listening = finale::axum::serve(&finale, "http", taken_v4.clone(), app()).unwrap();
    let report = tokio::time::timeout(BOUND, finale.run()).await.unwrap();
    assert_eq!(report.status, ShutdownStatus::StartupFailure, "{report}");
    assert_eq!(report.exit_code, 3);
    let error = bind_error(&report.reason);
    assert_eq!(error.server(), "http");
    assert_eq!(error.address(), taken_v4);
    assert_eq!(error.kind(), ErrorKind::AddrInUse);
    assert!(
        error
            .to_string()
            .starts_with(&format!("server \"http\" cannot listen on {taken_v4}: ")),
        "{error}"
    );
    // The same error from the handle; the other server was bound, then shut down.
    assert_eq!(
        listening.local_addr().await.unwrap_err().kind(),
        ErrorKind::AddrInUse
    );
    assert!(other.local_addr().await.is_ok());
}

#[tokio::test]
async fn an_address_without_a_port_fails_the_start_naming_it() {
    let finale = builder().build().unwrap();
    let listening = finale::axum::serve(&finale, "http", "localhost", app()).unwrap();
    let report = tokio::time::timeout(BOUND, finale.run()).await.unwrap();
    assert_eq!(report.exit_code, 3, "{report}");
    let error = bind_error(&report.reason);
    assert_eq!(error.address(), "localhost");
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert!(
        report.to_string().contains("cannot listen on localhost"),
        "{report}"
    );
    assert!(listening.local_addr().await.is_err());
}
