//! The supervisor: a plain OS thread owned by finale, with a small tokio runtime of its own,
//! that holds the signals and the hard deadline whatever the user's runtime is doing.
//!
//! # What it does
//!
//! - **Signals.** The configured signals are received here, from [`Builder::build`] on: the
//!   first requests the shutdown (held until [`Finale::run`] is reached; the budget counts from
//!   the signal), the second escalates, the third ends the process at once, and a signal after
//!   the sequence finished ends the process with the report's code. None of this needs a thread
//!   of the user's runtime, so it holds when every worker thread is blocked.
//! - **The hard deadline.** Once the shutdown is requested, the supervisor watches the clock.
//!   If the Telemetry phase has not started [`GRACE`] after it should have (`t0 + total -
//!   reserve`, or the escalation), or the sequence has not finished [`GRACE`] after its end
//!   (`t0 + total`, or the escalation budget), the user's runtime is wedged: the supervisor logs
//!   why, runs the telemetry stages that can run without that runtime (each integration hands
//!   one over, see [`EmergencyStage`]) on threads of its own, and ends the process with the
//!   deadline-overrun code (forced, after a second signal). The stages get what is left of the
//!   Telemetry slot, or, when the slot itself was overrun, up to half the safety margin past
//!   the total: the process always exits by `t0 + total + safety_margin / 2` (a termination
//!   message that the file system does not take by then may add 10 ms). After a second
//!   signal the checkpoints move to the escalation: the Telemetry phase must start within
//!   `min(GRACE, escalation budget / 4)`, and a sequence still running [`GRACE`] after the
//!   escalation budget's end is ended at once, without a flush (the user asked to leave).
//! - **Dropped without running**, a `Finale`'s supervisor steps aside: its watchdog ends and it
//!   stops handling signals, so a later `Finale` of the process gets them. After its sequence
//!   finished, a signal ends the process with the report's code only if no other `Finale` of
//!   the process is still unfinished.
//!
//! # Invariants
//!
//! - The supervisor holds a [`Weak`] reference to the state and an [`Arc`] of [`Life`] only, so
//!   a `Finale` dropped without running (a test that builds many) ends the watchdog.
//! - Without signals the thread ends when the sequence finished or the state was dropped; with
//!   signals it lives as long as the process, so that signals keep working after `run()`.
//! - A takeover starts only with the end of the process claimed for the supervisor
//!   ([`Life::claim_end`]), before it logs, delivers, tells the platform or exits; the sequence
//!   claims it as `run()` ends. So a sequence that ends in the instant the watchdog decides
//!   either owns the end (the supervisor steps aside, as after any finished sequence) or finds
//!   it the supervisor's (its `run()` waits for the supervisor's exit, bounded, and the
//!   platform hears the supervisor's word last).
//!
//! [`Builder::build`]: crate::Builder::build
//! [`Finale::run`]: crate::Finale::run

use std::borrow::Cow;
use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tokio_mpsc;

use crate::config::{Budget, ConfigError};
use crate::phase::Phase;
use crate::report::names::{self, metric};
use crate::report::{ExitCodes, Reason, ShutdownStatus};
use crate::run::signals::Listener;
use crate::signal::Signal;
use crate::state::{EmergencyStage, EndOwner, Life, Shared};

/// How late the sequence may be at a checkpoint before the supervisor takes over: 250 ms, or a
/// quarter of the telemetry reserve if that is shorter. Long enough for a busy but healthy
/// runtime, short next to any platform's grace period.
pub(crate) const GRACE: Duration = Duration::from_millis(250);
/// The grace never drops below this, so a tiny reserve cannot make a healthy runtime look
/// wedged.
const MIN_GRACE: Duration = Duration::from_millis(10);

fn grace(budget: &Budget) -> Duration {
    GRACE.min(budget.telemetry_reserve / 4).max(MIN_GRACE)
}

