//! A tower [`Layer`] that tracks every request as in flight and serves what arrives while
//! draining with `Connection: close` (`503` + `Retry-After` only near the deadline), and
//! `/livez` + `/readyz` as a tower [`Service`].
//!
//! # What the layer does
//!
//! - **Tracks** every request with the core's [`InFlightGuard`], from the
//!   call until the response **body** has ended (or was dropped), so a streamed response counts
//!   until its last byte. The [`Drain`](crate::Phase::Drain) phase waits for these.
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

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use ::tower::{Layer, Service};
use bytes::Bytes;
use http::header::{CONNECTION, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::Handle;
use crate::track::{InFlight, InFlightGuard};

mod body;
mod conn;
mod health;
mod rejection;
mod responder;

pub use body::DrainBody;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) use conn::Peer;
pub(crate) use conn::{ConnWatch, CutName};
pub use health::HealthService;
pub use rejection::{DEFAULT_LATE_MARGIN, DEFAULT_REJECTION_BODY, DEFAULT_RETRY_AFTER, Rejection};
pub(crate) use rejection::{Grpc, grpc_kind, panic_response};
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
pub(crate) use responder::TooLate;
pub(crate) use responder::handler_panicked;
pub use responder::{Responder, ResponderFuture, ServerLayers};

fn is_http1(version: Version) -> bool {
    version <= Version::HTTP_11
}

/// What the layer and the servers share.
pub(crate) struct LayerShared {
    pub(crate) handle: Handle,
    pub(crate) rejection: Rejection,
    /// Extra time before the Drain deadline at which requests are too late (finale's servers
    /// cut their connections this much before the deadline).
    pub(crate) cut_margin: Duration,
}

impl LayerShared {
    /// Whether an HTTP/1 request arriving now, while draining, is too late to be answered
    /// before the Drain deadline (less its cut margin).
    fn too_late(&self) -> bool {
        self.handle
            .phase_deadline(crate::Phase::Drain)
            .is_some_and(|deadline| {
                tokio::time::Instant::now() + self.rejection.late_margin_value() + self.cut_margin
                    >= deadline
            })
    }
}

/// The decision for one request.
pub(crate) enum Admission<B> {
    Rejected(Response<DrainBody<B>>),
    Admitted(Admitted),
}

/// An admitted request's tracking, handed to [`ResponseFuture`].
pub(crate) struct Admitted {
    guard: InFlightGuard,
    in_flight: InFlight,
    announced: bool,
    close_http1: bool,
    /// A gRPC request: a panic is answered in gRPC form.
    grpc: Option<Grpc>,
    /// A CONNECT (an HTTP/1 tunnel, or an HTTP/2 extended CONNECT: a WebSocket over HTTP/2):
    /// a `2xx` upgrades it.
    connect: bool,
    /// Too late to be served (finale's own connections only): the [`Responder`] answers it
    /// with the rejection.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) too_late: bool,
    /// Boxed: the name's parts (a method and a URI) are large, and the response and its
    /// futures are moved several times on their way out; one small allocation is cheaper.
    cut: Option<Box<CutName>>,
}

impl Admitted {
    /// The service's response, made ready to go out: `Connection: close` on HTTP/1 once the
    /// shutdown is announced, and its body in flight until its last byte (an upgrade's request
    /// stays in flight on its connection instead).
    #[inline]
    pub(crate) fn finish<B>(self, response: Response<B>) -> Response<DrainBody<B>> {
        let (parts, body) = response.into_parts();
        self.finish_parts(parts, DrainBody::untracked(body))
    }

    /// A handler panicked: the request is answered `500` (gRPC: `grpc-status: 13`), counted,
    /// and the answer goes out as any other response does.
    #[cold]
    pub(crate) fn panicked<B>(
        self,
        payload: &(dyn std::any::Any + Send),
    ) -> Response<DrainBody<B>> {
        let (parts, body) = handler_panicked(self.in_flight, payload, self.grpc).into_parts();
        self.finish_parts(parts, body)
    }

