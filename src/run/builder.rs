//! [`Builder`]: from settings, defaults and environment variables to a running supervisor.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{self, BudgetSettings, ConfigError, DrainDelay, Environment, Misfit};
use crate::report::{DeliveryPolicy, ExitCodes, Reason};
use crate::run::finale::Finale;
use crate::run::{global, supervisor};
use crate::signal::{DEFAULT_SIGNALS, Signal};
#[cfg(all(feature = "upgrade", unix))]
use crate::state::Handover;
use crate::state::Shared;
use crate::termination_log::TerminationLog;

/// Configures a [`Finale`]. Created by [`Finale::builder`].
///
/// # Default values
///
/// | setting | default | environment variable |
/// |---|---|---|
/// | [`total_budget`](Builder::total_budget) | 25 s ([`DEFAULT_TOTAL_BUDGET`](crate::DEFAULT_TOTAL_BUDGET)) | `FINALE_TOTAL_BUDGET` |
/// | [`telemetry_reserve`](Builder::telemetry_reserve) | 5 s ([`DEFAULT_TELEMETRY_RESERVE`](crate::DEFAULT_TELEMETRY_RESERVE)) | `FINALE_TELEMETRY_RESERVE` |
/// | [`drain_delay`](Builder::drain_delay) | 5 s on Kubernetes/ECS, 0 elsewhere ([`Environment`]) | `FINALE_DRAIN_DELAY`, `FINALE_DRAIN_PROBES`, `FINALE_DRAIN_IDLE` |
/// | [`announce_timeout`](Builder::announce_timeout) | 1 s ([`DEFAULT_ANNOUNCE_TIMEOUT`](crate::DEFAULT_ANNOUNCE_TIMEOUT)) | `FINALE_ANNOUNCE_TIMEOUT` |
/// | [`drain_timeout`](Builder::drain_timeout) | 10 s ([`DEFAULT_DRAIN_TIMEOUT`](crate::DEFAULT_DRAIN_TIMEOUT)) | `FINALE_DRAIN_TIMEOUT` |
/// | [`workers_timeout`](Builder::workers_timeout) | 4 s ([`DEFAULT_WORKERS_TIMEOUT`](crate::DEFAULT_WORKERS_TIMEOUT)) | `FINALE_WORKERS_TIMEOUT` |
/// | [`escalation_budget`](Builder::escalation_budget) | 2 s ([`DEFAULT_ESCALATION_BUDGET`](crate::DEFAULT_ESCALATION_BUDGET)) | `FINALE_ESCALATION_BUDGET` |
/// | [`startup_timeout`](Builder::startup_timeout) | 60 s ([`DEFAULT_STARTUP_TIMEOUT`](crate::DEFAULT_STARTUP_TIMEOUT)) | `FINALE_STARTUP_TIMEOUT` |
/// | [`grace_period`](Builder::grace_period) | unknown (planner off) | `FINALE_GRACE_PERIOD` |
/// | [`safety_margin`](Builder::safety_margin) | 2 s ([`DEFAULT_SAFETY_MARGIN`](crate::DEFAULT_SAFETY_MARGIN)) | `FINALE_SAFETY_MARGIN` |
/// | [`signals`](Builder::signals) | `SIGTERM`, `SIGINT` ([`DEFAULT_SIGNALS`](crate::DEFAULT_SIGNALS)) | |
/// | [`panic_hook`](Builder::panic_hook) | off | |
/// | [`exit_codes`](Builder::exit_codes) | [`ExitCodes::default`] | |
/// | [`delivery_policy`](Builder::delivery_policy) | [`DeliveryPolicy::AtExit`] | |
/// | [`termination_log`](Builder::termination_log) | [`TerminationLog::Auto`]: `/dev/termination-log` on Kubernetes, off elsewhere | `FINALE_TERMINATION_LOG` (a path, `auto`, `off`) |
/// | `systemd_notify` (feature `systemd`) | off | |
///
/// Environment variables take durations such as `25s`, `500ms`, `1.5s`, `2m` or a bare number of
/// seconds, and **override** what the builder set, so operators can tune a deployed service
/// without a rebuild. [`read_env(false)`](Builder::read_env) turns that off.
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    settings: BudgetSettings,
    environment: Option<Environment>,
    read_env: bool,
    misfit: Misfit,
    signals: Vec<Signal>,
    panic_hook: bool,
    exit_codes: ExitCodes,
    delivery_policy: DeliveryPolicy,
    empty_signals: bool,
    install: bool,
    platform: PlatformSettings,
    /// Set by [`Builder::upgrade`], which the upgrade defines.
    #[cfg(all(feature = "upgrade", unix))]
    pub(crate) handover: Option<Box<dyn Install>>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            settings: BudgetSettings::default(),
            environment: None,
            read_env: true,
            misfit: Misfit::default(),
            signals: DEFAULT_SIGNALS.to_vec(),
            panic_hook: false,
            exit_codes: ExitCodes::default(),
            delivery_policy: DeliveryPolicy::default(),
            empty_signals: false,
            install: false,
            platform: PlatformSettings::default(),
            #[cfg(all(feature = "upgrade", unix))]
            handover: None,
        }
    }
}

