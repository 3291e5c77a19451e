//! The [`Finale`] orchestrator, its [`Builder`] and the cloneable [`Handle`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{self, Budget, BudgetSettings, ConfigError, DrainDelay, Environment, Misfit};
use crate::health::Health;
use crate::hook::{CatchUnwind, Hook, HookError};
use crate::phase::Phase;
use crate::report::{ExitCodes, Reason, ShutdownReport};
use crate::sequence;
use crate::signal::{DEFAULT_SIGNALS, Signal};
use crate::task::{Task, TaskContext};
use crate::token::StopToken;
use crate::tracker::InFlight;

/// Where the service is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Graceful start: waiting for every service to report ready.
    Starting,
    /// Serving; no shutdown requested.
    Running,
    /// The shutdown sequence is in this phase.
    ShuttingDown(Phase),
    /// The sequence has ended; the report is ready.
    Finished,
}

impl State {
    fn to_u8(self) -> u8 {
        match self {
            State::Starting => 0,
            State::Running => 1,
            State::ShuttingDown(p) => 2 + p.index() as u8,
            State::Finished => 6,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => State::Starting,
            1 => State::Running,
            2..=5 => State::ShuttingDown(Phase::ALL[(v - 2) as usize]),
            _ => State::Finished,
        }
    }
}

/// State shared by the orchestrator, every [`Handle`] and the integrations.
pub(crate) struct Shared {
    pub(crate) budget: Budget,
    pub(crate) exit_codes: ExitCodes,
    pub(crate) health: Health,
    pub(crate) in_flight: InFlight,
    pub(crate) requested: StopToken,
    pub(crate) escalated: StopToken,
    /// Cancelled when the phase of the same index starts.
    pub(crate) phase_started: [StopToken; 4],
    /// Each phase's deadline, set just before its token is cancelled.
    phase_deadlines: Mutex<[Option<tokio::time::Instant>; 4]>,
    /// What was cut short at a deadline, for the report.
    cut: Mutex<Vec<String>>,
    reason: Mutex<Option<Reason>>,
    state: AtomicU8,
    rejected: AtomicU64,
}

impl Shared {
    /// Requests the shutdown; the first reason wins. Returns whether this call requested it.
    pub(crate) fn request(&self, reason: Reason) -> bool {
        {
            let mut slot = lock(&self.reason);
            if slot.is_some() {
                return false;
            }
            tracing::info!(target: "finale", %reason, "shutdown requested");
            *slot = Some(reason);
        }
        self.requested.cancel()
    }

    pub(crate) fn reason(&self) -> Option<Reason> {
        lock(&self.reason).clone()
    }

    pub(crate) fn set_state(&self, state: State) {
        self.state.store(state.to_u8(), Ordering::Release);
    }

    /// Sets the phase's deadline, then cancels its token, so anything woken by the token sees it.
    pub(crate) fn start_phase(&self, phase: Phase, deadline: tokio::time::Instant) {
        lock(&self.phase_deadlines)[phase.index()] = Some(deadline);
        self.phase_started[phase.index()].cancel();
    }

