//! The server side of the HTTP overhead bench: a minimal axum handler served one of three ways,
//! chosen by the first argument, on the loopback port given as the second.
//!
//! - `plain`: `axum::serve(listener, router)`, no finale at all;
//! - `plain-ci`: the same with `into_make_service_with_connect_info::<SocketAddr>()`, so that
//!   handlers get `ConnectInfo` as they do behind finale's server (the peer of the instruction
//!   count, `scripts/bench_instructions.py`);
//! - `plain-ci-task`: `plain-ci` awaited in a spawned task, so that its accept loop runs on the
//!   runtime's workers as finale's server does (`plain-ci` accepts on the thread of
//!   `block_on`); glibc gives each thread an arena of its own, and where the accept loop's
//!   allocations land changes the resident size of idle connections
//!   (`scripts/bench_memory.py`);
//! - `finale`: `finale::axum::serve(..)`, finale's accept loop with the drain layer built in;
//! - `layer`: `axum::serve(listener, router.layer(DrainLayer::new(..)))`, the layer alone;
//! - `plain-tls`, `finale-tls`: the handler over HTTPS, tokio-rustls + hyper-util vs finale's;
//! - `plain-tls-ci`: `plain-tls` with the same `ConnectInfo<SocketAddr>` finale's server gives
//!   handlers, inserted as `axum::serve` inserts it (`into_make_service_with_connect_info`,
//!   asked for each connection's service with the client's address).
//!
//! And unary gRPC, tonic-health's `grpc.health.v1.Health/Check` (no codegen needed):
//!
//! - `plain-grpc`: tonic's own `Server` (`add_routes(..).serve_with_incoming(..)`, TCP_NODELAY on);
//! - `finale-grpc`: `finale::tonic::serve(..)`;
//! - `plain-grpc-tls`, `finale-grpc-tls`: the same over TLS, tonic's own (`ServerTlsConfig`,
//!   rustls with ring) vs finale's `HttpServer::tls`.
//!
//! It prints `listening on 127.0.0.1:<port>` once bound and exits on SIGTERM. Driven by
//! `scripts/bench_http.py`, which runs a load generator against each variant in turn:
//!
//! ```sh
//! python3 scripts/bench_http.py
//! # or by hand:
//! cargo bench --features axum --bench http_server -- finale 3000
//! ```
//!
//! Run without a variant (as a plain `cargo bench` does) it prints its usage and exits.

// A bench reports; the library never prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use axum::routing::get;
use finale::Finale;
use finale::tower::DrainLayer;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: http_server <plain|plain-ci|plain-ci-task|finale|layer|plain-tls|plain-tls-ci|finale-tls|\
                     plain-grpc|finale-grpc|plain-grpc-tls|finale-grpc-tls> <port>";

