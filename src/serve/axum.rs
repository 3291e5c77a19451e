//! Serve an axum [`Router`] under finale.
//!
//! axum's own `serve(..).with_graceful_shutdown(..)` drops the listener the instant its signal
//! resolves and then waits for connections with no deadline, so an SSE stream or a slow client
//! keeps the process alive until the platform's SIGKILL. finale serves the router with its own
//! accept loop instead (hyper-util, HTTP/1 and HTTP/2), which:
//!
//! - binds inside the server's task, so a bind error (port in use) fails graceful start;
//!   on a TCP address or, on Unix, a Unix domain socket ([`Listen::unix`]: the same drain,
//!   handlers get `ConnectInfo<tokio::net::unix::SocketAddr>`; see
//!   [`Listen`](Listen#unix-domain-sockets) for the socket file);
//! - keeps serving normally through the [Announce](crate::Phase::Announce) phase (readiness off,
//!   drain delay), and stops accepting only when the [Drain](crate::Phase::Drain) phase starts;
//! - finishes requests in flight, sends HTTP/2 GOAWAY, serves requests still arriving on open
//!   HTTP/1 keep-alive connections with `Connection: close` (`503` + `Retry-After` only near
//!   the deadline);
//! - counts upgraded connections (WebSockets, HTTP/1 CONNECT tunnels) as in flight until they
//!   close;
//! - cuts what is still open shortly before the Drain phase's deadline and names it in the
//!   report (`GET /events from 127.0.0.1:5555 (stream open at the drain deadline)`).
//!
//! See [`HttpServer`] for the settings, and [`health_router`] for `/livez` and `/readyz`.
//!
//! # Layers and finale's own answers
//!
//! finale answers two kinds of request itself: one that arrives too late in the drain (the
//! [`Rejection`](crate::tower::Rejection), `503`) and one whose handler panicked (`500`; in gRPC
//! form for gRPC). Layers on the router (`Router::layer`) sit inside those answers and never
//! see them; layers given to [`HttpServer::layer`] sit outside and see them as any other
//! response, so put request logging, metrics, CORS and compression there:
//!
//! ```ignore
//! finale::axum::HttpServer::new("http")
//!     .layer(tower_http::trace::TraceLayer::new_for_http()) // sees finale's 503s and 500s
//!     .serve(&finale, addr, app)?;
//! ```
//!
//! The in-flight tracking is outside every layer: a request counts from the moment it is read
//! to the last byte of its response, time spent in your layers included.
//!
//! # WebSockets
//!
//! An upgraded connection belongs to its handler, which knows how to say goodbye in its own
//! protocol; finale tells it when, counts it, and ends it if it does not:
//!
//! - From the `101` on, the connection counts as in flight (the Drain phase waits for it) until
//!   the handler drops the socket.
//! - The handler learns that the drain started from
//!   [`Handle::phase_started(Phase::Drain)`](crate::Handle::phase_started): take it before the
//!   upgrade, and on it send a close frame (1001, "going away"); the client reconnects, and since
//!   the listener is closed by then, to another instance.
//! - Still open at the drain deadline (less the [cut margin](HttpServer::cut_margin)), the
//!   socket is shut down (the client sees the connection end, the handler's next read ends) and
//!   the report names it: `GET /ws from 127.0.0.1:5555 (upgraded connection open at the drain
//!   deadline)`.
//!
//! With axum's `ws` feature (not one finale turns on):
//!
//! ```ignore
//! use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
//! use axum::extract::State;
//! use finale::{Cancelled, Handle, Phase};
//!
//! async fn ws(upgrade: WebSocketUpgrade, State(handle): State<Handle>) -> axum::response::Response {
//!     let draining = handle.phase_started(Phase::Drain);
//!     upgrade.on_upgrade(move |socket| session(socket, draining))
//! }
//!
//! async fn session(mut socket: WebSocket, draining: Cancelled) {
//!     tokio::pin!(draining);
//!     loop {
//!         tokio::select! {
//!             () = &mut draining => {
//!                 let close = CloseFrame { code: 1001, reason: "shutting down".into() };
//!                 if socket.send(Message::Close(Some(close))).await.is_ok() {
//!                     while let Some(Ok(_)) = socket.recv().await {} // the client's close
//!                 }
//!                 return;
//!             }
//!             message = socket.recv() => match message {
//!                 Some(Ok(Message::Text(text))) => { let _ = socket.send(Message::Text(text)).await; }
//!                 Some(Ok(_)) => {}
//!                 Some(Err(_)) | None => return,
//!             },
//!         }
//!     }
//! }
//! ```
//!
//! `integration/tests/servers_websocket.rs` runs exactly this against a real WebSocket client.
//! An HTTP/1 `CONNECT` tunnel answered `2xx` is an upgrade too, and is treated the same.
//! Limits: over HTTP/2 (extended CONNECT) finale cannot see when one upgraded stream ends, only
//! when its connection does: such a stream counts in flight until its `2xx`, then holds its
//! connection open (the drain waits for it), and a connection still open at the deadline is cut
//! and named by the extended CONNECT requests it carried (the last 16). With
//! [`DrainLayer`](crate::tower::DrainLayer) in a server of your own, finale does not see the
//! upgraded socket at all: hold an [`InFlightGuard`](crate::InFlightGuard) in the handler for
//! as long as the connection lives.
//!
//! # Examples
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use finale::Finale;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     let finale = Finale::builder().build()?;
//!     let app = Router::new()
//!         .route("/", get(|| async { "hello" }))
//!         .merge(finale::axum::health_router(&finale.handle()));
//!     finale::axum::serve(&finale, "http", ([127, 0, 0, 1], 3000), app)?;
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;

use ::axum::Router;
use ::axum::routing::get;

use crate::config::ConfigError;
use crate::serve::tower::HealthService;
use crate::{Finale, Handle};

pub use crate::serve::listen::Listen;
pub use crate::serve::listening::{BindError, Listening, LocalAddr};
pub use crate::serve::server::{
    DEFAULT_CUT_MARGIN, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_GRACE, HttpServer,
};

/// Serves `router` on `listen` as a [`Task::service`](crate::Task::service) named `name`, with
/// [`HttpServer`]'s defaults. Every request is tracked as in flight and, once draining,
/// served with `Connection: close` (`503` + `Retry-After` only near the deadline; the
/// [`DrainLayer`](crate::tower::DrainLayer) behaviour is built in).
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
    router: Router,
) -> Result<Listening, ConfigError> {
    HttpServer::new(name).serve(finale, listen, router)
}

/// `GET /livez` and `GET /readyz` as an axum [`Router`] to merge into yours; see
/// [`HealthService`].
pub fn health_router(handle: &Handle) -> Router {
    let live = HealthService::new(handle);
    let ready = live.clone();
    Router::new()
        .route(
            "/livez",
            get(move || std::future::ready(live.answer("/livez"))),
        )
        .route(
            "/readyz",
            get(move || std::future::ready(ready.answer("/readyz"))),
        )
}