    /// finale's own answer to this request (a rejection too late in the drain), sent as any
    /// other response is.
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[cold]
    pub(crate) fn answer<B>(self, response: Response<DrainBody<B>>) -> Response<DrainBody<B>> {
        let (parts, body) = response.into_parts();
        self.finish_parts(parts, body)
    }

    fn finish_parts<B>(
        self,
        mut parts: http::response::Parts,
        body: DrainBody<B>,
    ) -> Response<DrainBody<B>> {
        // What hyper upgrades: a 101, or a 2xx to a CONNECT (both versions).
        let upgrade = (self.close_http1 && parts.status == StatusCode::SWITCHING_PROTOCOLS)
            || (self.connect && parts.status.is_success());
        if self.close_http1
            && !upgrade
            && (self.announced
                || self.in_flight.is_draining()
                // finale's own connections know their handle: a request admitted before the
                // Announce phase and answered during it closes too.
                || self
                    .cut
                    .as_ref()
                    .is_some_and(|c| c.conn.handle.shared.health.is_announced()))
        {
            // Answered once the shutdown is announced: this connection's last, so that a
            // persistent client reconnects (through the load balancer, to an instance that
            // stays) while this one still serves. Never on a 101: the upgrade needs
            // `Connection: upgrade`.
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let Self {
            guard,
            cut,
            close_http1,
            ..
        } = self;
        let body = match (upgrade, cut) {
            // On finale's own connections an upgraded request stays in flight after its
            // (empty) response, for as long as the upgraded connection lives: the connection's
            // task holds it.
            (true, Some(cut)) => {
                cut.upgraded(guard, close_http1);
                body
            }
            (_, cut) => body.tracked(guard, cut),
        };
        Response::from_parts(parts, body)
    }

    /// The name this request gets if it is cut before its response exists.
    pub(crate) fn record_if_cut(&self) {
        if let Some(cut) = &self.cut {
            cut.record_if_cut("no response");
        }
    }
}

/// The hot path, shared by [`Drain`] and finale's servers.
///
/// While draining, a request is still served: HTTP/2 streams reach here only if the peer opened
/// them before the final GOAWAY (h2 itself refuses later ones with `REFUSED_STREAM`, which
/// clients retry), and an HTTP/1 request on a connection still open is answered with
/// `Connection: close`. Only an HTTP/1 request that arrives within the
/// [late margin](crate::tower::Rejection::late_margin) of the Drain deadline, too late to be
/// answered in time, gets the rejection.
#[inline]
pub(crate) fn admit<ReqB, B>(
    in_flight: InFlight,
    shared: &LayerShared,
    conn: Option<&Arc<ConnWatch>>,
    req: &Request<ReqB>,
    grpc: Option<Grpc>,
) -> Admission<B> {
    let version = req.version();
    // Count first, then check: a drain that starts at the same moment either sees this guard
    // (and waits for the request) or is seen here. The check is one relaxed load of a
    // `&'static` flag, set when the Drain phase starts.
    let guard = in_flight.acquire();
    let too_late = in_flight.is_draining() && is_http1(version) && shared.too_late();
    if too_late && conn.is_none() {
        drop(guard);
        shared.handle.shared.record_rejected_request();
        return Admission::Rejected(shared.rejection.response(version, grpc));
    }
    // On finale's own connections a request too late is answered (and counted) by the innermost
    // service, the [`Responder`], so that the user's layers around it see the answer; it stays
    // tracked until its body ends, as any other.
    let health = &shared.handle.shared.health;
    let announced = health.is_announced();
    if announced && !matches!(req.uri().path(), "/livez" | "/readyz") {
        // Traffic still arriving during the drain delay: the load balancer has not let go.
        health.record_activity();
    }
    let cut = conn.map(|conn| {
        if !is_http1(version) && !conn.http2.load(Ordering::Relaxed) {
            conn.http2.store(true, Ordering::Relaxed);
        }
        Box::new(CutName::new(req.method().clone(), req.uri(), conn.clone()))
    });
    let http1 = is_http1(version);
    Admission::Admitted(Admitted {
        guard,
        in_flight,
        // Read here (no clone of the health handle per request): a request admitted once the
        // shutdown is announced answers with `Connection: close`; one admitted before answers so
        // if the drain has started by then (checked on the static tracker, below).
        announced: http1 && announced,
        close_http1: http1,
        grpc,
        connect: req.method() == Method::CONNECT,
        too_late,
        cut,
    })
}

/// A [`Layer`] that wraps services in [`Drain`]; see the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct DrainLayer {
    in_flight: InFlight,
    shared: Arc<LayerShared>,
}

