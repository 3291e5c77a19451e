//! One upgrade from its trigger to its end, on its own thread: the checks, the successor
//! started and waited for, then the hand-off completed (the platform told, counted, logged,
//! the shutdown requested) or the failure counted; settled however the thread ends. Also the
//! upgrade's door on the [`Handle`] and the core's view of it ([`Handover`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::Handle;
use crate::report::Reason;
use crate::signal::Signal;
use crate::state::{Handover, HandoverFuture, Shared, lock};

use super::error::{UpgradeError, Upgraded};
use super::state::{UpgradeState, state};
use super::successor::{isolated, spawn_and_wait};

impl Handle {
    /// Starts an upgrade, as the upgrade signal does, and waits for its end: the successor
    /// ready (this process is then shutting down, [`Reason::Upgrade`](crate::Reason::Upgrade)),
    /// or an [`UpgradeError`](UpgradeError) and this process goes on serving.
    /// See [`finale::upgrade`](super).
    ///
    /// # Errors
    ///
    /// [`NotEnabled`](UpgradeError::NotEnabled) without
    /// [`Builder::upgrade`](crate::Builder::upgrade), [`InProgress`](UpgradeError::InProgress),
    /// [`ShuttingDown`](UpgradeError::ShuttingDown), or how the successor
    /// failed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future (a caller's timeout, say), or the runtime that polls it, does not
    /// stop the upgrade: it runs to its end on its own thread (the successor started, waited
    /// for, and handed the service or stopped), as one started by the upgrade signal does.
    /// Only its result is lost; the log and the report still tell it.
    #[cfg_attr(docsrs, doc(cfg(feature = "upgrade")))]
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        run(&self.shared).await
    }
}

impl Handover for UpgradeState {
    fn take_failed(&self) -> Vec<String> {
        UpgradeState::take_failed(self)
    }

    fn succeeded(&self) -> bool {
        UpgradeState::succeeded(self)
    }

    fn handed_off(&self) -> bool {
        UpgradeState::handed_off(self)
    }

    fn signal(&self) -> Option<Signal> {
        UpgradeState::signal(self)
    }

    fn start(&self, shared: &Arc<Shared>) -> HandoverFuture {
        let shared = shared.clone();
        Box::pin(async move {
            let _ = run(&shared).await;
        })
    }

    fn completing(self: Arc<Self>) -> Option<HandoverFuture> {
        // `idle` goes back to `true` once the upgrade has told the platform and counted the
        // hand-over (`upgrade_here`).
        if *self.idle.borrow() {
            return None;
        }
        Some(Box::pin(async move {
            let mut idle = self.idle.subscribe();
            let _ = idle.wait_for(|idle| *idle).await;
        }))
    }

    fn abandon(self: Arc<Self>, patience: Duration) -> Option<HandoverFuture> {
        if !self.in_progress() {
            return None;
        }
        Some(Box::pin(async move {
            tokio::select! {
                () = self.settled() => {}
                () = tokio::time::sleep(patience) => {
                    self.kill_successor();
                    self.settled().await;
                }
            }
        }))
    }
}