    pub(crate) fn take_cut(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.cut))
    }

    pub(crate) fn requests_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means another thread panicked while holding the lock; the data (a reason,
    // a list of registrations) is still consistent, and shutdown must go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cheap, cloneable handle to the shutdown: trigger it, wait for its stages, query its state.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let finale = finale::Finale::builder().no_signals().build().unwrap();
/// let handle = finale.handle();
/// assert!(!handle.is_shutdown_requested());
/// assert!(handle.trigger("maintenance"));
/// assert!(!handle.trigger("again")); // the first reason wins
/// handle.shutdown_requested().await;
/// let report = finale.run().await;
/// assert_eq!(report.exit_code, 0);
/// # }
/// ```
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Requests the shutdown with a reason, recorded as [`Reason::Requested`]. Returns `true` if
    /// this call started the shutdown, `false` if it had already been requested.
    pub fn trigger(&self, reason: impl Into<Cow<'static, str>>) -> bool {
        self.shared.request(Reason::Requested(reason.into()))
    }

    /// Escalates a running shutdown, as a second signal does: the current phase is abandoned and
    /// the Telemetry phase runs with the escalation budget. Returns `true` if this call escalated;
    /// `false` if the shutdown was not requested yet or was already escalated.
    pub fn escalate(&self) -> bool {
        self.shared.requested.is_cancelled() && self.shared.escalated.cancel()
    }

    /// Waits until the shutdown is requested (by a signal, [`trigger`](Handle::trigger), a failed
    /// start, a failed critical task or a panic).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn shutdown_requested(&self) {
        self.shared.requested.cancelled().await;
    }

    /// Whether the shutdown has been requested. One atomic load.
    pub fn is_shutdown_requested(&self) -> bool {
        self.shared.requested.is_cancelled()
    }

    /// Waits until the Drain phase starts: servers stop accepting from here on.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn drain_started(&self) {
        self.shared.phase_started[Phase::Drain.index()]
            .cancelled()
            .await;
    }

    /// Waits until `phase` starts. Returns at once if it already has.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn phase_started(&self, phase: Phase) {
        self.shared.phase_started[phase.index()].cancelled().await;
    }

    /// Whether the Drain phase has started. One atomic load.
    pub fn is_draining(&self) -> bool {
        self.shared.phase_started[Phase::Drain.index()].is_cancelled()
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// The reason of the shutdown, once requested.
    pub fn reason(&self) -> Option<Reason> {
        self.shared.reason()
    }

    /// A token cancelled when the Workers phase starts: hand it to background tasks that finale
    /// does not spawn itself. (Tasks spawned with [`Finale::spawn`] get theirs in their
    /// [`TaskContext`].)
    pub fn token(&self) -> StopToken {
        self.shared.phase_started[Phase::Workers.index()].clone()
    }

    /// The token cancelled when `phase` starts.
    pub fn phase_token(&self, phase: Phase) -> StopToken {
        self.shared.phase_started[phase.index()].clone()
    }

    /// Readiness and liveness.
    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    /// The in-flight tracker the Drain phase waits on.
    pub fn in_flight(&self) -> InFlight {
        self.shared.in_flight
    }

    /// The budget this run uses.
    pub fn budget(&self) -> Budget {
        self.shared.budget
    }

    /// The deadline of `phase`, once it has started: when what is unfinished in it is abandoned.
    /// Servers use it to cut their remaining connections themselves, just before, and report them.
    pub fn phase_deadline(&self, phase: Phase) -> Option<tokio::time::Instant> {
        lock(&self.shared.phase_deadlines)[phase.index()]
    }

    /// Records something that was cut short at a deadline (a connection, a stream that never
    /// ended), so the report names it. It counts as a
    /// [`DeadlineOverrun`](crate::ExitStatus::DeadlineOverrun).
    pub fn record_cut(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::warn!(target: "finale", cut = %what, "cut at the deadline");
        lock(&self.shared.cut).push(what);
    }

    /// Records one request answered `503` because it arrived while draining; counted in the
    /// report and in the `finale_requests_rejected_total` metric.
    pub fn record_rejected_request(&self) {
        self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::names::REQUESTS_REJECTED).increment(1);
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Configures a [`Finale`]. Created by [`Finale::builder`].
///
/// # Default values
///
/// | setting | default | environment variable |
/// |---|---|---|
/// | [`total_budget`](Builder::total_budget) | 25 s ([`DEFAULT_TOTAL_BUDGET`](crate::DEFAULT_TOTAL_BUDGET)) | `FINALE_TOTAL_BUDGET` |
/// | [`telemetry_reserve`](Builder::telemetry_reserve) | 5 s ([`DEFAULT_TELEMETRY_RESERVE`](crate::DEFAULT_TELEMETRY_RESERVE)) | `FINALE_TELEMETRY_RESERVE` |
/// | [`drain_delay`](Builder::drain_delay) | 5 s on Kubernetes/ECS, 0 elsewhere ([`Environment`]) | `FINALE_DRAIN_DELAY`, `FINALE_DRAIN_PROBES` |
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
    hooks: Vec<Hook>,
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
            hooks: Vec::new(),
        }
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
    /// next ends the process at once.
    ///
    /// # Caveats
    ///
    /// [`Finale::run`] installs a process-wide handler for each of these signals. tokio never
    /// uninstalls it: once installed, the signal no longer kills the process by default.
    pub fn signals(mut self, signals: &[Signal]) -> Self {
        self.signals = signals.to_vec();
        self
    }

    /// Listens for no signal at all: the shutdown starts only through a [`Handle`], a failed
    /// start, a failed critical task or a panic.
    pub fn no_signals(mut self) -> Self {
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

    /// Registers a hook. Validated by [`build`](Builder::build).
    pub fn hook(mut self, hook: Hook) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Resolves and validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] that says what to fix: an environment variable that does not parse, a
    /// zero or absurd duration, a reserve not below the total, a plan that does not fit the
    /// grace period, a duplicate hook name or a hook timeout beyond its phase.
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
        let shared = Arc::new(Shared {
            budget,
            exit_codes: self.exit_codes,
            health: Health::new(),
            in_flight: InFlight::new(),
            requested: StopToken::new(),
            escalated: StopToken::new(),
            phase_started: std::array::from_fn(|_| StopToken::new()),
            phase_deadlines: Mutex::new([None; 4]),
            cut: Mutex::new(Vec::new()),
            reason: Mutex::new(None),
            state: AtomicU8::new(State::Starting.to_u8()),
            rejected: AtomicU64::new(0),
        });
        let finale = Finale {
            shared,
            registry: Mutex::new(Registry::default()),
            signals: self.signals,
        };
        for hook in self.hooks {
            finale.hook(hook)?;
        }
        if self.panic_hook {
            install_panic_hook(Arc::downgrade(&finale.shared));
        }
        tracing::debug!(target: "finale", ?budget, ?environment, "configured");
        Ok(finale)
    }
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
        if let Some(shared) = shared.upgrade() {
            let message = crate::hook::panic_message(info.payload());
            let location = info.location().map(|l| l.to_string());
            shared.request(Reason::Panic { message, location });
        }
    }));
}

