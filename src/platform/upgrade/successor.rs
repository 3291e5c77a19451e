//! Starting the successor and waiting for it: the listening sockets passed as systemd passes
//! them, its `READY=1` read (bounded, against a shutdown's request), and a successor that will
//! not take over stopped.

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use crate::platform::PARENT_ENV;
use crate::state::{Life, lock};

use super::error::UpgradeError;
use super::ready::{GENERATION_ENV, READY_LINE, READY_NAME, generation};
use super::state::UpgradeState;

/// How long a successor that is stopped (not ready in time, or the shutdown started) has to
/// end after its SIGTERM before it is killed: 10 seconds.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

impl UpgradeState {
    /// SIGKILL to a successor that does not stop in time (the upgrade thread reaps it).
    pub(crate) fn kill_successor(&self) {
        let pid = self.successor.load(Ordering::Acquire);
        if pid != 0 {
            tracing::warn!(target: "finale", successor_pid = pid, "the successor did not stop in time: killed");
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs `step`; a panic in it (a user's recorder or log layer) ends the step, not the thread.
pub(super) fn isolated(step: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
}

pub(super) fn spawn_and_wait(state: &UpgradeState, life: &Life) -> Result<u32, UpgradeError> {
    let program = state.program.clone().map_err(|error| UpgradeError::Spawn {
        program: PathBuf::from("<current executable>"),
        error,
    })?;
    let spawn_error = |error: String| UpgradeError::Spawn {
        program: program.clone(),
        error,
    };
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| spawn_error(format!("socket pair: {e}")))?;
    let mut names: Vec<String> = Vec::new();
    let mut mappings = Vec::new();
    for (_, name, fd) in lock(&state.listeners).iter() {
        let fd = fd
            .try_clone()
            .map_err(|e| spawn_error(format!("duplicate the socket of {name}: {e}")))?;
        mappings.push(FdMapping {
            parent_fd: fd,
            child_fd: 3 + i32::try_from(names.len()).unwrap_or(i32::MAX - 3),
        });
        names.push(name.clone());
    }
    mappings.push(FdMapping {
        parent_fd: OwnedFd::from(theirs),
        child_fd: 3 + i32::try_from(names.len()).unwrap_or(i32::MAX - 3),
    });
    names.push(READY_NAME.to_owned());

    let mut command = std::process::Command::new(&program);
    command
        .args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(PARENT_ENV, std::process::id().to_string())
        .env(GENERATION_ENV, generation().saturating_add(1).to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env_remove("WATCHDOG_PID");
    command
        .fd_mappings(mappings)
        .map_err(|e| spawn_error(e.to_string()))?;
    if life.shutdown_won() {
        // The shutdown came while the successor was being prepared: not started at all.
        return Err(UpgradeError::ShuttingDown);
    }
    state.sharing.store(true, Ordering::Release);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            state.sharing.store(false, Ordering::Release);
            return Err(spawn_error(e.to_string()));
        }
    };
    // Closes this process's copies of the successor's ends: its exit is then an end of file.
    drop(command);
    let pid = child.id();
    state.successor.store(pid, Ordering::Release);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tracing::info!(target: "finale", successor_pid = pid, program = %program.display(), "upgrade: successor started");
        wait_ready(state, life, &mut ours, &mut child, pid)
    }));
    let result = match waited {
        Ok(result) => result,
        Err(panic) => {
            // A log layer of the user's panicked while the successor started: one that is not
            // waited for is not to serve (stopped and reaped), unless its hand-off won already.
            if life.handover_pid() != Some(pid) {
                isolated(|| stop(&mut child, pid));
                let _ = child.kill();
                let _ = child.wait();
                state.successor.store(0, Ordering::Release);
                state.sharing.store(false, Ordering::Release);
            }
            std::panic::resume_unwind(panic)
        }
    };
    state.successor.store(0, Ordering::Release);
    if result.is_err() {
        // Stopped and reaped: the sockets are this process's alone again.
        state.sharing.store(false, Ordering::Release);
    }
    result
}

/// Waits for the successor's `READY=1`, at most the ready timeout; a shutdown requested
/// meanwhile abandons the upgrade (the service is to stop, not to be replaced).
fn wait_ready(
    state: &UpgradeState,
    life: &Life,
    ours: &mut UnixStream,
    child: &mut std::process::Child,
    pid: u32,
) -> Result<u32, UpgradeError> {
    /// How often the wait looks at whether the shutdown was requested.
    const SLICE: Duration = Duration::from_millis(20);
    enum End {
        Exited,
        TimedOut,
        Aborted,
    }
    let timeout = state.config.ready_timeout_value();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let ended = loop {
        if life.shutdown_won() {
            break End::Aborted;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break End::TimedOut;
        }
        if ours.set_read_timeout(Some(left.min(SLICE))).is_err() {
            break End::TimedOut;
        }
        let mut buf = [0u8; 64];
        match ours.read(&mut buf) {
            Ok(0) => break End::Exited,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(READY_LINE.len()).any(|w| w == READY_LINE) {
                    // One decision, against the shutdown's request: a shutdown requested
                    // before this instant (within the last slice too) wins; one after it is
                    // the hand-off's.
                    if !life.claim_handover(pid) {
                        break End::Aborted;
                    }
                    // Now, not once the caller hears of it: a signal's request may start the
                    // sequence first, and its servers must leave the sockets alone.
                    state.handed_off.store(true, Ordering::Release);
                    return Ok(pid);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break End::Exited,
        }
    };
    // It closed its end: it exited (or crashed) before it was ready, or it closed the socket
    // and runs on (a program that closes the descriptors it inherits). Its exit is waited for
    // until the ready timeout (or the shutdown), not for ever: then it is stopped.
    let ended = match ended {
        End::Exited => loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(UpgradeError::Exited {
                        pid,
                        status: status.to_string(),
                    });
                }
                Ok(None) if life.shutdown_won() => break End::Aborted,
                Ok(None) if Instant::now() >= deadline => break End::TimedOut,
                // Polling the child's exit, bounded by the ready timeout.
                Ok(None) => std::thread::sleep(SLICE.min(Duration::from_millis(10))),
                Err(e) => {
                    return Err(UpgradeError::Exited {
                        pid,
                        status: format!("unknown ({e})"),
                    });
                }
            }
        },
        other => other,
    };
    match ended {
        // (`Exited` was waited for above: it ends there, or as one of the other two.)
        End::Exited | End::TimedOut => {
            stop(child, pid);
            Err(UpgradeError::NotReady {
                pid,
                waited: timeout,
            })
        }
        End::Aborted => {
            // In the report already: this process may be gone before the successor is.
            let abandoned = UpgradeError::Aborted { pid };
            lock(&state.failed).push(abandoned.to_string());
            stop(child, pid);
            Err(abandoned)
        }
    }
}

/// Stops a successor that will not take over: SIGTERM first, so that its own finale drains the
/// connections it already accepted from the shared sockets, then SIGKILL if it is still there
/// after [`STOP_WAIT`]; reaped either way.
fn stop(child: &mut std::process::Child, pid: u32) {
    if signal(pid, nix::sys::signal::Signal::SIGTERM) {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                // Polling the child's exit, bounded by the deadline.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
        tracing::warn!(target: "finale", successor_pid = pid, "the successor did not stop within {STOP_WAIT:?}: killed");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to the process `pid` (a successor this process started); whether it went.
pub(super) fn signal(pid: u32, signal: nix::sys::signal::Signal) -> bool {
    i32::try_from(pid)
        .is_ok_and(|raw| nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal).is_ok())
}
