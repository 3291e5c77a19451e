//! What the sequence needs from the user's tokio runtime, checked before it relies on it.
//!
//! The sequence bounds every phase with tokio timers, so the runtime must have the time driver
//! (`enable_time`, or `enable_all`; `#[tokio::main]` has it). It does not need the IO driver:
//! signals are received on finale's own supervisor thread. (The servers need it, as any tokio
//! socket does.)

use std::cell::Cell;
use std::time::Duration;

use crate::hook::HookError;

thread_local! {
    /// Set while this thread probes for the time driver, so that finale's own panic hook (if
    /// installed) does not take the probe's panic for a real one.
    static PROBING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic on this thread is finale's own probe.
pub(crate) fn is_probing() -> bool {
    PROBING.with(Cell::get)
}

/// Checks that the current runtime has the time driver.
///
/// tokio offers no way to ask, and creating a timer without the driver panics; so the probe
/// creates one under `catch_unwind`. On a runtime that lacks the driver the process's panic hook
/// runs once (the default hook prints tokio's message); finale then reports a typed startup
/// failure instead of unwinding through `run()`. (With `panic = "abort"` there is no unwinding
/// to catch: on such a runtime the probe aborts the process.)
pub(crate) fn check() -> Result<(), HookError> {
    PROBING.with(|p| p.set(true));
    let probe = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)));
    PROBING.with(|p| p.set(false));
    probe.map_err(|_| {
        HookError::msg(
            "the tokio runtime has no time driver: build it with enable_time() or enable_all() \
             (#[tokio::main] does)",
        )
    })
}