#[derive(Default)]
pub(crate) struct Registry {
    names: HashSet<String>,
    pub(crate) hooks: Vec<Hook>,
    pub(crate) tasks: Vec<RunningTask>,
}

pub(crate) type TaskResult = Result<Result<(), HookError>, String>;

/// A spawned task, as the sequence sees it.
pub(crate) struct RunningTask {
    pub(crate) name: Cow<'static, str>,
    pub(crate) stop_in: Phase,
    pub(crate) timeout: Option<Duration>,
    pub(crate) needs_ready: bool,
    pub(crate) ready: StopToken,
    pub(crate) join: JoinHandle<TaskResult>,
}

/// The orchestrator: collects hooks and tasks, then [`run`](Finale::run)s the sequence once.
///
/// # Examples
///
/// ```no_run
/// use finale::{Finale, Hook, Phase, Task};
///
/// #[tokio::main]
/// async fn main() -> Result<(), finale::ConfigError> {
///     let finale = Finale::builder().build()?;
///     finale.spawn(Task::worker("mailer", |ctx| async move {
///         ctx.stopped().await; // send what is queued, then return
///     }))?;
///     finale.hook(Hook::new(Phase::Workers, "close-db", |_| async {}))?;
///     finale.run_and_exit().await // waits for SIGTERM/SIGINT, runs the sequence, exits
/// }
/// ```
pub struct Finale {
    shared: Arc<Shared>,
    registry: Mutex<Registry>,
    signals: Vec<Signal>,
}

impl Finale {
    /// Starts configuring a `Finale`.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A cloneable handle to trigger and observe the shutdown.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// The resolved budget.
    pub fn budget(&self) -> Budget {
        self.shared.budget
    }

