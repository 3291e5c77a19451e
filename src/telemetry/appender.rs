//! Release tracing-appender's writer last in the Telemetry phase, bounded, and report whether it
//! wrote everything.
//!
//! tracing-appender's `WorkerGuard` has no flush: its drop is the flush, and it waits at most
//! 100 ms to queue the stop message plus a hard-coded 1 s for the writer thread, then returns
//! without saying whether the writer finished; lines still queued are lost silently. Held in
//! `main` past `std::process::exit`, or in a `static`, it is never dropped at all.
//!
//! finale takes the guard and releases it as the very last hook (order
//! [`ORDER_LOG_WRITER`]), after the metrics push and the OTLP flushes,
//! so their own log lines (an export error, say) are written too. The drop runs on a thread of its
//! own, so it never blocks the runtime, and finale waits for the writer thread to end, up to what
//! is left of the slot rather than the guard's fixed 1 s.
//!
//! # Knowing that the writer drained
//!
//! Create the writer with [`non_blocking`] or [`non_blocking_with`]: they wrap your writer so
//! finale sees the writer thread let go of it, which happens only after it wrote and flushed every
//! line queued before the release. The hook (named `log-writer`) completes only if that
//! happened in time; otherwise it fails with a [`LogWriterError`] and the run's status is
//! [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered).
//!
//! # What was written
//!
//! The wrapped writer also counts the lines written and the lines whose write failed (a full
//! disk: tracing-appender drops such a line and goes on), those a failed flush lost (a
//! buffered writer, a `BufWriter` over a file, loses what it held: the lines written since the
//! last flush that succeeded count as failed), and the writer's [`ErrorCounter`]
//! the lines dropped because the queue was full (lossy mode). The report's
//! [`delivery`](crate::ShutdownReport::delivery) entry `log-writer` splits them at the trigger:
//! what happened during the run, and from the trigger to the release. Under the default
//! [`DeliveryPolicy`](crate::DeliveryPolicy) a line lost from the trigger on makes the run
//! not delivered, while a burst that overflowed the queue an hour earlier is reported but
//! leaves the exit code alone.
//!
//! A guard made elsewhere can be handed over with [`LogWriterGuard::from_worker_guard`], but
//! then finale can only tell that the guard's drop returned, not that the lines were written;
//! pass the writer's [`ErrorCounter`] with [`LogWriterGuard::error_counter`] for its drops to
//! be counted.
//!
//! Lines logged after the release (for example the warnings the Telemetry phase logs about hooks
//! that did not complete) are not written. finale's report line is logged before the Telemetry
//! phase, so it is in the file.
//!
//! # Examples
//!
//! ```no_run
//! use finale::Finale;
//! use tracing_subscriber::prelude::*;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     let file = tracing_appender::rolling::never("/var/log/app", "app.log");
//!     let (writer, guard) = finale::appender::non_blocking(file);
//!     tracing_subscriber::registry()
//!         .with(tracing_subscriber::fmt::layer().with_writer(writer))
//!         .init();
//!     let finale = Finale::builder().build()?;
//!     guard.register(&finale)?;
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::Hook;
use crate::phase::Phase;
use crate::report::{Counts, Items, Tally};
use crate::slot::{ORDER_LOG_WRITER, Share, stage_deadline};
use crate::state::EmergencyStage;
use crate::telemetry::stages::{Handoff, OffThread, run_until};

/// The report name of the hook that releases the writer.
pub const HOOK_NAME: &str = "log-writer";

/// Like [`tracing_appender::non_blocking()`], but the returned guard can tell whether the writer
/// drained.
pub fn non_blocking<W: Write + Send + 'static>(writer: W) -> (NonBlocking, LogWriterGuard) {
    non_blocking_with(NonBlockingBuilder::default(), writer)
}

