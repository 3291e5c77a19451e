//! The running service's state: the one home that the phase loop, the supervisor, tasks,
//! servers and telemetry stages depend on, and that depends on none of them.
//!
//! # Invariants
//!
//! - The shutdown is requested once: the first [`Reason`] wins, and the trigger instant is set
//!   before the `requested` token is cancelled, so whoever wakes on the token sees both.
//! - A hand-off and a shutdown requested while the successor starts are decided once, by
//!   one compare-and-swap on `Life::handover`: whichever comes first wins, the other loses.
//! - The escalation instant is set before the `escalated` token is cancelled, for the same reason.
//! - The end of the process has one owner, decided once by one compare-and-swap on
//!   `Life::end`: the sequence claims it as `run()` ends, the supervisor before it takes over,
//!   each before it tells the platform anything final or exits. Whichever comes first owns the
//!   last word (the termination message, systemd's last status) and the exit code; the other
//!   neither writes its own nor exits under it.
//! - A phase's deadline is set before its token is cancelled.
//! - The registry is `Some` until the sequence starts; after that every registration is refused.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{Budget, ConfigError};
use crate::hook::{Hook, HookError};
use crate::phase::Phase;
use crate::report::names::Recorder;
use crate::report::{
    Delivery, DeliveryPolicy, ExitCodes, FinalScrape, Reason, ShutdownReport, Tallied, Tally,
};
use crate::slot::Share;
use crate::track::{Health, InFlight, InFlightTracker, StopToken};

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

/// The moments of the service's life, shared with the supervisor thread.
///
/// The supervisor holds this (not [`Shared`]), so that a `Finale` dropped without running lets
/// the supervisor end: `dropped` fires when the last [`Shared`] goes.
pub(crate) struct Life {
    pub(crate) requested: StopToken,
    pub(crate) escalated: StopToken,
    /// Cancelled when the phase of the same index starts (or is skipped).
    pub(crate) phase_started: [StopToken; 4],
    /// The sequence has ended and its report exists.
    pub(crate) finished: StopToken,
    /// The `Finale` was dropped without running (or the last [`Shared`] went): the
    /// supervisor steps aside.
    pub(crate) dropped: StopToken,
    /// The trigger on both clocks: the std one for the supervisor, tokio's for the sequence
    /// (the same instant unless a test paused tokio's clock).
    trigger: OnceLock<(std::time::Instant, tokio::time::Instant)>,
    escalated_at: OnceLock<(std::time::Instant, tokio::time::Instant)>,
    exit_code: AtomicI32,
    /// Counted out of [`UNFINISHED`] (finished, or dropped without running).
    settled: AtomicBool,
    /// Who won between a hand-off and a shutdown: 0 neither yet, [`SHUTDOWN_WON`] a shutdown
    /// was requested, otherwise the successor's process id (the hand-off won).
    handover: AtomicU32,
    /// Who owns the end of the process: [`END_OPEN`] not decided yet, otherwise an
    /// [`EndOwner`] as a number. Set once (see [`Life::claim_end`]).
    end: AtomicU8,
}

/// Who ends the process and has the last word: the sequence, whose `run()` returns the
/// report, or the supervisor, which took over a wedged shutdown and exits with its own code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndOwner {
    Sequence,
    Supervisor,
}

/// [`Life::end`] before either side claimed it.
const END_OPEN: u8 = 0;

impl EndOwner {
    fn to_u8(self) -> u8 {
        match self {
            EndOwner::Sequence => 1,
            EndOwner::Supervisor => 2,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(EndOwner::Sequence),
            2 => Some(EndOwner::Supervisor),
            _ => None,
        }
    }
}

/// [`Life::handover`] once a shutdown was requested before any hand-off was decided.
const SHUTDOWN_WON: u32 = u32::MAX;

/// `Finale`s of this process built and neither finished nor dropped without running. A
/// supervisor whose own sequence finished leaves a later signal to them.
static UNFINISHED: AtomicUsize = AtomicUsize::new(0);

impl Life {
    fn new() -> Self {
        UNFINISHED.fetch_add(1, Ordering::AcqRel);
        Self {
            requested: StopToken::new(),
            escalated: StopToken::new(),
            phase_started: std::array::from_fn(|_| StopToken::new()),
            finished: StopToken::new(),
            dropped: StopToken::new(),
            trigger: OnceLock::new(),
            escalated_at: OnceLock::new(),
            exit_code: AtomicI32::new(0),
            settled: AtomicBool::new(false),
            handover: AtomicU32::new(0),
            end: AtomicU8::new(END_OPEN),
        }
    }