const VARIANTS: [&str; 12] = [
    "plain",
    "plain-ci",
    "plain-ci-task",
    "finale",
    "layer",
    "plain-tls",
    "plain-tls-ci",
    "finale-tls",
    "plain-grpc",
    "finale-grpc",
    "plain-grpc-tls",
    "finale-grpc-tls",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (variant, port) = match args.as_slice() {
        [variant, port, ..] if VARIANTS.contains(&variant.as_str()) => match port.parse::<u16>() {
            Ok(port) => (variant.clone(), port),
            Err(_) => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        },
        // `cargo bench` with no filter runs every bench target with `--bench`: nothing to do.
        _ => {
            eprintln!("{USAGE} (run by scripts/bench_http.py)");
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(&variant, port));
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello, world" }))
}

async fn run(variant: &str, port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = std::net::TcpListener::bind(addr).expect("bind the loopback port");
    match variant {
        "plain-grpc" | "plain-grpc-tls" => {
            let mut server = tonic::transport::Server::builder();
            if variant == "plain-grpc-tls" {
                let (cert, key) = self_signed();
                let identity = tonic::transport::Identity::from_pem(cert, key);
                server = server
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .expect("tonic's TLS configuration");
            }
            listener
                .set_nonblocking(true)
                .expect("a non-blocking listener");
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            // `Server::tcp_nodelay` does not reach a listener of one's own: set it on the
            // incoming stream, as finale's server sets it.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
            println!("listening on {addr} ({variant})");
            server
                .add_routes(grpc_routes())
                .serve_with_incoming_shutdown(incoming, async move {
                    term.recv().await;
                })
                .await
                .expect("serve");
        }
        "finale-grpc" => {
            let finale = Finale::builder().build().expect("a finale configuration");
            finale::tonic::serve(&finale, "grpc", listener, grpc_routes())
                .expect("register the server");
            println!("listening on {addr} ({variant})");
            let _report = finale.run().await;
        }
        "finale-grpc-tls" => {
            let finale = Finale::builder().build().expect("a finale configuration");
            let (cert, key) = self_signed();
            let tls = finale::tls::TlsConfig::from_pem(cert.as_bytes(), key.as_bytes())
                .expect("a TLS configuration");
            // What `finale::tonic::serve` serves, over TLS.
            let service = tower::Layer::layer(
                &finale::tonic::GrpcTimeoutLayer::new(None),
                grpc_routes().prepare(),
            );
            finale::tonic::HttpServer::new("grpcs")
                .tls(tls)
                .serve(&finale, listener, service)
                .expect("register the server");
            println!("listening on {addr} ({variant})");
            let _report = finale.run().await;
        }
        "finale-tls" => {
            let finale = Finale::builder().build().expect("a finale configuration");
            let (cert, key) = self_signed();
            let tls = finale::tls::TlsConfig::from_pem(cert.as_bytes(), key.as_bytes())
                .expect("a TLS configuration");
            finale::axum::HttpServer::new("https")
                .tls(tls)
                .serve(&finale, listener, app())
                .expect("register the server");
            println!("listening on {addr} ({variant})");
            let _report = finale.run().await;
        }
        "plain-tls" | "plain-tls-ci" => {
            // What axum-server's rustls acceptor does: tokio-rustls in front of hyper-util's
            // auto connection, one task per connection; `plain-tls-ci` adds the connect info as
            // `axum::serve` does (`plain-tls` asks for it too, per connection, and drops it).
            let (cert, key) = self_signed();
            let tls = finale::tls::TlsConfig::from_pem(cert.as_bytes(), key.as_bytes())
                .expect("a TLS configuration");
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&tls));
            listener
                .set_nonblocking(true)
                .expect("a non-blocking listener");
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
            println!("listening on {addr} ({variant})");
            let connect_info = variant == "plain-tls-ci";
            let plain = hyper_util::service::TowerToHyperService::new(app());
            let mut make = app().into_make_service_with_connect_info::<SocketAddr>();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, peer)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let (acceptor, plain) = (acceptor.clone(), plain.clone());
                        let service = tower::Service::call(&mut make, peer);
                        tokio::spawn(async move {
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let io = hyper_util::rt::TokioIo::new(stream);
                            if connect_info {
                                let Ok(service) = service.await;
                                let service = hyper_util::service::TowerToHyperService::new(service);
                                let _ = builder.serve_connection_with_upgrades(io, service).await;
                            } else {
                                let _ = builder.serve_connection_with_upgrades(io, plain).await;
                            }
                        });
                    }
                    _ = term.recv() => break,
                }
            }
        }
        "finale" => {
            let finale = Finale::builder().build().expect("a finale configuration");
            finale::axum::serve(&finale, "http", listener, app()).expect("register the server");
            println!("listening on {addr} ({variant})");
            let _report = finale.run().await;
        }
        _ => {
            // `plain`, `plain-ci` and `layer` share everything but the layer, so the difference between
            // them is the layer's own cost, and `finale` minus `layer` is the accept loop's.
            let finale = Finale::builder()
                .no_signals()
                .build()
                .expect("a finale configuration");
            let router = if variant == "layer" {
                app().layer(DrainLayer::new(&finale.handle()))
            } else {
                app()
            };
            listener
                .set_nonblocking(true)
                .expect("a non-blocking listener");
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            // TCP_NODELAY on every accepted connection, as finale's server sets it: the variants
            // differ in the accept loop only.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
            println!("listening on {addr} ({variant})");
            if variant == "plain-ci-task" {
                let service = router.into_make_service_with_connect_info::<SocketAddr>();
                let served = tokio::spawn(async move { axum::serve(listener, service).await });
                tokio::select! {
                    result = served => result.expect("join").expect("serve"),
                    _ = term.recv() => {}
                }
            } else if variant == "plain-ci" {
                let service = router.into_make_service_with_connect_info::<SocketAddr>();
                tokio::select! {
                    result = axum::serve(listener, service) => result.expect("serve"),
                    _ = term.recv() => {}
                }
            } else {
                tokio::select! {
                    result = axum::serve(listener, router) => result.expect("serve"),
                    _ = term.recv() => {}
                }
            }
            drop(finale);
        }
    }
}

/// tonic-health's service, `SERVING` for `""`: `Check` is a unary call with a 5-byte request.
fn grpc_routes() -> tonic::service::Routes {
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::service::Routes::new(health)
}

/// A certificate for `localhost` and `127.0.0.1` and its key (PEM), made at start.
fn self_signed() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate parameters");
    let cert = params.self_signed(&key).expect("a certificate");
    (cert.pem(), key.serialize_pem())
}

/// The same rustls configuration finale's server uses (ring provider, ALPN h2 + http/1.1).
fn tls_config(tls: &finale::tls::TlsConfig) -> std::sync::Arc<rustls::ServerConfig> {
    tls.rustls_config()
}
