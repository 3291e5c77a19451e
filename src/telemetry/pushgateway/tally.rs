//! The report's count of the samples pushed.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::report::{Counts, Items, Tally};

/// Samples in pushes the Pushgateway took (`exported`) and refused or never answered
/// (`failed`), and how many the last body rendered held.
#[derive(Debug, Default)]
pub(super) struct Samples {
    exported: AtomicU64,
    failed: AtomicU64,
    pub(super) last_body: AtomicU64,
}

impl Samples {
    /// A push whose body was not rendered: it fails as many samples as the last body held, at
    /// least one, so that a [`DeliveryPolicy`](crate::DeliveryPolicy) sees the failure. Its own
    /// count is unknown; the last one is the best guess.
    pub(super) fn nothing_rendered(&self) {
        self.last_body.fetch_max(1, Ordering::Relaxed);
    }

    /// Counts the last body's samples as pushed or not. One count per push, not per attempt:
    /// a push that succeeded on its second attempt lost nothing.
    pub(super) fn record(&self, pushed: bool) {
        let n = self.last_body.load(Ordering::Relaxed);
        let to = if pushed { &self.exported } else { &self.failed };
        to.fetch_add(n, Ordering::Relaxed);
    }
}

/// The report's view of the samples pushed.
pub(super) struct SampleTally {
    pub(super) stage: String,
    pub(super) samples: Arc<Samples>,
}

impl Tally for SampleTally {
    fn stage(&self) -> Cow<'static, str> {
        Cow::Owned(self.stage.clone())
    }

    fn items(&self) -> Items {
        Items::Samples
    }

    fn counts(&self) -> Counts {
        Counts::new(
            self.samples.exported.load(Ordering::Relaxed),
            self.samples.failed.load(Ordering::Relaxed),
            0,
        )
    }
}