/// Like [`NonBlockingBuilder::finish`], but the returned guard can tell whether the writer
/// drained.
pub fn non_blocking_with<W: Write + Send + 'static>(
    builder: NonBlockingBuilder,
    writer: W,
) -> (NonBlocking, LogWriterGuard) {
    let (tx, rx) = oneshot::channel();
    let lines = Arc::new(Lines::default());
    let (non_blocking, guard) = builder.finish(Tracked {
        inner: writer,
        released: Some(tx),
        lines: lines.clone(),
        unflushed: 0,
    });
    let guard = LogWriterGuard {
        guard: Some(guard),
        released: Some(rx),
        errors: Some(non_blocking.error_counter()),
        lines: Some(lines),
    };
    (non_blocking, guard)
}

/// The user's writer, as the writer thread holds it. Dropped only when that thread ends, after
/// it wrote and flushed every line queued before the stop message.
struct Tracked<W> {
    inner: W,
    released: Option<oneshot::Sender<()>>,
    lines: Arc<Lines>,
    /// Lines written since the last flush that succeeded: a buffered writer (a `BufWriter`
    /// over a file) holds them until its flush, and loses them if that fails.
    unflushed: u64,
}

/// The lines the writer thread wrote, and those whose write failed.
#[derive(Debug, Default)]
struct Lines {
    written: AtomicU64,
    failed: AtomicU64,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    // The writer thread writes each line with one `write_all`; a line whose write fails is
    // lost (tracing-appender goes on with the next one and tells nobody), so count both.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let result = self.inner.write_all(buf);
        let count = if result.is_ok() {
            self.unflushed += 1;
            &self.lines.written
        } else {
            &self.lines.failed
        };
        count.fetch_add(1, Ordering::Relaxed);
        result
    }

    // The writer thread flushes after each batch (and at its end). A failed flush loses what a
    // buffered writer held: the lines written since the last good flush move from written to
    // failed. (Written first, then failed: a reader between the two sees a line in neither,
    // never in both.)
    fn flush(&mut self) -> io::Result<()> {
        let result = self.inner.flush();
        let unflushed = std::mem::take(&mut self.unflushed);
        if result.is_err() && unflushed > 0 {
            self.lines.written.fetch_sub(unflushed, Ordering::Relaxed);
            self.lines.failed.fetch_add(unflushed, Ordering::Relaxed);
        }
        result
    }
}

impl<W> Drop for Tracked<W> {
    fn drop(&mut self) {
        if let Some(tx) = self.released.take() {
            // Nobody waits when the guard was released without finale: nothing to tell then.
            let _ = tx.send(());
        }
    }
}

/// Why the log writer did not (surely) write everything.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogWriterError {
    /// The writer thread had not finished when the slot ran out; the lines still queued are lost.
    NotDrained {
        /// How long finale waited.
        waited: Duration,
    },
    /// Lines were dropped because the writer's queue was full (lossy mode).
    LinesDropped {
        /// How many, over the life of the writer.
        count: usize,
    },
    /// Lines were lost because the writer failed to write them (a full disk, say).
    WriteErrors {
        /// How many, over the life of the writer.
        count: u64,
    },
    /// The guard's drop panicked.
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The supervisor released the writer (the runtime was wedged when the Telemetry phase
    /// was due), and its release did not drain, or had not ended at this stage's deadline.
    TakenOver {
        /// What the supervisor's release said.
        message: String,
    },
    /// The thread that drops the guard could not be started.
    Thread {
        /// The OS error.
        source: io::Error,
    },
}

impl fmt::Display for LogWriterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogWriterError::NotDrained { waited } => write!(
                f,
                "the log writer did not finish within {waited:?}; the lines still queued are lost"
            ),
            LogWriterError::LinesDropped { count } => write!(
                f,
                "{count} log lines were dropped because the writer's queue was full"
            ),
            LogWriterError::WriteErrors { count } => {
                write!(f, "{count} log lines were lost to write errors")
            }
            LogWriterError::Panicked { message } => {
                write!(f, "releasing the log writer panicked: {message}")
            }
            LogWriterError::TakenOver { message } => write!(
                f,
                "the supervisor took the log writer's release over and it did not drain: {message}"
            ),
            LogWriterError::Thread { source } => {
                write!(
                    f,
                    "cannot start the thread to release the log writer: {source}"
                )
            }
        }
    }
}

