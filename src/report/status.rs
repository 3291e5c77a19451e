//! The classes of ending and the exit codes they map to.

use std::fmt;

/// The classes of ending, each with its own exit code (see [`ExitCodes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShutdownStatus {
    /// Everything completed.
    Clean,
    /// A service failed to start; the others were shut down.
    StartupFailure,
    /// A hook or task failed or panicked, or a critical task or a panic triggered the shutdown.
    ComponentFailure,
    /// A hook, task or phase overran its deadline and was abandoned.
    DeadlineOverrun,
    /// A Telemetry-phase hook did not deliver (failed, panicked or overran), or telemetry the
    /// [`DeliveryPolicy`](crate::DeliveryPolicy) requires was lost (failed or dropped).
    TelemetryNotDelivered,
    /// A second signal cut the shutdown short.
    Forced,
    /// A third signal ended the process at once.
    Immediate,
}

/// The mapping of [`ShutdownStatus`] to process exit codes.
///
/// # Default values
///
/// | status | code |
/// |---|---|
/// | [`Clean`](ShutdownStatus::Clean) | 0 |
/// | [`StartupFailure`](ShutdownStatus::StartupFailure) | 3 |
/// | [`ComponentFailure`](ShutdownStatus::ComponentFailure) | 4 |
/// | [`DeadlineOverrun`](ShutdownStatus::DeadlineOverrun) | 5 |
/// | [`TelemetryNotDelivered`](ShutdownStatus::TelemetryNotDelivered) | 6 |
/// | [`Forced`](ShutdownStatus::Forced) | 7 |
/// | [`Immediate`](ShutdownStatus::Immediate) | 8 |
///
/// When several apply, the first in this order wins: Immediate, Forced, StartupFailure,
/// ComponentFailure, DeadlineOverrun, TelemetryNotDelivered, Clean.
///
/// # Examples
///
/// ```
/// use finale::{ExitCodes, ShutdownStatus};
/// // Treat an overrun like a failure, the way a supervisor that only knows "0 or 1" wants it.
/// let codes = ExitCodes::default().with(ShutdownStatus::DeadlineOverrun, 1);
/// assert_eq!(codes.code(ShutdownStatus::DeadlineOverrun), 1);
/// assert_eq!(codes.code(ShutdownStatus::Clean), 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCodes {
    codes: [i32; 7],
}

impl ShutdownStatus {
    const fn slot(self) -> usize {
        match self {
            ShutdownStatus::Clean => 0,
            ShutdownStatus::StartupFailure => 1,
            ShutdownStatus::ComponentFailure => 2,
            ShutdownStatus::DeadlineOverrun => 3,
            ShutdownStatus::TelemetryNotDelivered => 4,
            ShutdownStatus::Forced => 5,
            ShutdownStatus::Immediate => 6,
        }
    }

    /// The exit code of this status under the default mapping ([`ExitCodes::DEFAULT`]).
    pub const fn default_code(self) -> i32 {
        ExitCodes::DEFAULT.code(self)
    }

    /// The status's lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ShutdownStatus::Clean => "clean",
            ShutdownStatus::StartupFailure => "startup failure",
            ShutdownStatus::ComponentFailure => "component failure",
            ShutdownStatus::DeadlineOverrun => "deadline overrun",
            ShutdownStatus::TelemetryNotDelivered => "telemetry not delivered",
            ShutdownStatus::Forced => "forced by second signal",
            ShutdownStatus::Immediate => "immediate exit on third signal",
        }
    }
}

impl ShutdownStatus {
    /// The status's snake-case name, as the termination message and the JSON report write it.
    pub(crate) const fn key(self) -> &'static str {
        match self {
            ShutdownStatus::Clean => "clean",
            ShutdownStatus::StartupFailure => "startup_failure",
            ShutdownStatus::ComponentFailure => "component_failure",
            ShutdownStatus::DeadlineOverrun => "deadline_overrun",
            ShutdownStatus::TelemetryNotDelivered => "telemetry_not_delivered",
            ShutdownStatus::Forced => "forced",
            ShutdownStatus::Immediate => "immediate",
        }
    }
}

impl fmt::Display for ShutdownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for ExitCodes {
    fn default() -> Self {
        Self {
            codes: Self::DEFAULT.codes,
        }
    }
}

impl ExitCodes {
    /// The default mapping (see the table above).
    pub const DEFAULT: ExitCodes = ExitCodes {
        codes: [0, 3, 4, 5, 6, 7, 8],
    };

    /// Maps `status` to `code` instead of its default.
    #[must_use]
    pub const fn with(mut self, status: ShutdownStatus, code: i32) -> Self {
        self.codes[status.slot()] = code;
        self
    }

    /// The code for `status`.
    pub const fn code(&self, status: ShutdownStatus) -> i32 {
        self.codes[status.slot()]
    }
}
