//! OS signals that trigger the shutdown, and escalation on repeated signals.

use std::fmt;

/// An OS signal finale can listen for.
///
/// On Unix every variant is the signal of the same name. On Windows only
/// [`Interrupt`](Signal::Interrupt) (Ctrl-C) and [`Terminate`](Signal::Terminate) (Ctrl-Close /
/// Ctrl-Shutdown) exist; the others are ignored there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Signal {
    /// `SIGTERM`: Kubernetes, ECS, `docker stop`, systemd.
    Terminate,
    /// `SIGINT`: Ctrl-C in a terminal.
    Interrupt,
    /// `SIGQUIT`.
    Quit,
    /// `SIGHUP`.
    Hangup,
    /// `SIGUSR1`.
    User1,
    /// `SIGUSR2`.
    User2,
}

impl Signal {
    /// The conventional name, such as `SIGTERM`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Quit => "SIGQUIT",
            Signal::Hangup => "SIGHUP",
            Signal::User1 => "SIGUSR1",
            Signal::User2 => "SIGUSR2",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The signals that trigger the shutdown by default: `SIGTERM` and `SIGINT`.
pub const DEFAULT_SIGNALS: &[Signal] = &[Signal::Terminate, Signal::Interrupt];
