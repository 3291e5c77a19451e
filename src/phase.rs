//! The four phases of the shutdown sequence, in their fixed order.

use std::fmt;

/// One phase of the shutdown sequence.
///
/// Phases always run in this order, one after another; the hooks and tasks registered into one
/// phase run concurrently. The order is part of finale's contract and never changes:
///
/// | phase | what happens | bounded by |
/// |---|---|---|
/// | [`Announce`](Phase::Announce) | readiness turns off, the service keeps serving for the drain delay | drain delay + announce timeout |
/// | [`Drain`](Phase::Drain) | servers stop accepting and finish in-flight work | drain timeout |
/// | [`Workers`](Phase::Workers) | background tasks are told to stop and are awaited; cleanup hooks run | workers timeout |
/// | [`Telemetry`](Phase::Telemetry) | final metrics push, OTLP flush, log flush | the telemetry reserve (at least) |
///
/// The first three phases must end by `total budget - telemetry reserve`; whatever they leave
/// unfinished is abandoned, so the Telemetry phase always gets at least the reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Readiness off, then the drain delay, while the service keeps serving.
    Announce,
    /// Servers stop accepting and finish in-flight requests.
    Drain,
    /// Background tasks stop and are awaited; cleanup hooks run.
    Workers,
    /// The final metrics push and telemetry flush, in a reserved slot of the budget.
    Telemetry,
}

impl Phase {
    /// All phases, in the order they run.
    pub const ALL: [Phase; 4] = [
        Phase::Announce,
        Phase::Drain,
        Phase::Workers,
        Phase::Telemetry,
    ];

    /// The phase's lower-case name, as used in span fields and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Announce => "announce",
            Phase::Drain => "drain",
            Phase::Workers => "workers",
            Phase::Telemetry => "telemetry",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_ordered() {
        let mut sorted = Phase::ALL;
        sorted.sort();
        assert_eq!(sorted, Phase::ALL);
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
    }
}