    /// Claims the end of the process for `by`; returns whether this call made `by` its owner.
    /// The first claim wins and is never undone: the sequence claims as `run()` ends, the
    /// supervisor before it takes over, so that exactly one of them writes the final
    /// termination message and decides the exit code, whatever the interleaving. `AcqRel`: the
    /// loser's failed exchange reads the winner's claim, and what the winner did before it.
    pub(crate) fn claim_end(&self, by: EndOwner) -> bool {
        self.end
            .compare_exchange(END_OPEN, by.to_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Who owns the end of the process, once claimed.
    pub(crate) fn end_owner(&self) -> Option<EndOwner> {
        EndOwner::from_u8(self.end.load(Ordering::Acquire))
    }

    /// The hand-off to the successor `pid` (ready) wins, unless a shutdown was requested
    /// first. Returns whether it won; a shutdown requested after it is the hand-off's.
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    pub(crate) fn claim_handover(&self, pid: u32) -> bool {
        pid != 0
            && pid != SHUTDOWN_WON
            && self
                .handover
                .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Whether a shutdown was requested (and so a hand-off can no longer win).
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    pub(crate) fn shutdown_won(&self) -> bool {
        self.handover.load(Ordering::Acquire) == SHUTDOWN_WON
    }

    /// Whether the hand-off won (a successor's ready line was claimed before any shutdown
    /// request). The decision itself, read before the upgrade thread has marked anything else.
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    pub(crate) fn handover_won(&self) -> bool {
        self.handover_pid().is_some()
    }

    /// The successor the hand-off went to, once it won.
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    pub(crate) fn handover_pid(&self) -> Option<u32> {
        match self.handover.load(Ordering::Acquire) {
            0 | SHUTDOWN_WON => None,
            pid => Some(pid),
        }
    }

    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            UNFINISHED.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether another `Finale` of this process is alive and has not finished.
    pub(crate) fn others_unfinished() -> bool {
        UNFINISHED.load(Ordering::Acquire) > 0
    }

    /// The `Finale` is gone without having run its sequence (or its state is gone).
    pub(crate) fn abandon(&self) {
        self.settle();
        self.dropped.cancel();
    }

    /// Sets when the shutdown was requested, as if it had been `ago` earlier (tests of what
    /// depends on the time left).
    #[cfg(test)]
    #[cfg_attr(not(all(feature = "systemd", unix)), allow(dead_code))]
    pub(crate) fn triggered_ago(&self, ago: std::time::Duration) {
        let (std_now, tokio_now) = now();
        let _ = self.trigger.set((std_now - ago, tokio_now - ago));
    }

    /// When the shutdown was requested, on the std clock. `None` before.
    pub(crate) fn trigger(&self) -> Option<std::time::Instant> {
        self.trigger.get().map(|t| t.0)
    }

    /// When the shutdown was requested, on the tokio clock of the thread that requested it.
    pub(crate) fn trigger_tokio(&self) -> Option<tokio::time::Instant> {
        self.trigger.get().map(|t| t.1)
    }

    /// When the shutdown was escalated, on the std clock. `None` before.
    pub(crate) fn escalated_at(&self) -> Option<std::time::Instant> {
        self.escalated_at.get().map(|t| t.0)
    }

    /// When the shutdown was escalated, on the tokio clock. `None` before.
    pub(crate) fn escalated_at_tokio(&self) -> Option<tokio::time::Instant> {
        self.escalated_at.get().map(|t| t.1)
    }

    /// Records the report's exit code, then marks the sequence finished.
    pub(crate) fn finish(&self, exit_code: i32) {
        self.exit_code.store(exit_code, Ordering::Release);
        self.settle();
        self.finished.cancel();
    }

    /// The report's exit code, once [`finished`](Life::finished).
    pub(crate) fn exit_code(&self) -> i32 {
        self.exit_code.load(Ordering::Acquire)
    }
}

/// What a task's future ended with: its own result, or the panic message.
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

/// Hooks and tasks registered so far. Taken by the sequence when it starts.
#[derive(Default)]
pub(crate) struct Registry {
    names: HashSet<String>,
    pub(crate) hooks: Vec<Hook>,
    pub(crate) tasks: Vec<RunningTask>,
}

/// A Telemetry stage's work, runnable on a plain thread with a std deadline: what the
/// supervisor runs itself when the user's runtime is wedged and the Telemetry phase cannot.
pub(crate) struct EmergencyStage {
    /// The name of the Telemetry hook it stands in for.
    pub(crate) name: Cow<'static, str>,
    pub(crate) order: i32,
    pub(crate) share: Share,
    /// Delivers what it can by the deadline; blocks its thread.
    pub(crate) run: Box<dyn FnOnce(std::time::Instant) -> Result<(), String> + Send>,
}

/// A telemetry stage's name and what the supervisor's delivery of it said.
pub(crate) type StageOutcome = (Cow<'static, str>, Result<(), String>);

/// Reads a final-scrape stage's line for the report: `None` until the stage ran.
pub(crate) type FinalScrapeReader = Box<dyn Fn() -> Option<FinalScrape> + Send + Sync>;

/// What the platform learns of the service's life (systemd's notify socket, Kubernetes'
/// termination message): told at each moment, on the thread where it happens. Implementations
/// never block for long, never panic and never print.
pub(crate) trait Observer: Send + Sync {
    /// Graceful start completed: the service is ready (on the user's runtime).
    fn started(&self, _shared: &Shared) {}
    /// The shutdown was requested: the trigger is set, the `requested` token not cancelled yet.
    fn requested(&self, _shared: &Shared, _reason: &Reason) {}
    /// `phase` starts (or is skipped); its token is not cancelled yet.
    fn phase_started(&self, _shared: &Shared, _phase: Phase) {}
    /// The run ended with `report`, just before `run()` returns it. The sequence has claimed
    /// the end by then, or found it the supervisor's ([`Life::end_owner`]): then the
    /// supervisor has the last word, and the observer says nothing final of its own (it may
    /// keep the report for the supervisor's word, [`took_over`](Observer::took_over)).
    fn finished(&self, _shared: &Shared, _report: &ShutdownReport) {}
    /// The supervisor took over a wedged shutdown (it owns the end: the sequence's
    /// [`finished`](Observer::finished), if it comes, is not the last word), delivered what
    /// its `stages` could (each stage's name and outcome), and is about to exit with `code`.
    fn took_over(&self, _shared: &Shared, _why: &str, _code: i32, _stages: &[StageOutcome]) {}
    /// An upgrade handed the service over to the process `successor_pid`, which is ready: it
    /// speaks for the service from now on (this process's shutdown follows).
    #[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
    fn handed_over(&self, _shared: &Shared, _successor_pid: u32) {}
}

/// What the running state asks of the upgrade machinery (feature `upgrade`), which plugs in
/// here: the state never names it. The upgrade finds its own state again with a downcast
/// (the trait is [`Any`](std::any::Any)).
#[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
pub(crate) trait Handover: std::any::Any + Send + Sync + std::fmt::Debug {
    /// Upgrades that failed (the process kept serving), for the report; taken once.
    fn take_failed(&self) -> Vec<String>;
    /// Whether the service was handed over to a successor that is ready.
    fn succeeded(&self) -> bool;
    /// Whether the listening sockets belong to a successor, or are shared with one starting.
    fn handed_off(&self) -> bool;
    /// The signal that starts a hand-over instead of the shutdown, if any.
    fn signal(&self) -> Option<crate::signal::Signal>;
    /// Starts one hand-over of `shared`'s service, as its signal does; it logs and counts its
    /// own outcome.
    fn start(&self, shared: &Arc<Shared>) -> HandoverFuture;
    /// The Announce phase's wait when the shutdown started while a hand-over was under way:
    /// stops the successor (most of `patience` for it to go, then it is killed) and resolves
    /// once no hand-over is under way. `None` when none is.
    fn abandon(self: Arc<Self>, patience: Duration) -> Option<HandoverFuture>;
    /// The Announce phase's wait when the hand-over won but is still being completed (the
    /// platform told: systemd's `MAINPID=`, which may wait for room) as the shutdown starts:
    /// resolves once it is, so that the process does not end before. `None` when it is.
    fn completing(self: Arc<Self>) -> Option<HandoverFuture>;
}

/// What [`Handover`] hands back to run: a boxed future, so that the state never names the
/// upgrade's own types.
#[cfg_attr(not(all(feature = "upgrade", unix)), allow(dead_code))]
pub(crate) type HandoverFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// Why a registration was refused.
pub(crate) enum Refused {
    Config(ConfigError),
    /// The sequence has started: the registry is gone.
    Started,
}

impl From<ConfigError> for Refused {
    fn from(e: ConfigError) -> Self {
        Refused::Config(e)
    }
}

/// State shared by the orchestrator, every [`Handle`](crate::Handle), the supervisor and the
/// integrations.
pub(crate) struct Shared {
    pub(crate) budget: Budget,
    pub(crate) exit_codes: ExitCodes,
    pub(crate) health: Health,
    pub(crate) in_flight: InFlight,
    /// Owns `in_flight`'s tracker: when the state goes, the tracker is retired and pooled.
    _in_flight_owner: InFlightTracker,
    pub(crate) life: Arc<Life>,
    /// Each phase's deadline, set just before its token is cancelled.
    phase_deadlines: Mutex<[Option<tokio::time::Instant>; 4]>,
    /// What was cut short at a deadline, for the report.
    cut: Mutex<Vec<String>>,
    reason: Mutex<Option<Reason>>,
    state: AtomicU8,
    rejected: AtomicU64,
    registry: Mutex<Option<Registry>>,
    emergency: Mutex<Vec<EmergencyStage>>,
    /// The telemetry stages that count what they deliver, each read at the trigger.
    tallies: Mutex<Vec<Tallied>>,
    /// The final-scrape stages' lines for the report, each read at the end of the sequence.
    final_scrapes: Mutex<Vec<FinalScrapeReader>>,
    /// Which lost telemetry makes the run not delivered; set by the builder.
    pub(crate) delivery_policy: DeliveryPolicy,
    /// Recorders of finale's own metrics besides the facade (the OTLP meter provider's).
    sinks: Mutex<Vec<Arc<dyn Recorder>>>,
    /// Set by the builder before the state is shared; empty unless the user asked.
    pub(crate) observers: Vec<Box<dyn Observer>>,
    /// Set by the builder before the state is shared, with [`Builder::upgrade`](crate::Builder::upgrade).
    #[cfg(all(feature = "upgrade", unix))]
    pub(crate) upgrade: Option<Arc<dyn Handover>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.life.abandon();
    }
}

impl Shared {
    pub(crate) fn new(budget: Budget, exit_codes: ExitCodes) -> Self {
        let in_flight_owner = InFlightTracker::new();
        Self {
            budget,
            exit_codes,
            health: Health::new(),
            in_flight: in_flight_owner.in_flight(),
            _in_flight_owner: in_flight_owner,
            life: Arc::new(Life::new()),
            phase_deadlines: Mutex::new([None; 4]),
            cut: Mutex::new(Vec::new()),
            reason: Mutex::new(None),
            state: AtomicU8::new(State::Starting.to_u8()),
            rejected: AtomicU64::new(0),
            registry: Mutex::new(Some(Registry::default())),
            emergency: Mutex::new(Vec::new()),
            tallies: Mutex::new(Vec::new()),
            final_scrapes: Mutex::new(Vec::new()),
            delivery_policy: DeliveryPolicy::default(),
            sinks: Mutex::new(Vec::new()),
            observers: Vec::new(),
            #[cfg(all(feature = "upgrade", unix))]
            upgrade: None,
        }
    }

    /// Requests the shutdown; the first reason wins. Returns whether this call requested it.
    ///
    /// No code of the user's runs under the reason's lock (a log layer's, a panic hook's that
    /// requests the shutdown in turn). Once the reason is set, the shutdown starts whatever
    /// happens after: a panic in the log line is held until the observers have heard of the
    /// trigger and the token is cancelled, then goes on; one in an observer still cancels the
    /// token.
    pub(crate) fn request(&self, mut reason: Reason) -> bool {
        let mut substituted = false;
        {
            let mut slot = lock(&self.reason);
            if slot.is_some() {
                return false;
            }
            // First: the hand-off started by the upgrade decides against the same word.
            if let Err(pid) = self.life.handover.compare_exchange(
                0,
                SHUTDOWN_WON,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) && pid != SHUTDOWN_WON
                && !matches!(reason, Reason::Upgrade { .. })
            {
                // The successor was ready first: it serves, and this shutdown is the
                // hand-off's (no drain delay, the shared sockets left alone). The caller (a
                // signal, say) did not request it: to it, this is the first signal after the
                // hand-off.
                substituted = true;
                reason = Reason::Upgrade { successor_pid: pid };
            }
            *slot = Some(reason.clone());
            // The budget starts here, wherever the program is.
            let _ = self.life.trigger.set(now());
            // The run's telemetry ends here too: what the stages count from now on is the
            // exit's. Atomic loads only; under the reason's lock, so a stage added at the same
            // moment is read either here or by `add_tally`, never twice or not at all.
            for t in lock(&self.tallies).iter_mut() {
                t.at_trigger.get_or_insert_with(|| t.tally.counts());
            }
        }
        let _started = CancelOnUnwind(&self.life.requested);
        let logged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tracing::info!(target: "finale", %reason, "shutdown requested");
        }));
        // Before the token: the platform hears of the trigger before any phase starts.
        self.observe(|o| o.requested(self, &reason));
        let requested = self.life.requested.cancel() && !substituted;
        if let Err(panic) = logged {
            std::panic::resume_unwind(panic);
        }
        requested
    }

