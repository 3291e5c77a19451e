//! A tower [`Layer`] that tracks every request as in flight and answers `503` while draining,
//! and `/livez` + `/readyz` as a tower [`Service`].
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

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::tower::{Layer, Service};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

use crate::Handle;
use crate::track::{InFlight, InFlightGuard};

/// The default `Retry-After` of a rejected request: 1 second.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The default body of a rejected request.
pub const DEFAULT_REJECTION_BODY: &str = "shutting down, retry on another instance\n";
/// How long before the Drain deadline an HTTP/1 request is too late to be served, by default:
/// 1 second. Earlier ones are served (with `Connection: close`).
pub const DEFAULT_LATE_MARGIN: Duration = Duration::from_secs(1);

/// The response to an HTTP/1 request that arrives too late in the drain to be served.
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`status`](Rejection::status) | `503 Service Unavailable` |
/// | [`retry_after`](Rejection::retry_after) | 1 s ([`DEFAULT_RETRY_AFTER`]) |
/// | [`body`](Rejection::body) | [`DEFAULT_REJECTION_BODY`], `text/plain` |
/// | [`late_margin`](Rejection::late_margin) | 1 s ([`DEFAULT_LATE_MARGIN`]) |
///
/// On HTTP/1.x the response always carries `Connection: close`.
#[derive(Clone, Debug)]
#[must_use]
pub struct Rejection {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    body: Bytes,
    late_margin: Duration,
}

impl Default for Rejection {
    fn default() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(HeaderValue::from_static("1")),
            body: Bytes::from_static(DEFAULT_REJECTION_BODY.as_bytes()),
            late_margin: DEFAULT_LATE_MARGIN,
        }
    }
}

impl Rejection {
    /// The late margin ([`late_margin`](Rejection::late_margin)).
    pub(crate) fn late_margin_value(&self) -> Duration {
        self.late_margin
    }

