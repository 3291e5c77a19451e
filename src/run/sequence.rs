//! The shutdown sequence: the four phases in order, under one budget, into one report.
//!
//! # Invariants
//!
//! - Phases run strictly in [`Phase::ALL`] order. On every path (a phase skipped by a second
//!   signal included) each phase's effects on the rest of the process happen before anything in
//!   it runs: readiness turns off at Announce, the drain flag is set at Drain, and the phase's
//!   token fires.
//! - The budget counts from the trigger (which may predate `run()`). Announce, Drain and
//!   Workers end by `t0 + total - reserve`; Telemetry ends by `t0 + total`, or by the escalation
//!   plus the escalation budget if that is earlier. Nothing here extends past the total; what a
//!   blocked thread makes late is reported ([`Outcome::Overran`], `over_budget`), and the
//!   supervisor ends the process if the sequence cannot end at all.
//! - The shutdown's own spans are closed and its metrics and report line recorded before the
//!   Telemetry phase starts, so the final flush carries them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::DrainDelay;
use crate::hook::HookError;
use crate::phase::Phase;
use crate::report::names::{self, metric};
use crate::report::{
    EntryKind, EntryReport, Outcome, PhaseOutcome, PhaseReport, Reason, ShutdownReport,
    ShutdownStatus,
};
use crate::run::entries::{Entry, OnEscalate, PhaseRun, run_phase};
use crate::run::supervisor;
use crate::state::{Registry, Shared, State};

/// The sequence's clock: the trigger and the deadlines that follow from it, on the tokio clock
/// (which tests may pause).
struct Clock {
    t0: Instant,
    hard_end: Instant,
    pre_end: Instant,
}

impl Clock {
    fn new(shared: &Shared) -> Self {
        let t0 = shared.life.trigger_tokio().unwrap_or_else(Instant::now);
        let hard_end = t0 + shared.budget.total;
        Self {
            t0,
            hard_end,
            pre_end: hard_end - shared.budget.telemetry_reserve,
        }
    }

    /// When the Telemetry phase must end.
    fn telemetry_deadline(&self, shared: &Shared) -> Instant {
        match shared.life.escalated_at_tokio() {
            Some(te) => (te + shared.budget.escalation_budget).min(self.hard_end),
            None => self.hard_end,
        }
    }
}

