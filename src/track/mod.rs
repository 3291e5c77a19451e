//! What running code checks on the hot path: in-flight work, one-shot stop tokens and health.
//! Leaves of the crate: they depend on nothing else in it but the metric names.

mod health;
mod in_flight;
mod token;

pub use self::health::Health;
pub use self::in_flight::{InFlight, InFlightGuard, InFlightTracker};
pub use self::token::{Cancelled, StopToken};

/// Waits on `notify` until `ready()` holds. The waiter registers before it checks, so a
/// `notify_waiters` between the check and the await cannot be missed (`notify_waiters` only
/// wakes registered waiters): the one "enable, then check" loop of the crate.
pub(crate) async fn wait_until(notify: &tokio::sync::Notify, ready: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if ready() {
            return;
        }
        notified.await;
    }
}