    /// The status code (not for a gRPC request: its answer is always `200` with
    /// `grpc-status: 14`).
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The `Retry-After` header, in whole seconds (rounded up); `None` leaves it out. gRPC
    /// answers have none (gRPC clients retry UNAVAILABLE by their own policy).
    pub fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            HeaderValue::from(secs)
        });
        self
    }

    /// The body, sent as `text/plain; charset=utf-8`.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// How long before the Drain deadline an HTTP/1 request that arrives on a connection still
    /// open is too late to be served and gets this rejection instead. Earlier requests are
    /// served, with `Connection: close`.
    pub fn late_margin(mut self, margin: Duration) -> Self {
        self.late_margin = margin;
        self
    }

    /// The rejection for a request of `version`; a gRPC request (gRPC-Web over HTTP/1.1
    /// included) gets it in gRPC form: `200` with `grpc-status: 14` (UNAVAILABLE, which gRPC
    /// clients may retry) and the body as `grpc-message`.
    pub(crate) fn response<B>(
        &self,
        version: Version,
        grpc: Option<Grpc>,
    ) -> Response<DrainBody<B>> {
        if let Some(grpc) = grpc {
            let mut response = Response::new(DrainBody::full(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, grpc.content_type());
            headers.insert("grpc-status", HeaderValue::from_static("14"));
            if let Ok(message) = HeaderValue::from_str(&grpc_message(&self.body)) {
                headers.insert("grpc-message", message);
            }
            if is_http1(version) {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
        let mut response = Response::new(DrainBody::full(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = &self.retry_after {
            headers.insert(RETRY_AFTER, after.clone());
        }
        if is_http1(version) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `text` as a `grpc-message` value: trimmed, percent-encoded as the gRPC spec asks (every byte
/// outside printable ASCII, and `%`).
fn grpc_message(text: &[u8]) -> String {
    use std::fmt::Write as _;
    let text = text.trim_ascii();
    let mut out = String::with_capacity(text.len());
    for &byte in text {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The answer to a request whose handler panicked: `500`, or for gRPC `grpc-status: 13`
/// (INTERNAL), in gRPC form.
fn panic_response<B>(grpc: Option<Grpc>) -> Response<DrainBody<B>> {
    if let Some(grpc) = grpc {
        let mut response = Response::new(DrainBody::full(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, grpc.content_type());
        headers.insert("grpc-status", HeaderValue::from_static("13"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("the%20handler%20panicked"),
        );
        return response;
    }
    let mut response = Response::new(DrainBody::full(Bytes::from_static(
        b"internal server error\n",
    )));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

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
                tokio::time::Instant::now() + self.rejection.late_margin + self.cut_margin
                    >= deadline
            })
    }
}

/// Who is on the other end of a served connection, as its requests and the report name it.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "tonic"), allow(dead_code))]
pub(crate) enum Peer {
    /// A TCP connection: the client's address (`127.0.0.1:5555` in the report) and the
    /// server's own end (tonic's `local_addr()`).
    Tcp { peer: SocketAddr, local: SocketAddr },
    /// A Unix domain socket connection. A client's socket rarely has a path of its own, so the
    /// report names the server's socket and, when the kernel tells it, the client's process:
    /// `pid 4321 on unix:/run/app.sock`.
    #[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
    Unix {
        /// The client's address, as `accept` gave it (usually unnamed).
        addr: Arc<tokio::net::unix::SocketAddr>,
        /// The client's credentials (`SO_PEERCRED`), if the kernel gave them.
        cred: Option<tokio::net::unix::UCred>,
        /// The server's socket: `unix:/run/app.sock`.
        server: Arc<str>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp { peer, .. } => peer.fmt(f),
            #[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
            Peer::Unix { cred, server, .. } => match cred.and_then(|cred| cred.pid()) {
                Some(pid) if pid > 0 => write!(f, "pid {pid} on {server}"),
                _ => f.write_str(server),
            },
        }
    }
}

/// One served connection, as the requests on it see it: who is on the other end, and whether
/// the server is cutting it at the drain deadline. Only finale's own servers make these.
#[derive(Debug)]
pub(crate) struct ConnWatch {
    pub(crate) peer: Peer,
    pub(crate) handle: Handle,
    /// Set by the first HTTP/2 request: connections not known to be HTTP/2 get a grace period.
    pub(crate) http2: AtomicBool,
    /// Set once the connection's first bytes (or its TLS handshake's ALPN) say HTTP/1: only
    /// such a connection is bounded by the header-read timeout (an HTTP/2 connection with no
    /// stream open is idle, not slow).
    pub(crate) http1: AtomicBool,
    /// Set just before the connection is dropped at the deadline: unfinished requests name
    /// themselves in the report as they are dropped.
    pub(crate) cutting: AtomicBool,
    /// How many requests of this connection named themselves.
    pub(crate) named: AtomicUsize,
    /// Requests of this connection admitted and not yet answered to their last byte. A
    /// connection with none holds nothing: the drain may close it after the grace.
    pub(crate) active: AtomicUsize,
    /// When the connection was accepted.
    accepted: tokio::time::Instant,
    /// When its last request ended, in nanoseconds after `accepted` (0: none yet).
    last_active: AtomicU64,
    /// Requests answered with an upgrade (`101`, or a `2xx` to an HTTP/2 extended CONNECT):
    /// each counts as in flight, and is named if cut, until the server's connection task lets
    /// it go (the upgraded socket closed, or the connection ended).
    pub(crate) upgrades: Mutex<Vec<Upgrade>>,
    /// Notified when the connection's socket is dropped: by hyper, or, after an HTTP/1
    /// upgrade, by the handler that took it over.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) io_dropped: tokio::sync::Notify,
}

impl ConnWatch {
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn new(peer: Peer, handle: Handle) -> Self {
        Self {
            peer,
            handle,
            http2: AtomicBool::new(false),
            http1: AtomicBool::new(false),
            cutting: AtomicBool::new(false),
            named: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            accepted: tokio::time::Instant::now(),
            last_active: AtomicU64::new(0),
            upgrades: Mutex::new(Vec::new()),
            io_dropped: tokio::sync::Notify::new(),
        }
    }

    /// When the connection was accepted.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn accepted(&self) -> tokio::time::Instant {
        self.accepted
    }

    /// When this connection last did something: accepted, or its last request ended.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn last_active(&self) -> tokio::time::Instant {
        self.accepted + Duration::from_nanos(self.last_active.load(Ordering::Relaxed))
    }
}

/// How many HTTP/2 extended CONNECT streams a connection remembers, to name them if it is cut.
const MAX_H2_UPGRADE_NAMES: usize = 16;

/// A request whose connection was upgraded (a WebSocket, an HTTP/2 extended CONNECT): in
/// flight while it lives, and named if it is cut.
#[derive(Debug)]
pub(crate) struct Upgrade {
    _guard: Option<InFlightGuard>,
    /// `GET /ws from 127.0.0.1:5555`: method and path, never the query.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) name: String,
}

/// What an admitted request on one of finale's connections remembers so that, if it is cut at
/// the deadline, the report can name it ("GET /events from 127.0.0.1:5555"), and that its
/// connection counts it as active while it lives.
///
/// The name is the method and the path only: a query string may carry a token or a signed URL,
/// and the report goes to logs and telemetry.
struct CutName {
    method: Method,
    uri: Uri,
    conn: Arc<ConnWatch>,
}

impl CutName {
    fn new(method: Method, uri: Uri, conn: Arc<ConnWatch>) -> Self {
        conn.active.fetch_add(1, Ordering::Relaxed);
        Self { method, uri, conn }
    }

    /// Called on drop of an unfinished request or body.
    fn record_if_cut(&self, what: &str) {
        // Relaxed: the server sets `cutting` and then drops the connection on the same task,
        // so this drop is sequenced after the store. (HTTP/2 streams run on tasks of their own
        // and are dropped later; `cutting` was set before, and the connection does not name
        // itself while it has active requests, so each stream is named once.)
        //
        // A second signal abandons the drain: the server's task is aborted, its connections
        // are dropped without a cut, and an unfinished request names itself as it is dropped.
        let when = if self.conn.cutting.load(Ordering::Relaxed) {
            "at the drain deadline"
        } else if self.conn.handle.shared.is_escalated() {
            "when a second signal abandoned the drain"
        } else {
            return;
        };
        self.conn.named.fetch_add(1, Ordering::Relaxed);
        self.conn
            .handle
            .shared
            .record_cut(format!("{} ({what} {when})", self.name()));
    }
}

impl CutName {
    /// The name of this request in the report: method and path (a tunnel's target for an
    /// HTTP/1 CONNECT), never the query.
    fn name(&self) -> String {
        request_name(&self.method, &self.uri, &self.conn.peer)
    }

    /// The request was answered with an upgrade. HTTP/1: the connection's task keeps `guard`
    /// (the request stays in flight) until the upgraded socket is dropped, and names it if cut.
    /// HTTP/2: finale cannot see one upgraded stream end, only its connection; the guard goes
    /// now (the connection, which the drain waits for, stays open while the stream does) and
    /// the name is kept, for at most [`MAX_H2_UPGRADE_NAMES`] streams per connection.
    fn upgraded(&self, guard: InFlightGuard, http1: bool) {
        let mut upgrades = crate::state::lock(&self.conn.upgrades);
        if http1 {
            upgrades.push(Upgrade {
                _guard: Some(guard),
                name: self.name(),
            });
            return;
        }
        drop(guard);
        if upgrades.len() >= MAX_H2_UPGRADE_NAMES {
            upgrades.remove(0);
        }
        upgrades.push(Upgrade {
            _guard: None,
            name: self.name(),
        });
    }
}

impl Drop for CutName {
    fn drop(&mut self) {
        let since = tokio::time::Instant::now().saturating_duration_since(self.conn.accepted);
        self.conn.last_active.store(
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // Release: whoever sees the count drop also sees this request's `named` increment.
        self.conn.active.fetch_sub(1, Ordering::Release);
    }
}

/// How many bytes of a method, and of a path or authority, a request's name in the report
/// keeps; a longer one is cut there and ends with `…`.
const MAX_NAME_PART: usize = 128;

/// A request's name in the report: `GET /events from 127.0.0.1:5555`. The method and the path
/// (a tunnel's target for an HTTP/1 CONNECT), never the query, nor the userinfo of an authority
/// (`CONNECT user:password@host:443` is named `CONNECT host:443`): the report goes to logs and
/// telemetry. Each part is bounded ([`MAX_NAME_PART`] bytes).
fn request_name(method: &Method, uri: &Uri, peer: &Peer) -> String {
    let target = match uri.authority() {
        Some(authority) if uri.path().is_empty() => {
            let authority = authority.as_str();
            // The userinfo ends at the last `@` (a password may hold one too).
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host)
        }
        _ => uri.path(),
    };
    format!(
        "{} {} from {peer}",
        bounded(method.as_str()),
        bounded(target)
    )
}

/// `text` cut to at most [`MAX_NAME_PART`] bytes (on a character boundary), marked with `…`.
fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_NAME_PART {
        return text.into();
    }
    let mut end = MAX_NAME_PART;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
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
        Box::new(CutName::new(
            req.method().clone(),
            req.uri().clone(),
            conn.clone(),
        ))
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

/// Which gRPC a request speaks, for answers in its own form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grpc {
    /// gRPC over HTTP/2 (`application/grpc`, `application/grpc+proto`, ...).
    Plain,
    /// gRPC-Web (`application/grpc-web`, `+proto`, `+json`), HTTP/1.1 or HTTP/2.
    Web,
    /// gRPC-Web with base64 bodies (`application/grpc-web-text`).
    WebText,
}

impl Grpc {
    /// The content type of an answer in this form: the family of the request's, as the
    /// gRPC-Web protocol asks (a gRPC-Web client reads `application/grpc` as an error).
    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Grpc::Plain => "application/grpc",
            Grpc::Web => "application/grpc-web",
            Grpc::WebText => "application/grpc-web-text",
        })
    }
}

/// The request's gRPC kind, from its content type; a `CONNECT` is never gRPC (a `2xx` to it
/// would upgrade the connection).
pub(crate) fn grpc_kind<ReqB>(req: &Request<ReqB>) -> Option<Grpc> {
    let content_type = req.headers().get(CONTENT_TYPE)?.as_bytes();
    let rest = content_type.strip_prefix(b"application/grpc")?;
    if req.method() == Method::CONNECT {
        return None;
    }
    Some(if rest.starts_with(b"-web-text") {
        Grpc::WebText
    } else if rest.starts_with(b"-web") {
        Grpc::Web
    } else {
        Grpc::Plain
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
                && let Some(cut) = &admitted.cut
            {
                cut.record_if_cut("no response");
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

    /// The service panicked when it was called: answered `500` (in gRPC form for gRPC),
    /// counted, and no longer in flight.
    pub(crate) fn panicked(admitted: Admitted, payload: &(dyn std::any::Any + Send)) -> Self {
        Self::rejected(handler_panicked(admitted.in_flight, payload, admitted.grpc))
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
                        return Poll::Ready(Ok(handler_panicked(
                            admitted.in_flight,
                            &*payload,
                            admitted.grpc,
                        )));
                    }
                };
                let admitted = admitted.take().expect("polled after completion");
                Poll::Ready(result.map(|response| {
                    let (mut parts, body) = response.into_parts();
                    // What hyper upgrades: a 101, or a 2xx to a CONNECT (both versions).
                    let upgrade = (admitted.close_http1
                        && parts.status == StatusCode::SWITCHING_PROTOCOLS)
                        || (admitted.connect && parts.status.is_success());
                    if admitted.close_http1
                        && !upgrade
                        && (admitted.announced
                            || admitted.in_flight.is_draining()
                            // finale's own connections know their handle: a request admitted
                            // before the Announce phase and answered during it closes too.
                            || admitted
                                .cut
                                .as_ref()
                                .is_some_and(|c| c.conn.handle.shared.health.is_announced()))
                    {
                        // Answered once the shutdown is announced: this connection's last, so
                        // that a persistent client reconnects (through the load balancer, to an
                        // instance that stays) while this one still serves. Never on a 101: the
                        // upgrade needs `Connection: upgrade`.
                        parts
                            .headers
                            .insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    let Admitted {
                        guard,
                        cut,
                        close_http1,
                        ..
                    } = admitted;
                    let body = match (upgrade, cut) {
                        // On finale's own connections an upgraded request stays in flight
                        // after its (empty) response, for as long as the upgraded connection
                        // lives: the connection's task holds it.
                        (true, Some(cut)) => {
                            cut.upgraded(guard, close_http1);
                            DrainBody::untracked(body)
                        }
                        (_, cut) => DrainBody::tracked(body, guard, cut),
                    };
                    Response::from_parts(parts, body)
                }))
            }
        }
    }
}

/// Marks a request that finale's server found too late to be served: the [`Responder`]
/// answers it with the rejection instead of calling the service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TooLate;

/// The innermost service of finale's servers: calls the user's service, isolates its panics
/// (`500`, in gRPC form for gRPC), and answers a request the server found too late in the drain
/// with the [`Rejection`]. The layers given to
/// [`HttpServer::layer`](crate::axum::HttpServer::layer) wrap it, so they see those answers as
/// they see any other; the tracking (in flight until the last byte of the body, the cut and its
/// report names) stays outside every layer.
///
/// Only finale's servers make it; its name shows in the bounds of `HttpServer::serve`.
#[derive(Clone)]
pub struct Responder<S> {
    inner: S,
    shared: Arc<LayerShared>,
}

impl<S> Responder<S> {
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn new(inner: S, shared: Arc<LayerShared>) -> Self {
        Self { inner, shared }
    }
}

impl<S: fmt::Debug> fmt::Debug for Responder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Responder<S>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone,
    B: Body<Data = Bytes>,
{
    type Response = Response<DrainBody<B>>;
    type Error = S::Error;
    type Future = ResponderFuture<S, Request<ReqB>, B>;

    /// Always ready: the service's own readiness is awaited in the future, so that a request
    /// too late in the drain is answered at once, not after a concurrency limit (or any
    /// service whose `poll_ready` waits) lets it through.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = grpc_kind(&req);
        if req.extensions().get::<TooLate>().is_some() {
            // Counted here, where it is answered: a request a layer answered itself (or
            // stripped of its mark and had served) is not a rejection.
            self.shared.handle.shared.record_rejected_request();
            return ResponderFuture {
                state: Answer::Ready {
                    response: Some(self.shared.rejection.response(req.version(), grpc)),
                },
            };
        }
        let in_flight = self.shared.handle.in_flight();
        // Ready at once (the usual case): called now, inside the panic isolation, and the
        // request is handed over once. (A waker that does nothing: a service not ready now is
        // polled again, with the task's waker, in the future.)
        let ready = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.inner
                .poll_ready(&mut Context::from_waker(std::task::Waker::noop()))
        }));
        let state = match ready {
            Ok(Poll::Ready(Ok(()))) => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
                    Ok(fut) => Answer::Called {
                        fut,
                        grpc,
                        in_flight,
                    },
                    Err(payload) => Answer::Ready {
                        response: Some(handler_panicked(in_flight, &*payload, grpc)),
                    },
                }
            }
            // Not ready, or failed (asked again in the future, where it says so again: its
            // error is not kept here, it need not be `Send`).
            Ok(Poll::Ready(Err(_)) | Poll::Pending) => {
                // The clone that was made for this request goes into the future (tower's usual
                // clone-and-swap): its readiness and its call both happen there, inside the
                // panic isolation.
                let clone = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, clone);
                Answer::Waiting {
                    call: Some((service, req)),
                    grpc,
                    in_flight,
                }
            }
            Err(payload) => Answer::Ready {
                response: Some(handler_panicked(in_flight, &*payload, grpc)),
            },
        };
        ResponderFuture { state }
    }
}

