//! A tower [`Layer`] that tracks every request as in flight and serves what arrives while
//! draining with `Connection: close` (`503` + `Retry-After` only near the deadline), and
//! `/livez` + `/readyz` as a tower [`Service`].
//!
//! # What the layer does
//!
//! - **Tracks** every request with the core's [`InFlightGuard`], from the
//!   call until the response **body** has ended (or was dropped), so a streamed response counts
//!   until its last byte is handed to the server. The [`Drain`](crate::Phase::Drain) phase
//!   waits for these. (hyper may hold the last bytes a while longer, for a client that reads
//!   slowly; finale's own servers keep such a connection open until they are written.)
//! - **Serves what still arrives while draining**, without an application error: an HTTP/2 (and
//!   gRPC) stream reaches the service only if the peer opened it before the final GOAWAY (h2
//!   refuses later ones itself with `REFUSED_STREAM`, which clients retry transparently), so it
//!   is served; an HTTP/1 request on a connection still open is served and answered with
//!   `Connection: close`. Only an HTTP/1 request that arrives within the
//!   [late margin](Rejection::late_margin) of the Drain deadline, too late to be answered, gets
//!   `503 Service Unavailable` with `Retry-After` and `Connection: close`; each such one is
//!   counted in the report and the `finale_requests_rejected_total` metric (see
//!   [`names`](crate::names)). The response is configurable with [`Rejection`]; a gRPC request
//!   (gRPC-Web over HTTP/1.1) gets it in its own form: `200` with `grpc-status: 14`
//!   (UNAVAILABLE) and the content type of its family (`application/grpc`,
//!   `application/grpc-web`, `application/grpc-web-text`).
//! - **Isolates panics**: a handler that panics gets its request answered `500` (a gRPC or
//!   gRPC-Web request `grpc-status: 13`, INTERNAL, in its own form), counted in the report and in `finale_request_panics_total`;
//!   the connection and the server go on.
//! - **Moves persistent clients politely**: from the Announce phase on (the drain delay, while
//!   the service still serves), HTTP/1 responses carry `Connection: close`, so keep-alive clients
//!   reconnect, through the load balancer, to an instance that stays. A `101 Switching
//!   Protocols` never gets it.
//!
//! # Where it sits among your layers
//!
//! The layer answers what it rejects and the panics it catches itself, so layers *outside* it
//! see those answers and layers *inside* it do not: place it where your tracing, metrics or CORS
//! should see them. finale's own servers build it in and put the tracking outermost; the layers
//! you give [`HttpServer::layer`](crate::axum::HttpServer::layer) wrap its answers (the
//! [`Responder`]), the service's own layers sit inside.
//!
//! The hot path costs the in-flight guard (a load and a store on this thread's own counter) and
//! one atomic load (is the drain on?); no lock, no allocation (the body wrapper lives inline in
//! the response).
//!
//! # Health endpoints and the drain delay
//!
//! [`HealthService`] answers `GET /livez` (`200` until the process exits) and `GET /readyz`
//! (`200` when ready, `503` otherwise). Readiness is off until graceful start has seen every
//! registered server ready, and off again from the [`Announce`](crate::Phase::Announce) phase on.
//! Every `503` it serves is recorded with
//! [`Health::record_not_ready_answer`](crate::Health::record_not_ready_answer), which is what
//! [`DrainDelay::UntilProbed`](crate::DrainDelay::UntilProbed) counts: behind a load balancer
//! that health-checks `/readyz` every second and takes an instance out after three failures,
//! `DrainDelay::UntilProbed { answers: 3, max: 10s }` ends the delay as soon as the LB has seen
//! three "not ready" answers. With no drain delay configured, finale picks one from where it
//! runs: 5 s on Kubernetes or ECS, none on a laptop (see [`Environment`](crate::Environment)).
//!
//! # Examples
//!
//! ```
//! use finale::tower::{DrainLayer, Rejection};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let finale = finale::Finale::builder().read_env(false).build().unwrap();
//! let layer = DrainLayer::new(&finale.handle())
//!     .rejection(Rejection::default().retry_after(Some(Duration::from_secs(2))));
//! // axum: `Router::new().route(..).layer(layer)`; tower: `ServiceBuilder::new().layer(layer)`.
//! # let _ = layer;
//! # }
//! ```

// For the links of the docs above (the layer's code is in `layer.rs`).
#[cfg(doc)]
use ::tower::{Layer, Service};

#[cfg(doc)]
use crate::track::InFlightGuard;

mod admit;
mod body;
mod conn;
mod health;
mod layer;
mod rejection;
mod responder;

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) use admit::admit_on;
pub(crate) use admit::{Admission, Admitted, LayerShared, admit};
pub use body::DrainBody;
pub(crate) use body::Track;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) use conn::Peer;
pub(crate) use conn::{ConnWatch, CutName};
pub use health::HealthService;
pub use layer::{Drain, DrainLayer, ResponseFuture};
pub use rejection::{DEFAULT_LATE_MARGIN, DEFAULT_REJECTION_BODY, DEFAULT_RETRY_AFTER, Rejection};
pub(crate) use rejection::{Grpc, grpc_kind, panic_response};
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) use responder::TooLate;
pub(crate) use responder::handler_panicked;
pub use responder::{Responder, ResponderFuture, ServerLayers};
