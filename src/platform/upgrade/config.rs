//! How an upgrade is configured ([`Upgrade`]): the signal that starts it, the successor's
//! program, and how long the successor may take to report ready.

use std::path::PathBuf;
use std::time::Duration;

use crate::signal::Signal;

/// How long the old process waits for its successor to report ready, by default: 30 seconds.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the service restarts without downtime; see the [module docs](super). Set with
/// [`Builder::upgrade`](crate::Builder::upgrade).
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`signal`](Upgrade::signal) | `SIGUSR2` |
/// | [`program`](Upgrade::program) | this process's executable (`std::env::current_exe`) |
/// | [`ready_timeout`](Upgrade::ready_timeout) | [`DEFAULT_READY_TIMEOUT`] |
#[derive(Clone, Debug)]
#[must_use]
pub struct Upgrade {
    pub(crate) signal: Option<Signal>,
    pub(super) program: Option<PathBuf>,
    ready_timeout: Duration,
}

impl Default for Upgrade {
    fn default() -> Self {
        Self {
            signal: Some(Signal::User2),
            program: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

impl Upgrade {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The signal that starts an upgrade; `None` for [`Handle::upgrade`](crate::Handle::upgrade)
    /// only. It must not be one of the shutdown signals
    /// ([`ConfigError::UpgradeSignal`](crate::ConfigError::UpgradeSignal)).
    pub fn signal(mut self, signal: Option<Signal>) -> Self {
        self.signal = signal;
        self
    }

    /// The successor's executable: a new binary installed next to the running one, say. By
    /// default the running process's own executable (on Linux, if the file was replaced, the
    /// new file at the same path).
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// How long the successor may take to report ready (its graceful start).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    pub(crate) fn ready_timeout_value(&self) -> Duration {
        self.ready_timeout
    }
}