/// Starts the supervisor thread and installs the signal handlers; returns once both are in place.
pub(crate) fn start(shared: &Arc<Shared>, signals: &[Signal]) -> Result<(), ConfigError> {
    let supervisor = Supervisor {
        shared: Arc::downgrade(shared),
        life: shared.life.clone(),
        budget: shared.budget,
        codes: shared.exit_codes,
        after_upgrade: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let signals = signals.to_vec();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("finale-supervisor".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(ConfigError::SupervisorThread { kind: e.kind() }));
                    return;
                }
            };
            runtime.block_on(async move {
                let (tx, rx) = tokio_mpsc::unbounded_channel();
                let mut listening = Vec::new();
                for signal in signals {
                    match Listener::new(signal) {
                        Ok(Some(mut listener)) => {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                while let Some(signal) = listener.recv().await {
                                    if tx.send(signal).is_err() {
                                        break;
                                    }
                                }
                            });
                            listening.push(signal.as_str());
                        }
                        Ok(None) => tracing::debug!(
                            target: "finale",
                            %signal,
                            "signal not supported on this platform"
                        ),
                        Err(e) => {
                            let _ = ready_tx.send(Err(ConfigError::SignalHandler {
                                signal,
                                kind: e.kind(),
                            }));
                            return;
                        }
                    }
                }
                drop(tx);
                if !listening.is_empty() {
                    tracing::info!(target: "finale", signals = %listening.join(", "), "listening for signals");
                }
                let _ = ready_tx.send(Ok(()));
                supervisor.run(rx, !listening.is_empty()).await;
            });
        })
        .map_err(|e| ConfigError::SupervisorThread { kind: e.kind() })?;
    ready_rx
        .recv()
        .unwrap_or(Err(ConfigError::SupervisorThread {
            kind: std::io::ErrorKind::Other,
        }))
}

#[derive(Clone)]
struct Supervisor {
    shared: Weak<Shared>,
    life: Arc<Life>,
    budget: Budget,
    codes: ExitCodes,
    /// A signal arrived after a hand-off had requested the shutdown (that one does not
    /// escalate; the next does).
    after_upgrade: Arc<std::sync::atomic::AtomicBool>,
}

/// Where the sequence was stuck when the supervisor took over.
#[derive(Clone, Copy)]
enum Stuck {
    BeforeTelemetry,
    InTelemetry,
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stuck::BeforeTelemetry => "the Telemetry phase did not start in time",
            Stuck::InTelemetry => "the sequence did not end by its deadline",
        })
    }
}

impl Supervisor {
    async fn run(self, mut signals: tokio_mpsc::UnboundedReceiver<Signal>, listening: bool) {
        let watchdog = tokio::spawn(self.clone().watchdog());
        if !listening {
            let _ = watchdog.await;
            return;
        }
        let mut watch_dropped = true;
        loop {
            tokio::select! {
                biased;
                signal = signals.recv() => match signal {
                    Some(signal) => self.on_signal(signal),
                    None => return,
                },
                () = self.life.dropped.cancelled(), if watch_dropped => {
                    if !self.life.finished.is_cancelled() {
                        // A `Finale` dropped without running steps aside: its signals are no
                        // longer its to handle (another `Finale` may listen for them).
                        return;
                    }
                    // Finished, then its state went: keep ending the process on a signal.
                    watch_dropped = false;
                }
            }
        }
    }

    /// First signal: shutdown. A signal while shutting down: escalate. Another: exit at once.
    /// The upgrade signal starts an upgrade instead.
    fn on_signal(&self, signal: Signal) {
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(shared) = self.shared.upgrade()
            && let Some(handover) = &shared.upgrade
            && handover.signal() == Some(signal)
        {
            // On the supervisor's own runtime: the upgrade needs nothing of the user's.
            tokio::spawn(handover.start(&shared));
            return;
        }
        if self.life.finished.is_cancelled() {
            if Life::others_unfinished() {
                // Another `Finale` of this process is alive and has not finished: the signal is
                // its (its own supervisor receives it too).
                return;
            }
            let code = self.life.exit_code();
            tracing::warn!(
                target: "finale",
                %signal,
                code,
                "signal after the shutdown finished: exiting with the report's code"
            );
            std::process::exit(code);
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if shared.request(Reason::Signal(signal)) {
            return;
        }
        // A hand-off requested the shutdown, not a signal: the first signal after it (systemd
        // stopping a draining old process) is the first, not a second that cuts what is still
        // in flight here. The drain goes on; another signal escalates.
        if matches!(shared.reason(), Some(Reason::Upgrade { .. }))
            && !self
                .after_upgrade
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::warn!(
                target: "finale",
                %signal,
                "signal while draining after the hand-off: the drain goes on; send another to abandon it"
            );
            return;
        }
        if shared.escalate() {
            tracing::warn!(
                target: "finale",
                %signal,
                "second signal: abandoning the drain, flushing telemetry; send another to exit at once"
            );
            return;
        }
        let immediate = self.codes.code(ShutdownStatus::Immediate);
        tracing::error!(target: "finale", %signal, code = immediate, "third signal: exiting at once");
        std::process::exit(immediate);
    }

