//! Running the life of the service: signals, graceful start, and the shutdown sequence.
//!
//! # Invariants
//!
//! - Phases run strictly in [`Phase::ALL`] order; a phase's token is cancelled before anything
//!   in it runs, and nothing of a phase outlives its deadline (unfinished work is aborted).
//! - Announce, Drain and Workers end by `t0 + total - reserve`; Telemetry then gets until
//!   `max(t0 + total, now + reserve)`, or `now + escalation budget` after a second signal.
//! - The shutdown's own spans are closed and its metrics and report line recorded before the
//!   Telemetry phase starts, so the final flush carries them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::config::DrainDelay;
use crate::finale::{Registry, RunningTask, Shared, State, TaskResult};
use crate::hook::{BoxFuture, CatchUnwind, HookContext, HookError};
use crate::phase::Phase;
use crate::report::{
    EntryKind, ExitStatus, HookReport, Outcome, PhaseOutcome, PhaseReport, Reason, ShutdownReport,
};
use crate::signal::{Listener, Signal};

/// Installs the signal handlers and spawns one listener task per signal.
pub(crate) fn listen(shared: &Arc<Shared>, signals: &[Signal]) -> Vec<AbortHandle> {
    let mut tasks = Vec::new();
    for &signal in signals {
        match Listener::new(signal) {
            Ok(Some(mut listener)) => {
                let shared = shared.clone();
                let task = tokio::spawn(async move {
                    while let Some(signal) = listener.recv().await {
                        on_signal(&shared, signal);
                    }
                });
                tasks.push(task.abort_handle());
            }
            Ok(None) => {
                tracing::debug!(target: "finale", %signal, "signal not supported on this platform")
            }
            Err(e) => {
                shared.request(Reason::StartupFailed {
                    name: Cow::Owned(format!("{signal} handler")),
                    error: HookError::new(e),
                });
            }
        }
    }
    if !tasks.is_empty() {
        let names: Vec<&str> = signals.iter().map(|s| s.as_str()).collect();
        tracing::info!(target: "finale", signals = %names.join(", "), "listening for signals");
    }
    tasks
}

/// First signal: shutdown. A signal while shutting down: escalate. Another: exit at once.
fn on_signal(shared: &Shared, signal: Signal) {
    if shared.request(Reason::Signal(signal)) {
        return;
    }
    if shared.escalated.cancel() {
        tracing::warn!(
            target: "finale",
            %signal,
            "second signal: abandoning the drain, flushing telemetry; send another to exit at once"
        );
        return;
    }
    let code = shared.exit_codes.code(ExitStatus::Immediate);
    tracing::error!(target: "finale", %signal, code, "third signal: exiting at once");
    std::process::exit(code);
}

/// Graceful start: waits until every service is ready, the start fails, or the shutdown is
/// requested, bounded by the startup timeout.
pub(crate) async fn start(shared: &Arc<Shared>, tasks: &[RunningTask]) {
    let all_ready = async {
        for task in tasks.iter().filter(|t| t.needs_ready) {
            task.ready.cancelled().await;
        }
    };
    let timeout = shared.budget.startup_timeout;
    tokio::select! {
        () = all_ready => {}
        () = shared.requested.cancelled() => return,
        () = tokio::time::sleep(timeout) => {
            let pending: Vec<&str> = tasks
                .iter()
                .filter(|t| t.needs_ready && !t.ready.is_cancelled())
                .map(|t| &*t.name)
                .collect();
            let name = pending.join(", ");
            shared.request(Reason::StartupFailed {
                error: HookError::msg(format!("not ready within the startup timeout of {timeout:?}")),
                name: Cow::Owned(name),
            });
            return;
        }
    }
    if !shared.requested.is_cancelled() {
        shared.health.set_started();
        shared.set_state(State::Running);
        tracing::info!(target: "finale", "started: ready");
    }
}

/// One thing a phase waits for.
struct Entry {
    name: Cow<'static, str>,
    kind: EntryKind,
    order: i32,
    timeout: Option<Duration>,
    work: Work,
}

enum Work {
    Hook(Box<dyn FnOnce(HookContext) -> BoxFuture<Result<(), HookError>> + Send>),
    Task(JoinHandle<TaskResult>),
    Wait(BoxFuture<()>),
}

