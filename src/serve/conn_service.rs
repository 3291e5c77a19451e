//! One connection's service: who is on the other end (the frameworks' connection info), the
//! drain's admission, and the call of the user's layers and service.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::serve::tower::{
    Admitted, ConnWatch, DrainBody, LayerShared, Peer, TooLate, admit_on, grpc_kind,
};
use crate::track::InFlight;

/// One connection's service: the drain logic of [`DrainLayer`](crate::tower::DrainLayer) in
/// front of a clone of the user's service per request.
pub(super) struct ConnService<S> {
    pub(super) inner: S,
    pub(super) in_flight: InFlight,
    pub(super) shared: Arc<LayerShared>,
    pub(super) conn: Arc<ConnWatch>,
    /// `inner` is the user's service itself, with no layer of [`HttpServer::layer`] around
    /// it: what the [`Responder`](crate::tower::Responder) does inside those layers (a request
    /// too late in the drain answered, a panic isolated) is done here, with no layer to see
    /// it.
    ///
    /// [`HttpServer::layer`]: crate::axum::HttpServer::layer
    pub(super) bare: bool,
}

impl<S> fmt::Debug for ConnService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnService")
            .field("peer", &self.conn.peer)
            .finish_non_exhaustive()
    }
}

/// Who is on the other end, as the frameworks' own servers tell their handlers: axum's
/// `ConnectInfo<SocketAddr>` extractor, tonic's `Request::remote_addr()`. On a Unix socket,
/// what they give for a `UnixListener`: axum's `ConnectInfo<tokio::net::unix::SocketAddr>`,
/// tonic's `UdsConnectInfo`. tonic's is read by gRPC handlers only (`tonic::Request` exists for
/// gRPC calls): it is inserted for gRPC requests, and a plain HTTP request pays for one insert,
/// as with `axum::serve`'s own connect info.
#[inline(always)]
#[cfg_attr(not(all(feature = "axum", feature = "tonic")), allow(unused_variables))]
fn insert_connect_info<ReqB>(req: &mut Request<ReqB>, peer: &Peer, grpc: bool) {
    match peer {
        Peer::Tcp { peer, local } => {
            #[cfg(feature = "axum")]
            req.extensions_mut()
                .insert(::axum::extract::ConnectInfo(*peer));
            #[cfg(feature = "tonic")]
            if grpc {
                req.extensions_mut()
                    .insert(::tonic::transport::server::TcpConnectInfo {
                        local_addr: Some(*local),
                        remote_addr: Some(*peer),
                    });
            }
        }
        #[cfg(unix)]
        Peer::Unix { addr, cred, .. } => {
            #[cfg(feature = "axum")]
            req.extensions_mut().insert(::axum::extract::ConnectInfo(
                tokio::net::unix::SocketAddr::clone(addr),
            ));
            #[cfg(feature = "tonic")]
            if grpc {
                req.extensions_mut()
                    .insert(::tonic::transport::server::UdsConnectInfo {
                        peer_addr: Some(addr.clone()),
                        peer_cred: *cred,
                    });
            }
        }
    }
}

/// A service's error as hyper takes it.
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<DrainBody<B>>;
    type Error = BoxError;
    type Future = ConnFuture<S, Incoming, B>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // The connection info goes into the request when its future is first polled: on
        // HTTP/2, on the stream's own task, which also frees it (not on the connection's, which
        // would hand every stream's allocations to another thread to free).
        let grpc = grpc_kind(&req);
        let admitted = admit_on(self.in_flight, &self.shared, &self.conn, &req, grpc);
        if admitted.too_late {
            if self.bare {
                // Counted here, where it is answered.
                self.shared.handle.shared.record_rejected_request();
                let response = self.shared.rejection.response(req.version(), grpc);
                return ConnFuture::answered(admitted, response);
            }
            // Answered by the `Responder`, inside the user's layers.
            req.extensions_mut().insert(TooLate);
        }
        // Asked for its readiness and called when the future is first polled (hyper polls it at
        // once): a panic in the service's (or the user's layers') `poll_ready`, `call` or
        // future is isolated there, a `500`, counted.
        ConnFuture::call(self.inner.clone(), req, admitted)
    }
}

