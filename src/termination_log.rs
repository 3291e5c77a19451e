//! Where the termination message goes: [`TerminationLog`], a plain setting the builder
//! collects. Writing it is the platform layer's (`platform/kubernetes.rs`).

use std::path::PathBuf;

/// Where Kubernetes reads a container's termination message unless its
/// `terminationMessagePath` says otherwise: `/dev/termination-log`.
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";

/// The environment variable that overrides [`Builder::termination_log`](crate::Builder::termination_log):
/// a path, `auto` or `off`.
pub(crate) const TERMINATION_LOG_ENV: &str = "FINALE_TERMINATION_LOG";

/// Where [`Finale::run`](crate::Finale::run) writes the termination message when the run ends
/// (see [`Builder::termination_log`](crate::Builder::termination_log)).
///
/// The environment variable `FINALE_TERMINATION_LOG` overrides the builder (unless
/// [`read_env(false)`](crate::Builder::read_env)): a path, `auto`, or `off`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TerminationLog {
    /// [`DEFAULT_TERMINATION_LOG`] when running on Kubernetes (`KUBERNETES_SERVICE_HOST` is set,
    /// see [`Environment`](crate::Environment)) and that file exists and opens for writing when the `Finale` is
    /// built; nowhere otherwise. The default.
    #[default]
    Auto,
    /// Never write one.
    Off,
    /// Always write it to this file (created if missing), wherever the process runs: a
    /// `terminationMessagePath` of your own, or a test.
    Path(PathBuf),
}

impl TerminationLog {
    /// Reads the value of `FINALE_TERMINATION_LOG`; `None` when it is empty.
    pub(crate) fn from_env(value: &str) -> Option<Self> {
        let value = value.trim();
        Some(match value {
            "" => return None,
            "off" | "none" | "false" | "0" => TerminationLog::Off,
            "auto" => TerminationLog::Auto,
            path => TerminationLog::Path(PathBuf::from(path)),
        })
    }
}
