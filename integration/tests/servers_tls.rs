//! HTTPS served by finale's server (feature `tls`), against real clients: curl over HTTP/1.1 and
//! HTTP/2 (certificates made here with rcgen), h2load across the drain start, a client that
//! stalls in its handshake, and certificates that do not go together.

#![cfg(unix)]
// The tests report what they measured (run with `--no-capture` to see it).
#![allow(clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use common::components::{find_binary, in_ci};
use common::pki::{Pki, pki};
use common::served::finish;
use finale::tls::TlsConfig;
use finale::{Finale, Handle, ShutdownReport, ShutdownStatus};
use tokio::task::JoinHandle;

const BOUND: Duration = Duration::from_secs(15);

struct Served {
    handle: Handle,
    addr: SocketAddr,
    run: JoinHandle<ShutdownReport>,
    served: Arc<AtomicUsize>,
}

async fn serve(pki: &Pki) -> Served {
    let finale = Finale::builder()
        .read_env(false)
        .no_signals()
        .environment(finale::Environment::Local)
        .build()
        .unwrap();
    let handle = finale.handle();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                async { "ok" }
            }),
        )
        .route(
            "/who",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow ok"
            }),
        );
    let tls = TlsConfig::from_pem(pki.server.0.as_bytes(), pki.server.1.as_bytes()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    finale::axum::HttpServer::new("https")
        .tls(tls)
        .serve(&finale, listener, app)
        .unwrap();
    let run = tokio::spawn(finale.run());
    tokio::time::timeout(BOUND, handle.health().started())
        .await
        .expect("graceful start completes");
    Served {
        handle,
        addr,
        run,
        served,
    }
}

/// The CA in a file, for curl's `--cacert`.
fn ca_file(pki: &Pki, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("finale-tls-{}-{name}.pem", std::process::id()));
    std::fs::write(&path, &pki.ca).unwrap();
    path
}

fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = find_binary(name);
    if found.is_none() {
        assert!(
            !in_ci(),
            "{name} (Debian package {package}) is missing under CI=true"
        );
        eprintln!("SKIPPING: {name} is not installed ({package})");
    }
    found
}

/// `curl` with the test CA; returns (HTTP version, body).
async fn curl(ca: &PathBuf, url: &str, http2: bool) -> (String, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl {url}: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (body, tail) = text.rsplit_once('\n').unwrap();
    (tail.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_https_over_http1_and_http2_and_a_request_in_flight_finishes() {
    if tool("curl", "curl").is_none() {
        return;
    }
    let pki = pki("server");
    let ca = ca_file(&pki, "curl");
    let served = serve(&pki).await;
    let base = format!("https://localhost:{}", served.addr.port());
    let (v1, body1) = curl(&ca, &format!("{base}/who"), false).await;
    let (v2, body2) = curl(&ca, &format!("{base}/who"), true).await;
    eprintln!("curl over TLS: {v1} from {body1}; {v2} from {body2}");
    assert_eq!(v1, "1.1 200");
    assert_eq!(v2, "2 200");
    assert!(
        body1.starts_with("127.0.0.1:"),
        "ConnectInfo over TLS: {body1}"
    );

    // A request in flight when the drain starts completes.
    let slow = tokio::spawn({
        let (ca, url) = (ca.clone(), format!("{base}/slow"));
        async move { curl(&ca, &url, false).await }
    });
    let deadline = Instant::now() + BOUND;
    while served.handle.in_flight().count() == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    served.handle.trigger("test");
    let (v, body) = tokio::time::timeout(BOUND, slow).await.unwrap().unwrap();
    let report = finish(served.run).await;
    assert_eq!((v.as_str(), body.as_str()), ("1.1 200", "slow ok"));
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    let _ = std::fs::remove_file(&ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_over_https_across_the_drain_start_sees_no_error_status() {
    let Some(h2load) = tool("h2load", "nghttp2-client") else {
        return;
    };
    let pki = pki("server");
    for round in 0..3 {
        let served = serve(&pki).await;
        let child = tokio::process::Command::new(&h2load)
            .args(["-n", "100000", "-c", "8", "-m", "16", "-t", "1"])
            .arg(format!("https://127.0.0.1:{}/", served.addr.port()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Bounded poll: the load is running once 2000 requests were served.
        let deadline = Instant::now() + BOUND;
        while served.served.load(Ordering::Relaxed) < 2000 {
            assert!(Instant::now() < deadline, "h2load never got going");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        served.handle.trigger("test");
        let output = tokio::time::timeout(BOUND, child.wait_with_output())
            .await
            .expect("h2load ends once the server is gone")
            .unwrap();
        let report = finish(served.run).await;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let (requests, codes) = (line("requests:"), line("status codes:"));
        eprintln!("h2load over TLS, round {round}: {requests} | {codes}");
        let count = |kind: &str| {
            codes
                .split(',')
                .find(|c| c.trim_end().ends_with(kind))
                // "status codes: 2139 2xx" or " 0 5xx": the number just before the kind.
                .and_then(|c| c.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
        };
        assert_eq!(count("5xx"), Some(0), "{text}");
        assert!(count("2xx").is_some_and(|n| n >= 2000), "{text}");
        // Every answer was a 2xx. Streams h2load opened after the server's final GOAWAY are
        // refused at the h2 level (REFUSED_STREAM, which clients retry; h2load counts them as
        // failed and does not reconnect): never an application error.
        let of = |kind: &str| {
            requests
                .split(',')
                .find(|c| c.trim_end().ends_with(kind))
                .and_then(|c| c.split_whitespace().rev().nth(1)?.parse::<u64>().ok())
        };
        assert_eq!(count("2xx"), of("succeeded"), "{text}");
        assert_eq!(report.requests_rejected, 0, "{report}");
        assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_handshake_does_not_hold_the_drain() {
    let pki = pki("server");
    let served = serve(&pki).await;
    // Connected, and nothing more: no ClientHello.
    let _stalled = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let start = Instant::now();
    served.handle.trigger("test");
    let report = finish(served.run).await;
    let elapsed = start.elapsed();
    eprintln!("a stalled handshake: the drain ended {elapsed:?} after the trigger");
    // The idle grace (1 s) and no more; the handshake timeout is 10 s.
    assert!(
        elapsed < Duration::from_secs(3),
        "took {elapsed:?}: {report}"
    );
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
}

#[test]
fn certificates_that_do_not_go_together_are_a_typed_error() {
    let (a, b) = (pki("a"), pki("b"));
    let err = TlsConfig::from_pem(a.server.0.as_bytes(), b.server.1.as_bytes()).unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.what, "certificate chain");
    assert!(err.reason.contains("does not go with the key"), "{err}");
    let err = TlsConfig::from_pem(b"not pem", a.server.1.as_bytes()).unwrap_err();
    assert_eq!(err.what, "certificate chain");
    let err =
        TlsConfig::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
    assert_eq!(err.path, Some(PathBuf::from("/nonexistent/cert.pem")));
    assert!(err.reason.contains("cannot read it"), "{err}");
}
