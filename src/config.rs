//! The budget: defaults, environment overrides, validation and the budget planner.

use std::fmt;
use std::time::Duration;

use crate::phase::Phase;
use crate::signal::Signal;

/// Default total budget for the whole sequence: 25 s, which fits Kubernetes' default 30 s
/// `terminationGracePeriodSeconds` with 5 s to spare for the kubelet and the container runtime.
pub const DEFAULT_TOTAL_BUDGET: Duration = Duration::from_secs(25);
/// Default part of the budget held back for the Telemetry phase: 5 s (one OTel exporter timeout).
pub const DEFAULT_TELEMETRY_RESERVE: Duration = Duration::from_secs(5);
/// Default drain delay when an orchestrator is detected (Kubernetes or ECS): 5 s, enough for the
/// endpoint removal to reach kube-proxy and ingress controllers.
pub const DEFAULT_DRAIN_DELAY_ORCHESTRATED: Duration = Duration::from_secs(5);
/// Default drain delay elsewhere (a terminal, a laptop, CI): none, so Ctrl-C feels instant.
pub const DEFAULT_DRAIN_DELAY_LOCAL: Duration = Duration::ZERO;
/// Default time the Announce phase's hooks get beyond the drain delay: 1 s.
pub const DEFAULT_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound of the Drain phase: 10 s.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of the Workers phase: 4 s.
pub const DEFAULT_WORKERS_TIMEOUT: Duration = Duration::from_secs(4);
/// Default telemetry budget after a second signal: 2 s.
pub const DEFAULT_ESCALATION_BUDGET: Duration = Duration::from_secs(2);
/// Default bound of graceful start (all services ready): 60 s.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default margin the budget planner keeps between the plan and the platform's grace period: 2 s.
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(2);
/// The longest duration any setting accepts: 1 hour. Anything longer is a mistake in units.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// A tunable setting of the budget, with the environment variable that overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// [`Builder::total_budget`](crate::Builder::total_budget), `FINALE_TOTAL_BUDGET`.
    TotalBudget,
    /// [`Builder::telemetry_reserve`](crate::Builder::telemetry_reserve), `FINALE_TELEMETRY_RESERVE`.
    TelemetryReserve,
    /// [`Builder::drain_delay`](crate::Builder::drain_delay), `FINALE_DRAIN_DELAY`.
    DrainDelay,
    /// The probe count of [`DrainDelay::UntilProbed`], `FINALE_DRAIN_PROBES`.
    DrainProbes,
    /// The quiet time of [`DrainDelay::UntilQuiet`], `FINALE_DRAIN_IDLE`.
    DrainIdle,
    /// [`Builder::announce_timeout`](crate::Builder::announce_timeout), `FINALE_ANNOUNCE_TIMEOUT`.
    AnnounceTimeout,
    /// [`Builder::drain_timeout`](crate::Builder::drain_timeout), `FINALE_DRAIN_TIMEOUT`.
    DrainTimeout,
    /// [`Builder::workers_timeout`](crate::Builder::workers_timeout), `FINALE_WORKERS_TIMEOUT`.
    WorkersTimeout,
    /// [`Builder::escalation_budget`](crate::Builder::escalation_budget), `FINALE_ESCALATION_BUDGET`.
    EscalationBudget,
    /// [`Builder::startup_timeout`](crate::Builder::startup_timeout), `FINALE_STARTUP_TIMEOUT`.
    StartupTimeout,
    /// [`Builder::grace_period`](crate::Builder::grace_period), `FINALE_GRACE_PERIOD`.
    GracePeriod,
    /// [`Builder::safety_margin`](crate::Builder::safety_margin), `FINALE_SAFETY_MARGIN`.
    SafetyMargin,
}

impl Setting {
    const ALL: [Setting; 12] = [
        Setting::TotalBudget,
        Setting::TelemetryReserve,
        Setting::DrainDelay,
        Setting::DrainProbes,
        Setting::DrainIdle,
        Setting::AnnounceTimeout,
        Setting::DrainTimeout,
        Setting::WorkersTimeout,
        Setting::EscalationBudget,
        Setting::StartupTimeout,
        Setting::GracePeriod,
        Setting::SafetyMargin,
    ];

