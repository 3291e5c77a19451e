//! The report every run ends with, and the exit codes it maps to.

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

/// What kind of entry a [`HookReport`] describes.
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
}

/// One hook's or task's part in the report.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HookReport {
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
    /// It never started (a second signal skipped it).
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
    /// Its hooks, tasks and waits, in registration order.
    pub entries: Vec<HookReport>,
}

/// The classes of ending, each with its own exit code (see [`ExitCodes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitStatus {
    /// Everything completed.
    Clean,
    /// A service failed to start; the others were shut down.
    StartupFailure,
    /// A hook or task failed or panicked, or a critical task or a panic triggered the shutdown.
    ComponentFailure,
    /// A hook, task or phase overran its deadline and was abandoned.
    DeadlineOverrun,
    /// A Telemetry-phase hook did not deliver (failed, panicked or overran).
    TelemetryNotDelivered,
    /// A second signal cut the shutdown short.
    Forced,
    /// A third signal ended the process at once.
    Immediate,
}

/// The mapping of [`ExitStatus`] to process exit codes.
///
/// # Default values
///
/// | status | code | |
/// |---|---|---|
/// | [`Clean`](ExitStatus::Clean) | 0 | [`EXIT_CLEAN`](crate::EXIT_CLEAN) |
/// | [`StartupFailure`](ExitStatus::StartupFailure) | 3 | [`EXIT_STARTUP_FAILURE`](crate::EXIT_STARTUP_FAILURE) |
/// | [`ComponentFailure`](ExitStatus::ComponentFailure) | 4 | [`EXIT_COMPONENT_FAILURE`](crate::EXIT_COMPONENT_FAILURE) |
/// | [`DeadlineOverrun`](ExitStatus::DeadlineOverrun) | 5 | [`EXIT_DEADLINE_OVERRUN`](crate::EXIT_DEADLINE_OVERRUN) |
/// | [`TelemetryNotDelivered`](ExitStatus::TelemetryNotDelivered) | 6 | [`EXIT_TELEMETRY_NOT_DELIVERED`](crate::EXIT_TELEMETRY_NOT_DELIVERED) |
/// | [`Forced`](ExitStatus::Forced) | 7 | [`EXIT_FORCED`](crate::EXIT_FORCED) |
/// | [`Immediate`](ExitStatus::Immediate) | 8 | [`EXIT_IMMEDIATE`](crate::EXIT_IMMEDIATE) |
///
/// When several apply, the first in this order wins: Immediate, Forced, StartupFailure,
/// ComponentFailure, DeadlineOverrun, TelemetryNotDelivered, Clean.
///
/// # Examples
///
/// ```
/// use finale::{ExitCodes, ExitStatus};
/// // Treat an overrun like a failure, the way a supervisor that only knows "0 or 1" wants it.
/// let codes = ExitCodes::default().with(ExitStatus::DeadlineOverrun, 1);
/// assert_eq!(codes.code(ExitStatus::DeadlineOverrun), 1);
/// assert_eq!(codes.code(ExitStatus::Clean), 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCodes {
    codes: [i32; 7],
}

/// Exit code of a clean shutdown.
pub const EXIT_CLEAN: i32 = 0;
/// Exit code when a service failed to start.
pub const EXIT_STARTUP_FAILURE: i32 = 3;
/// Exit code when a hook or task failed or panicked.
pub const EXIT_COMPONENT_FAILURE: i32 = 4;
/// Exit code when something overran its deadline.
pub const EXIT_DEADLINE_OVERRUN: i32 = 5;
/// Exit code when telemetry was not delivered.
pub const EXIT_TELEMETRY_NOT_DELIVERED: i32 = 6;
/// Exit code when a second signal forced the shutdown short.
pub const EXIT_FORCED: i32 = 7;
/// Exit code when a third signal ended the process at once.
pub const EXIT_IMMEDIATE: i32 = 8;

impl ExitStatus {
    const fn slot(self) -> usize {
        match self {
            ExitStatus::Clean => 0,
            ExitStatus::StartupFailure => 1,
            ExitStatus::ComponentFailure => 2,
            ExitStatus::DeadlineOverrun => 3,
            ExitStatus::TelemetryNotDelivered => 4,
            ExitStatus::Forced => 5,
            ExitStatus::Immediate => 6,
        }
    }

    /// The status's lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExitStatus::Clean => "clean",
            ExitStatus::StartupFailure => "startup failure",
            ExitStatus::ComponentFailure => "component failure",
            ExitStatus::DeadlineOverrun => "deadline overrun",
            ExitStatus::TelemetryNotDelivered => "telemetry not delivered",
            ExitStatus::Forced => "forced by second signal",
            ExitStatus::Immediate => "immediate exit on third signal",
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for ExitCodes {
    fn default() -> Self {
        Self {
            codes: [
                EXIT_CLEAN,
                EXIT_STARTUP_FAILURE,
                EXIT_COMPONENT_FAILURE,
                EXIT_DEADLINE_OVERRUN,
                EXIT_TELEMETRY_NOT_DELIVERED,
                EXIT_FORCED,
                EXIT_IMMEDIATE,
            ],
        }
    }
}

impl ExitCodes {
    /// Maps `status` to `code` instead of its default.
    #[must_use]
    pub const fn with(mut self, status: ExitStatus, code: i32) -> Self {
        self.codes[status.slot()] = code;
        self
    }

