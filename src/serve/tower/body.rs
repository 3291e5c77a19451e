//! The response body of the drain layer and of finale's servers: in flight until its end.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::CutName;
use crate::track::InFlightGuard;

pin_project! {
    /// The response body of [`Drain`]: the inner body, counted as in flight until it ends or is
    /// dropped; or the body of a rejection.
    pub struct DrainBody<B> {
        #[pin]
        kind: Kind<B>,
        guard: Option<InFlightGuard>,
        cut: Option<CutName>,
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
    pub(super) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            guard: None,
            cut: None,
        }
    }

    #[inline]
    pub(super) fn untracked(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
            guard: None,
            cut: None,
        }
    }

    /// This body, in flight (with `guard`) until it ends or is dropped; named in the report as
    /// `cut` if it is cut.
    #[inline]
    pub(super) fn tracked(mut self, guard: InFlightGuard, cut: Option<CutName>) -> Self {
        self.guard = Some(guard);
        self.cut = cut;
        self
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
