//! Serve tonic gRPC services under finale, with tonic-health reporting `NOT_SERVING` from the
//! Announce phase on.
//!
//! tonic's `serve_with_shutdown` closes the listener the moment its signal resolves and then
//! waits for every connection with no deadline: one `Watch` stream or a slow streaming RPC keeps
//! the process alive until SIGKILL. finale serves the [`Routes`] with the same accept loop as
//! [`finale::axum`](crate::axum) (HTTP/2 with prior knowledge, as gRPC clients speak it):
//! the listener closes when the Drain phase starts, connections get GOAWAY, unary and streaming
//! RPCs in flight finish, and whatever is still open shortly before the Drain deadline is cut and
//! named in the report (`POST /pkg.Svc/Method from 127.0.0.1:5555 (stream open at the drain
//! deadline)`).
//!
//! [`report_health`] ties a [`HealthReporter`] to the sequence: `SERVING` once graceful start
//! completed, `NOT_SERVING` as soon as the Announce phase starts — for the overall server (`""`)
//! and for every service you name — so load balancers and clients that watch the health service
//! move away during the drain delay.
//!
//! # Settings
//!
//! [`serve`] uses [`HttpServer`]'s defaults and bounds each call by its client's
//! `grpc-timeout` header ([`GrpcTimeoutLayer`]): when the deadline passes, the handler is
//! dropped and the client gets `DEADLINE_EXCEEDED` in gRPC form (HTTP `200`, a trailers-only
//! `grpc-status: 4`); a malformed header is ignored. For settings, serve the prepared routes
//! with an [`HttpServer`] of your own, tower layers around them:
//!
//! ```ignore
//! let routes = ServiceBuilder::new()
//!     .layer(GrpcTimeoutLayer::new(Some(Duration::from_secs(30)))) // tonic's timeout
//!     .service(routes.prepare());
//! finale::tonic::HttpServer::new("grpc")
//!     .max_connection_age(Duration::from_secs(300))                   // tonic's max_connection_age
//!     .hyper(|b| { b.http2().max_concurrent_streams(200); })          // tonic's max_concurrent_streams
//!     .serve(&finale, addr, routes)?;
//! ```
//!
//! Every tonic `Server` setting and its equivalent here (`b` is hyper-util's connection
//! builder in [`HttpServer::hyper`]):
//!
//! | tonic `Server` | finale |
//! |---|---|
//! | `grpc-timeout` header (always read) | read by [`serve`]; with an [`HttpServer`], `GrpcTimeoutLayer::new(None)` around the routes |
//! | `timeout(d)` | `GrpcTimeoutLayer::new(Some(d))` around the routes (the shorter of it and the header wins). tonic answers `CANCELLED`, finale `DEADLINE_EXCEEDED` (see [`GrpcTimeoutLayer`]) |
//! | `concurrency_limit_per_connection(n)` | no per-connection limit: the routes are shared by every connection. `tower::limit::ConcurrencyLimitLayer` around the routes limits the handlers running in the whole server; `b.http2().max_concurrent_streams(n)` limits the calls one connection may have open (the client queues the rest) |
//! | `load_shed(true)` | `tonic::service::RecoverErrorLayer`, then `tower::load_shed::LoadShedLayer`, then the concurrency limit, around the routes: `RESOURCE_EXHAUSTED` when the limit is reached, as tonic answers |
//! | `max_concurrent_streams(n)` | `b.http2().max_concurrent_streams(n)` |
//! | `initial_stream_window_size`, `initial_connection_window_size`, `http2_adaptive_window`, `max_frame_size`, `http2_max_header_list_size`, `http2_max_pending_accept_reset_streams`, `http2_max_local_error_reset_streams` | the `b.http2()` setting of the same name (`adaptive_window`, `max_header_list_size`, ...) |
//! | `http2_keepalive_interval`, `http2_keepalive_timeout` | `b.http2().keep_alive_interval(..).keep_alive_timeout(..)` (both default the timeout to 20 s) |
//! | `max_connection_age(d)` | [`HttpServer::max_connection_age`] |
//! | `max_connection_age_grace(d)` | none: an aged connection's calls run to their end, bounded by their deadlines and, at shutdown, by the drain deadline. Bound long streams in the handler |
//! | `tcp_nodelay(b)` | [`HttpServer::tcp_nodelay`] (on by default, as in tonic) |
//! | `tcp_keepalive`, `tcp_keepalive_interval`, `tcp_keepalive_retries` | none in finale: set them on a `socket2::Socket` you bind and pass it as a `std::net::TcpListener` ([`Listen`]); on Linux accepted sockets inherit them |
//! | `accept_http1(false)` (tonic's default) | none: finale serves HTTP/1 and HTTP/2, auto-detected, always (hyper-util's `http1_only()` and `http2_only()` do not apply to connections served with upgrades, as finale's are) |
//! | `layer(l)` | [`HttpServer::layer`]`(l)`: outside finale's own answers (a panicking handler's `grpc-status: 13` passes through it), inside the drain tracking; or `l` around the routes, inside those answers |
//! | `trace_fn` | a tracing layer around the routes (for example `tower-http`'s `TraceLayer`) |
//! | `tls_config(..)` | `HttpServer::tls` with a `finale::tls::TlsConfig` (feature `tls`; a rustls `ServerConfig` of your own through `TlsConfig::from_rustls`, client certificates included) |
//! | `serve_with_incoming(..)`, `serve_with_incoming` over a `UnixListenerStream` | [`Listen`]: an address, a std or tokio `TcpListener`, [`Listen::unix`] or a `UnixListener`, or a socket passed by systemd or an upgrade |
//! | `serve_with_shutdown(..)` | the sequence itself: Announce (health `NOT_SERVING`), Drain, the cut at the deadline |
//!
//! On a Unix domain socket ([`Listen::unix`], or a `UnixListener`), handlers find tonic's
//! `UdsConnectInfo` (the peer's address and credentials) in the request's extensions, as
//! with tonic's own server; `Request::remote_addr()` is `None` there, as with tonic's own
//! server too. See [`Listen`](Listen#unix-domain-sockets) for the socket file.
//!
//! # Examples
//!
//! ```no_run
//! use finale::Finale;
//! use tonic::service::Routes;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     let finale = Finale::builder().build()?;
//!     let (reporter, health) = tonic_health::server::health_reporter();
//!     finale::tonic::report_health(&finale, reporter, ["my.pkg.Greeter"])?;
//!     let routes = Routes::new(health); // .add_service(GreeterServer::new(..))
//!     finale::tonic::serve(&finale, "grpc", ([127, 0, 0, 1], 50051), routes)?;
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;