    /// Escalates a requested shutdown, as a second signal does. Returns whether this call did.
    pub(crate) fn escalate(&self) -> bool {
        // The trigger instant, not the token: `request` sets it under the reason's lock before
        // it cancels the token, so a second signal racing the first request's last step still
        // counts as the second, not the third.
        if self.life.trigger.get().is_none() {
            return false;
        }
        let _ = self.life.escalated_at.set(now());
        self.life.escalated.cancel()
    }

    pub(crate) fn is_requested(&self) -> bool {
        self.life.requested.is_cancelled()
    }

    pub(crate) fn is_escalated(&self) -> bool {
        self.life.escalated.is_cancelled()
    }

    pub(crate) fn reason(&self) -> Option<Reason> {
        lock(&self.reason).clone()
    }

    pub(crate) fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, state: State) {
        self.state.store(state.to_u8(), Ordering::Release);
    }

    /// Sets the phase's deadline, then cancels its token, so anything woken by the token sees it.
    pub(crate) fn start_phase(&self, phase: Phase, deadline: tokio::time::Instant) {
        lock(&self.phase_deadlines)[phase.index()].get_or_insert(deadline);
        self.observe(|o| o.phase_started(self, phase));
        self.life.phase_started[phase.index()].cancel();
    }

    pub(crate) fn phase_deadline(&self, phase: Phase) -> Option<tokio::time::Instant> {
        lock(&self.phase_deadlines)[phase.index()]
    }

    pub(crate) fn phase_token(&self, phase: Phase) -> StopToken {
        self.life.phase_started[phase.index()].clone()
    }

    /// Records something that was cut short at a deadline, so the report names it.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn record_cut(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::warn!(target: "finale", cut = %what, "cut at the deadline");
        lock(&self.cut).push(what);
    }

    /// Upgrades that failed during the run (the process kept serving), for the report.
    pub(crate) fn take_upgrades_failed(&self) -> Vec<String> {
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(upgrade) = &self.upgrade {
            return upgrade.take_failed();
        }
        Vec::new()
    }

    /// Whether this process handed its service to an upgrade's successor (ready): there is no
    /// drain delay.
    pub(crate) fn upgraded(&self) -> bool {
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(upgrade) = &self.upgrade {
            // The claim decides; the upgrade's own flag follows it an instant later.
            return self.life.handover_won() || upgrade.succeeded();
        }
        false
    }

    /// The time the upgrade's waits in the Announce phase may take, at most: the Announce
    /// timeout (the phase's own time, the drain delay aside, which keeps its own; hooks ordered
    /// before the drain delay share this time with the waits), or the budget's time before the
    /// Telemetry reserve if that is shorter (the phase's deadline is the earlier of its limit and that, counted from its
    /// start, which is at or after the trigger); less what has passed since the trigger, once
    /// the shutdown was requested.
    #[cfg_attr(
        not(all(any(feature = "systemd", feature = "upgrade"), unix)),
        allow(dead_code)
    )]
    pub(crate) fn announce_wait_left(&self) -> Duration {
        let budget = &self.budget;
        let announce = budget
            .announce_timeout
            .min(budget.total.saturating_sub(budget.telemetry_reserve));
        match self.life.trigger() {
            Some(trigger) => {
                (trigger + announce).saturating_duration_since(std::time::Instant::now())
            }
            None => announce,
        }
    }

    /// The Announce phase's wait for an upgrade, named, if one is under way as the shutdown
    /// starts: the hand-off won, and is still being completed ([`Handover::completing`]); or
    /// the shutdown won, and the upgrade is abandoned ([`Handover::abandon`]). Read on the
    /// claim itself: the shutdown is the hand-off's even when it was requested in the instant
    /// before the upgrade thread marked the hand-off done.
    #[cfg(all(feature = "upgrade", unix))]
    pub(crate) fn upgrade_wait(
        &self,
        patience: Duration,
    ) -> Option<(&'static str, HandoverFuture)> {
        let upgrade = self.upgrade.clone()?;
        if self.life.handover_won() {
            return upgrade.completing().map(|wait| ("upgrade hand-over", wait));
        }
        upgrade
            .abandon(patience)
            .map(|wait| ("upgrade abandoned", wait))
    }

    /// Whether the listening sockets are shared with an upgrade's successor (ready, or still
    /// starting): the servers stop accepting without touching them.
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn handed_off(&self) -> bool {
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(upgrade) = &self.upgrade {
            return upgrade.handed_off();
        }
        false
    }

    pub(crate) fn take_cut(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.cut))
    }

    /// Records one request answered `503` because it arrived near the drain deadline.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn record_rejected_request(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::report::names::metric::REQUESTS_REJECTED.name).increment(1);
    }

    pub(crate) fn requests_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Runs `f` on the registry after checking `name`, unless the sequence has started.
    pub(crate) fn register<T>(
        &self,
        name: &str,
        phase: Phase,
        timeout: Option<Duration>,
        f: impl FnOnce(&mut Registry) -> T,
    ) -> Result<T, Refused> {
        if name.trim().is_empty() {
            return Err(ConfigError::EmptyName.into());
        }
        if let Some(timeout) = timeout {
            let limit = self.budget.phase_limit(phase);
            if timeout.is_zero() || timeout > limit {
                return Err(ConfigError::TimeoutBeyondPhase {
                    name: name.to_string(),
                    phase,
                    timeout,
                    limit,
                }
                .into());
            }
        }
        let mut registry = lock(&self.registry);
        let registry = registry.as_mut().ok_or(Refused::Started)?;
        if !registry.names.insert(name.to_owned()) {
            return Err(ConfigError::DuplicateName {
                name: name.to_string(),
            }
            .into());
        }
        Ok(f(registry))
    }

    /// Takes the registry: from now on every registration is refused.
    pub(crate) fn take_registry(&self) -> Registry {
        lock(&self.registry).take().unwrap_or_default()
    }

    /// Adds work the supervisor runs itself if the Telemetry phase cannot.
    #[cfg_attr(
        not(any(
            feature = "pushgateway",
            feature = "otlp",
            feature = "tracing-appender"
        )),
        allow(dead_code)
    )]
    pub(crate) fn add_emergency(&self, stage: EmergencyStage) {
        lock(&self.emergency).push(stage);
    }

    /// Adds a stage that counts what it delivers, for the report.
    pub(crate) fn add_tally(&self, tally: Arc<dyn Tally>) {
        // The reason's lock first, as in `request`: a stage added after the trigger is read now.
        let reason = lock(&self.reason);
        let at_trigger = reason.as_ref().map(|_| tally.counts());
        lock(&self.tallies).push(Tallied { tally, at_trigger });
        drop(reason);
    }

    /// Adds a final-scrape stage's line to the report.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn add_final_scrape(&self, reader: FinalScrapeReader) {
        lock(&self.final_scrapes).push(reader);
    }

    /// The final-scrape stages' lines, of those that ran.
    pub(crate) fn final_scrapes(&self) -> Vec<FinalScrape> {
        lock(&self.final_scrapes)
            .iter()
            .filter_map(|r| r())
            .collect()
    }

    /// What every counting stage delivered so far, split at the trigger.
    pub(crate) fn delivery(&self) -> Vec<Delivery> {
        lock(&self.tallies).iter().map(Tallied::delivery).collect()
    }

    pub(crate) fn take_emergency(&self) -> Vec<EmergencyStage> {
        std::mem::take(&mut *lock(&self.emergency))
    }

    /// Records finale's own metrics through `sink` too, from now on.
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub(crate) fn add_recorder(&self, sink: Arc<dyn Recorder>) {
        lock(&self.sinks).push(sink);
    }

    /// The recorders of finale's own metrics besides the facade.
    pub(crate) fn recorders(&self) -> Vec<Arc<dyn Recorder>> {
        lock(&self.sinks).clone()
    }

    /// Tells every [`Observer`] (none unless the user asked for one).
    pub(crate) fn observe(&self, f: impl Fn(&dyn Observer)) {
        for observer in &self.observers {
            f(&**observer);
        }
    }
}