/// Runs the shutdown sequence.
pub(crate) async fn shutdown(shared: &Arc<Shared>, registry: Registry) -> ShutdownReport {
    let clock = Clock::new(shared);
    let budget = shared.budget;
    let reason = requested_reason(shared);
    names::set(&shared.recorders(), &metric::SHUTTING_DOWN, &[], 1.0);
    let mut by_phase = by_phase(registry);

    let shutdown_span = tracing::info_span!(target: "finale", "finale.shutdown", reason = %reason);
    let mut phases = Vec::with_capacity(4);
    let mut in_flight_at_drain_start = 0;
    let mut last_seen = (None, None);
    for phase in [Phase::Announce, Phase::Drain, Phase::Workers] {
        let entries = std::mem::take(&mut by_phase[phase.index()]);
        enter(shared, phase);
        if phase == Phase::Drain {
            in_flight_at_drain_start = shared.in_flight.count();
            names::set(
                &shared.recorders(),
                &metric::IN_FLIGHT_AT_DRAIN_START,
                &[],
                in_flight_at_drain_start as f64,
            );
        }
        if shared.is_escalated() {
            phases.push(skip(shared, phase, entries));
            continue;
        }
        let start = Instant::now();
        let (entries, limit) = with_own_waits(shared, phase, entries);
        let deadline = (start + limit).min(clock.pre_end);
        // Tasks learn about their phase (and its deadline) before anything in it is awaited.
        shared.start_phase(phase, deadline);
        let span = tracing::info_span!(target: "finale", parent: &shutdown_span, "finale.phase", phase = phase.as_str());
        let mut run = run_phase(shared, phase, entries, deadline, OnEscalate::Abandon, &span).await;
        if phase == Phase::Drain && run.outcome == PhaseOutcome::Completed {
            settle_in_flight(shared, &mut run, deadline, &span).await;
        }
        drop(span);
        if phase == Phase::Announce {
            last_seen = shared.health.last_seen();
        }
        phases.push(PhaseReport {
            phase,
            outcome: run.outcome,
            duration: start.elapsed(),
            entries: run.entries,
        });
    }
    drop(shutdown_span);
    if shared.is_escalated() && shared.in_flight.count() > 0 {
        // The servers were aborted: their connections are dropped on the runtime, and each
        // unfinished request names itself in the report as it goes. A short, bounded wait for
        // that, out of the escalation's budget, so that the report names what was cut.
        // Never more than a tenth of what is left to the Telemetry phase, whose deadline is
        // the total's at the latest.
        let left = clock
            .telemetry_deadline(shared)
            .saturating_duration_since(Instant::now());
        let wait = ESCALATION_NAMING_WAIT
            .min(budget.escalation_budget / 10)
            .min(left / 10);
        let _ = tokio::time::timeout(wait, shared.in_flight.wait_idle()).await;
    }

    // Record everything known so far before the Telemetry phase flushes it.
    let before_telemetry = clock.t0.elapsed();
    names::record(
        &shared.recorders(),
        &reason,
        &phases,
        in_flight_at_drain_start,
        before_telemetry,
    );
    let mut report = ShutdownReport {
        reason,
        phases,
        in_flight_at_drain_start,
        last_request_after_announce: last_seen.0,
        last_probe_after_announce: last_seen.1,
        requests_rejected: shared.requests_rejected(),
        requests_panicked: shared.in_flight.panicked(),
        cut: shared.take_cut(),
        upgrades_failed: shared.take_upgrades_failed(),
        escalated: shared.is_escalated(),
        total: before_telemetry,
        over_budget: false,
        delivery: Vec::new(),
        final_scrapes: Vec::new(),
        status: ShutdownStatus::Clean,
        exit_code: 0,
    };
    report.classify(&shared.exit_codes, shared.delivery_policy);
    // The event's target already says `finale`: the line does not say it twice.
    let text = report.to_string();
    tracing::info!(target: "finale", "{}", text.strip_prefix("finale: ").unwrap_or(&text));

    // Telemetry: the reserved slot.
    let phase = Phase::Telemetry;
    let start = Instant::now();
    shared.set_state(State::ShuttingDown(phase));
    let deadline = clock.telemetry_deadline(shared);
    shared.start_phase(phase, deadline);
    let entries = std::mem::take(&mut by_phase[phase.index()]);
    let span = tracing::Span::none();
    let on_escalate = OnEscalate::Shorten(budget.escalation_budget);
    let run = run_phase(shared, phase, entries, deadline, on_escalate, &span).await;
    report.phases.push(PhaseReport {
        phase,
        outcome: run.outcome,
        duration: start.elapsed(),
        entries: run.entries,
    });
    finish(shared, &mut report, clock.t0.elapsed());
    report
}

/// How long, after a second signal, the sequence waits for the aborted servers' requests to
/// be dropped (and named): 100 ms, at most a tenth of the escalation budget and a tenth of what
/// is left to the Telemetry phase.
const ESCALATION_NAMING_WAIT: Duration = Duration::from_millis(100);

/// How late past the total a sequence may end and still count as within it: the Telemetry
/// phase ends at its deadline, and its timer fires a tick after it.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// The end of every report: the last counts, the total and the status.
fn finish(shared: &Shared, report: &mut ShutdownReport, total: Duration) {
    report.total = total;
    report.over_budget = total > shared.budget.total + TIMER_SLACK;
    report.escalated |= shared.is_escalated();
    report.requests_rejected = shared.requests_rejected();
    report.requests_panicked = shared.in_flight.panicked();
    report.cut.extend(shared.take_cut());
    report.delivery = shared.delivery();
    report.final_scrapes = shared.final_scrapes();
    report.classify(&shared.exit_codes, shared.delivery_policy);
    shared.set_state(State::Finished);
}