/// What a second signal does to a running phase.
#[derive(Clone, Copy)]
enum OnEscalate {
    Abandon,
    Shorten(Duration),
}

/// Runs the shutdown sequence.
pub(crate) async fn shutdown(shared: &Arc<Shared>, registry: Registry) -> ShutdownReport {
    let t0 = Instant::now();
    let budget = shared.budget;
    let hard_end = t0 + budget.total;
    let pre_end = hard_end - budget.telemetry_reserve;
    let reason = shared
        .reason()
        .expect("the sequence starts only once requested");
    metrics::gauge!(crate::names::SHUTTING_DOWN).set(1.0);

    let mut by_phase: [Vec<Entry>; 4] = Default::default();
    for hook in registry.hooks {
        by_phase[hook.phase.index()].push(Entry {
            name: hook.name,
            kind: EntryKind::Hook,
            order: hook.order,
            timeout: hook.timeout,
            work: Work::Hook(hook.run),
        });
    }
    let mut task_aborts: HashMap<Phase, Vec<AbortHandle>> = HashMap::new();
    for task in registry.tasks {
        task_aborts
            .entry(task.stop_in)
            .or_default()
            .push(task.join.abort_handle());
        by_phase[task.stop_in.index()].push(Entry {
            name: task.name,
            kind: EntryKind::Task,
            order: 0,
            timeout: task.timeout,
            work: Work::Task(task.join),
        });
    }

    let shutdown_span = tracing::info_span!(target: "finale", "finale.shutdown", reason = %reason);
    let mut phases = Vec::with_capacity(4);
    let mut in_flight_at_drain_start = 0;
    let mut escalated = shared.escalated.is_cancelled();
    for phase in [Phase::Announce, Phase::Drain, Phase::Workers] {
        let mut entries = std::mem::take(&mut by_phase[phase.index()]);
        if escalated {
            abort_all(task_aborts.get(&phase));
            phases.push(PhaseReport {
                phase,
                outcome: PhaseOutcome::Skipped,
                duration: Duration::ZERO,
                entries: entries
                    .into_iter()
                    .map(|e| HookReport {
                        name: e.name,
                        kind: e.kind,
                        outcome: Outcome::Abandoned,
                        duration: Duration::ZERO,
                    })
                    .collect(),
            });
            continue;
        }
        let start = Instant::now();
        shared.set_state(State::ShuttingDown(phase));
        let limit = match phase {
            Phase::Announce => {
                shared.health.announce();
                let delay = budget.drain_delay;
                if !delay.max().is_zero() {
                    let health = shared.health.clone();
                    entries.push(Entry {
                        name: Cow::Borrowed("drain delay"),
                        kind: EntryKind::DrainDelay,
                        // Order 0: Announce hooks of the default order run during the delay; those with a
                        // negative order before it starts, a positive one after it.
                        order: 0,
                        timeout: None,
                        work: Work::Wait(Box::pin(async move {
                            match delay {
                                DrainDelay::UntilProbed { answers, max } => {
                                    tokio::select! {
                                        () = tokio::time::sleep(max) => {}
                                        () = health.wait_not_ready_answers(answers) => {}
                                    }
                                }
                                other => tokio::time::sleep(other.max()).await,
                            }
                        })),
                    });
                }
                budget.phase_limit(Phase::Announce)
            }
            Phase::Drain => {
                shared.in_flight.begin_drain();
                in_flight_at_drain_start = shared.in_flight.count();
                metrics::gauge!(crate::names::IN_FLIGHT_AT_DRAIN_START)
                    .set(in_flight_at_drain_start as f64);
                if in_flight_at_drain_start > 0 {
                    let in_flight = shared.in_flight;
                    entries.push(Entry {
                        name: Cow::Borrowed("in-flight work"),
                        kind: EntryKind::InFlight,
                        order: 0,
                        timeout: None,
                        work: Work::Wait(Box::pin(async move { in_flight.wait_idle().await })),
                    });
                }
                budget.drain_timeout
            }
            _ => budget.workers_timeout,
        };
        let deadline = (start + limit).min(pre_end);
        // Tasks learn about their phase (and its deadline) before anything in it is awaited.
        shared.start_phase(phase, deadline);
        let span = tracing::info_span!(target: "finale", parent: &shutdown_span, "finale.phase", phase = phase.as_str());
        let (outcome, reports) = run_phase(
            shared,
            phase,
            entries,
            deadline,
            OnEscalate::Abandon,
            task_aborts.get(&phase),
            &span,
        )
        .await;
        drop(span);
        escalated |= outcome == PhaseOutcome::Escalated || shared.escalated.is_cancelled();
        phases.push(PhaseReport {
            phase,
            outcome,
            duration: start.elapsed(),
            entries: reports,
        });
    }
    drop(shutdown_span);

    // Record everything known so far before the Telemetry phase flushes it.
    let before_telemetry = t0.elapsed();
    crate::names::record(&reason, &phases, in_flight_at_drain_start, before_telemetry);
    let cut = shared.take_cut();
    let mut report = ShutdownReport {
        status: ShutdownReport::classify(&reason, &phases, &cut, escalated),
        exit_code: 0,
        cut,
        reason,
        phases,
        in_flight_at_drain_start,
        requests_rejected: shared.requests_rejected(),
        requests_panicked: shared.in_flight.panicked(),
        escalated,
        total: before_telemetry,
    };
    report.exit_code = shared.exit_codes.code(report.status);
    tracing::info!(target: "finale", "{report}");

    // Telemetry: the reserved slot.
    let phase = Phase::Telemetry;
    let start = Instant::now();
    shared.set_state(State::ShuttingDown(phase));
    let deadline = if escalated {
        start + budget.escalation_budget
    } else {
        hard_end.max(start + budget.telemetry_reserve)
    };
    shared.start_phase(phase, deadline);
    let entries = std::mem::take(&mut by_phase[phase.index()]);
    let span = tracing::Span::none();
    let (outcome, reports) = run_phase(
        shared,
        phase,
        entries,
        deadline,
        OnEscalate::Shorten(budget.escalation_budget),
        task_aborts.get(&phase),
        &span,
    )
    .await;
    report.escalated |= shared.escalated.is_cancelled();
    report.phases.push(PhaseReport {
        phase,
        outcome,
        duration: start.elapsed(),
        entries: reports,
    });
    report.total = t0.elapsed();
    report.requests_rejected = shared.requests_rejected();
    report.requests_panicked = shared.in_flight.panicked();
    report.cut.extend(shared.take_cut());
    report.status = ShutdownReport::classify(
        &report.reason,
        &report.phases,
        &report.cut,
        report.escalated,
    );
    report.exit_code = shared.exit_codes.code(report.status);
    shared.set_state(State::Finished);
    report
}