impl StdError for LogWriterError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            LogWriterError::Thread { source } => Some(source),
            _ => None,
        }
    }
}

/// Owns a tracing-appender [`WorkerGuard`] until the end of the Telemetry phase.
///
/// [`register`](LogWriterGuard::register) it with finale, or [`release`](LogWriterGuard::release)
/// it yourself.
///
/// # Drop
///
/// Dropped without a release (say, the Telemetry phase ended before its hook ran), it hands the
/// `WorkerGuard` to a new thread that drops it, and returns at once: the writer drains if the
/// process lives long enough. Only if no thread can be started does it drop the `WorkerGuard`
/// in place, which blocks for up to 1.1 s.
#[must_use = "dropping the guard releases the log writer now"]
pub struct LogWriterGuard {
    guard: Option<WorkerGuard>,
    released: Option<oneshot::Receiver<()>>,
    errors: Option<ErrorCounter>,
    lines: Option<Arc<Lines>>,
}

impl fmt::Debug for LogWriterGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWriterGuard")
            .field("held", &self.guard.is_some())
            .field("tracked", &self.released.is_some())
            .finish_non_exhaustive()
    }
}

impl LogWriterGuard {
    /// Takes a guard made with tracing-appender directly. finale then only knows that the drop
    /// returned (after at most 1.1 s), not that the writer drained, nor what it wrote; prefer
    /// [`non_blocking`]. Hand over the writer's [`ErrorCounter`] with
    /// [`error_counter`](LogWriterGuard::error_counter) for the drops to be reported.
    pub fn from_worker_guard(guard: WorkerGuard) -> Self {
        Self {
            guard: Some(guard),
            released: None,
            errors: None,
            lines: None,
        }
    }

    /// Reports the lines this counter counts as dropped (from
    /// [`NonBlocking::error_counter`]), for a guard taken with
    /// [`from_worker_guard`](LogWriterGuard::from_worker_guard).
    pub fn error_counter(mut self, counter: ErrorCounter) -> Self {
        self.errors = Some(counter);
        self
    }

    /// What the report counts: lines written and failed (known only for [`non_blocking`]'s
    /// writer) and dropped.
    fn tally(&self) -> Option<WriterTally> {
        if self.errors.is_none() && self.lines.is_none() {
            return None;
        }
        Some(WriterTally {
            errors: self.errors.clone(),
            lines: self.lines.clone(),
        })
    }