    /// Watches the budget of a requested shutdown; takes over if the sequence misses a
    /// checkpoint.
    async fn watchdog(self) {
        tokio::select! {
            () = self.life.requested.cancelled() => {}
            () = self.life.finished.cancelled() => return,
            () = self.life.dropped.cancelled() => return,
        }
        let Some(t0) = self.life.trigger() else {
            return;
        };
        let b = self.budget;
        let hard_end = t0 + b.total;
        // The process's last moment: half the safety margin past the total.
        let last = hard_end + b.safety_margin / 2;
        let grace = grace(&b);
        let telemetry = self.life.phase_started[Phase::Telemetry.index()].clone();
        loop {
            let escalated_at = self.life.escalated_at();
            // When the Telemetry phase must have started, when the sequence must have ended,
            // and what the supervisor's own flush may use if it takes over there.
            let (telemetry_by, start_grace, end_by) = match escalated_at {
                // After a second signal the sequence jumps to Telemetry at once; a wedged one is
                // taken over early enough to leave the stages most of the escalation budget.
                Some(te) => (
                    te,
                    grace.min(b.escalation_budget / 4),
                    (te + b.escalation_budget).min(hard_end),
                ),
                None => (hard_end - b.telemetry_reserve, grace, hard_end),
            };
            // Never later than the process's last moment, whatever the settings.
            let end_check = (end_by + grace).min(last.max(end_by));
            tokio::select! {
                biased;
                () = self.life.finished.cancelled() => return,
                () = self.life.dropped.cancelled() => return,
                () = self.life.escalated.cancelled(), if escalated_at.is_none() => continue,
                () = sleep_until(telemetry_by + start_grace), if !telemetry.is_cancelled() => {
                    if telemetry.is_cancelled() || self.life.finished.is_cancelled() {
                        continue;
                    }
                    self.take_over(Stuck::BeforeTelemetry, t0, end_by).await;
                    // Back only if the sequence ended first: it has the last word.
                    return;
                }
                () = sleep_until(end_check) => {
                    if self.life.finished.is_cancelled() {
                        return;
                    }
                    // After a second signal the user wants out: no flush past the escalation.
                    let deadline = if escalated_at.is_some() { Instant::now() } else { last };
                    self.take_over(Stuck::InTelemetry, t0, deadline).await;
                    return;
                }
            }
        }
    }

    /// Delivers what the telemetry stages can deliver by `deadline`, then ends the process.
    /// Returns, having done nothing, only if the sequence claimed the end first.
    async fn take_over(&self, stuck: Stuck, t0: Instant, deadline: Instant) {
        // The one decision both sides take before either says anything final or exits: the
        // `finished` check above can pass in the instant the sequence ends, but only one of the
        // two claims succeeds. Lost: the sequence's report is the last word, its `run()`
        // returns it, and the process exits with its code; the supervisor steps aside as after
        // any finished sequence.
        if !self.life.claim_end(EndOwner::Supervisor) {
            tracing::debug!(
                target: "finale",
                "{stuck}, but the sequence ended first: it has the last word, no takeover"
            );
            return;
        }
        let status = if self.life.escalated.is_cancelled() {
            ShutdownStatus::Forced
        } else {
            ShutdownStatus::DeadlineOverrun
        };
        let code = self.codes.code(status);
        let (state, stages) = match self.shared.upgrade() {
            Some(shared) => (Some(shared.state()), shared.take_emergency()),
            None => (None, Vec::new()),
        };
        tracing::error!(
            target: "finale",
            ?state,
            elapsed = ?t0.elapsed(),
            budget = ?self.budget.total,
            code,
            stages = stages.len(),
            "{stuck}: the shutdown overran its budget (a thread of the runtime is blocked?); \
             the supervisor delivers the telemetry it can reach, then exits"
        );
        let shared = self.shared.upgrade();
        let sinks = shared.as_ref().map(|s| s.recorders()).unwrap_or_default();
        names::add(&sinks, &metric::SUPERVISOR_TAKEOVERS, &[], 1);
        // Each stage's outcome is logged by `deliver` as its group ends, so the outcomes of the
        // stages before the log writer reach the log file it releases last.
        let results = tokio::task::spawn_blocking(move || deliver(stages, deadline))
            .await
            .unwrap_or_default();
        // After the delivery, so that the platform hears which stages delivered.
        if let Some(shared) = shared {
            shared.observe(|o| o.took_over(&shared, &stuck.to_string(), code, &results));
        }
        std::process::exit(code)
    }
}