fn abort_all(handles: Option<&Vec<AbortHandle>>) {
    for h in handles.into_iter().flatten() {
        h.abort();
    }
}

/// Runs one phase's entries, grouped by order, under one deadline.
async fn run_phase(
    shared: &Arc<Shared>,
    phase: Phase,
    mut entries: Vec<Entry>,
    mut deadline: Instant,
    on_escalate: OnEscalate,
    task_aborts: Option<&Vec<AbortHandle>>,
    span: &tracing::Span,
) -> (PhaseOutcome, Vec<HookReport>) {
    // Stable: registration order within a group, and in the report.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].order);
    let n = entries.len();
    let mut results: Vec<Option<(Outcome, Duration)>> = vec![None; n];
    let names: Vec<(Cow<'static, str>, EntryKind)> =
        entries.iter().map(|e| (e.name.clone(), e.kind)).collect();
    let mut works: Vec<Option<Entry>> = entries.drain(..).map(Some).collect();
    let mut outcome = PhaseOutcome::Completed;
    let mut escalation_seen = shared.escalated.is_cancelled();
    if escalation_seen && let OnEscalate::Shorten(d) = on_escalate {
        deadline = deadline.min(Instant::now() + d);
    }
    let mut ended_at: Vec<Option<Duration>> = vec![None; n];

    let mut i = 0;
    'groups: while i < n {
        let group_order = works[order[i]].as_ref().map_or(0, |e| e.order);
        let mut set: JoinSet<(usize, Outcome, Duration)> = JoinSet::new();
        let group_start = Instant::now();
        let mut group: Vec<usize> = Vec::new();
        while i < n && works[order[i]].as_ref().map_or(0, |e| e.order) == group_order {
            let idx = order[i];
            let entry = works[idx].take().expect("each entry runs once");
            spawn_entry(&mut set, idx, entry, phase, deadline, span);
            group.push(idx);
            i += 1;
        }
        loop {
            tokio::select! {
                biased;
                joined = set.join_next() => match joined {
                    None => break,
                    Some(Ok((idx, o, d))) => {
                        results[idx] = Some((o, d));
                    }
                    // Only aborted tasks fail to join: their outcome stays unknown = abandoned.
                    Some(Err(_)) => {}
                },
                () = sleep_until(deadline) => {
                    outcome = PhaseOutcome::DeadlineReached;
                    set.abort_all();
                    abort_all(task_aborts);
                    for &idx in &group {
                        ended_at[idx] = Some(group_start.elapsed());
                    }
                    break 'groups;
                }
                () = shared.escalated.cancelled(), if !escalation_seen => {
                    escalation_seen = true;
                    match on_escalate {
                        OnEscalate::Abandon => {
                            outcome = PhaseOutcome::Escalated;
                            set.abort_all();
                            abort_all(task_aborts);
                            for &idx in &group {
                                ended_at[idx] = Some(group_start.elapsed());
                            }
                            break 'groups;
                        }
                        OnEscalate::Shorten(d) => {
                            deadline = deadline.min(Instant::now() + d);
                        }
                    }
                }
            }
        }
    }
    // Entries of later groups that never started are abandoned too.
    let reports = names
        .into_iter()
        .enumerate()
        .map(|(idx, (name, kind))| {
            let (outcome, duration) = results[idx]
                .take()
                .unwrap_or((Outcome::Abandoned, ended_at[idx].unwrap_or_default()));
            if !outcome.is_completed() {
                tracing::warn!(target: "finale", phase = phase.as_str(), name = %name, %outcome, "did not complete");
            }
            HookReport {
                name,
                kind,
                outcome,
                duration,
            }
        })
        .collect();
    (outcome, reports)
}