/// The run's reason; the sequence starts only once requested.
fn requested_reason(shared: &Shared) -> Reason {
    shared
        .reason()
        .unwrap_or(Reason::Requested(std::borrow::Cow::Borrowed("unknown")))
}

/// Every registered hook and task, in the phase it runs in.
fn by_phase(registry: Registry) -> [Vec<Entry>; 4] {
    let mut by_phase: [Vec<Entry>; 4] = Default::default();
    for hook in registry.hooks {
        by_phase[hook.phase.index()].push(Entry::hook(hook));
    }
    for task in registry.tasks {
        by_phase[task.stop_in.index()].push(Entry::task(task));
    }
    by_phase
}

/// What the rest of the process relies on at the start of `phase`, on every path.
fn enter(shared: &Shared, phase: Phase) {
    shared.set_state(State::ShuttingDown(phase));
    match phase {
        Phase::Announce => {
            shared.health.announce();
            shared.in_flight.announce();
        }
        Phase::Drain => shared.in_flight.begin_drain(),
        Phase::Workers | Phase::Telemetry => {}
    }
}

/// A phase a second signal skipped: its token still fires and its tasks are aborted.
fn skip(shared: &Shared, phase: Phase, entries: Vec<Entry>) -> PhaseReport {
    shared.start_phase(phase, Instant::now());
    PhaseReport {
        phase,
        outcome: PhaseOutcome::Skipped,
        duration: Duration::ZERO,
        entries: entries.into_iter().map(Entry::skipped).collect(),
    }
}

/// Adds finale's own waits to a phase (the drain delay, in-flight work) and returns its limit.
fn with_own_waits(
    shared: &Shared,
    phase: Phase,
    mut entries: Vec<Entry>,
) -> (Vec<Entry>, Duration) {
    let budget = shared.budget;
    match phase {
        Phase::Announce => {
            // A successor still starting when the shutdown was requested is stopped (the
            // service is to stop, not to be replaced): the sequence waits for that, before the
            // Drain lets go of the sockets the successor holds too. Most of the time the phase
            // has for its SIGTERM; then SIGKILL, so that no orphan outlives this process. A
            // hand-off that won but is still telling the platform (systemd's `MAINPID=`) is
            // waited for too: this process must not end before it. First in the phase, before
            // any hook: the patience counts from the phase's start.
            #[cfg(all(feature = "upgrade", unix))]
            if let Some((name, wait)) = shared.upgrade_wait(shared.announce_wait_left() * 4 / 5) {
                entries.push(Entry::wait(name, EntryKind::Upgrade, i32::MIN, wait));
            }
            let delay = budget.drain_delay;
            // A service that never became ready was never in the load balancer's rotation:
            // there is nothing to wait for. After an upgrade the listeners stay open in the
            // successor: nobody has to let go of this process first.
            if !delay.max().is_zero() && shared.health.is_started() && !shared.upgraded() {
                let health = shared.health.clone();
                // Order 0: Announce hooks of the default order run during the delay; those with
                // a negative order before it starts, a positive one after it.
                entries.push(Entry::wait(
                    "drain delay",
                    EntryKind::DrainDelay,
                    0,
                    Box::pin(async move {
                        match delay {
                            DrainDelay::UntilProbed { answers, max } => {
                                tokio::select! {
                                    () = tokio::time::sleep(max) => {}
                                    () = health.wait_not_ready_answers(answers) => {}
                                }
                            }
                            DrainDelay::UntilQuiet { probes, idle, max } => {
                                tokio::select! {
                                    () = tokio::time::sleep(max) => {}
                                    () = health.wait_quiet(probes, idle) => {}
                                }
                                let (request, probe) = health.last_seen();
                                tracing::info!(
                                    target: "finale",
                                    last_request = ?request,
                                    last_probe = ?probe,
                                    "drain delay over: the data path is quiet (times since the announce)"
                                );
                            }
                            other => tokio::time::sleep(other.max()).await,
                        }
                    }),
                ));
            }
        }
        Phase::Drain => {
            // Always, also with nothing in flight now: work acquired just after the drain
            // started must be waited for too.
            let in_flight = shared.in_flight;
            entries.push(Entry::wait(
                "in-flight work",
                EntryKind::InFlight,
                0,
                Box::pin(async move { in_flight.wait_idle().await }),
            ));
        }
        Phase::Workers | Phase::Telemetry => {}
    }
    (entries, budget.phase_limit(phase))
}

