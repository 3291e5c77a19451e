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
        // Let go at the body's end.
        track: Option<Track>,
    }

    impl<B> PinnedDrop for DrainBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(Track { cut: Some(cut), .. }) = this.project().track {
                cut.record_if_cut("stream open", None);
            }
        }
    }
}

/// What a response body keeps while it is in flight: the guard, and the name it gets if it is
/// cut (whose drop tells its connection the request ended).
pub(crate) struct Track {
    pub(super) _guard: InFlightGuard,
    pub(super) cut: Option<CutName>,
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
            track: None,
        }
    }

    #[inline]
    pub(super) fn untracked(body: B) -> Self {
        Self::new(body, None)
    }

    /// `body`, in flight until it ends or is dropped, and named in the report if it is cut, as
    /// `track` says.
    #[inline]
    pub(super) fn new(body: B, track: Option<Track>) -> Self {
        Self {
            kind: Kind::Inner { body },
            track,
        }
    }

    /// This body, kept in flight and named as `track` says.
    #[inline]
    pub(super) fn tracked(mut self, track: Option<Track>) -> Self {
        self.track = track;
        self
    }
}

impl<B> fmt::Debug for DrainBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainBody")
            .field("in_flight", &self.track.is_some())
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
                    this.track.take();
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
