//! Serve an axum [`Router`] under finale.
//!
//! axum's own `serve(..).with_graceful_shutdown(..)` drops the listener the instant its signal
//! resolves and then waits for connections with no deadline, so an SSE stream or a slow client
//! keeps the process alive until the platform's SIGKILL. finale serves the router with its own
//! accept loop instead (hyper-util, HTTP/1 and HTTP/2), which:
//!
//! - binds inside the server's task, so a bind error (port in use) fails graceful start;
//! - keeps serving normally through the [Announce](crate::Phase::Announce) phase (readiness off,
//!   drain delay), and stops accepting only when the [Drain](crate::Phase::Drain) phase starts;
//! - finishes requests in flight, sends HTTP/2 GOAWAY, answers requests still arriving on open
//!   HTTP/1 keep-alive connections with `503` + `Retry-After` + `Connection: close`;
//! - cuts what is still open shortly before the Drain phase's deadline and names it in the
//!   report (`GET /events from 127.0.0.1:5555 (stream open at the drain deadline)`).
//!
//! See [`HttpServer`] for the settings, and [`health_router`] for `/livez` and `/readyz`.
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

pub use crate::serve::accept::{
    DEFAULT_CUT_MARGIN, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_GRACE, HttpServer, Listen,
};

/// Serves `router` on `listen` as a [`Task::service`](crate::Task::service) named `name`, with
/// [`HttpServer`]'s defaults. Every request is tracked as in flight and, once draining, rejected
/// with `503` (the [`DrainLayer`](crate::tower::DrainLayer) behaviour is built in).
///
/// # Errors
///
/// As [`Finale::spawn`]: a duplicate or empty name.
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn serve(
    finale: &Finale,
    name: impl Into<Cow<'static, str>>,
    listen: impl Into<Listen>,
    router: Router,
) -> Result<(), ConfigError> {
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