impl Finale {
    /// Starts configuring a `Finale`.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl Builder {
    /// The total budget of the whole sequence, from the trigger to the end of the Telemetry
    /// phase. Set it to the platform's grace period minus a margin.
    pub fn total_budget(mut self, total: Duration) -> Self {
        self.settings.total = Some(total);
        self
    }

    /// The part of the budget held back for the Telemetry phase.
    pub fn telemetry_reserve(mut self, reserve: Duration) -> Self {
        self.settings.telemetry_reserve = Some(reserve);
        self
    }

    /// The drain delay: a fixed [`Duration`], or a [`DrainDelay`] that ends once the load balancer
    /// has seen enough "not ready" answers.
    pub fn drain_delay(mut self, delay: impl Into<DrainDelay>) -> Self {
        self.settings.drain_delay = Some(delay.into());
        self
    }

    /// Extra time the Announce phase's hooks get beyond the drain delay.
    pub fn announce_timeout(mut self, timeout: Duration) -> Self {
        self.settings.announce_timeout = Some(timeout);
        self
    }

    /// Bounds the Drain phase.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = Some(timeout);
        self
    }

    /// Bounds the Workers phase.
    pub fn workers_timeout(mut self, timeout: Duration) -> Self {
        self.settings.workers_timeout = Some(timeout);
        self
    }

    /// The Telemetry phase's budget after a second signal.
    pub fn escalation_budget(mut self, budget: Duration) -> Self {
        self.settings.escalation_budget = Some(budget);
        self
    }

    /// Bounds graceful start: services not ready by then fail the start.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.settings.startup_timeout = Some(timeout);
        self
    }

    /// The platform's grace period (Kubernetes `terminationGracePeriodSeconds`, ECS
    /// `stopTimeout`, `docker stop -t`). Turns on the budget planner: [`build`](Builder::build)
    /// checks that every phase at its limit, plus the safety margin, fits.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.settings.grace_period = Some(grace);
        self
    }

    /// The budget planner's margin between the plan and the grace period.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.settings.safety_margin = Some(margin);
        self
    }

    /// What the budget planner does on a misfit: fail the build (default) or log a warning.
    pub fn on_misfit(mut self, misfit: Misfit) -> Self {
        self.misfit = misfit;
        self
    }

    /// Overrides the detected [`Environment`] (which picks the default drain delay).
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// Whether `FINALE_*` environment variables override the settings (default `true`).
    pub fn read_env(mut self, read: bool) -> Self {
        self.read_env = read;
        self
    }

    /// The signals that trigger the shutdown. A signal while the shutdown runs escalates it; the
    /// next ends the process at once. Give at least one; for none, use
    /// [`no_signals`](Builder::no_signals) (an empty slice is
    /// [`ConfigError::NoSignalsGiven`] at build).
    ///
    /// # Caveats
    ///
    /// [`build`](Builder::build) installs a process-wide handler for each of these signals,
    /// received on finale's supervisor thread from then on: before [`Finale::run`], during the
    /// sequence and after it (see the crate docs, "Threading and process-wide effects"). tokio
    /// never uninstalls a handler: once installed, the signal no longer kills the process by
    /// default.
    pub fn signals(mut self, signals: &[Signal]) -> Self {
        self.empty_signals = signals.is_empty();
        self.signals = signals.to_vec();
        self
    }

    /// Listens for no signal at all: the shutdown starts only through a [`Handle`](crate::Handle), a failed
    /// start, a failed critical task or a panic.
    pub fn no_signals(mut self) -> Self {
        self.empty_signals = false;
        self.signals.clear();
        self
    }

    /// Installs a panic hook (when [`build`](Builder::build) succeeds) that records the panic and
    /// triggers the shutdown with [`Reason::Panic`]. The previous hook still runs first.
    ///
    /// # Caveats
    ///
    /// The panic hook is process-wide: every panic on every thread triggers the shutdown, also
    /// one that a request handler's framework would have caught. It stays installed for the
    /// life of the process.
    pub fn panic_hook(mut self, install: bool) -> Self {
        self.panic_hook = install;
        self
    }

    /// Maps outcomes to exit codes differently.
    pub fn exit_codes(mut self, codes: ExitCodes) -> Self {
        self.exit_codes = codes;
        self
    }

    /// Which lost telemetry makes the run
    /// [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered): only what was
    /// lost from the trigger on ([`DeliveryPolicy::AtExit`], the default), or anything lost
    /// over the run ([`DeliveryPolicy::WholeRun`]). See [`Delivery`](crate::Delivery) for what
    /// is counted.
    pub fn delivery_policy(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery_policy = policy;
        self
    }

    /// Installs the built `Finale` as the process's one instance, reachable from code that
    /// never sees it (a library, a connection pool, an exporter set up deep in the stack)
    /// through [`finale::global`](crate::global). Off by default.
    ///
    /// # Caveats
    ///
    /// Process-wide: at most one instance per process is installed, for the life of the
    /// process; a second `install(true)` build fails with
    /// [`ConfigError::AlreadyInstalled`]. Test suites that build many `Finale`s in one process
    /// leave it off.
    pub fn install(mut self, install: bool) -> Self {
        self.install = install;
        self
    }

    /// Where the termination message goes when [`Finale::run`] ends: a short summary of the
    /// report (status, exit code, reason, the entries that did not complete and the slowest),
    /// at most 4096 bytes, which Kubernetes shows in `kubectl describe pod`. By default
    /// ([`TerminationLog::Auto`]) `/dev/termination-log` when running on Kubernetes and the
    /// file is writable, nowhere elsewhere. `FINALE_TERMINATION_LOG` overrides it.
    ///
    /// # Caveats
    ///
    /// Writes a file outside the process, once, at the end of `run()` (or when the supervisor
    /// takes over a wedged shutdown); a failure is logged, never returned.
    pub fn termination_log(mut self, log: TerminationLog) -> Self {
        self.platform.termination_log = log;
        self
    }

    /// Tells systemd how the service's life goes through `$NOTIFY_SOCKET`: `READY=1` when
    /// graceful start completes, `STOPPING=1` at the trigger, `STATUS=` at each phase,
    /// `EXTEND_TIMEOUT_USEC=` sized to what is left of the budget, and `WATCHDOG=1` pings while
    /// running when `$WATCHDOG_USEC` is set. Off by default; a no-op without `$NOTIFY_SOCKET`.
    /// See [`finale::systemd`](crate::systemd).
    ///
    /// # Caveats
    ///
    /// Sends datagrams to the service manager, and, with the watchdog, spawns a task on your
    /// runtime when graceful start completes; see the crate docs, "Threading and process-wide
    /// effects".
    #[cfg(all(feature = "systemd", unix))]
    #[cfg_attr(docsrs, doc(cfg(feature = "systemd")))]
    pub fn systemd_notify(mut self, notify: bool) -> Self {
        self.platform.systemd_notify = notify;
        self
    }

    /// Resolves and validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] that says what to fix: an environment variable that does not parse, a
    /// zero or absurd duration, a reserve not below the total, a plan that does not fit the
    /// grace period, a signal handler or the supervisor thread that could not be set up, or a
    /// second installed instance.
    ///
    /// # Caveats
    ///
    /// Starts finale's supervisor thread (`finale-supervisor`) and installs the signal
    /// handlers; see the crate docs, "Threading and process-wide effects".
    pub fn build(self) -> Result<Finale, ConfigError> {
        let env = if self.read_env {
            config::env_overrides(|k| std::env::var(k).ok())?
        } else {
            Vec::new()
        };
        let environment = self.environment.unwrap_or_else(Environment::detect);
        let budget = self.settings.resolve(&env, environment)?;
        if let Err(misfit) = config::plan(&budget) {
            match self.misfit {
                Misfit::Warn => tracing::warn!(target: "finale", "{misfit}"),
                _ => return Err(ConfigError::DoesNotFit(misfit)),
            }
        }
        if self.empty_signals {
            return Err(ConfigError::NoSignalsGiven);
        }
        let mut shared = Shared::new(budget, self.exit_codes);
        shared.delivery_policy = self.delivery_policy;
        shared.observers = self.platform.observers(self.read_env, environment);
        #[allow(unused_mut)]
        let mut signals = self.signals.clone();
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(install) = self.handover {
            let handover = install.install()?;
            if let Some(signal) = handover.signal() {
                if signals.contains(&signal) {
                    return Err(ConfigError::UpgradeSignal { signal });
                }
                signals.push(signal);
            }
            shared.upgrade = Some(handover);
        }
        let shared = Arc::new(shared);
        // Installed first: a second instance fails here, before it has a supervisor that
        // would take signals from the installed one.
        if self.install {
            global::install(&shared)?;
        }
        supervisor::start(&shared, &signals)?;
        let finale = Finale {
            shared,
            signals: self.signals,
            running: false,
        };
        if self.panic_hook {
            install_panic_hook(Arc::downgrade(&finale.shared));
        }
        tracing::debug!(target: "finale", ?budget, ?environment, "configured");
        Ok(finale)
    }
}

