//! The parts of a report: why the shutdown started, how each phase and entry ended.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::hook::HookError;
use crate::phase::Phase;
use crate::signal::Signal;

/// Why the shutdown started. The first trigger wins; later ones are ignored.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Reason {
    /// The process received a signal.
    Signal(Signal),
    /// [`Handle::trigger`](crate::Handle::trigger) was called.
    Requested(Cow<'static, str>),
    /// A service failed before it was ready, or graceful start failed.
    StartupFailed {
        /// What failed.
        name: Cow<'static, str>,
        /// Why.
        error: HookError,
    },
    /// A critical task ended with an error or a panic before the shutdown.
    TaskFailed {
        /// The task.
        name: Cow<'static, str>,
        /// Why.
        error: HookError,
    },
    /// A panic, seen by the opt-in panic hook ([`Builder::panic_hook`](crate::Builder::panic_hook)).
    Panic {
        /// The panic message.
        message: String,
        /// `file:line:column`, if known.
        location: Option<String>,
    },
    /// An upgrade's successor is ready and serves the listening sockets (feature `upgrade`, see
    /// [`finale::upgrade`](crate::upgrade)); this process steps down. No drain delay: the
    /// listeners stay open in the successor.
    Upgrade {
        /// The successor's process id.
        successor_pid: u32,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Signal(s) => write!(f, "signal {s}"),
            Reason::Requested(why) => write!(f, "requested: {why}"),
            Reason::StartupFailed { name, error } => {
                write!(f, "startup of {name:?} failed: {error}")
            }
            Reason::TaskFailed { name, error } => {
                write!(f, "critical task {name:?} failed: {error}")
            }
            Reason::Panic { message, location } => match location {
                Some(l) => write!(f, "panic at {l}: {message}"),
                None => write!(f, "panic: {message}"),
            },
            Reason::Upgrade { successor_pid } => {
                write!(f, "upgrade: handed over to pid {successor_pid}")
            }
        }
    }
}

/// How one hook or task ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// It finished in time.
    Completed,
    /// It returned an error.
    Failed(HookError),
    /// It panicked; the panic message.
    Panicked(String),
    /// Its own timeout elapsed.
    TimedOut,
    /// It finished, but after its deadline: it blocked its thread past the point where it
    /// should have been abandoned, so nothing could stop it in time.
    Overran,
    /// Its phase's deadline passed, or a second signal came, before it finished; it was aborted.
    Abandoned,
}

impl Outcome {
    /// The outcome's lower-case name, as used in metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed(_) => "failed",
            Outcome::Panicked(_) => "panicked",
            Outcome::TimedOut => "timed_out",
            Outcome::Overran => "overran",
            Outcome::Abandoned => "abandoned",
        }
    }

    /// Whether it completed.
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Failed(e) => write!(f, "failed: {e}"),
            Outcome::Panicked(m) => write!(f, "panicked: {m}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What kind of entry a [`EntryReport`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryKind {
    /// A [`Hook`](crate::Hook).
    Hook,
    /// A [`Task`](crate::Task), stopped and awaited in this phase.
    Task,
    /// The wait for in-flight work ([`InFlight`](crate::InFlight)) to reach zero.
    InFlight,
    /// The Announce phase's drain delay.
    DrainDelay,
    /// The Announce phase's wait for an upgrade under way to be abandoned (its successor
    /// stopped) before the servers let go of the shared sockets (feature `upgrade`).
    Upgrade,
}

impl EntryKind {
    /// The kind's snake-case name, as the termination message and the JSON report write it.
    pub(crate) const fn key(self) -> &'static str {
        match self {
            EntryKind::Hook => "hook",
            EntryKind::Task => "task",
            EntryKind::InFlight => "in_flight",
            EntryKind::DrainDelay => "drain_delay",
            EntryKind::Upgrade => "upgrade",
        }
    }
}

/// One entry's part in the report: a hook, a task, or one of finale's own waits.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EntryReport {
    /// Its name.
    pub name: Cow<'static, str>,
    /// Hook, task, or one of finale's own waits.
    pub kind: EntryKind,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran in this phase.
    pub duration: Duration,
}

/// How a phase as a whole ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PhaseOutcome {
    /// Everything in it finished before its deadline.
    Completed,
    /// Its deadline passed; what was unfinished was abandoned.
    DeadlineReached,
    /// A second signal cut it short.
    Escalated,
    /// It never ran: a second signal skipped it. Its token still fired, readiness was still
    /// turned off and the drain flag still set.
    Skipped,
}

impl PhaseOutcome {
    /// The lower-case name, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseOutcome::Completed => "completed",
            PhaseOutcome::DeadlineReached => "deadline_reached",
            PhaseOutcome::Escalated => "escalated",
            PhaseOutcome::Skipped => "skipped",
        }
    }
}

/// One phase's part in the report.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PhaseReport {
    /// The phase.
    pub phase: Phase,
    /// How it ended.
    pub outcome: PhaseOutcome,
    /// How long it ran.
    pub duration: Duration,
    /// Its tasks first (they stop from the phase's start), in registration order; then its
    /// hooks and finale's own waits, in the order their groups ran: registration order within
    /// a group, finale's own waits last.
    pub entries: Vec<EntryReport>,
}