    /// The code for `status`.
    pub const fn code(&self, status: ExitStatus) -> i32 {
        self.codes[status.slot()]
    }
}

/// What happened during one run: why it stopped, what every phase, hook and task did, and how
/// the process should exit.
///
/// Its [`Display`](fmt::Display) is a readable timeline:
///
/// ```text
/// finale: shutdown after signal SIGTERM: clean, exit code 0, 12.4ms
///   announce   completed         0.1ms
///   drain      completed         3.0ms  (in flight at start: 2)
///     in-flight requests     completed          2.9ms
///   workers    completed         8.1ms
///     task "ticker"          completed          0.2ms
///     hook "close-db"        completed          8.0ms
///   telemetry  completed         1.1ms
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Why the shutdown started.
    pub reason: Reason,
    /// Every phase, in order.
    pub phases: Vec<PhaseReport>,
    /// In-flight work ([`InFlight`](crate::InFlight)) when the Drain phase started.
    pub in_flight_at_drain_start: usize,
    /// Requests answered `503` because they arrived while draining.
    pub requests_rejected: u64,
    /// Requests whose handler panicked during the run; each was answered `500`, the server kept
    /// serving.
    pub requests_panicked: u64,
    /// What was cut short at a deadline: connections and streams still open when their phase
    /// ended (see [`Handle::record_cut`](crate::Handle::record_cut)).
    pub cut: Vec<String>,
    /// Whether a second signal cut the shutdown short.
    pub escalated: bool,
    /// From the trigger to the end of the Telemetry phase.
    pub total: Duration,
    /// The ending's class.
    pub status: ExitStatus,
    /// The process exit code for [`status`](ShutdownReport::status), after the user's mapping.
    pub exit_code: i32,
}

impl ShutdownReport {
    /// The report of one phase.
    pub fn phase(&self, phase: Phase) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.phase == phase)
    }

    /// The report of the hook or task named `name`, in any phase.
    pub fn entry(&self, name: &str) -> Option<&HookReport> {
        self.phases
            .iter()
            .flat_map(|p| &p.entries)
            .find(|e| e.name == name)
    }

    /// Whether every phase, hook and task completed.
    pub fn is_clean(&self) -> bool {
        self.status == ExitStatus::Clean
    }

    /// Ends the process with [`exit_code`](ShutdownReport::exit_code).
    ///
    /// Call this once the report is in hand, that is after the Telemetry phase delivered
    /// everything. See [`Finale::run_and_exit`](crate::Finale::run_and_exit) for why finale ends
    /// the process explicitly rather than returning from `main`.
    pub fn exit(&self) -> ! {
        std::process::exit(self.exit_code)
    }

    pub(crate) fn classify(
        reason: &Reason,
        phases: &[PhaseReport],
        cut: &[String],
        escalated: bool,
    ) -> ExitStatus {
        if escalated {
            return ExitStatus::Forced;
        }
        if matches!(reason, Reason::StartupFailed { .. }) {
            return ExitStatus::StartupFailure;
        }
        let non_telemetry = || {
            phases
                .iter()
                .filter(|p| p.phase != Phase::Telemetry)
                .flat_map(|p| &p.entries)
        };
        if matches!(reason, Reason::TaskFailed { .. } | Reason::Panic { .. })
            || non_telemetry()
                .any(|e| matches!(e.outcome, Outcome::Failed(_) | Outcome::Panicked(_)))
        {
            return ExitStatus::ComponentFailure;
        }
        if !cut.is_empty()
            || non_telemetry().any(|e| matches!(e.outcome, Outcome::TimedOut | Outcome::Abandoned))
            || phases
                .iter()
                .any(|p| p.phase != Phase::Telemetry && p.outcome == PhaseOutcome::DeadlineReached)
        {
            return ExitStatus::DeadlineOverrun;
        }
        if phases
            .iter()
            .filter(|p| p.phase == Phase::Telemetry)
            .flat_map(|p| &p.entries)
            .any(|e| !e.outcome.is_completed())
        {
            return ExitStatus::TelemetryNotDelivered;
        }
        ExitStatus::Clean
    }
}

struct Ms(Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1000.0;
        if ms >= 10_000.0 {
            write!(f, "{:.2}s", ms / 1000.0)
        } else {
            write!(f, "{ms:.1}ms")
        }
    }
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "finale: shutdown after {}: {}, exit code {}, {}",
            self.reason,
            self.status,
            self.exit_code,
            Ms(self.total)
        )?;
        if self.requests_rejected > 0 {
            write!(
                f,
                ", {} requests rejected while draining",
                self.requests_rejected
            )?;
        }
        if self.requests_panicked > 0 {
            write!(
                f,
                "\n  requests whose handler panicked (answered 500): {}",
                self.requests_panicked
            )?;
        }
        for c in &self.cut {
            write!(f, "\n  cut at deadline: {c}")?;
        }
        for p in &self.phases {
            write!(
                f,
                "\n  {:<10} {:<16} {:>9}",
                p.phase.as_str(),
                p.outcome.as_str(),
                Ms(p.duration).to_string()
            )?;
            if p.phase == Phase::Drain && p.outcome != PhaseOutcome::Skipped {
                write!(
                    f,
                    "  (in flight at start: {})",
                    self.in_flight_at_drain_start
                )?;
            }
            for e in &p.entries {
                let label = match e.kind {
                    EntryKind::Hook => format!("hook {:?}", e.name),
                    EntryKind::Task => format!("task {:?}", e.name),
                    EntryKind::InFlight | EntryKind::DrainDelay => e.name.to_string(),
                };
                write!(
                    f,
                    "\n    {:<28} {:<16} {:>9}",
                    label,
                    e.outcome.as_str(),
                    Ms(e.duration).to_string()
                )?;
                match &e.outcome {
                    Outcome::Failed(err) => write!(f, "  {err}")?,
                    Outcome::Panicked(msg) => write!(f, "  {msg}")?,
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