pin_project! {
    /// The response future of a connection's request: the user's service asked for its
    /// readiness and called when the future is first polled (hyper polls it at once), all of it
    /// and the service's own future inside one panic isolation; or finale's own answer. Its
    /// response goes out tracked ([`Admitted::finish`]). A service whose readiness failed is
    /// not asked again (tower's contract: it may panic if it is); its error is the answer.
    pub(super) struct ConnFuture<S, ReqB, B>
    where
        S: tower::Service<Request<ReqB>>,
    {
        #[pin]
        step: Step<S, ReqB, B>,
        admitted: Option<Admitted>,
    }

    impl<S, ReqB, B> PinnedDrop for ConnFuture<S, ReqB, B>
    where
        S: tower::Service<Request<ReqB>>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its response: named if its connection is being cut (by the
            // request itself if it never reached the service).
            let this = this.project();
            if let Some(admitted) = this.admitted {
                let req = match this.step.project() {
                    StepProj::Waiting {
                        pending: Some((_, req)),
                        arrived: true,
                    } => Some(req),
                    _ => None,
                };
                admitted.record_if_cut(req.map(|req| (req.method(), req.uri())));
            }
        }
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<S, ReqB, B>
    where
        S: tower::Service<Request<ReqB>>,
    {
        // Waiting for the service's readiness; `arrived`: not polled yet, the request as hyper
        // made it.
        Waiting { pending: Option<(S, Request<ReqB>)>, arrived: bool },
        Called { #[pin] fut: S::Future },
        Answered { response: Option<Response<DrainBody<B>>> },
    }
}

impl<S, ReqB, B> ConnFuture<S, ReqB, B>
where
    S: tower::Service<Request<ReqB>>,
{
    /// `service` called with `req` when polled.
    #[inline]
    fn call(service: S, req: Request<ReqB>, admitted: Admitted) -> Self {
        Self {
            step: Step::Waiting {
                pending: Some((service, req)),
                arrived: true,
            },
            admitted: Some(admitted),
        }
    }

    /// finale's own answer to an admitted request, sent tracked as any response is.
    #[cold]
    fn answered(admitted: Admitted, response: Response<DrainBody<B>>) -> Self {
        Self {
            step: Step::Answered {
                response: Some(admitted.answer(response)),
            },
            admitted: None,
        }
    }
}

impl<S, ReqB, B> Future for ConnFuture<S, ReqB, B>
where
    S: tower::Service<Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<DrainBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut step = this.step;
        let admitted = this.admitted;
        if let StepProj::Answered { response } = step.as_mut().project() {
            return Poll::Ready(Ok(response.take().expect("polled after completion")));
        }
        // A panic in the service's `poll_ready`, `call` or future is the handler's: the request
        // is answered `500` and never polled again (no broken invariant can be observed).
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            poll_service(step.as_mut(), admitted.as_mut(), cx)
        }));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => {
                let admitted = admitted.take().expect("polled after completion");
                Poll::Ready(result.map(|response| admitted.finish(response)))
            }
            Err(payload) => {
                step.set(Step::Answered { response: None });
                let admitted = admitted.take().expect("polled after completion");
                Poll::Ready(Ok(admitted.panicked(&*payload)))
            }
        }
    }
}

