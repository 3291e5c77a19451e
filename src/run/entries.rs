//! One phase's entries (hooks, tasks and finale's own waits), run in order groups under one
//! deadline.
//!
//! # Invariants
//!
//! - Each entry is one record from start to report: its work is taken when its group starts,
//!   its outcome is set when it ends; an entry the phase gave up on (deadline, second signal)
//!   is [`Outcome::Abandoned`], and a task among them is aborted, since it does not stop
//!   because we stopped waiting.
//! - An entry that completes after its deadline (it blocked its thread past it, so nothing
//!   could abandon it in time) is [`Outcome::Overran`], and its phase
//!   [`PhaseOutcome::DeadlineReached`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::hook::{BoxFuture, CatchUnwind, Hook, HookContext, WorkFn};
use crate::phase::Phase;
use crate::report::{EntryKind, EntryReport, Outcome, PhaseOutcome};
use crate::state::{RunningTask, Shared, TaskResult};

/// One thing a phase waits for.
pub(crate) struct Entry {
    name: Cow<'static, str>,
    kind: EntryKind,
    /// Runs after the phase's tasks have ended (a Workers hook, unless
    /// [`Hook::alongside_tasks`]): sorts before `order`. Tasks themselves are in no group.
    after_tasks: bool,
    order: i32,
    timeout: Option<Duration>,
    work: Option<Work>,
    /// A task runs on its own: stop it when the phase gives up on it.
    abort: Option<AbortHandle>,
    started: Option<Instant>,
    ended: Option<(Outcome, Duration)>,
}

enum Work {
    Hook(WorkFn<HookContext>),
    Task(JoinHandle<TaskResult>),
    Wait(BoxFuture<()>),
}

impl Entry {
    pub(crate) fn hook(hook: Hook) -> Self {
        let after_tasks = hook.phase == Phase::Workers && !hook.alongside_tasks;
        let mut entry = Self::new(
            hook.name,
            EntryKind::Hook,
            hook.order,
            hook.timeout,
            Work::Hook(hook.run),
        );
        entry.after_tasks = after_tasks;
        entry
    }

    pub(crate) fn task(task: RunningTask) -> Self {
        let abort = task.join.abort_handle();
        let mut entry = Self::new(
            task.name,
            EntryKind::Task,
            0,
            task.timeout,
            Work::Task(task.join),
        );
        entry.abort = Some(abort);
        entry
    }

    /// One of finale's own waits (the drain delay, in-flight work).
    pub(crate) fn wait(
        name: &'static str,
        kind: EntryKind,
        order: i32,
        fut: BoxFuture<()>,
    ) -> Self {
        Self::new(Cow::Borrowed(name), kind, order, None, Work::Wait(fut))
    }

    fn new(
        name: Cow<'static, str>,
        kind: EntryKind,
        order: i32,
        timeout: Option<Duration>,
        work: Work,
    ) -> Self {
        Self {
            name,
            kind,
            after_tasks: false,
            order,
            timeout,
            work: Some(work),
            abort: None,
            started: None,
            ended: None,
        }
    }

    /// The phase gave up on it: abort it if it runs on its own, and record it as abandoned.
    fn abandon(&mut self) {
        if self.ended.is_some() {
            return;
        }
        if let Some(abort) = &self.abort {
            abort.abort();
        }
        let ran = self.started.map(|s| s.elapsed()).unwrap_or_default();
        self.ended = Some((Outcome::Abandoned, ran));
    }

    /// The report of an entry whose phase never ran (a second signal skipped it).
    pub(crate) fn skipped(mut self) -> EntryReport {
        self.abandon();
        self.report(None)
    }

    fn report(self, phase: Option<Phase>) -> EntryReport {
        let (outcome, duration) = self.ended.unwrap_or((Outcome::Abandoned, Duration::ZERO));
        if let Some(phase) = phase
            && !outcome.is_completed()
        {
            tracing::warn!(target: "finale", phase = phase.as_str(), name = %self.name, %outcome, "did not complete");
        }
        EntryReport {
            name: self.name,
            kind: self.kind,
            outcome,
            duration,
        }
    }
}