pin_project! {
    /// The response future of [`Responder`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponderFuture<S, Req, B>
    where
        S: Service<Req>,
    {
        #[pin]
        state: Answer<S, Req, B>,
    }
}

pin_project! {
    #[project = AnswerProj]
    enum Answer<S, Req, B>
    where
        S: Service<Req>,
    {
        Waiting { call: Option<(S, Req)>, grpc: Option<Grpc>, in_flight: InFlight },
        Called { #[pin] fut: S::Future, grpc: Option<Grpc>, in_flight: InFlight },
        Ready { response: Option<Response<DrainBody<B>>> },
    }
}

impl<S: Service<Req>, Req, B> fmt::Debug for ResponderFuture<S, Req, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponderFuture").finish_non_exhaustive()
    }
}

impl<S, Req, B> Future for ResponderFuture<S, Req, B>
where
    S: Service<Req, Response = Response<B>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<DrainBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            // A panic in the service's `poll_ready`, `call` or future is the handler's: the
            // request is answered `500` here, inside the user's layers, and never polled again.
            let caught = match state.as_mut().project() {
                AnswerProj::Ready { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
                AnswerProj::Waiting {
                    call,
                    grpc,
                    in_flight,
                } => {
                    let (grpc, in_flight) = (*grpc, *in_flight);
                    let (service, _) = call.as_mut().expect("polled after completion");
                    match std::panic::catch_unwind(AssertUnwindSafe(|| service.poll_ready(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(Err(e))) => {
                            state.set(Answer::Ready { response: None });
                            return Poll::Ready(Err(e));
                        }
                        Ok(Poll::Ready(Ok(()))) => {
                            let (mut service, req) = call.take().expect("checked above");
                            match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(req))) {
                                Ok(fut) => {
                                    state.set(Answer::Called {
                                        fut,
                                        grpc,
                                        in_flight,
                                    });
                                    continue;
                                }
                                Err(payload) => (payload, grpc, in_flight),
                            }
                        }
                        Err(payload) => (payload, grpc, in_flight),
                    }
                }
                AnswerProj::Called {
                    fut,
                    grpc,
                    in_flight,
                } => match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(result)) => {
                        return Poll::Ready(
                            result.map(|response| response.map(DrainBody::untracked)),
                        );
                    }
                    Err(payload) => (payload, *grpc, *in_flight),
                },
            };
            let (payload, grpc, in_flight) = caught;
            state.set(Answer::Ready { response: None });
            return Poll::Ready(Ok(handler_panicked(in_flight, &*payload, grpc)));
        }
    }
}