    /// The environment variable that overrides this setting.
    pub const fn env_var(self) -> &'static str {
        match self {
            Setting::TotalBudget => "FINALE_TOTAL_BUDGET",
            Setting::TelemetryReserve => "FINALE_TELEMETRY_RESERVE",
            Setting::DrainDelay => "FINALE_DRAIN_DELAY",
            Setting::DrainProbes => "FINALE_DRAIN_PROBES",
            Setting::DrainIdle => "FINALE_DRAIN_IDLE",
            Setting::AnnounceTimeout => "FINALE_ANNOUNCE_TIMEOUT",
            Setting::DrainTimeout => "FINALE_DRAIN_TIMEOUT",
            Setting::WorkersTimeout => "FINALE_WORKERS_TIMEOUT",
            Setting::EscalationBudget => "FINALE_ESCALATION_BUDGET",
            Setting::StartupTimeout => "FINALE_STARTUP_TIMEOUT",
            Setting::GracePeriod => "FINALE_GRACE_PERIOD",
            Setting::SafetyMargin => "FINALE_SAFETY_MARGIN",
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Setting::TotalBudget => "total budget",
            Setting::TelemetryReserve => "telemetry reserve",
            Setting::DrainDelay => "drain delay",
            Setting::DrainProbes => "drain probe count",
            Setting::DrainIdle => "drain quiet time",
            Setting::AnnounceTimeout => "announce timeout",
            Setting::DrainTimeout => "drain timeout",
            Setting::WorkersTimeout => "workers timeout",
            Setting::EscalationBudget => "escalation budget",
            Setting::StartupTimeout => "startup timeout",
            Setting::GracePeriod => "grace period",
            Setting::SafetyMargin => "safety margin",
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.env_var())
    }
}

/// How the Announce phase's drain delay ends.
///
/// The delay exists so the load balancer can stop sending traffic before any listener closes:
/// Kubernetes removes the pod from its endpoints at the same moment it sends SIGTERM, and the
/// removal takes a few seconds to reach every proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainDelay {
    /// Wait exactly this long.
    Fixed(Duration),
    /// End the delay as soon as `/readyz` (or any health endpoint that calls
    /// [`Health::record_not_ready_answer`](crate::Health::record_not_ready_answer)) has answered
    /// "not ready" `answers` times, or after `max`, whichever comes first. Behind a
    /// health-checking load balancer this leaves as soon as it is safe.
    UntilProbed {
        /// How many "not ready" answers end the delay (for example the LB's `fall` count).
        answers: u64,
        /// The delay never lasts longer than this.
        max: Duration,
    },
    /// End the delay once the data path has gone quiet: no new connection and no new request
    /// (health probes aside) for `idle` since readiness turned off, after at least `probes`
    /// "not ready" answers (0: no probe condition), or after `max`, whichever comes first.
    ///
    /// This is what knows when the load balancer has really let go: on Kubernetes the kubelet's
    /// probes say nothing about kube-proxy, the ingress or a cloud load balancer, but traffic
    /// that stops arriving does. Clients that bypass the load balancer keep it going until
    /// `max`. finale's servers (and [`DrainLayer`](crate::tower::DrainLayer)) report the
    /// activity; other servers can call [`Health::record_activity`](crate::Health::record_activity).
    UntilQuiet {
        /// How many "not ready" answers must have been served first (0: none).
        probes: u64,
        /// How long without a new connection or request ends the delay.
        idle: Duration,
        /// The delay never lasts longer than this.
        max: Duration,
    },
}

impl DrainDelay {
    /// The longest the delay can last.
    pub const fn max(&self) -> Duration {
        match *self {
            DrainDelay::Fixed(d) => d,
            DrainDelay::UntilProbed { max, .. } => max,
            DrainDelay::UntilQuiet { max, .. } => max,
        }
    }
}

/// What to do when the budget planner finds that the plan does not fit the platform's grace
/// period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Misfit {
    /// [`Builder::build`](crate::Builder::build) fails with [`ConfigError::DoesNotFit`] (the default).
    #[default]
    Error,
    /// Log a warning through `tracing` and go on.
    Warn,
}

/// Where the process runs, as far as the defaults are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Environment {
    /// `KUBERNETES_SERVICE_HOST` is set.
    Kubernetes,
    /// `ECS_CONTAINER_METADATA_URI_V4` or `ECS_CONTAINER_METADATA_URI` is set.
    Ecs,
    /// Neither: a terminal, a laptop, CI, `docker run`.
    Local,
}