impl DrainLayer {
    /// A layer tracking requests in `handle`'s [`InFlight`] tracker, rejecting with the default
    /// [`Rejection`] once the Drain phase has started.
    pub fn new(handle: &Handle) -> Self {
        Self {
            in_flight: handle.in_flight(),
            shared: Arc::new(LayerShared {
                handle: handle.clone(),
                rejection: Rejection::default(),
                cut_margin: Duration::ZERO,
            }),
        }
    }

    /// Answers rejected requests with `rejection`.
    pub fn rejection(self, rejection: Rejection) -> Self {
        Self {
            in_flight: self.in_flight,
            shared: Arc::new(LayerShared {
                handle: self.shared.handle.clone(),
                rejection,
                cut_margin: Duration::ZERO,
            }),
        }
    }

    /// The in-flight tracker (its [`count`](InFlight::count) is the in-flight gauge).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight
    }
}

impl fmt::Debug for DrainLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainLayer")
            .field("in_flight", &self.in_flight)
            .field("rejection", &self.shared.rejection)
            .finish()
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            in_flight: self.in_flight,
            shared: self.shared.clone(),
        }
    }
}

/// The [`Service`] made by [`DrainLayer`]: tracks requests, rejects them while draining.
///
/// Cloning it clones the inner service and one `Arc` (hyper and axum clone the service for
/// every request, as they do with every layer).
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    in_flight: InFlight,
    shared: Arc<LayerShared>,
}

impl<S: fmt::Debug> fmt::Debug for Drain<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("inner", &self.inner)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Drain<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    type Response = Response<DrainBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match admit(self.in_flight, &self.shared, None, &req, grpc_kind(&req)) {
            Admission::Rejected(response) => ResponseFuture::rejected(response),
            Admission::Admitted(admitted) => {
                ResponseFuture::admitted(self.inner.call(req), admitted)
            }
        }
    }
}

pin_project! {
    /// The response future of [`Drain`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }

    impl<F, B> PinnedDrop for ResponseFuture<F, B> {
        fn drop(this: Pin<&mut Self>) {
            if let StateProj::Pending { admitted, .. } = this.project().state.project()
                && let Some(admitted) = admitted
            {
                admitted.record_if_cut();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Pending { #[pin] fut: F, admitted: Option<Admitted> },
        Rejected { response: Option<Response<DrainBody<B>>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn rejected(response: Response<DrainBody<B>>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn admitted(fut: F, admitted: Admitted) -> Self {
        Self {
            state: State::Pending {
                fut,
                admitted: Some(admitted),
            },
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<DrainBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            StateProj::Pending { fut, admitted } => {
                // A panicking handler is isolated: the request gets a 500 and is counted, the
                // connection and the server go on. (The future is not polled again after a
                // panic, so no broken invariant can be observed.)
                let result = match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(result)) => result,
                    Err(payload) => {
                        let admitted = admitted.take().expect("polled after completion");
                        return Poll::Ready(Ok(admitted.panicked(&*payload)));
                    }
                };
                let admitted = admitted.take().expect("polled after completion");
                Poll::Ready(result.map(|response| admitted.finish(response)))
            }
        }
    }
}