/// A handler panicked: counted, logged, answered `500` (gRPC: `grpc-status: 13`).
fn handler_panicked<B>(
    in_flight: InFlight,
    payload: &(dyn std::any::Any + Send),
    grpc: Option<Grpc>,
) -> Response<DrainBody<B>> {
    in_flight.record_panic();
    tracing::error!(
        target: "finale",
        panic = %crate::hook::panic_message(payload),
        "request handler panicked; answered 500"
    );
    panic_response(grpc)
}

pin_project! {
    /// The response body of [`Drain`]: the inner body, counted as in flight until it ends or is
    /// dropped; or the body of a rejection.
    pub struct DrainBody<B> {
        #[pin]
        kind: Kind<B>,
        guard: Option<InFlightGuard>,
        cut: Option<Box<CutName>>,
    }

    impl<B> PinnedDrop for DrainBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.guard.is_some()
                && let Some(cut) = this.cut
            {
                cut.record_if_cut("stream open");
            }
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> DrainBody<B> {
    fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            guard: None,
            cut: None,
        }
    }

    fn untracked(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
            guard: None,
            cut: None,
        }
    }

    fn tracked(body: B, guard: InFlightGuard, cut: Option<Box<CutName>>) -> Self {
        Self {
            kind: Kind::Inner { body },
            guard: Some(guard),
            cut,
        }
    }
}

