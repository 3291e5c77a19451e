//! The end of a connection at the drain deadline: cut, with its requests (or, with none, the
//! connection itself) named in the report; an upgraded connection held until its handler lets
//! go, shut down at the deadline.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use crate::serve::tower::ConnWatch;
use crate::serve::transport::{SocketReach, Transport};

use super::Stage;

/// After the connection ended on its own: if a request on it was upgraded (HTTP/1: the
/// socket now belongs to the upgrade's handler, a WebSocket say), it stays in flight until the
/// handler drops the socket; at the drain deadline the socket is shut down and the request
/// named. The handler learns that the drain started from the Drain phase's token, and can
/// send its close frame (see the module docs).
/// Whether the connection had upgraded requests.
pub(super) async fn hold_upgraded<T: Transport>(
    watch: &ConnWatch,
    socket: &SocketReach<T>,
    stage: &mut watch::Receiver<Stage>,
) -> bool {
    if crate::state::lock(&watch.upgrades).is_empty() {
        return false;
    }
    tokio::select! {
        () = watch.io_dropped.notified() => {}
        _ = stage.wait_for(|s| *s == Stage::Cut) => {
            // Both directions: the handler's next read ends, the peer sees the close now.
            let _ = socket.get().sock_ref().shutdown(std::net::Shutdown::Both);
            name_upgrades(watch, "upgraded connection open", "at the drain deadline");
        }
    }
    // Drops the in-flight guards.
    crate::state::lock(&watch.upgrades).clear();
    true
}

/// Names every upgraded request of a connection cut (`when`: at the drain deadline, or when a
/// second signal abandoned the drain) and lets their in-flight guards go; how many were named.
fn name_upgrades(watch: &ConnWatch, what: &str, when: &str) -> usize {
    let upgrades = std::mem::take(&mut *crate::state::lock(&watch.upgrades));
    for upgrade in &upgrades {
        watch
            .handle
            .shared
            .record_cut(format!("{} ({what} {when})", upgrade.name));
    }
    upgrades.len()
}

/// Held by a connection's task: if the task is dropped before it ends (its server's task, with
/// its connections, was aborted: a second signal abandoned the drain, or the Drain deadline
/// came before the connection had seen the cut), the upgraded requests the connection still
/// holds (a WebSocket whose handler owns the socket) are named and let go, and the socket is
/// shut down. Nothing else would: their responses have ended, and their handlers may hold them
/// for as long as the peer stays.
pub(super) struct Abandoned<'a, T: Transport> {
    pub(super) watch: &'a ConnWatch,
    pub(super) socket: &'a SocketReach<T>,
    /// The task ended on its own: nothing to do.
    pub(super) ended: bool,
}

impl<T: Transport> Drop for Abandoned<'_, T> {
    fn drop(&mut self) {
        if self.ended || crate::state::lock(&self.watch.upgrades).is_empty() {
            return;
        }
        let _ = self
            .socket
            .get()
            .sock_ref()
            .shutdown(std::net::Shutdown::Both);
        let when = if self.watch.handle.shared.is_escalated() {
            "when a second signal abandoned the drain"
        } else {
            "at the drain deadline"
        };
        name_upgrades(self.watch, "upgraded connection open", when);
    }
}

pub(super) fn cut_connection<C>(mut conn: Pin<&mut Option<C>>, watch: &ConnWatch) -> bool {
    // Set before the drop: every request dropped with the connection names itself.
    watch.cutting.store(true, Ordering::Relaxed);
    conn.set(None);
    // Upgraded requests (a 101 not yet handed over, HTTP/2 extended CONNECT streams) are
    // named here: their responses have ended, so nothing else names them.
    let upgrades = name_upgrades(watch, "upgraded stream open", "at the drain deadline");
    // A connection with requests in flight is named by them (HTTP/2 streams, on tasks of their
    // own, name themselves when they are dropped, a moment later); only one with none is named
    // here, so nothing is reported twice.
    // `active` first (Acquire, paired with the Release decrement): a stream that named itself
    // and then went inactive between the two loads is then seen as named.
    if upgrades == 0
        && watch.active.load(Ordering::Acquire) == 0
        && watch.named.load(Ordering::Relaxed) == 0
    {
        // A response whose body ended but whose bytes hyper still held (its client reads
        // slower than the server writes) was cut short: named as its request.
        let cut = match (
            watch.write_blocked.load(Ordering::Relaxed),
            watch.http1_request_name(),
        ) {
            (true, Some(request)) => {
                format!("{request} (response still being written at the drain deadline)")
            }
            // HTTP/2 (its streams are not a connection's one request).
            (true, None) => format!(
                "connection from {} (a response still being written at the drain deadline)",
                watch.peer
            ),
            (false, _) => format!(
                "connection from {} (open at the drain deadline)",
                watch.peer
            ),
        };
        watch.handle.shared.record_cut(cut);
    }
    false
}