/// A hand-over the builder installs at build (the upgrade, feature `upgrade`, which plugs in
/// here: the builder never names it): its own settings checked, then turned into the state's
/// [`Handover`]. The builder adds the hand-over's signal to the ones it listens for.
#[cfg(all(feature = "upgrade", unix))]
pub(crate) trait Install: Send + Sync + std::fmt::Debug {
    /// Checks the hand-over's settings and builds what the state holds.
    fn install(self: Box<Self>) -> Result<Arc<dyn Handover>, ConfigError>;
}

/// What the builder collected for the platform layer, which turns it into the state's
/// observers (`PlatformSettings::observers`, defined by the platform: the builder never names
/// it).
#[derive(Clone, Debug, Default)]
pub(crate) struct PlatformSettings {
    pub(crate) termination_log: TerminationLog,
    #[cfg(all(feature = "systemd", unix))]
    pub(crate) systemd_notify: bool,
}

impl From<Duration> for DrainDelay {
    fn from(d: Duration) -> Self {
        DrainDelay::Fixed(d)
    }
}

fn install_panic_hook(shared: Weak<Shared>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if crate::run::runtime::is_probing() {
            return;
        }
        if let Some(shared) = shared.upgrade() {
            let message = crate::hook::panic_message(info.payload());
            let location = info.location().map(|l| l.to_string());
            shared.request(Reason::Panic { message, location });
        }
    }));
}