impl Environment {
    /// Detects the environment from the variables the orchestrators set in every container.
    pub fn detect() -> Self {
        let set = |v: &str| std::env::var_os(v).is_some_and(|s| !s.is_empty());
        if set("KUBERNETES_SERVICE_HOST") {
            Environment::Kubernetes
        } else if set("ECS_CONTAINER_METADATA_URI_V4") || set("ECS_CONTAINER_METADATA_URI") {
            Environment::Ecs
        } else {
            Environment::Local
        }
    }

    /// The default drain delay for this environment.
    pub const fn default_drain_delay(self) -> Duration {
        match self {
            Environment::Kubernetes | Environment::Ecs => DEFAULT_DRAIN_DELAY_ORCHESTRATED,
            Environment::Local => DEFAULT_DRAIN_DELAY_LOCAL,
        }
    }
}

/// The resolved budget a [`Finale`](crate::Finale) runs with.
///
/// # Timeline
///
/// ```text
/// t0 (trigger)                                         t0 + total - reserve     t0 + total
/// |-- Announce: delay (+ hooks) --|-- Drain --|-- Workers --|                   |
///                                  each phase also ends at its own timeout      |
///                                                           |-- Telemetry (>= reserve) --|
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Budget {
    /// Bounds the whole sequence.
    pub total: Duration,
    /// Held back for the Telemetry phase.
    pub telemetry_reserve: Duration,
    /// How the Announce phase's delay ends.
    pub drain_delay: DrainDelay,
    /// Extra time the Announce phase's hooks get beyond the delay.
    pub announce_timeout: Duration,
    /// Bounds the Drain phase.
    pub drain_timeout: Duration,
    /// Bounds the Workers phase.
    pub workers_timeout: Duration,
    /// The Telemetry phase's budget after a second signal.
    pub escalation_budget: Duration,
    /// Bounds graceful start.
    pub startup_timeout: Duration,
    /// The platform's grace period, if known; enables the budget planner.
    pub grace_period: Option<Duration>,
    /// The planner's margin between the plan and the grace period.
    pub safety_margin: Duration,
}

impl Budget {
    /// The longest a phase can run by its own configuration: the limit a hook or task timeout in
    /// that phase must not exceed. For Telemetry it is the reserve, the part it is guaranteed.
    pub fn phase_limit(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Announce => self.drain_delay.max() + self.announce_timeout,
            Phase::Drain => self.drain_timeout,
            Phase::Workers => self.workers_timeout,
            Phase::Telemetry => self.telemetry_reserve,
        }
    }

    /// What the plan needs from the platform: every phase at its limit plus the safety margin,
    /// and never less than the total budget plus the margin.
    pub fn needed(&self) -> Duration {
        let phases: Duration = Phase::ALL.iter().map(|p| self.phase_limit(*p)).sum();
        phases.max(self.total) + self.safety_margin
    }
}

/// The budget planner found that the plan does not fit the platform's grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanMisfit {
    /// The platform's grace period.
    pub grace_period: Duration,
    /// What the plan needs (see [`Budget::needed`]).
    pub needed: Duration,
    /// The plan, phase by phase.
    pub budget: Budget,
}

impl fmt::Display for PlanMisfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.budget;
        write!(
            f,
            "the shutdown plan needs {:?} but the platform's grace period is {:?}: \
             drain delay {:?} + announce {:?} + drain {:?} + workers {:?} + telemetry reserve {:?} \
             (total budget {:?}) + safety margin {:?}; shorten a phase or the total budget, \
             or raise the grace period (terminationGracePeriodSeconds, ECS stopTimeout, docker stop -t)",
            self.needed,
            self.grace_period,
            b.drain_delay.max(),
            b.announce_timeout,
            b.drain_timeout,
            b.workers_timeout,
            b.telemetry_reserve,
            b.total,
            b.safety_margin
        )
    }
}

