//! The admission of a request: the drain's decision (served, or too late), its tracking until
//! its response body ends, and the response made ready to go out (`Connection: close` on
//! HTTP/1 once the shutdown is announced, an upgrade held, a panic answered). Shared by
//! [`Drain`](super::Drain) and finale's servers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{CONNECTION, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::Handle;
use crate::track::{InFlight, InFlightGuard};

use super::{ConnWatch, CutName, DrainBody, Grpc, Rejection, Track, handler_panicked};

pub(super) fn is_http1(version: Version) -> bool {
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

/// An admitted request's tracking, handed to [`ResponseFuture`](super::ResponseFuture).
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
    /// Too late to be served (finale's own connections only): the
    /// [`Responder`](super::Responder) answers it with the rejection.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) too_late: bool,
    /// Small (two words): the response and its futures are moved several times on their way
    /// out.
    cut: Option<CutName>,
}

impl Admitted {
    /// The service's response, made ready to go out: `Connection: close` on HTTP/1 once the
    /// shutdown is announced, and its body in flight until its last byte (an upgrade's request
    /// stays in flight on its connection instead).
    #[inline]
    pub(crate) fn finish<B>(self, response: Response<B>) -> Response<DrainBody<B>> {
        let (mut parts, body) = response.into_parts();
        let track = self.finish_head(&mut parts);
        Response::from_parts(parts, DrainBody::new(body, track))
    }

    /// A handler panicked: the request is answered `500` (gRPC: `grpc-status: 13`), counted,
    /// and the answer goes out as any other response does.
    #[cold]
    pub(crate) fn panicked<B>(
        self,
        payload: &(dyn std::any::Any + Send),
    ) -> Response<DrainBody<B>> {
        let (mut parts, body) = handler_panicked(self.in_flight, payload, self.grpc).into_parts();
        let track = self.finish_head(&mut parts);
        Response::from_parts(parts, body.tracked(track))
    }

    /// finale's own answer to this request (a rejection too late in the drain), sent as any
    /// other response is.
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[cold]
    pub(crate) fn answer<B>(self, response: Response<DrainBody<B>>) -> Response<DrainBody<B>> {
        let (mut parts, body) = response.into_parts();
        let track = self.finish_head(&mut parts);
        Response::from_parts(parts, body.tracked(track))
    }

    /// The response's head made ready to go out; what its body keeps in flight (`None`: an
    /// upgrade, whose request stays in flight on its connection).
    #[inline(always)]
    fn finish_head(self, parts: &mut http::response::Parts) -> Option<Track> {
        // What hyper upgrades: a 101, or a 2xx to a CONNECT (both versions).
        let upgrade = (self.close_http1 && parts.status == StatusCode::SWITCHING_PROTOCOLS)
            || (self.connect && parts.status.is_success());
        if self.close_http1
            && !upgrade
            && (self.announced
                // A request admitted before the Announce phase and answered during it (or
                // during the drain) closes too.
                || self.in_flight.is_announced()
                || self.in_flight.is_draining())
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
        match (upgrade, cut) {
            // On finale's own connections an upgraded request stays in flight after its
            // (empty) response, for as long as the upgraded connection lives: the connection's
            // task holds it.
            (true, Some(cut)) => {
                cut.upgraded(guard, close_http1);
                None
            }
            (_, cut) => Some(Track { _guard: guard, cut }),
        }
    }

    /// The name this request gets if it is cut before its response exists. `request`: the
    /// request itself, if it never reached the service.
    pub(crate) fn record_if_cut(&self, request: Option<(&Method, &http::Uri)>) {
        if let Some(cut) = &self.cut {
            cut.record_if_cut("no response", request);
        }
    }

    /// Made ready on the task that calls the service, before the call: an HTTP/2 stream gets
    /// its own name there (see [`CutName::name_stream`]).
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[inline]
    pub(crate) fn name_stream<ReqB>(&mut self, req: &Request<ReqB>) {
        if let (false, Some(cut)) = (self.close_http1, &mut self.cut) {
            cut.name_stream(req.method(), req.uri());
        }
    }

    /// Who is on the other end, on one of finale's own connections.
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[inline]
    pub(crate) fn peer(&self) -> Option<&super::Peer> {
        self.cut.as_ref().map(|cut| &cut.conn.peer)
    }

    /// A gRPC request.
    #[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
    #[inline]
    pub(crate) fn is_grpc(&self) -> bool {
        self.grpc.is_some()
    }
}

/// The hot path, shared by [`Drain`](super::Drain) and finale's servers.
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
    req: &Request<ReqB>,
    grpc: Option<Grpc>,
) -> Admission<B> {
    // Count first, then check: a drain that starts at the same moment either sees this guard
    // (and waits for the request) or is seen here. The check is one relaxed load of a
    // `&'static` flag, set when the Drain phase starts.
    let guard = in_flight.acquire();
    let too_late = in_flight.is_draining() && is_http1(req.version()) && shared.too_late();
    if too_late {
        drop(guard);
        shared.handle.shared.record_rejected_request();
        return Admission::Rejected(shared.rejection.response(req.version(), grpc));
    }
    Admission::Admitted(admitted(guard, false, in_flight, shared, None, req, grpc))
}

/// [`admit`] on one of finale's own connections: always admitted. A request too late is
/// answered (and counted) by the connection's service, or, when the user added layers, by the
/// innermost service (the [`Responder`](super::Responder)), so that those layers see the
/// answer; it stays tracked until its body ends, as any other.
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
#[inline(always)]
pub(crate) fn admit_on<ReqB>(
    in_flight: InFlight,
    shared: &LayerShared,
    conn: &Arc<ConnWatch>,
    req: &Request<ReqB>,
    grpc: Option<Grpc>,
) -> Admitted {
    // Counted first, then checked, as in `admit`.
    let guard = in_flight.acquire();
    let too_late = in_flight.is_draining() && is_http1(req.version()) && shared.too_late();
    admitted(guard, too_late, in_flight, shared, Some(conn), req, grpc)
}

/// What an admitted request's response needs.
#[inline(always)]
fn admitted<ReqB>(
    guard: InFlightGuard,
    too_late: bool,
    in_flight: InFlight,
    shared: &LayerShared,
    conn: Option<&Arc<ConnWatch>>,
    req: &Request<ReqB>,
    grpc: Option<Grpc>,
) -> Admitted {
    let health = &shared.handle.shared.health;
    let announced = health.is_announced();
    if announced && !matches!(req.uri().path(), "/livez" | "/readyz") {
        // Traffic still arriving during the drain delay: the load balancer has not let go.
        health.record_activity();
    }
    let http1 = is_http1(req.version());
    let cut = match conn {
        Some(conn) => {
            if !http1 && !conn.http2.load(Ordering::Relaxed) {
                conn.http2.store(true, Ordering::Relaxed);
            }
            Some(CutName::new(req.method(), req.uri(), conn.clone(), http1))
        }
        None => None,
    };
    Admitted {
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
    }
}