impl<B> fmt::Debug for DrainBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainBody")
            .field("in_flight", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for DrainBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { body } => {
                let frame = ready!(body.poll_frame(cx));
                if !matches!(frame, Some(Ok(_))) {
                    // The end, or an error that ends the response: no longer in flight.
                    this.guard.take();
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
        }
    }
}

/// `GET /livez` and `GET /readyz` as a tower [`Service`]; anything else is `404`.
///
/// - `/livez`: `200 live` while the process runs (also during the shutdown).
/// - `/readyz`: `200 ready` once graceful start completed and until the Announce phase;
///   `503 not ready` otherwise, each recorded with
///   [`Health::record_not_ready_answer`](crate::Health::record_not_ready_answer) so that
///   [`DrainDelay::UntilProbed`](crate::DrainDelay::UntilProbed) can end the drain delay early.
///
/// # Examples
///
/// ```
/// use finale::tower::HealthService;
/// use tower::Service;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().read_env(false).build().unwrap();
/// let mut health = HealthService::new(&finale.handle());
/// let req = http::Request::get("/readyz").body(()).unwrap();
/// let response = health.call(req).await.unwrap();
/// assert_eq!(response.status(), 503); // graceful start has not completed
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HealthService {
    health: crate::Health,
}

impl HealthService {
    /// The health endpoints of `handle`'s service.
    pub fn new(handle: &Handle) -> Self {
        Self {
            health: handle.health(),
        }
    }

    pub(crate) fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/livez" => (StatusCode::OK, "live\n"),
            "/readyz" if self.health.is_ready() => (StatusCode::OK, "ready\n"),
            "/readyz" => {
                self.health.record_not_ready_answer();
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
            _ => (StatusCode::NOT_FOUND, "not found\n"),
        };
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl<B> Service<Request<B>> for HealthService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        std::future::ready(Ok(self.answer(req.uri().path())))
    }
}
