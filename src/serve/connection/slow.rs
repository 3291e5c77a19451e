//! The timing of slow clients: when a connection's header-read timer is next due, and when it
//! looks again after it fired; `after`, the saturating deadline every timer of a connection
//! uses.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::serve::tower::ConnWatch;

use super::LoopSettings;

/// When the slow-client timer of a connection is next due, or `None` if the connection is
/// slow: not known to be HTTP/2, no request in flight, nothing left to write, and no request's
/// headers within the header-read timeout after it last did something.
pub(super) fn slow_due(watch: &ConnWatch, settings: &LoopSettings) -> Option<Instant> {
    let now = Instant::now();
    if watch.active.load(Ordering::Relaxed) > 0
        || watch.write_blocked.load(Ordering::Relaxed)
        || watch.h2_preface.load(Ordering::Relaxed)
        || watch.http2.load(Ordering::Relaxed)
    {
        // A request in flight (its body, its response), a response still going out (however
        // slowly the client reads it), or HTTP/2: look again one timeout from now.
        return Some(after(now, settings.header_read_timeout));
    }
    let due = after(watch.last_active(), settings.header_read_timeout);
    if due <= now {
        tracing::debug!(target: "finale", peer = %watch.peer, "no request headers within the header-read timeout: closing");
        return None;
    }
    Some(due)
}

/// When the slow-client timer looks again after it fired and found the connection due (at
/// the earliest) at `due`. `due` is on the runtime's clock and the timer may be on the real
/// one (the server's timer thread): if the runtime's clock was paused after the server
/// started, a `due` the real clock has passed would make the timer fire again at once, for
/// ever; it then looks again a quarter of the timeout later, on the real clock. On one clock
/// `due` is always ahead (a connection found past it is closed), and is kept.
pub(super) fn rearm(due: Instant, settings: &LoopSettings) -> Instant {
    let real_now = Instant::from_std(std::time::Instant::now());
    if due > real_now {
        due
    } else {
        after(real_now, settings.header_read_timeout / 4)
    }
}

/// `at + duration`, or about thirty years after `at` if that does not fit in an `Instant`
/// (`Duration::MAX` as a timeout means none).
pub(in crate::serve) fn after(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .unwrap_or_else(|| at + Duration::from_secs(86_400 * 365 * 30))
}
