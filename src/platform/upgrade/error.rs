//! How an upgrade ended: [`Upgraded`] (the successor serves) or [`UpgradeError`] (this
//! process goes on serving).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A successful upgrade: the successor is ready and this process is shutting down.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The successor's process id.
    pub successor_pid: u32,
    /// From the trigger to the successor's `READY=1`.
    pub ready_after: Duration,
}

/// Why an upgrade did not happen. In every case this process goes on serving.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The finale was built without [`Builder::upgrade`](crate::Builder::upgrade).
    NotEnabled,
    /// Another upgrade is under way.
    InProgress,
    /// The shutdown has started already.
    ShuttingDown,
    /// The successor could not be started (the program is missing, say).
    Spawn {
        /// The program.
        program: PathBuf,
        /// What failed.
        error: String,
    },
    /// The successor ended before it reported ready.
    Exited {
        /// Its process id.
        pid: u32,
        /// How it ended (`exit status: 3`, `signal: 9 (SIGKILL)`).
        status: String,
    },
    /// The successor did not report ready in time; it was stopped (SIGTERM, so that it
    /// drains what it had accepted, then SIGKILL after [`STOP_WAIT`](super::STOP_WAIT)).
    NotReady {
        /// Its process id.
        pid: u32,
        /// How long it was given.
        waited: Duration,
    },
    /// The shutdown was requested while the successor was starting: the upgrade was abandoned
    /// and the successor stopped, so that the service stops as asked.
    Aborted {
        /// Its process id.
        pid: u32,
    },
}

impl UpgradeError {
    /// The `outcome` label of `finale_upgrades_total`.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            UpgradeError::NotEnabled | UpgradeError::InProgress | UpgradeError::ShuttingDown => {
                "refused"
            }
            UpgradeError::Spawn { .. } => "spawn_failed",
            UpgradeError::Exited { .. } => "exited",
            UpgradeError::NotReady { .. } => "not_ready",
            UpgradeError::Aborted { .. } => "aborted",
        }
    }
}

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeError::NotEnabled => f.write_str("upgrades are not enabled (Builder::upgrade)"),
            UpgradeError::InProgress => f.write_str("an upgrade is already under way"),
            UpgradeError::ShuttingDown => f.write_str("the shutdown has started"),
            UpgradeError::Spawn { program, error } => {
                write!(
                    f,
                    "the successor {} could not start: {error}",
                    program.display()
                )
            }
            UpgradeError::Exited { pid, status } => {
                write!(
                    f,
                    "the successor (pid {pid}) ended before it was ready: {status}"
                )
            }
            UpgradeError::NotReady { pid, waited } => write!(
                f,
                "the successor (pid {pid}) was not ready within {waited:?}; it was stopped"
            ),
            UpgradeError::Aborted { pid } => write!(
                f,
                "the shutdown started while the successor (pid {pid}) was starting; it was stopped"
            ),
        }
    }
}

impl std::error::Error for UpgradeError {}