/// A configuration mistake, found when the configuration is built or a hook is registered,
/// never at shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration is zero where it must not be, or longer than [`MAX_DURATION`].
    InvalidDuration {
        /// Which setting.
        setting: Setting,
        /// The value given.
        value: Duration,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The telemetry reserve is not smaller than the total budget.
    ReserveNotBelowTotal {
        /// The reserve.
        reserve: Duration,
        /// The total budget.
        total: Duration,
    },
    /// The escalation budget is longer than the total budget.
    EscalationBeyondTotal {
        /// The escalation budget.
        escalation: Duration,
        /// The total budget.
        total: Duration,
    },
    /// [`DrainDelay::UntilProbed`] with zero answers.
    ZeroProbeCount,
    /// An environment variable does not parse.
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The budget planner found that the plan does not fit the platform's grace period.
    DoesNotFit(Box<PlanMisfit>),
    /// Two hooks or tasks have the same name.
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A hook or task has an empty name.
    EmptyName,
    /// A server's name cannot name its listening socket, which is passed under it
    /// (`LISTEN_FDNAMES`: systemd socket activation, an upgrade's hand-off): it contains `:`
    /// (their separator) or a NUL byte, or it is `finale.ready` (an upgrade's own socket).
    ServerName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A hook's or task's own timeout is longer than its phase can last.
    TimeoutBeyondPhase {
        /// The hook or task.
        name: String,
        /// Its phase.
        phase: Phase,
        /// Its timeout.
        timeout: Duration,
        /// The phase's limit ([`Budget::phase_limit`]).
        limit: Duration,
    },
    /// [`Builder::signals`](crate::Builder::signals) was given an empty slice; use
    /// [`Builder::no_signals`](crate::Builder::no_signals) to listen for none.
    NoSignalsGiven,
    /// A signal handler could not be installed.
    SignalHandler {
        /// The signal.
        signal: Signal,
        /// What the OS said.
        kind: std::io::ErrorKind,
    },
    /// The supervisor thread (or its small runtime) could not be started.
    SupervisorThread {
        /// What the OS said.
        kind: std::io::ErrorKind,
    },
    /// [`Builder::install`](crate::Builder::install) was asked for while another instance is
    /// installed in this process.
    AlreadyInstalled,
    /// A task was spawned outside a tokio runtime.
    NoRuntime,
    /// The upgrade signal ([`Upgrade::signal`](crate::upgrade::Upgrade::signal)) is also a
    /// shutdown signal: it cannot mean both.
    UpgradeSignal {
        /// The signal.
        signal: crate::Signal,
    },
    /// The upgrade's ready timeout is zero or longer than [`MAX_DURATION`].
    UpgradeReadyTimeout {
        /// The value given.
        value: Duration,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidDuration {
                setting,
                value,
                problem,
            } => write!(f, "invalid {setting}: {value:?} {problem}"),
            ConfigError::ReserveNotBelowTotal { reserve, total } => write!(
                f,
                "the telemetry reserve ({reserve:?}) must be smaller than the total budget ({total:?}), \
                 or nothing is left for the drain"
            ),
            ConfigError::EscalationBeyondTotal { escalation, total } => write!(
                f,
                "the escalation budget ({escalation:?}) must not exceed the total budget ({total:?})"
            ),
            ConfigError::ZeroProbeCount => f.write_str(
                "a drain delay that ends after N \"not ready\" answers needs N >= 1 (FINALE_DRAIN_PROBES)",
            ),
            ConfigError::InvalidEnv {
                var,
                value,
                expected,
            } => write!(f, "environment variable {var}={value:?} is invalid: expected {expected}"),
            ConfigError::DoesNotFit(misfit) => misfit.fmt(f),
            ConfigError::DuplicateName { name } => write!(
                f,
                "the name {name:?} is used by two hooks or tasks; names identify them in the report"
            ),
            ConfigError::EmptyName => f.write_str("a hook or task needs a non-empty name"),
            ConfigError::ServerName { name, reason } => write!(
                f,
                "the server name {name:?} cannot name its passed socket: {reason}"
            ),
            ConfigError::TimeoutBeyondPhase {
                name,
                phase,
                timeout,
                limit,
            } => write!(
                f,
                "the timeout of {name:?} ({timeout:?}) is longer than the {phase} phase can last \
                 ({limit:?}); shorten it or raise the phase's budget"
            ),
            ConfigError::NoSignalsGiven => f.write_str(
                "signals(&[]) listens for no signal: say so with no_signals(), or name at least one",
            ),
            ConfigError::SignalHandler { signal, kind } => {
                write!(f, "cannot install the {signal} handler: {kind}")
            }
            ConfigError::SupervisorThread { kind } => {
                write!(f, "cannot start finale's supervisor thread: {kind}")
            }
            ConfigError::NoRuntime => f.write_str(
                "tasks are spawned on the current tokio runtime: call spawn from inside one",
            ),
            ConfigError::AlreadyInstalled => f.write_str(
                "another finale instance is already installed in this process (Builder::install)",
            ),
            ConfigError::UpgradeSignal { signal } => write!(
                f,
                "{signal} cannot both start an upgrade and shut the service down: pick another \
                 upgrade signal (Upgrade::signal) or leave it out of Builder::signals"
            ),
            ConfigError::UpgradeReadyTimeout { value } => write!(
                f,
                "invalid upgrade ready timeout: {value:?} (it must be above zero and at most {MAX_DURATION:?})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses a duration such as `25s`, `500ms`, `1.5s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        _ => return None,
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return None;
    }
    Some(Duration::from_secs_f64(seconds))
}

/// Reads the overrides from the environment, through `get` so tests need no process-wide state.
pub(crate) fn env_overrides(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(Setting, EnvValue)>, ConfigError> {
    let mut out = Vec::new();
    for setting in Setting::ALL {
        let var = setting.env_var();
        let Some(value) = get(var).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        let parsed = if setting == Setting::DrainProbes {
            value.trim().parse::<u64>().ok().map(EnvValue::Count)
        } else {
            parse_duration(&value).map(EnvValue::Duration)
        };
        match parsed {
            Some(v) => out.push((setting, v)),
            None => {
                return Err(ConfigError::InvalidEnv {
                    var,
                    value,
                    expected: if setting == Setting::DrainProbes {
                        "a whole number such as 3"
                    } else {
                        "a duration such as 25s, 500ms, 1.5s or 2m"
                    },
                });
            }
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum EnvValue {
    Duration(Duration),
    Count(u64),
}

/// The budget settings a builder collected, before defaults and environment are applied.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BudgetSettings {
    pub(crate) total: Option<Duration>,
    pub(crate) telemetry_reserve: Option<Duration>,
    pub(crate) drain_delay: Option<DrainDelay>,
    pub(crate) announce_timeout: Option<Duration>,
    pub(crate) drain_timeout: Option<Duration>,
    pub(crate) workers_timeout: Option<Duration>,
    pub(crate) escalation_budget: Option<Duration>,
    pub(crate) startup_timeout: Option<Duration>,
    pub(crate) grace_period: Option<Duration>,
    pub(crate) safety_margin: Option<Duration>,
}

impl BudgetSettings {
    /// Applies environment overrides (which win over the builder, so operators can tune a
    /// deployed service without a rebuild), then defaults, then validates.
    pub(crate) fn resolve(
        mut self,
        env: &[(Setting, EnvValue)],
        environment: Environment,
    ) -> Result<Budget, ConfigError> {
        let mut probes = None;
        let mut idle = None;
        for &(setting, value) in env {
            match (setting, value) {
                (Setting::DrainProbes, EnvValue::Count(n)) => probes = Some(n),
                (Setting::DrainIdle, EnvValue::Duration(d)) => idle = Some(d),
                (s, EnvValue::Duration(d)) => {
                    let slot = match s {
                        Setting::TotalBudget => &mut self.total,
                        Setting::TelemetryReserve => &mut self.telemetry_reserve,
                        Setting::DrainDelay => {
                            self.drain_delay = Some(match self.drain_delay {
                                Some(DrainDelay::UntilProbed { answers, .. }) => {
                                    DrainDelay::UntilProbed { answers, max: d }
                                }
                                Some(DrainDelay::UntilQuiet { probes, idle, .. }) => {
                                    DrainDelay::UntilQuiet {
                                        probes,
                                        idle,
                                        max: d,
                                    }
                                }
                                _ => DrainDelay::Fixed(d),
                            });
                            continue;
                        }
                        Setting::AnnounceTimeout => &mut self.announce_timeout,
                        Setting::DrainTimeout => &mut self.drain_timeout,
                        Setting::WorkersTimeout => &mut self.workers_timeout,
                        Setting::EscalationBudget => &mut self.escalation_budget,
                        Setting::StartupTimeout => &mut self.startup_timeout,
                        Setting::GracePeriod => &mut self.grace_period,
                        Setting::SafetyMargin => &mut self.safety_margin,
                        Setting::DrainProbes | Setting::DrainIdle => continue,
                    };
                    *slot = Some(d);
                }
                (_, EnvValue::Count(_)) => {}
            }
        }
        let mut drain_delay = self
            .drain_delay
            .unwrap_or(DrainDelay::Fixed(environment.default_drain_delay()));
        if let Some(idle) = idle {
            if drain_delay.max().is_zero() {
                tracing::warn!(
                    target: "finale",
                    ?idle,
                    "FINALE_DRAIN_IDLE has no effect: the drain delay it may end early is 0 \
                     (set FINALE_DRAIN_DELAY to the longest the delay may last)"
                );
            } else {
                drain_delay = DrainDelay::UntilQuiet {
                    probes: probes.take().unwrap_or(0),
                    idle,
                    max: drain_delay.max(),
                };
            }
        }
        if let Some(answers) = probes {
            if drain_delay.max().is_zero() {
                // Outside an orchestrator the delay is 0 unless set: a probe count alone caps at
                // nothing and would silently change nothing.
                tracing::warn!(
                    target: "finale",
                    answers,
                    "FINALE_DRAIN_PROBES has no effect: the drain delay it may end early is 0 \
                     (set FINALE_DRAIN_DELAY to the longest the delay may last)"
                );
            }
            drain_delay = DrainDelay::UntilProbed {
                answers,
                max: drain_delay.max(),
            };
        }
        let budget = Budget {
            total: self.total.unwrap_or(DEFAULT_TOTAL_BUDGET),
            telemetry_reserve: self.telemetry_reserve.unwrap_or(DEFAULT_TELEMETRY_RESERVE),
            drain_delay,
            announce_timeout: self.announce_timeout.unwrap_or(DEFAULT_ANNOUNCE_TIMEOUT),
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            workers_timeout: self.workers_timeout.unwrap_or(DEFAULT_WORKERS_TIMEOUT),
            escalation_budget: self.escalation_budget.unwrap_or(DEFAULT_ESCALATION_BUDGET),
            startup_timeout: self.startup_timeout.unwrap_or(DEFAULT_STARTUP_TIMEOUT),
            grace_period: self.grace_period,
            safety_margin: self.safety_margin.unwrap_or(DEFAULT_SAFETY_MARGIN),
        };
        validate(&budget)?;
        Ok(budget)
    }
}

fn validate(b: &Budget) -> Result<(), ConfigError> {
    let check = |setting, value: Duration, may_be_zero: bool| {
        if value.is_zero() && !may_be_zero {
            Err(ConfigError::InvalidDuration {
                setting,
                value,
                problem: "must be longer than zero",
            })
        } else if value > MAX_DURATION {
            Err(ConfigError::InvalidDuration {
                setting,
                value,
                problem: "is longer than the 1 h maximum (a mistake in units?)",
            })
        } else {
            Ok(())
        }
    };
    check(Setting::TotalBudget, b.total, false)?;
    check(Setting::TelemetryReserve, b.telemetry_reserve, false)?;
    check(Setting::DrainDelay, b.drain_delay.max(), true)?;
    check(Setting::AnnounceTimeout, b.announce_timeout, false)?;
    check(Setting::DrainTimeout, b.drain_timeout, false)?;
    check(Setting::WorkersTimeout, b.workers_timeout, false)?;
    check(Setting::EscalationBudget, b.escalation_budget, false)?;
    check(Setting::StartupTimeout, b.startup_timeout, false)?;
    check(Setting::SafetyMargin, b.safety_margin, true)?;
    if let Some(grace) = b.grace_period {
        check(Setting::GracePeriod, grace, false)?;
    }
    if let DrainDelay::UntilProbed { answers: 0, .. } = b.drain_delay {
        return Err(ConfigError::ZeroProbeCount);
    }
    if let DrainDelay::UntilQuiet { idle, max, .. } = b.drain_delay
        && (idle.is_zero() || idle >= max)
    {
        return Err(ConfigError::InvalidDuration {
            setting: Setting::DrainDelay,
            value: idle,
            problem: "(the quiet time) must be above 0 and shorter than the delay's max",
        });
    }
    if b.telemetry_reserve >= b.total {
        return Err(ConfigError::ReserveNotBelowTotal {
            reserve: b.telemetry_reserve,
            total: b.total,
        });
    }
    if b.escalation_budget > b.total {
        return Err(ConfigError::EscalationBeyondTotal {
            escalation: b.escalation_budget,
            total: b.total,
        });
    }
    Ok(())
}

/// The budget planner: a server's drain answers do not fit the Drain phase. An HTTP/1 request
/// that arrives within the late margin (plus the server's cut margin) of the Drain deadline is
/// answered `503`; a drain timeout not longer than that makes every HTTP/1 request of the
/// drain a `503`, from its first moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
pub(crate) struct LateMisfit {
    /// The longest the drain can last.
    pub(crate) drain: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) late_margin: Duration,
    pub(crate) cut_margin: Duration,
}

impl fmt::Display for LateMisfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the drain lasts at most {:?} (the drain timeout {:?}, and what the total budget \
             leaves it after the telemetry reserve and a fixed drain delay), not longer than the \
             late margin {:?} plus the cut margin {:?}: every HTTP/1 request that arrives during \
             the drain is answered 503 instead of served; lengthen the drain timeout \
             (FINALE_DRAIN_TIMEOUT) or the total budget, or shorten Rejection::late_margin",
            self.drain, self.drain_timeout, self.late_margin, self.cut_margin
        )
    }
}