/// What a second signal does to a running phase.
#[derive(Clone, Copy)]
pub(crate) enum OnEscalate {
    /// Give up on the phase (Announce, Drain, Workers).
    Abandon,
    /// Shorten its deadline to this much from the escalation (Telemetry).
    Shorten(Duration),
}

/// How a phase went.
pub(crate) struct PhaseRun {
    pub(crate) outcome: PhaseOutcome,
    pub(crate) entries: Vec<EntryReport>,
}

/// One step of a phase: an order group of hooks and waits, or the wait for the phase's tasks.
#[derive(Clone, Copy)]
enum Step<'a> {
    Group(&'a [(Key, usize)]),
    Tasks,
}

/// Sorts a phase's hooks and waits: those that run alongside the tasks before those that run
/// after them, then by order.
type Key = (bool, i32);

/// Runs `entries` until they are done, `deadline` passes or a second signal says otherwise.
///
/// The phase's tasks were told to stop when it started, and are awaited from its start; its
/// hooks and finale's own waits run grouped by order (each group concurrently, the groups in
/// sequence), alongside the tasks. Hooks that run after the tasks (the Workers phase's, by
/// default) form groups of their own once the tasks have ended, and the others' groups too.
/// The report lists the tasks first (registration order), then the hooks and waits in the
/// order their groups ran (registration order within a group, finale's own waits last).
pub(crate) async fn run_phase(
    shared: &Arc<Shared>,
    phase: Phase,
    mut entries: Vec<Entry>,
    mut deadline: Instant,
    on_escalate: OnEscalate,
    span: &tracing::Span,
) -> PhaseRun {
    let mut escalation_seen = shared.is_escalated();
    let mut outcome = PhaseOutcome::Completed;
    if escalation_seen {
        match on_escalate {
            // Escalated between the sequence's check and here: give up on the phase now.
            OnEscalate::Abandon => outcome = PhaseOutcome::Escalated,
            OnEscalate::Shorten(d) => deadline = deadline.min(Instant::now() + d),
        }
    }
    let is_task = |e: &Entry| e.kind == EntryKind::Task;
    let task_idx: Vec<usize> = (0..entries.len())
        .filter(|&i| is_task(&entries[i]))
        .collect();
    // Stable: registration order within a group, and in the report.
    let mut order: Vec<(Key, usize)> = (0..entries.len())
        .filter(|&i| !is_task(&entries[i]))
        .map(|i| ((entries[i].after_tasks, entries[i].order), i))
        .collect();
    order.sort_by_key(|&(key, _)| key);
    let (alongside, after) = order.split_at(order.partition_point(|&((after, _), _)| !after));
    let same_group = |a: &(Key, usize), b: &(Key, usize)| a.0 == b.0;
    let steps: Vec<Step<'_>> = if outcome == PhaseOutcome::Completed {
        alongside
            .chunk_by(same_group)
            .map(Step::Group)
            .chain([Step::Tasks])
            .chain(after.chunk_by(same_group).map(Step::Group))
            .collect()
    } else {
        Vec::new()
    };
    // Dropping a set (when the phase gives up) aborts what still runs in it.
    let mut tasks = JoinSet::new();
    if !steps.is_empty() {
        for &idx in &task_idx {
            start_entry(&mut tasks, idx, &mut entries[idx], phase, deadline, span);
        }
    }
    'steps: for step in steps {
        let mut set = JoinSet::new();
        if let Step::Group(group) = step {
            for &(_, idx) in group {
                start_entry(&mut set, idx, &mut entries[idx], phase, deadline, span);
            }
        }
        loop {
            let done = match step {
                Step::Group(_) => set.is_empty(),
                Step::Tasks => tasks.is_empty(),
            };
            if done {
                break;
            }
            tokio::select! {
                biased;
                // Only aborted wrappers fail to join; their entry is abandoned below.
                Some(joined) = set.join_next(), if !set.is_empty() => {
                    if let Ok((idx, ended)) = joined {
                        entries[idx].ended = Some(ended);
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((idx, ended)) = joined {
                        entries[idx].ended = Some(ended);
                    }
                }
                () = sleep_until(deadline) => {
                    outcome = PhaseOutcome::DeadlineReached;
                    break 'steps;
                }
                () = shared.life.escalated.cancelled(), if !escalation_seen => {
                    escalation_seen = true;
                    match on_escalate {
                        OnEscalate::Abandon => {
                            outcome = PhaseOutcome::Escalated;
                            break 'steps;
                        }
                        OnEscalate::Shorten(d) => deadline = deadline.min(Instant::now() + d),
                    }
                }
            }
        }
    }
    drop(tasks);
    // Entries still running, and those of later groups that never started, are abandoned.
    for entry in &mut entries {
        entry.abandon();
    }
    if outcome == PhaseOutcome::Completed
        && entries
            .iter()
            .any(|e| matches!(e.ended, Some((Outcome::Overran, _))))
    {
        outcome = PhaseOutcome::DeadlineReached;
    }
    // The tasks, then the groups in the order they ran.
    let mut entries: Vec<Option<Entry>> = entries.into_iter().map(Some).collect();
    let entries = task_idx
        .iter()
        .chain(order.iter().map(|(_, idx)| idx))
        .filter_map(|&idx| entries[idx].take())
        .map(|e| e.report(Some(phase)))
        .collect();
    PhaseRun { outcome, entries }
}

