//! Graceful start: every service ready, or the start fails.

use std::borrow::Cow;
use std::sync::Arc;

use crate::hook::HookError;
use crate::report::Reason;
use crate::state::{RunningTask, Shared, State};

/// Waits until every service is ready, the start fails, or the shutdown is requested, bounded
/// by the startup timeout. Readiness turns on only if the start completed before any request.
pub(crate) async fn graceful_start(shared: &Arc<Shared>, tasks: &[RunningTask]) {
    let all_ready = async {
        for task in tasks.iter().filter(|t| t.needs_ready) {
            task.ready.cancelled().await;
        }
    };
    let timeout = shared.budget.startup_timeout;
    tokio::select! {
        () = all_ready => {}
        () = shared.life.requested.cancelled() => return,
        () = tokio::time::sleep(timeout) => {
            let pending: Vec<&str> = tasks
                .iter()
                .filter(|t| t.needs_ready && !t.ready.is_cancelled())
                .map(|t| &*t.name)
                .collect();
            shared.request(Reason::StartupFailed {
                error: HookError::msg(format!("not ready within the startup timeout of {timeout:?}")),
                name: Cow::Owned(pending.join(", ")),
            });
            return;
        }
    }
    if !shared.is_requested() {
        shared.health.set_started();
        shared.set_state(State::Running);
        tracing::info!(target: "finale", "started: ready");
        shared.observe(|o| o.started(shared));
    }
}