/// The budget planner, for a server: do its late answers leave the drain time to serve? The
/// drain lasts at most its timeout, and at most what the total budget leaves it: the total
/// less the telemetry reserve and a fixed drain delay (a delay that ends when probed or quiet
/// may end at once, so only a fixed one is counted).
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
pub(crate) fn plan_late_answers(
    budget: &Budget,
    late_margin: Duration,
    cut_margin: Duration,
) -> Result<(), LateMisfit> {
    let delay = match budget.drain_delay {
        DrainDelay::Fixed(d) => d,
        DrainDelay::UntilProbed { .. } | DrainDelay::UntilQuiet { .. } => Duration::ZERO,
    };
    let left = budget
        .total
        .saturating_sub(budget.telemetry_reserve)
        .saturating_sub(delay);
    let drain = budget.drain_timeout.min(left);
    if drain <= late_margin + cut_margin {
        return Err(LateMisfit {
            drain,
            drain_timeout: budget.drain_timeout,
            late_margin,
            cut_margin,
        });
    }
    Ok(())
}

/// The budget planner: does the plan fit the platform's grace period?
pub(crate) fn plan(budget: &Budget) -> Result<(), Box<PlanMisfit>> {
    let Some(grace_period) = budget.grace_period else {
        return Ok(());
    };
    let needed = budget.needed();
    if needed > grace_period {
        return Err(Box::new(PlanMisfit {
            grace_period,
            needed,
            budget: *budget,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_drain_delay_from_the_environment() {
        let b = resolve(
            BudgetSettings::default(),
            &[
                ("FINALE_DRAIN_DELAY", "5s"),
                ("FINALE_DRAIN_IDLE", "300ms"),
                ("FINALE_DRAIN_PROBES", "2"),
            ],
        )
        .unwrap();
        assert_eq!(
            b.drain_delay,
            DrainDelay::UntilQuiet {
                probes: 2,
                idle: Duration::from_millis(300),
                max: Duration::from_secs(5)
            }
        );
        // A quiet time not shorter than the delay's max could never end it early.
        let err = resolve(
            BudgetSettings::default(),
            &[("FINALE_DRAIN_DELAY", "1s"), ("FINALE_DRAIN_IDLE", "2s")],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::InvalidDuration {
                    setting: Setting::DrainDelay,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_probe_count_that_cannot_take_effect_says_so() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // Locally the delay is 0: a probe count alone would do nothing.
            let b = resolve(BudgetSettings::default(), &[("FINALE_DRAIN_PROBES", "2")]).unwrap();
            assert_eq!(b.drain_delay.max(), Duration::ZERO);
            // With a delay to end early, it takes effect and says nothing.
            resolve(
                BudgetSettings::default(),
                &[("FINALE_DRAIN_PROBES", "2"), ("FINALE_DRAIN_DELAY", "5s")],
            )
            .unwrap();
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches("FINALE_DRAIN_PROBES has no effect").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_drain_timeout_within_the_late_margin_is_a_misfit() {
        let mut b = resolve(BudgetSettings::default(), &[]).unwrap();
        let (late, cut) = (Duration::from_secs(1), Duration::from_millis(100));
        b.drain_timeout = Duration::from_secs(1);
        let misfit = plan_late_answers(&b, late, cut).unwrap_err();
        assert!(misfit.to_string().contains("answered 503"), "{misfit}");
        b.drain_timeout = Duration::from_millis(1100);
        assert!(plan_late_answers(&b, late, cut).is_err());
        b.drain_timeout = Duration::from_millis(1500);
        assert!(plan_late_answers(&b, late, cut).is_ok());
    }

    #[test]
    fn a_drain_shortened_by_the_total_budget_within_the_late_margin_is_a_misfit() {
        let mut b = resolve(BudgetSettings::default(), &[]).unwrap();
        let (late, cut) = (Duration::from_secs(1), Duration::from_millis(100));
        b.drain_delay = DrainDelay::Fixed(Duration::ZERO);
        b.drain_timeout = Duration::from_secs(10);
        b.total = Duration::from_secs(2);
        b.telemetry_reserve = Duration::from_millis(900);
        let misfit = plan_late_answers(&b, late, cut).unwrap_err();
        assert_eq!(misfit.drain, Duration::from_millis(1100));
        b.total = Duration::from_secs(3);
        assert!(plan_late_answers(&b, late, cut).is_ok());
        // A fixed drain delay comes out of the total too.
        b.drain_delay = DrainDelay::Fixed(Duration::from_secs(1));
        assert!(plan_late_answers(&b, late, cut).is_err());
        // One that may end at once does not.
        b.drain_delay = DrainDelay::UntilQuiet {
            probes: 0,
            idle: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert!(plan_late_answers(&b, late, cut).is_ok());
    }

    fn resolve(s: BudgetSettings, env: &[(&str, &str)]) -> Result<Budget, ConfigError> {
        let env = env_overrides(|k| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        })?;
        s.resolve(&env, Environment::Local)
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("25s"), Some(Duration::from_secs(25)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration(" 3 s "), Some(Duration::from_secs(3)));
        for bad in ["", "s", "-1s", "abc", "10 parsecs", "1e400", "1..2s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_fit_kubernetes() {
        let b = BudgetSettings {
            grace_period: Some(Duration::from_secs(30)),
            ..Default::default()
        }
        .resolve(&[], Environment::Kubernetes)
        .unwrap();
        assert_eq!(b.drain_delay, DrainDelay::Fixed(Duration::from_secs(5)));
        assert!(b.needed() <= Duration::from_secs(30), "{:?}", b.needed());
        plan(&b).unwrap();
    }

    #[test]
    fn local_default_has_no_delay() {
        let b = resolve(BudgetSettings::default(), &[]).unwrap();
        assert_eq!(b.drain_delay, DrainDelay::Fixed(Duration::ZERO));
    }

    #[test]
    fn env_overrides_builder() {
        let s = BudgetSettings {
            total: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        let b = resolve(
            s,
            &[("FINALE_TOTAL_BUDGET", "40s"), ("FINALE_DRAIN_PROBES", "3")],
        )
        .unwrap();
        assert_eq!(b.total, Duration::from_secs(40));
        assert_eq!(
            b.drain_delay,
            DrainDelay::UntilProbed {
                answers: 3,
                max: Duration::ZERO
            }
        );
    }

    #[test]
    fn bad_env_is_a_typed_error() {
        let err = resolve(
            BudgetSettings::default(),
            &[("FINALE_DRAIN_TIMEOUT", "ten")],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::InvalidEnv {
                var: "FINALE_DRAIN_TIMEOUT",
                ..
            }
        ));
        assert!(err.to_string().contains("FINALE_DRAIN_TIMEOUT"));
        let err = resolve(BudgetSettings::default(), &[("FINALE_DRAIN_PROBES", "x")]).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::InvalidEnv {
                var: "FINALE_DRAIN_PROBES",
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_budgets() {
        let s = |f: fn(&mut BudgetSettings)| {
            let mut s = BudgetSettings::default();
            f(&mut s);
            resolve(s, &[]).unwrap_err()
        };
        assert!(matches!(
            s(|s| s.total = Some(Duration::ZERO)),
            ConfigError::InvalidDuration {
                setting: Setting::TotalBudget,
                ..
            }
        ));
        assert!(matches!(
            s(|s| s.drain_timeout = Some(Duration::from_secs(7200))),
            ConfigError::InvalidDuration {
                setting: Setting::DrainTimeout,
                ..
            }
        ));
        assert!(matches!(
            s(|s| s.telemetry_reserve = Some(Duration::from_secs(25))),
            ConfigError::ReserveNotBelowTotal { .. }
        ));
        assert!(matches!(
            s(|s| s.escalation_budget = Some(Duration::from_secs(26))),
            ConfigError::EscalationBeyondTotal { .. }
        ));
        assert!(matches!(
            s(|s| s.drain_delay = Some(DrainDelay::UntilProbed {
                answers: 0,
                max: Duration::from_secs(1)
            })),
            ConfigError::ZeroProbeCount
        ));
    }

    #[test]
    fn planner_reports_misfit() {
        let b = resolve(
            BudgetSettings {
                grace_period: Some(Duration::from_secs(10)),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        let misfit = plan(&b).unwrap_err();
        assert_eq!(misfit.grace_period, Duration::from_secs(10));
        assert!(misfit.needed > misfit.grace_period);
        assert!(misfit.to_string().contains("terminationGracePeriodSeconds"));
    }
}