/// Cancels its token if dropped by a panic: what must happen after a point of no return.
struct CancelOnUnwind<'a>(&'a StopToken);

impl Drop for CancelOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.cancel();
        }
    }
}

/// Now, on both clocks.
fn now() -> (std::time::Instant, tokio::time::Instant) {
    (std::time::Instant::now(), tokio::time::Instant::now())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means another thread panicked while holding the lock; the data (a reason,
    // a list of registrations) is still consistent, and shutdown must go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence and the supervisor claim the end of the process at the same instant (two
    /// threads released together), many times: exactly one claim wins each time, and both
    /// sides read the winner afterwards.
    #[test]
    fn the_end_has_one_owner_whichever_side_claims_first() {
        let mut wins = [0usize; 2];
        for _ in 0..1_000 {
            let life = Arc::new(Life::new());
            let start = Arc::new(std::sync::Barrier::new(2));
            let sides = [EndOwner::Sequence, EndOwner::Supervisor].map(|by| {
                let (life, start) = (life.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let won = life.claim_end(by);
                    (won, life.end_owner())
                })
            });
            let [sequence, supervisor] = sides.map(|t| t.join().unwrap());
            assert!(sequence.0 != supervisor.0, "{sequence:?} {supervisor:?}");
            let owner = if sequence.0 {
                EndOwner::Sequence
            } else {
                EndOwner::Supervisor
            };
            assert_eq!(sequence.1, Some(owner));
            assert_eq!(supervisor.1, Some(owner));
            wins[usize::from(supervisor.0)] += 1;
            // Counted out of the process's unfinished `Finale`s again.
            life.abandon();
        }
        assert_eq!(wins.iter().sum::<usize>(), 1_000);
    }

    /// A log layer of the user's that panics on "shutdown requested": the request still
    /// completes (the reason and the trigger set, the token cancelled; the platform told, which
    /// `platform::systemd`'s tests check) and the panic goes on to the caller. The line is
    /// logged without the reason's lock held, so that a panic hook that requests the shutdown in
    /// turn (`Builder::panic_hook`) cannot deadlock on it.
    #[test]
    fn a_panicking_log_layer_does_not_leave_a_request_half_done() {
        use std::sync::atomic::AtomicU8;
        use tracing_subscriber::layer::SubscriberExt;
        /// 0: not called; 1: called with the reason's lock free; 2: with it held.
        struct Panics(Arc<Shared>, Arc<AtomicU8>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Panics {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let free = self.0.reason.try_lock().is_ok();
                self.1.store(if free { 1 } else { 2 }, Ordering::SeqCst);
                panic!("a log layer that panics");
            }
        }
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .build()
            .unwrap();
        let shared = finale.shared.clone();
        let seen = Arc::new(AtomicU8::new(0));
        let subscriber = tracing_subscriber::registry().with(Panics(shared.clone(), seen.clone()));
        let requested = tracing::subscriber::with_default(subscriber, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                shared.request(crate::Reason::Requested("test".into()))
            }))
        });
        assert!(
            requested.is_err(),
            "the layer's panic goes on to the caller"
        );
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "logged under the reason's lock"
        );
        assert!(shared.reason().is_some(), "no reason");
        assert!(shared.life.trigger().is_some(), "no trigger");
        assert!(
            shared.life.requested.is_cancelled(),
            "the sequence never starts"
        );
    }

    /// The upgrade's waits in the Announce phase are bounded by the Announce timeout, not by
    /// the phase's limit with the drain delay in it: the drain delay keeps its time.
    #[test]
    fn the_upgrades_announce_waits_leave_the_drain_delay_its_time() {
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .drain_delay(std::time::Duration::from_secs(2))
            .announce_timeout(std::time::Duration::from_secs(1))
            .build()
            .unwrap();
        assert_eq!(
            finale.shared.announce_wait_left(),
            std::time::Duration::from_secs(1)
        );
    }
}
