//! The `grpc-timeout` request header, enforced on the server side as tonic's own `Server` does.
//!
//! A gRPC client sends its deadline as `grpc-timeout` (up to 8 ASCII digits and a unit: `H`
//! hours, `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds). The
//! server bounds the call by the shorter of that and its own default, so a handler whose
//! client has given up stops working for nobody.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ::tower::{Layer, Service};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

/// The request header that carries the client's deadline.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The `grpc-status` message of a call answered at its deadline: the text tonic's `Server`
/// sends, so clients that match on it see the same.
const EXPIRED: &str = "Timeout expired";

/// A tower [`Layer`] that answers a gRPC call `DEADLINE_EXCEEDED` once its deadline has passed:
/// the shorter of the client's `grpc-timeout` header and the server's `default`, if either is
/// set. The handler's future is dropped at that moment (the handler is cancelled, its
/// request stops counting as in flight) and the answer is a gRPC status in gRPC form: HTTP
/// `200`, `content-type: application/grpc`, `grpc-status: 4` in a trailers-only response.
///
/// [`finale::tonic::serve`](super::serve) applies it with no default, so the client's deadline
/// is honoured as under tonic's `Server`; with an [`HttpServer`](super::HttpServer) of your own,
/// apply it around the routes (`GrpcTimeoutLayer::new(Some(..)).layer(routes.prepare())`),
/// which is tonic's `Server::timeout`.
///
/// # Differences from tonic's `Server`
///
/// The deadline is the same (taken when the call reaches the service; a malformed header is
/// ignored, as if absent). The status differs: tonic's `Server` answers `CANCELLED` with the
/// message `Timeout expired`; this layer answers `DEADLINE_EXCEEDED` (the code the gRPC status
/// codes give for an expired deadline, and what gRPC's other servers and clients report) with
/// the same message.
///
/// The deadline bounds the call until its response headers, as tonic's does: a
/// server-streaming response that has started is not cut by it (bound it in the handler).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use finale::tonic::GrpcTimeoutLayer;
/// use tower::Layer;
///
/// let (_reporter, health) = tonic_health::server::health_reporter();
/// let routes = tonic::service::Routes::new(health).prepare();
/// // At most 30 s per call, less if the client's deadline is shorter.
/// let service = GrpcTimeoutLayer::new(Some(Duration::from_secs(30))).layer(routes);
/// # let _ = service;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTimeoutLayer {
    default: Option<Duration>,
}

impl GrpcTimeoutLayer {
    /// A layer that bounds each call by its `grpc-timeout` header and by `default`, whichever
    /// is shorter; `None` bounds only the calls that carry the header.
    pub const fn new(default: Option<Duration>) -> Self {
        Self { default }
    }
}

impl<S> Layer<S> for GrpcTimeoutLayer {
    type Service = GrpcTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTimeout {
            inner,
            default: self.default,
        }
    }
}

/// The service [`GrpcTimeoutLayer`] makes: answers `DEADLINE_EXCEEDED` at a call's deadline.
#[derive(Debug, Clone)]
pub struct GrpcTimeout<S> {
    inner: S,
    default: Option<Duration>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<GrpcTimeoutBody<ResBody>>;
    type Error = S::Error;
    type Future = GrpcTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let deadline = match (parse_grpc_timeout(req.headers()), self.default) {
            (Some(client), Some(server)) => Some(client.min(server)),
            (client, server) => client.or(server),
        };
        GrpcTimeoutFuture {
            inner: self.inner.call(req),
            // No timer at all for a call without a deadline (the common case): no entry in
            // tokio's timer wheel per request.
            sleep: deadline.map(tokio::time::sleep),
        }
    }
}

pin_project! {
    /// The response future of [`GrpcTimeout`].
    #[must_use = "futures do nothing unless polled"]
    pub struct GrpcTimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F> fmt::Debug for GrpcTimeoutFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTimeoutFuture")
            .field("deadline", &self.sleep.as_ref().map(Sleep::deadline))
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for GrpcTimeoutFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<GrpcTimeoutBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The handler first: an answer ready at the deadline is the answer.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map(|response| response.map(GrpcTimeoutBody::inner)));
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(sleep.poll(cx));
        // The handler's future is dropped with this one, which the server does as soon as the
        // response below is returned.
        tracing::debug!(target: "finale", "gRPC call answered DEADLINE_EXCEEDED at its deadline");
        let (parts, ()) = tonic::Status::deadline_exceeded(EXPIRED)
            .into_http::<()>()
            .into_parts();
        Poll::Ready(Ok(Response::from_parts(parts, GrpcTimeoutBody::empty())))
    }
}

pin_project! {
    /// The response body of [`GrpcTimeout`]: the handler's, or none at all (the status is in
    /// the headers: a trailers-only response).
    pub struct GrpcTimeoutBody<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> GrpcTimeoutBody<B> {
    fn inner(inner: B) -> Self {
        Self { inner: Some(inner) }
    }

    fn empty() -> Self {
        Self { inner: None }
    }
}

impl<B> fmt::Debug for GrpcTimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTimeoutBody")
            .field("timed_out", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for GrpcTimeoutBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().inner.as_pin_mut() {
            Some(body) => body.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The `grpc-timeout` header's duration, or `None` if it is absent or malformed (a malformed
/// one is ignored, as tonic's `Server` ignores it, rather than failing the call).
fn parse_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    // At most 8 digits (the gRPC spec's TimeoutValue), which also keeps the hours in a u64.
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, value.parse().unwrap());
        parse_grpc_timeout(&headers)
    }

    #[test]
    fn every_unit_of_the_spec() {
        assert_eq!(parse("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("42S"), Some(Duration::from_secs(42)));
        assert_eq!(parse("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse("30000000u"), Some(Duration::from_secs(30)));
        assert_eq!(parse("82n"), Some(Duration::from_nanos(82)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse("0m"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_ignored() {
        for value in [
            "",
            "m",
            "1",
            "1x",
            "1 m",
            " 1m",
            "-1m",
            "+1m",
            "1.5S",
            "123456789n",
            "1h",
            "oneH",
            "1mm",
        ] {
            assert_eq!(parse(value), None, "{value:?}");
        }
        assert_eq!(parse_grpc_timeout(&HeaderMap::new()), None);
    }
}