    fn register_name(
        &self,
        registry: &mut Registry,
        name: &str,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> Result<(), ConfigError> {
        if name.trim().is_empty() {
            return Err(ConfigError::EmptyName);
        }
        if let Some(timeout) = timeout {
            let limit = self.shared.budget.phase_limit(phase);
            if timeout.is_zero() || timeout > limit {
                return Err(ConfigError::TimeoutBeyondPhase {
                    name: name.to_string(),
                    phase,
                    timeout,
                    limit,
                });
            }
        }
        if !registry.names.insert(name.to_owned()) {
            return Err(ConfigError::DuplicateName {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Registers a hook.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`], [`ConfigError::EmptyName`] or
    /// [`ConfigError::TimeoutBeyondPhase`].
    pub fn hook(&self, hook: Hook) -> Result<(), ConfigError> {
        let mut registry = lock(&self.registry);
        self.register_name(&mut registry, &hook.name, hook.phase, hook.timeout)?;
        registry.hooks.push(hook);
        Ok(())
    }

    /// Spawns a tracked task on the current tokio runtime; see [`Task`].
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`], [`ConfigError::EmptyName`] or
    /// [`ConfigError::TimeoutBeyondPhase`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like [`tokio::spawn`].
    pub fn spawn(&self, task: Task) -> Result<(), ConfigError> {
        let mut registry = lock(&self.registry);
        self.register_name(&mut registry, &task.name, task.stop_in, task.timeout)?;
        let ready = StopToken::new();
        if !task.needs_ready {
            ready.cancel();
        }
        let ctx = TaskContext {
            name: task.name.clone(),
            stop: self.shared.phase_started[task.stop_in.index()].clone(),
            ready: ready.clone(),
            handle: self.handle(),
        };
        let shared = self.shared.clone();
        let (name, critical, needs_ready) = (task.name.clone(), task.critical, task.needs_ready);
        let fut = CatchUnwind::new((task.run)(ctx));
        let ready_flag = ready.clone();
        let join = tokio::spawn(async move {
            let result = fut.await;
            let failure = match &result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.clone()),
                Err(panic) => Some(HookError::msg(format!("panicked: {panic}"))),
            };
            if let Some(error) = failure
                && !shared.requested.is_cancelled()
            {
                if needs_ready && !ready_flag.is_cancelled() {
                    shared.request(Reason::StartupFailed { name, error });
                } else if critical {
                    shared.request(Reason::TaskFailed { name, error });
                } else {
                    tracing::warn!(target: "finale", task = %name, %error, "task failed");
                }
            }
            // A task that ended cannot hold up graceful start.
            ready_flag.cancel();
            result
        });
        registry.tasks.push(RunningTask {
            name: task.name,
            stop_in: task.stop_in,
            timeout: task.timeout,
            needs_ready: task.needs_ready,
            ready,
            join,
        });
        Ok(())
    }

    /// Spawns a background worker: shorthand for `spawn(Task::worker(name, f))`.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Finale::spawn).
    pub fn spawn_worker<F, Fut>(
        &self,
        name: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Result<(), ConfigError>
    where
        F: FnOnce(TaskContext) -> Fut + Send + 'static,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: crate::hook::HookOutput,
    {
        self.spawn(Task::worker(name, f))
    }

    /// Runs the service's whole life: listens for the configured signals, waits for graceful
    /// start (every [`Task::service`] ready), waits for the shutdown to be requested, runs the
    /// sequence and returns its report.
    ///
    /// It always returns a report, also when the start fails (then with
    /// [`ExitStatus::StartupFailure`](crate::ExitStatus::StartupFailure)).
    ///
    /// # Caveats
    ///
    /// Installs process-wide signal handlers for the [configured signals](Builder::signals). A
    /// third signal ends the process at once with [`EXIT_IMMEDIATE`](crate::EXIT_IMMEDIATE)
    /// (see [`ExitCodes`]) through `std::process::exit`.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future abandons the sequence where it is.
    pub async fn run(self) -> ShutdownReport {
        let Finale {
            shared,
            registry,
            signals,
        } = self;
        let registry = registry.into_inner().unwrap_or_else(|e| e.into_inner());
        let signal_tasks = crate::sequence::listen(&shared, &signals);
        sequence::start(&shared, &registry.tasks).await;
        shared.requested.cancelled().await;
        let report = sequence::shutdown(&shared, registry).await;
        for task in signal_tasks {
            task.abort();
        }
        report
    }

    /// [`run`](Finale::run)s, then ends the process with the report's exit code.
    ///
    /// # Why finale exits explicitly
    ///
    /// `std::process::exit` skips every destructor: called in the middle of the work it loses
    /// whatever buffered telemetry was waiting for a `Drop` (OTel batches, the tracing-appender
    /// buffer, a final metrics push). Returning from `main` instead drops the tokio runtime, which
    /// waits without limit for `spawn_blocking` tasks and can hang on a stuck thread (a blocked
    /// export, a read on stdin) until the platform's SIGKILL, losing everything. finale therefore
    /// flushes first, inside its budget, and only then calls `std::process::exit` with the
    /// report's code: nothing is left to lose, and nothing can keep the process alive.
    pub async fn run_and_exit(self) -> ! {
        let report = self.run().await;
        report.exit()
    }
}

impl fmt::Debug for Finale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finale")
            .field("budget", &self.shared.budget)
            .field("signals", &self.signals)
            .finish_non_exhaustive()
    }
}