/// Asks the service for its readiness and calls it (once), then polls its future. At the first
/// poll the request gets its connection info, and an HTTP/2 stream its own name: on the
/// stream's own task (see [`ConnService::call`]).
fn poll_service<S, ReqB, B>(
    mut step: Pin<&mut Step<S, ReqB, B>>,
    mut admitted: Option<&mut Admitted>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, BoxError>>
where
    S: tower::Service<Request<ReqB>>,
    S::Error: Into<BoxError>,
{
    loop {
        match step.as_mut().project() {
            StepProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
            StepProj::Waiting { pending, arrived } => {
                let (service, req) = pending.as_mut().expect("polled after completion");
                if std::mem::take(arrived)
                    && let Some(admitted) = admitted.as_deref_mut()
                {
                    admitted.name_stream(req);
                    if let Some(peer) = admitted.peer() {
                        insert_connect_info(req, peer, admitted.is_grpc());
                    }
                }
                if let Err(error) = ready!(service.poll_ready(cx)) {
                    // Not asked again: the request's answer is this error.
                    step.set(Step::Answered { response: None });
                    return Poll::Ready(Err(error.into()));
                }
                let (mut service, req) = pending.take().expect("checked above");
                let fut = service.call(req);
                step.set(Step::Called { fut });
            }
            StepProj::Answered { .. } => unreachable!("answered before the service is polled"),
        }
    }
}

/// Adapts a hyper service (`call(&self)`) to tower, for [`HttpServer::serve`].
#[cfg(feature = "hyper")]
#[derive(Clone, Debug)]
pub(crate) struct HyperToTower<S>(pub(crate) S);

#[cfg(feature = "hyper")]
impl<S, Req> tower::Service<Req> for HyperToTower<S>
where
    S: hyper::service::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails its readiness once, and panics if asked again (as tower allows a failed service
    /// to).
    struct FailsOnce {
        failed: bool,
    }

    impl tower::Service<Request<()>> for FailsOnce {
        type Response = Response<http_body_util::Empty<Bytes>>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            assert!(!self.failed, "poll_ready asked again after it failed");
            self.failed = true;
            Poll::Ready(Err(std::io::Error::other("backend gone")))
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            unreachable!("never ready")
        }
    }

    /// Never ready: its request never reaches it.
    struct NeverReady;

    impl tower::Service<Request<()>> for NeverReady {
        type Response = Response<http_body_util::Empty<Bytes>>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }

        fn call(&mut self, _req: Request<()>) -> Self::Future {
            unreachable!("never ready")
        }
    }

    /// A finale's handle, the drain's shared settings, and a connection from 127.0.0.1:5555.
    fn connection() -> (crate::Handle, LayerShared, Arc<ConnWatch>) {
        let finale = crate::Finale::builder().read_env(false).build().unwrap();
        let handle = finale.handle();
        let shared = LayerShared {
            handle: handle.clone(),
            rejection: crate::tower::Rejection::default(),
            cut_margin: std::time::Duration::ZERO,
        };
        let peer = Peer::Tcp {
            peer: ([127, 0, 0, 1], 5555).into(),
            local: ([127, 0, 0, 1], 80).into(),
        };
        let conn = Arc::new(ConnWatch::new(peer, handle.clone()));
        (handle, shared, conn)
    }

    #[tokio::test]
    async fn a_failed_readiness_is_the_answer_and_not_asked_again() {
        let (handle, shared, conn) = connection();
        let req = Request::new(());
        let admitted = admit_on(handle.in_flight(), &shared, &conn, &req, None);
        let error = ConnFuture::call(FailsOnce { failed: false }, req, admitted)
            .await
            .expect_err("the readiness failed");
        assert_eq!(error.to_string(), "backend gone");
        assert_eq!(handle.in_flight().count(), 0, "no longer in flight");
    }

    /// An HTTP/2 stream's request, `GET /events?token=secret`.
    fn http2_request() -> Request<()> {
        Request::builder()
            .version(http::Version::HTTP_2)
            .uri("http://example.com/events?token=secret")
            .body(())
            .unwrap()
    }

    /// The report's name of `GET /events` from the test's connection, cut unanswered.
    const EVENTS_CUT: &str = "GET /events from 127.0.0.1:5555 (no response at the drain deadline)";

    /// `future` dropped as its connection is cut: what the report names.
    fn dropped_in_the_cut<F>(handle: &crate::Handle, conn: &ConnWatch, future: F) -> Vec<String> {
        conn.cutting
            .store(true, std::sync::atomic::Ordering::Relaxed);
        drop(future);
        handle.shared.take_cut()
    }

    #[tokio::test]
    async fn an_http2_stream_cut_before_its_first_poll_is_named_by_its_request() {
        // Its own name is made on its first poll (on the stream's task): a stream dropped
        // before that, as a connection is cut, names itself from the request it still holds.
        let (handle, shared, conn) = connection();
        let req = http2_request();
        let admitted = admit_on(handle.in_flight(), &shared, &conn, &req, None);
        let future: ConnFuture<_, _, http_body_util::Empty<Bytes>> =
            ConnFuture::call(NeverReady, req, admitted);
        assert_eq!(dropped_in_the_cut(&handle, &conn, future), [EVENTS_CUT]);
        assert_eq!(handle.in_flight().count(), 0, "no longer in flight");
    }

    #[tokio::test]
    async fn an_http2_stream_cut_while_its_service_is_not_ready_is_named() {
        let (handle, shared, conn) = connection();
        let req = http2_request();
        let admitted = admit_on(handle.in_flight(), &shared, &conn, &req, None);
        let mut future = Box::pin(ConnFuture::call(NeverReady, req, admitted));
        let polled = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the service is never ready");
        assert_eq!(dropped_in_the_cut(&handle, &conn, future), [EVENTS_CUT]);
    }
}
