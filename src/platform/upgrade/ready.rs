//! The successor's side of the hand-off: which generation it is, and the `READY=1` it writes
//! to the old process on the passed `finale.ready` socket once its graceful start is done.

use std::io;
use std::os::unix::net::UnixStream;

use crate::platform::PARENT_ENV;
use crate::state::{Observer, Shared, lock};

/// The variable that carries [`generation`] to a successor.
pub const GENERATION_ENV: &str = "FINALE_UPGRADE_GENERATION";

/// How many upgrades led to this process: 0 for a process started otherwise, 1 for its first
/// successor, and so on (from `FINALE_UPGRADE_GENERATION`, which each upgrade sets one higher
/// for the successor). A label that tells the old and the new process apart in telemetry.
pub fn generation() -> u32 {
    std::env::var(GENERATION_ENV)
        .ok()
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or(0)
}

/// The name of the extra passed socket on which the successor reports ready.
pub(crate) const READY_NAME: &str = "finale.ready";
/// What the successor writes on it.
pub(super) const READY_LINE: &[u8] = b"READY=1\n";

/// In a successor: the socket on which to report ready, if this process was started by an
/// upgrade.
pub(crate) fn ready_reporter() -> Option<ReadyReporter> {
    std::env::var_os(PARENT_ENV)?;
    let stream = crate::platform::systemd::take_unix_named(READY_NAME)?;
    Some(ReadyReporter {
        stream: std::sync::Mutex::new(Some(stream)),
    })
}

/// Writes `READY=1` to the old process when graceful start is done.
#[derive(Debug)]
pub(crate) struct ReadyReporter {
    stream: std::sync::Mutex<Option<UnixStream>>,
}

impl Observer for ReadyReporter {
    fn started(&self, _shared: &Shared) {
        // Sockets of servers this version no longer has: refused from now on, not queued for
        // nobody.
        let closed = crate::platform::systemd::close_untaken();
        if !closed.is_empty() {
            tracing::warn!(
                target: "finale",
                sockets = %closed.join(", "),
                "upgrade: passed sockets no server took were closed"
            );
        }
        if let Some(mut stream) = lock(&self.stream).take()
            && let Err(e) = io::Write::write_all(&mut stream, READY_LINE)
        {
            tracing::warn!(target: "finale", error = %e, "upgrade: could not report ready to the old process");
        }
    }
}