/// Runs one upgrade; see the [module docs](super). Everything from the successor's start to
/// the hand-off's completion (the platform told, the shutdown requested) or the successor's
/// stop runs on the upgrade's own thread: dropping this future, or the runtime that polls it,
/// leaves nothing half done; only the answer is lost.
pub(crate) async fn run(shared: &Arc<Shared>) -> Result<Upgraded, UpgradeError> {
    let state = begin(shared).map_err(|e| ended(shared, e))?;
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let on_thread = (shared.clone(), state.clone());
    let thread = std::thread::Builder::new()
        .name("finale-upgrade".to_owned())
        .spawn(move || {
            let (shared, state) = on_thread;
            let _ = tx.send(upgrade_here(&shared, &state));
        });
    match thread {
        Ok(_) => rx.await.unwrap_or_else(|_| {
            // The thread panicked (a metrics recorder or a log layer of the user's, say).
            match shared.life.handover_pid() {
                // After the hand-off won: its drop guard requested the shutdown.
                Some(successor_pid) => Ok(Upgraded {
                    successor_pid,
                    ready_after: started.elapsed(),
                }),
                None => {
                    // Not counted here: the panic may have come from counting it there.
                    let e = UpgradeError::Spawn {
                        program: state.program.clone().unwrap_or_default(),
                        error: "the upgrade thread panicked".to_owned(),
                    };
                    lock(&state.failed).push(e.to_string());
                    tracing::error!(target: "finale", error = %e, "upgrade failed; still serving");
                    Err(e)
                }
            }
        }),
        Err(e) => {
            state.end();
            Err(ended(
                shared,
                UpgradeError::Spawn {
                    program: PathBuf::new(),
                    error: format!("no thread for the upgrade: {e}"),
                },
            ))
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Run by `begin` between its check for a shutdown and its mark (tests only).
    pub(super) static BETWEEN_CHECK_AND_MARK: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// The checks before an upgrade starts; marks it under way.
pub(super) fn begin(shared: &Shared) -> Result<Arc<UpgradeState>, UpgradeError> {
    let Some(state) = state(shared) else {
        return Err(UpgradeError::NotEnabled);
    };
    if shared.reason().is_some() {
        return Err(UpgradeError::ShuttingDown);
    }
    #[cfg(test)]
    if let Some(hook) = BETWEEN_CHECK_AND_MARK.take() {
        hook();
    }
    if !state.begin() {
        return Err(UpgradeError::InProgress);
    }
    // Again, now that it is marked: a shutdown requested since the check above found no upgrade
    // under way (the Announce phase would neither wait for this one nor stop its successor).
    // One requested after this look sees it marked.
    if shared.reason().is_some() {
        state.end();
        return Err(UpgradeError::ShuttingDown);
    }
    Ok(state)
}

/// An upgrade that did not happen: counted, logged, and listed in the report if it failed.
fn ended(shared: &Shared, e: UpgradeError) -> UpgradeError {
    crate::names::add(
        &shared.recorders(),
        &crate::names::metric::UPGRADES_TOTAL,
        &[("outcome", e.outcome())],
        1,
    );
    match e {
        UpgradeError::Aborted { .. } => {
            tracing::warn!(target: "finale", error = %e, "upgrade abandoned");
        }
        _ => tracing::error!(target: "finale", error = %e, "upgrade failed; still serving"),
    }
    if let Some(state) = state(shared)
        && !matches!(
            e,
            UpgradeError::NotEnabled
                | UpgradeError::InProgress
                | UpgradeError::ShuttingDown
                | UpgradeError::Aborted { .. }
        )
    {
        lock(&state.failed).push(e.to_string());
    }
    e
}

/// Marks the upgrade settled as its thread ends, however it ends (a panic in a metrics
/// recorder or a log layer included): the Announce phase's wait for it never outlasts it. A
/// panic after the hand-off won still requests the shutdown (the successor serves; this
/// process must not go on serving beside it, refusing every later upgrade).
struct Settled<'a> {
    shared: &'a Shared,
    state: &'a UpgradeState,
}

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        let Self { shared, state } = *self;
        if let Some(successor_pid) = shared.life.handover_pid() {
            state.handed_off.store(true, Ordering::Release);
            if std::thread::panicking() && shared.reason().is_none() {
                tracing::error!(target: "finale", successor_pid, "the upgrade thread panicked after the hand-off won: shutting down");
                shared.request(Reason::Upgrade { successor_pid });
            }
        } else {
            if std::thread::panicking() {
                // A successor started and not yet waited for: it is not to serve.
                state.kill_successor();
            }
            // The sockets are this process's alone again.
            state.sharing.store(false, Ordering::Release);
            state.end();
            return;
        }
        state.idle.send_replace(true);
    }
}

/// The upgrade, on its own thread: the successor started and waited for (spawning and waiting
/// block), then the hand-off completed, or the successor stopped.
fn upgrade_here(shared: &Arc<Shared>, state: &UpgradeState) -> Result<Upgraded, UpgradeError> {
    let _settled = Settled { shared, state };
    let started = Instant::now();
    let pid = spawn_and_wait(state, &shared.life).map_err(|e| ended(shared, e))?;
    // From here the sockets are the successor's: the servers must leave them as they are.
    state.handed_off.store(true, Ordering::Release);
    let upgraded = Upgraded {
        successor_pid: pid,
        ready_after: started.elapsed(),
    };
    // The platform is told first (systemd's `MAINPID=`), before the steps that run the user's
    // recorders or log layers: one that blocks must not hold it back (the Announce phase waits
    // for the hand-off only so long). Each step runs isolated from a panic in the step before it
    // (systemd must hear `MAINPID=`, the shutdown must be requested). Counted and logged before
    // the shutdown is requested: a process with nothing to drain may be gone soon after.
    isolated(|| shared.observe(|o| o.handed_over(shared, pid)));
    isolated(|| {
        crate::names::add(
            &shared.recorders(),
            &crate::names::metric::UPGRADES_TOTAL,
            &[("outcome", "ready")],
            1,
        );
    });
    isolated(|| {
        tracing::info!(
            target: "finale",
            successor_pid = pid,
            ready_after = ?upgraded.ready_after,
            "upgrade: the successor is ready; shutting down"
        );
    });
    state.idle.send_replace(true);
    // A signal requested after the hand-off won requested it already, as the hand-off's.
    isolated(|| {
        shared.request(Reason::Upgrade { successor_pid: pid });
    });
    Ok(upgraded)
}