/// Work acquired on the tracker while the Drain phase's other entries ran (a request on a
/// connection still open) is waited for too, within the same deadline.
async fn settle_in_flight(
    shared: &Arc<Shared>,
    run: &mut PhaseRun,
    deadline: Instant,
    span: &tracing::Span,
) {
    if shared.in_flight.count() == 0 {
        return;
    }
    let in_flight = shared.in_flight;
    let late = vec![Entry::wait(
        "in-flight work (late)",
        EntryKind::InFlight,
        0,
        Box::pin(async move { in_flight.wait_idle().await }),
    )];
    let settled = run_phase(
        shared,
        Phase::Drain,
        late,
        deadline,
        OnEscalate::Abandon,
        span,
    )
    .await;
    run.outcome = settled.outcome;
    run.entries.extend(settled.entries);
}

/// The report of a run on a runtime the sequence cannot use (no time driver): no phase can be
/// bounded, so none runs; every token fires, every task is aborted, the supervisor's telemetry
/// stages deliver what they can within the reserve, and the run is a startup failure.
pub(crate) fn without_timers(
    shared: &Arc<Shared>,
    registry: Registry,
    error: HookError,
) -> ShutdownReport {
    tracing::error!(target: "finale", %error, "cannot run the shutdown sequence");
    // The runtime is the cause, whatever triggered the request (a signal may have come first).
    let reason = Reason::StartupFailed {
        name: std::borrow::Cow::Borrowed("runtime"),
        error,
    };
    shared.request(reason.clone());
    let start = std::time::Instant::now();
    let mut by_phase = by_phase(registry);
    let mut phases = Vec::with_capacity(4);
    for phase in [Phase::Announce, Phase::Drain, Phase::Workers] {
        enter(shared, phase);
        phases.push(skip(
            shared,
            phase,
            std::mem::take(&mut by_phase[phase.index()]),
        ));
    }
    enter(shared, Phase::Telemetry);
    shared.life.phase_started[Phase::Telemetry.index()].cancel();
    let mut entries: Vec<EntryReport> = by_phase[Phase::Telemetry.index()]
        .drain(..)
        .map(Entry::skipped)
        .collect();
    // Within the reserve, and never past the total (the trigger may predate `run()`).
    let hard_end = shared.life.trigger().unwrap_or(start) + shared.budget.total;
    let delivered = supervisor::deliver(
        shared.take_emergency(),
        (start + shared.budget.telemetry_reserve).min(hard_end),
    );
    for (name, result) in delivered {
        if let Some(entry) = entries.iter_mut().find(|e| e.name == name) {
            entry.outcome = match result {
                Ok(()) => Outcome::Completed,
                Err(message) => Outcome::Failed(HookError::msg(message)),
            };
            entry.duration = start.elapsed();
        }
    }
    phases.push(PhaseReport {
        phase: Phase::Telemetry,
        outcome: PhaseOutcome::Completed,
        duration: start.elapsed(),
        entries,
    });
    let mut report = ShutdownReport {
        reason,
        phases,
        in_flight_at_drain_start: shared.in_flight.count(),
        last_request_after_announce: None,
        last_probe_after_announce: None,
        requests_rejected: 0,
        requests_panicked: 0,
        cut: Vec::new(),
        upgrades_failed: shared.take_upgrades_failed(),
        escalated: false,
        total: Duration::ZERO,
        over_budget: false,
        delivery: Vec::new(),
        final_scrapes: Vec::new(),
        status: ShutdownStatus::Clean,
        exit_code: 0,
    };
    finish(shared, &mut report, start.elapsed());
    report
}
