//! The public layer: [`DrainLayer`], the [`Drain`] service it makes, and its
//! [`ResponseFuture`] (the handler's panic isolated, the response made ready by the admission).

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::tower::{Layer, Service};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::Handle;
use crate::track::InFlight;

use super::{Admission, Admitted, DrainBody, LayerShared, Rejection, admit, grpc_kind};

/// A [`Layer`] that wraps services in [`Drain`]; see the [module docs](super).
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
        match admit(self.in_flight, &self.shared, &req, grpc_kind(&req)) {
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
                admitted.record_if_cut(None);
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