    /// Registers the release as the last Telemetry hook, `log-writer`, of order
    /// [`ORDER_LOG_WRITER`].
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`] if a hook named `log-writer` exists.
    ///
    /// If the user's runtime is wedged and the Telemetry phase cannot run, finale's supervisor
    /// releases the writer from its own thread instead.
    pub fn register(self, finale: &Finale) -> Result<(), ConfigError> {
        let tally = self.tally();
        let held = Handoff::new(self);
        let for_hook = held.clone();
        finale.hook(
            Hook::new(Phase::Telemetry, HOOK_NAME, move |ctx| async move {
                let Some(guard) = for_hook.take() else {
                    // The supervisor took the release over: wait for it (bounded, off the
                    // runtime) and report what it said, not a release of our own.
                    let deadline = stage_deadline(&ctx, Share::ALL);
                    let until = std::time::Instant::now()
                        + deadline.saturating_duration_since(tokio::time::Instant::now());
                    let held = for_hook.clone();
                    let waited =
                        run_until("finale-log-writer-wait", deadline, move || held.wait(until));
                    return match waited.await {
                        Ok(OffThread::Done(Ok(()))) => Ok(()),
                        Ok(OffThread::Done(Err(message))) => {
                            Err(LogWriterError::TakenOver { message })
                        }
                        _ => Err(LogWriterError::TakenOver {
                            message: "still releasing at the deadline".to_owned(),
                        }),
                    };
                };
                // The report counts the lines, and the delivery policy decides what their loss
                // means: the hook says only whether the writer drained.
                let result = guard.release_only(stage_deadline(&ctx, Share::ALL)).await;
                for_hook.done(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                result
            })
            .order(ORDER_LOG_WRITER),
        )?;
        if let Some(tally) = tally {
            finale.shared.add_tally(Arc::new(tally));
        }
        finale.shared.add_emergency(EmergencyStage {
            name: Cow::Borrowed(HOOK_NAME),
            order: ORDER_LOG_WRITER,
            share: Share::ALL,
            run: Box::new(move |deadline| {
                held.run_or_wait(deadline, |guard| {
                    guard.release_blocking(deadline).map_err(|e| e.to_string())
                })
            }),
        });
        Ok(())
    }

    /// [`release`](LogWriterGuard::release) from a plain thread, on a small runtime of its own.
    fn release_blocking(self, deadline: std::time::Instant) -> Result<(), LogWriterError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|source| LogWriterError::Thread { source })?;
        runtime.block_on(self.release_only(Instant::from_std(deadline)))
    }

    /// Releases the writer: drops the `WorkerGuard` on a thread of its own and waits, until
    /// `deadline`, for the writer thread to write everything and end.
    ///
    /// # Errors
    ///
    /// A [`LogWriterError`] if the writer did not drain in time, dropped lines or failed to
    /// write some (over its whole life: released by hand, there is no report to tell the run's
    /// losses from the exit's).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not undo the release; the writer goes on draining on its own.
    pub async fn release(self, deadline: Instant) -> Result<(), LogWriterError> {
        let errors = self.errors.clone();
        let lines = self.lines.clone();
        self.release_only(deadline).await?;
        let dropped = errors.as_ref().map_or(0, ErrorCounter::dropped_lines);
        let failed = lines.map_or(0, |l| l.failed.load(Ordering::Relaxed));
        if dropped > 0 {
            return Err(LogWriterError::LinesDropped { count: dropped });
        }
        if failed > 0 {
            return Err(LogWriterError::WriteErrors { count: failed });
        }
        Ok(())
    }

    /// The release, without a look at the counts.
    async fn release_only(mut self, deadline: Instant) -> Result<(), LogWriterError> {
        let start = Instant::now();
        let guard = self.guard.take();
        match self.released.take() {
            Some(released) => {
                // The drop's own waits are fixed; what matters is the writer thread ending, which
                // `released` reports, so the drop thread is not waited for.
                std::thread::Builder::new()
                    .name("finale-log-writer".to_owned())
                    .spawn(move || drop(guard))
                    .map_err(|source| LogWriterError::Thread { source })?;
                match tokio::time::timeout_at(deadline, released).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(LogWriterError::NotDrained {
                        waited: start.elapsed(),
                    }),
                }
            }
            None => match run_until("finale-log-writer", deadline, move || drop(guard)).await {
                Ok(OffThread::Done(())) => Ok(()),
                Ok(OffThread::Panicked(message)) => Err(LogWriterError::Panicked { message }),
                Ok(OffThread::TimedOut) => Err(LogWriterError::NotDrained {
                    waited: start.elapsed(),
                }),
                Err(source) => Err(LogWriterError::Thread { source }),
            },
        }
    }
}

/// The log writer's counts as the report reads them.
struct WriterTally {
    errors: Option<ErrorCounter>,
    lines: Option<Arc<Lines>>,
}

impl Tally for WriterTally {
    fn stage(&self) -> Cow<'static, str> {
        Cow::Borrowed(HOOK_NAME)
    }

    fn items(&self) -> Items {
        Items::LogLines
    }

    fn counts(&self) -> Counts {
        let (written, failed) = self.lines.as_ref().map_or((0, 0), |l| {
            (
                l.written.load(Ordering::Relaxed),
                l.failed.load(Ordering::Relaxed),
            )
        });
        let dropped = self.errors.as_ref().map_or(0, ErrorCounter::dropped_lines);
        Counts::new(written, failed, dropped as u64)
    }
}

impl Drop for LogWriterGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            // If the thread cannot start, the closure and the guard in it drop here, in place.
            let _ = std::thread::Builder::new()
                .name("finale-log-writer".to_owned())
                .spawn(move || drop(guard));
        }
    }
}