async fn sleep_until(at: Instant) {
    // The supervisor's runtime is never paused: its clock is the std clock.
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
}

/// Runs the stages on threads of their own, lower orders first, each group within its share of
/// what is left before `deadline`; blocks until all are done or the deadline passed. Logs each
/// stage's outcome when its group ends, before the next group starts: the log writer's stage
/// comes last, so the outcomes of the others are in the file it releases.
pub(crate) fn deliver(
    mut stages: Vec<EmergencyStage>,
    deadline: Instant,
) -> Vec<(Cow<'static, str>, Result<(), String>)> {
    stages.sort_by_key(|s| s.order);
    let mut results = Vec::with_capacity(stages.len());
    let mut logged = 0;
    let mut stages = stages.into_iter().peekable();
    while let Some(first) = stages.next() {
        let order = first.order;
        let mut group = vec![first];
        while let Some(next) = stages.next_if(|s| s.order == order) {
            group.push(next);
        }
        let now = Instant::now();
        // Stages of one order share one share (each integration registers its order's).
        let share = group[0].share;
        let group_deadline = now + share.usable(deadline.saturating_duration_since(now));
        let (tx, rx) = mpsc::channel();
        let mut pending = Vec::new();
        for stage in group {
            let tx = tx.clone();
            let EmergencyStage { name, run, .. } = stage;
            let sent = name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("finale-{name}"))
                .spawn(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(group_deadline)
                    }))
                    .unwrap_or_else(|p| Err(crate::hook::panic_message(&*p)));
                    let _ = tx.send((sent, result));
                });
            match spawned {
                Ok(_) => pending.push(name),
                Err(e) => results.push((name, Err(format!("no thread: {e}")))),
            }
        }
        drop(tx);
        while !pending.is_empty() {
            match rx.recv_timeout(group_deadline.saturating_duration_since(Instant::now())) {
                Ok((name, result)) => {
                    pending.retain(|n| *n != name);
                    results.push((name, result));
                }
                Err(_) => break,
            }
        }
        for name in pending {
            results.push((name, Err("not done by the deadline".to_owned())));
        }
        for (name, result) in &results[logged..] {
            match result {
                Ok(()) => {
                    tracing::info!(target: "finale", stage = %name, "delivered by the supervisor")
                }
                Err(error) => {
                    tracing::error!(target: "finale", stage = %name, %error, "not delivered by the supervisor")
                }
            }
        }
        logged = results.len();
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::termination_log::TerminationLog;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The watchdog decided to take over in the instant the sequence ended and claimed the end:
    /// the takeover does nothing (no stage runs, no termination message, no exit: an exit would
    /// end this test's process) and returns.
    #[tokio::test(flavor = "current_thread")]
    async fn a_takeover_after_the_sequence_claimed_the_end_does_nothing() {
        let path =
            std::env::temp_dir().join(format!("finale-takeover-lost-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .termination_log(TerminationLog::Path(path.clone()))
            .build()
            .unwrap();
        let shared = finale.shared.clone();
        let ran = Arc::new(AtomicBool::new(false));
        let stage_ran = ran.clone();
        shared.add_emergency(EmergencyStage {
            name: Cow::Borrowed("stage"),
            order: 0,
            share: crate::slot::Share::ALL,
            run: Box::new(move |_| {
                stage_ran.store(true, Ordering::SeqCst);
                Ok(())
            }),
        });
        finale.handle().trigger("test");
        assert!(shared.life.claim_end(EndOwner::Sequence));
        let supervisor = Supervisor {
            shared: Arc::downgrade(&shared),
            life: shared.life.clone(),
            budget: shared.budget,
            codes: shared.exit_codes,
            after_upgrade: Arc::default(),
        };
        supervisor
            .take_over(Stuck::InTelemetry, Instant::now(), Instant::now())
            .await;
        assert!(!ran.load(Ordering::SeqCst), "a stage ran");
        assert_eq!(shared.take_emergency().len(), 1, "the stages were taken");
        assert!(!path.exists(), "the supervisor wrote a termination message");
        assert_eq!(shared.life.end_owner(), Some(EndOwner::Sequence));
    }
}
