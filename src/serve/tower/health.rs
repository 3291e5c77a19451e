//! `/livez` and `/readyz` as a tower service.

use std::convert::Infallible;
use std::task::{Context, Poll};

use ::tower::Service;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::Handle;

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