use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use ::tower::Layer;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::Hook;
use crate::phase::Phase;
use crate::task::Task;

pub use self::grpc_timeout::{GrpcTimeout, GrpcTimeoutBody, GrpcTimeoutFuture, GrpcTimeoutLayer};
pub use crate::serve::listen::Listen;
pub use crate::serve::listening::{BindError, Listening, LocalAddr};
pub use crate::serve::server::{
    DEFAULT_CUT_MARGIN, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_GRACE, HttpServer,
};

mod grpc_timeout;

/// The name of the Announce hook that sets `NOT_SERVING`.
pub const HEALTH_HOOK: &str = "grpc-health";

/// Serves `routes` on `listen` as a [`Task::service`] named `name`, with [`HttpServer`]'s
/// defaults: ready once bound, drained in the Drain phase, bounded by its deadline. Each call
/// is bounded by its client's `grpc-timeout` header, as under tonic's `Server`
/// ([`GrpcTimeoutLayer`] with no server-side default).
///
/// # Errors
///
/// As [`Finale::spawn`]: a duplicate or empty name; [`ConfigError::ServerName`] for a name its
/// socket cannot be passed under ([`HttpServer::serve`]).
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn serve(
    finale: &Finale,
    name: impl Into<Cow<'static, str>>,
    listen: impl Into<Listen>,
    routes: Routes,
) -> Result<Listening, ConfigError> {
    let service = GrpcTimeoutLayer::new(None).layer(routes.prepare());
    HttpServer::new(name).serve(finale, listen, service)
}

/// Drives `reporter` from the sequence: `SERVING` for `""` and each of `services` once graceful
/// start completed, `NOT_SERVING` for all of them when the Announce phase starts.
///
/// Registers a hook named [`HEALTH_HOOK`] in the Announce phase and a worker named
/// `grpc-health (serving)`.
///
/// # Errors
///
/// [`ConfigError::DuplicateName`] if registered twice.
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn report_health<I, S>(
    finale: &Finale,
    reporter: HealthReporter,
    services: I,
) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut names: Vec<String> = vec![String::new()];
    names.extend(services.into_iter().map(Into::into));
    let (announce_reporter, announce_names) = (reporter.clone(), names.clone());
    finale.hook(Hook::new(
        Phase::Announce,
        HEALTH_HOOK,
        move |_| async move {
            for name in &announce_names {
                announce_reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        },
    ))?;
    let health = finale.handle().health();
    finale.spawn(Task::worker(
        "grpc-health (serving)",
        move |ctx| async move {
            // Not serving until every service is ready; set at start so clients see a status.
            for name in &names {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tokio::select! {
                () = health.started() => {
                    if !ctx.handle().is_shutdown_requested() {
                        for name in &names {
                            reporter.set_service_status(name, ServingStatus::Serving).await;
                        }
                    }
                    // The shutdown may have been requested while we set SERVING, after the
                    // Announce hook set NOT_SERVING: set it again, NOT_SERVING must win.
                    if ctx.handle().is_shutdown_requested() {
                        for name in &names {
                            reporter.set_service_status(name, ServingStatus::NotServing).await;
                        }
                    }
                }
                () = ctx.handle().shutdown_requested() => {}
            }
        },
    ))
}
