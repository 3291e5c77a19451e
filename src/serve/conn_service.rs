//! One connection's service: who is on the other end (the frameworks' connection info), the
//! drain's admission, and the call of the user's layers and service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::serve::tower::{
    Admission, ConnWatch, DrainBody, LayerShared, Peer, ResponseFuture, TooLate, admit, grpc_kind,
};
use crate::track::InFlight;

/// One connection's service: the drain logic of [`DrainLayer`](crate::tower::DrainLayer) in
/// front of a clone of the user's service per request.
pub(super) struct ConnService<S> {
    pub(super) inner: S,
    pub(super) in_flight: InFlight,
    pub(super) shared: Arc<LayerShared>,
    pub(super) conn: Arc<ConnWatch>,
}

impl<S> fmt::Debug for ConnService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnService")
            .field("peer", &self.conn.peer)
            .finish_non_exhaustive()
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
    type Future = ResponseFuture<Oneshot<S, Request<Incoming>>, B>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        // Who is on the other end, as the frameworks' own servers tell their handlers: axum's
        // `ConnectInfo<SocketAddr>` extractor, tonic's `Request::remote_addr()`.
        // On a Unix socket, what they give for a `UnixListener`: axum's
        // `ConnectInfo<tokio::net::unix::SocketAddr>`, tonic's `UdsConnectInfo`.
        // tonic's is read by gRPC handlers only (`tonic::Request` exists for gRPC calls): it is
        // inserted for gRPC requests, and a plain HTTP request pays for one insert, as with
        // `axum::serve`'s own connect info.
        let grpc = grpc_kind(&req);
        match &self.conn.peer {
            Peer::Tcp { peer, local } => {
                #[cfg(feature = "axum")]
                req.extensions_mut()
                    .insert(::axum::extract::ConnectInfo(*peer));
                #[cfg(feature = "tonic")]
                if grpc.is_some() {
                    req.extensions_mut()
                        .insert(::tonic::transport::server::TcpConnectInfo {
                            local_addr: Some(*local),
                            remote_addr: Some(*peer),
                        });
                }
                let _ = (peer, local);
            }
            #[cfg(unix)]
            Peer::Unix { addr, cred, .. } => {
                #[cfg(feature = "axum")]
                req.extensions_mut().insert(::axum::extract::ConnectInfo(
                    tokio::net::unix::SocketAddr::clone(addr),
                ));
                #[cfg(feature = "tonic")]
                if grpc.is_some() {
                    req.extensions_mut()
                        .insert(::tonic::transport::server::UdsConnectInfo {
                            peer_addr: Some(addr.clone()),
                            peer_cred: *cred,
                        });
                }
                let _ = (addr, cred);
            }
        }
        match admit(self.in_flight, &self.shared, Some(&self.conn), &req, grpc) {
            Admission::Rejected(response) => ResponseFuture::rejected(response),
            Admission::Admitted(admitted) => {
                if admitted.too_late {
                    // Answered by the `Responder`, inside the user's layers.
                    req.extensions_mut().insert(TooLate);
                }
                // The user's layers are called here: a panic in one is isolated as it is in
                // their futures (a `500`, counted).
                let inner = self.inner.clone();
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    Oneshot::new(inner, req)
                })) {
                    Ok(call) => ResponseFuture::admitted(call, admitted),
                    Err(payload) => ResponseFuture::panicked(admitted, &*payload),
                }
            }
        }
    }
}

pin_project! {
    /// `poll_ready`, then `call`, on an owned tower service: at once if the service is ready
    /// (the usual case: the request is handed over once, no future waits for readiness),
    /// otherwise when polled. A service whose readiness failed is not asked again (tower's
    /// contract: it may panic if it is); its error is the answer.
    #[project = OneshotProj]
    pub(crate) enum Oneshot<S, Req>
    where
        S: tower::Service<Req>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { pending: Option<(S, Req)> },
        Failed { error: Option<BoxError> },
    }
}

impl<S, Req> Oneshot<S, Req>
where
    S: tower::Service<Req>,
    S::Error: Into<BoxError>,
{
    fn new(mut service: S, req: Req) -> Self {
        // A waker that does nothing: a service not ready now is polled again, with the
        // task's waker, when the future is.
        match service.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => Self::Called {
                fut: service.call(req),
            },
            Poll::Ready(Err(error)) => Self::Failed {
                error: Some(error.into()),
            },
            Poll::Pending => Self::Waiting {
                pending: Some((service, req)),
            },
        }
    }
}

impl<S, Req> Future for Oneshot<S, Req>
where
    S: tower::Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                OneshotProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                OneshotProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
                OneshotProj::Waiting { pending } => {
                    let (service, _) = pending.as_mut().expect("polled after completion");
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        self.set(Self::Failed {
                            error: Some(error.into()),
                        });
                        continue;
                    }
                    let (mut service, req) = pending.take().expect("checked above");
                    let fut = service.call(req);
                    self.set(Self::Called { fut });
                }
            }
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

    impl tower::Service<()> for FailsOnce {
        type Response = ();
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<(), std::io::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            assert!(!self.failed, "poll_ready asked again after it failed");
            self.failed = true;
            Poll::Ready(Err(std::io::Error::other("backend gone")))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            unreachable!("never ready")
        }
    }

    #[tokio::test]
    async fn a_failed_readiness_is_the_answer_and_not_asked_again() {
        let error = Oneshot::new(FailsOnce { failed: false }, ())
            .await
            .expect_err("the readiness failed");
        assert_eq!(error.to_string(), "backend gone");
    }
}
