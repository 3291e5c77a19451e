//! finale's own answers: the [`Rejection`] of a request too late in the drain and the `500`
//! of a handler that panicked, each in gRPC form for a gRPC request.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode, Version};

use super::DrainBody;
use super::admit::is_http1;

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
pub(crate) fn panic_response<B>(grpc: Option<Grpc>) -> Response<DrainBody<B>> {
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
    pub(super) fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Grpc::Plain => "application/grpc",
            Grpc::Web => "application/grpc-web",
            Grpc::WebText => "application/grpc-web-text",
        })
    }
}

/// The request's gRPC kind, from its content type. Every gRPC call (gRPC-Web too) is a
/// `POST`: any other method is not gRPC, and is told without a header lookup (a `CONNECT`, whose
/// `2xx` would upgrade the connection, never is).
pub(crate) fn grpc_kind<ReqB>(req: &Request<ReqB>) -> Option<Grpc> {
    if req.method() != Method::POST {
        return None;
    }
    let content_type = req.headers().get(CONTENT_TYPE)?.as_bytes();
    let rest = content_type.strip_prefix(b"application/grpc")?;
    Some(if rest.starts_with(b"-web-text") {
        Grpc::WebText
    } else if rest.starts_with(b"-web") {
        Grpc::Web
    } else {
        Grpc::Plain
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, content_type: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .header(CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    #[test]
    fn only_a_post_is_grpc() {
        assert!(matches!(
            grpc_kind(&request(Method::POST, "application/grpc+proto")),
            Some(Grpc::Plain)
        ));
        assert!(matches!(
            grpc_kind(&request(Method::POST, "application/grpc-web-text")),
            Some(Grpc::WebText)
        ));
        assert!(matches!(
            grpc_kind(&request(Method::POST, "application/grpc-web+proto")),
            Some(Grpc::Web)
        ));
        assert!(grpc_kind(&request(Method::POST, "application/json")).is_none());
        assert!(grpc_kind(&request(Method::GET, "application/grpc")).is_none());
        assert!(grpc_kind(&request(Method::CONNECT, "application/grpc")).is_none());
    }
}
