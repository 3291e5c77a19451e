//! The innermost service of finale's servers: it calls the user's service, isolates its
//! panics, and answers a request found too late in the drain.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tower::Service;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use super::{DrainBody, Grpc, LayerShared, grpc_kind, panic_response};
use crate::track::InFlight;

/// Marks a request that finale's server found too late to be served: the [`Responder`]
/// answers it with the rejection instead of calling the service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TooLate;

/// The innermost service of finale's servers: calls the user's service, isolates its panics
/// (`500`, in gRPC form for gRPC), and answers a request the server found too late in the drain
/// with the [`Rejection`](super::Rejection). The layers given to
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
        let in_flight = self.shared.handle.in_flight();
        // Marked only while draining: one relaxed load before the extensions are looked at.
        if in_flight.is_draining() && req.extensions().get::<TooLate>().is_some() {
            // Counted here, where it is answered: a request a layer answered itself (or
            // stripped of its mark and had served) is not a rejection.
            self.shared.handle.shared.record_rejected_request();
            return ResponderFuture {
                state: Answer::Ready {
                    response: Some(self.shared.rejection.response(req.version(), grpc)),
                },
            };
        }
        // tower's clone-and-swap: this request's service is the one this `Responder` held, and
        // a clone made before it is asked for readiness stays for the next request. A layer
        // that keeps one `Responder` for every request (a `Buffer`) never asks a service whose
        // readiness failed again.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        // Ready at once (the usual case): called now, inside the panic isolation, and the
        // request is handed over once. (A waker that does nothing: a service not ready now is
        // polled again, with the task's waker, in the future.)
        let ready = std::panic::catch_unwind(AssertUnwindSafe(|| {
            service.poll_ready(&mut Context::from_waker(std::task::Waker::noop()))
        }));
        let state = match ready {
            Ok(Poll::Ready(Ok(()))) => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(req))) {
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
            // Failed: not asked again (tower's contract: a service may panic if it is); its
            // error is the answer.
            Ok(Poll::Ready(Err(error))) => Answer::Failed { error: Some(error) },
            // Not ready: asked again in the future.
            Ok(Poll::Pending) => {
                // Its readiness and its call both happen in the future, inside the panic
                // isolation.
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

impl<S> Responder<S> {
    fn into_inner(self) -> S {
        self.inner
    }
}

/// The layers of [`HttpServer::layer`](crate::axum::HttpServer::layer), as finale's servers put
/// them around the [`Responder`]. With none (a server no layer was added to, `Identity`), the
/// server calls the service itself and makes finale's answers (the rejection of a request too
/// late in the drain, the `500` of a panic) outside it, with no layer to see them: one future
/// and one response body fewer per request.
///
/// Sealed: implemented for what `HttpServer` builds (`Identity`, and the `Stack`s of
/// `HttpServer::layer`). It shows in the bounds of `HttpServer::serve`.
pub trait ServerLayers<S>: sealed::Sealed {
    /// The service the server calls for each request.
    type Service;

    /// The service is the user's own, with no [`Responder`] in front.
    #[doc(hidden)]
    const BARE: bool;

    /// The layers around `responder` (or, with none, the user's service itself).
    #[doc(hidden)]
    fn around(self, responder: Responder<S>) -> Self::Service;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for tower::layer::util::Identity {}
    impl<Inner, Outer> Sealed for tower::layer::util::Stack<Inner, Outer> {}
}

impl<S> ServerLayers<S> for tower::layer::util::Identity {
    type Service = S;
    const BARE: bool = true;

    fn around(self, responder: Responder<S>) -> S {
        responder.into_inner()
    }
}

impl<S, Inner, Outer> ServerLayers<S> for tower::layer::util::Stack<Inner, Outer>
where
    Self: ::tower::Layer<Responder<S>>,
{
    type Service = <Self as ::tower::Layer<Responder<S>>>::Service;
    const BARE: bool = false;

    fn around(self, responder: Responder<S>) -> Self::Service {
        ::tower::Layer::layer(&self, responder)
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
        Failed { error: Option<S::Error> },
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
                AnswerProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
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
pub(crate) fn handler_panicked<B>(
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