fn spawn_entry(
    set: &mut JoinSet<(usize, Outcome, Duration)>,
    idx: usize,
    entry: Entry,
    phase: Phase,
    phase_deadline: Instant,
    span: &tracing::Span,
) {
    let start = Instant::now();
    let deadline = entry
        .timeout
        .map_or(phase_deadline, |t| (start + t).min(phase_deadline));
    let own_timeout = entry.timeout.is_some() && deadline < phase_deadline;
    let hook_span = tracing::info_span!(
        target: "finale",
        parent: span,
        "finale.hook",
        phase = phase.as_str(),
        name = %entry.name,
    );
    let mut abort_on_timeout = None;
    let fut: BoxFuture<Outcome> = match entry.work {
        Work::Hook(run) => {
            let ctx = HookContext { phase, deadline };
            let fut = CatchUnwind::new(run(ctx));
            Box::pin(async move {
                match fut.await {
                    Ok(Ok(())) => Outcome::Completed,
                    Ok(Err(e)) => Outcome::Failed(e),
                    Err(panic) => Outcome::Panicked(panic),
                }
            })
        }
        Work::Task(join) => {
            abort_on_timeout = Some(join.abort_handle());
            Box::pin(async move {
                match join.await {
                    Ok(Ok(Ok(()))) => Outcome::Completed,
                    Ok(Ok(Err(e))) => Outcome::Failed(e),
                    Ok(Err(panic)) => Outcome::Panicked(panic),
                    Err(_) => Outcome::Abandoned,
                }
            })
        }
        Work::Wait(fut) => Box::pin(async move {
            fut.await;
            Outcome::Completed
        }),
    };
    set.spawn(
        async move {
            let outcome = if own_timeout {
                match tokio::time::timeout_at(deadline, fut).await {
                    Ok(o) => o,
                    Err(_) => {
                        // The task itself does not stop because we stopped waiting for it.
                        if let Some(abort) = abort_on_timeout {
                            abort.abort();
                        }
                        Outcome::TimedOut
                    }
                }
            } else {
                fut.await
            };
            (idx, outcome, start.elapsed())
        }
        .instrument(hook_span),
    );
}
