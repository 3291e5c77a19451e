//! Rendering a push's body on a thread of its own, one render at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Method, PushError, Pushgateway, RENDER_THREAD};
use crate::telemetry::stages::{OffThread, run_until};

/// What renders the metrics: [`PrometheusHandle::render`](metrics_exporter_prometheus::PrometheusHandle::render) or the user's closure.
pub(super) type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The right to run a render thread: one for pushes and one for consistency checks at a time,
/// so that a render that never returns leaves one thread behind, not one per push. Held by the
/// thread and given back when it returns (or panics).
pub(super) struct RenderSlot(Arc<AtomicBool>);

impl RenderSlot {
    /// The slot, unless its last render is still running.
    pub(super) fn take(running: &Arc<AtomicBool>) -> Option<RenderSlot> {
        running
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| RenderSlot(running.clone()))
    }
}

impl Drop for RenderSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A push's body, rendered.
#[derive(Clone, Default)]
pub(super) struct Body {
    pub(super) bytes: Bytes,
    /// The samples it holds, for the report.
    pub(super) samples: u64,
    /// Whether `bytes` is gzip-compressed.
    pub(super) gzip: bool,
}

/// Renders a push's body, compressed if `gzip`. Runs on the render thread.
fn rendered(render: &Render, gzip: bool) -> Body {
    let text = render();
    let samples = samples_in(&text);
    #[cfg(feature = "pushgateway-gzip")]
    if let Some(bytes) = gzip.then(|| gzipped(text.as_bytes())).flatten() {
        return Body {
            bytes: Bytes::from(bytes),
            samples,
            gzip: true,
        };
    }
    #[cfg(not(feature = "pushgateway-gzip"))]
    let _ = gzip;
    Body {
        bytes: Bytes::from(text),
        samples,
        gzip: false,
    }
}

/// `text`, gzip-compressed; `None` if compressing failed (it cannot, into memory: the body is
/// then sent as it is).
#[cfg(feature = "pushgateway-gzip")]
fn gzipped(text: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(text).ok()?;
    encoder.finish().ok()
}

/// The sample lines of a text exposition: neither empty nor comments.
fn samples_in(body: &str) -> u64 {
    body.lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .count() as u64
}

impl Pushgateway {
    /// Renders the metrics for a push on a thread of its own, by `deadline`, and notes how many
    /// samples they hold for the report.
    ///
    /// One render thread for pushes at a time: while the last one has not returned (a render
    /// that blocks), a push fails at once rather than leave one more thread behind each time.
    ///
    /// Not on the runtime: rendering a large registry (or a user's render that blocks) would
    /// stall every task of a `current_thread` runtime for as long. A plain thread rather than
    /// `spawn_blocking`, for the reason in [`stages`](crate::telemetry::stages): one that
    /// outlives its deadline is left behind, not waited for by the runtime's drop. The thread
    /// also works under the supervisor's takeover, whose runtime is a small one of its own.
    pub(super) async fn render(
        &self,
        method: Method,
        deadline: Instant,
    ) -> Result<Body, PushError> {
        let inner = &*self.inner;
        let start = Instant::now();
        let Some(slot) = RenderSlot::take(&inner.rendering) else {
            inner.samples.nothing_rendered();
            return Err(PushError::NotRendered {
                method,
                url: inner.url.clone(),
                panic: None,
                waited: Duration::ZERO,
                previous_running: true,
            });
        };
        let render = inner.render.clone();
        let gzip = inner.gzip;
        let work = move || {
            let _slot = slot;
            rendered(&render, gzip)
        };
        let rendered = match run_until(RENDER_THREAD, deadline, work).await {
            Ok(OffThread::Done(rendered)) => Ok(rendered),
            Ok(OffThread::Panicked(panic)) => Err(Some(panic)),
            Ok(OffThread::TimedOut) => Err(None),
            // No thread can start (a process at its limit): rendering here beats not pushing.
            Err(error) => {
                tracing::debug!(target: "finale", %error, "rendering on the runtime's thread");
                Ok(rendered(&inner.render, inner.gzip))
            }
        };
        match rendered {
            Ok(body) => {
                inner
                    .samples
                    .last_body
                    .store(body.samples, Ordering::Relaxed);
                Ok(body)
            }
            Err(panic) => {
                inner.samples.nothing_rendered();
                Err(PushError::NotRendered {
                    method,
                    url: inner.url.clone(),
                    panic,
                    waited: start.elapsed(),
                    previous_running: false,
                })
            }
        }
    }
}