fn start_entry(
    set: &mut JoinSet<(usize, (Outcome, Duration))>,
    idx: usize,
    entry: &mut Entry,
    phase: Phase,
    phase_deadline: Instant,
    span: &tracing::Span,
) {
    let start = Instant::now();
    entry.started = Some(start);
    let deadline = entry
        .timeout
        .map_or(phase_deadline, |t| (start + t).min(phase_deadline));
    let own_timeout = entry.timeout.is_some() && deadline < phase_deadline;
    let abort = entry.abort.clone();
    let hook_span = tracing::info_span!(
        target: "finale",
        parent: span,
        "finale.hook",
        phase = phase.as_str(),
        name = %entry.name,
    );
    let fut: BoxFuture<Outcome> = match entry.work.take().expect("each entry starts once") {
        Work::Hook(run) => {
            let fut = CatchUnwind::new(run(HookContext { phase, deadline }));
            Box::pin(async move {
                match fut.await {
                    Ok(Ok(())) => Outcome::Completed,
                    Ok(Err(e)) => Outcome::Failed(e),
                    Err(panic) => Outcome::Panicked(panic),
                }
            })
        }
        Work::Task(join) => Box::pin(async move {
            match join.await {
                Ok(Ok(Ok(()))) => Outcome::Completed,
                Ok(Ok(Err(e))) => Outcome::Failed(e),
                Ok(Err(panic)) => Outcome::Panicked(panic),
                Err(_) => Outcome::Abandoned,
            }
        }),
        Work::Wait(fut) => Box::pin(async move {
            fut.await;
            Outcome::Completed
        }),
    };
    set.spawn(
        async move {
            let outcome = if own_timeout {
                match tokio::time::timeout_at(deadline, fut).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        // A task does not stop because we stopped waiting for it.
                        if let Some(abort) = abort {
                            abort.abort();
                        }
                        Outcome::TimedOut
                    }
                }
            } else {
                fut.await
            };
            // Completed, but only after its deadline: it blocked its thread past it.
            let outcome = if outcome.is_completed() && Instant::now() > deadline {
                Outcome::Overran
            } else {
                outcome
            };
            (idx, (outcome, start.elapsed()))
        }
        .instrument(hook_span),
    );
}
