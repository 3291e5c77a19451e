//! The user's own telemetry stages: a blocking or async flush (Sentry, StatsD, a remote-write
//! queue) with an order and a share of the Telemetry slot, run like the built-in stages.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::{Hook, HookContext, work_fn};
use crate::hook::{HookError, HookOutput};
use crate::phase::Phase;
use crate::report::{Counts, Items, Tally};
use crate::slot::{ORDER_TRACES_LOGS, Share, stage_deadline};
use crate::state::EmergencyStage;
use crate::telemetry::stages::{Handoff, OffThread, run_until};

type BlockingFn = Box<dyn FnOnce(&SinkContext) -> Result<(), HookError> + Send + 'static>;

enum Work {
    Blocking(BlockingFn),
    Async(crate::hook::WorkFn<SinkContext>),
}

/// A telemetry stage of your own: a last flush to a backend finale has no integration for,
/// run in the Telemetry phase with the same guarantees as the built-in stages.
///
/// - **An order and a share.** It runs with the stages of its [`order`](Sink::order) (default
///   [`ORDER_TRACES_LOGS`], next to the OTLP traces and logs; [`ORDER_METRICS`](crate::ORDER_METRICS)
///   with the metrics push, or anything in between) and gives up at its
///   [`share`](Sink::share) of what is left of the slot when its stage starts, so a backend
///   that hangs cannot starve the stages after it (the log file last).
/// - **Thread isolation and a deadline.** A [`blocking`](Sink::blocking) flush runs on a plain
///   thread of its own, never on a runtime thread, and is waited for until its deadline
///   ([`SinkContext::deadline`]); a thread still blocked then is left behind and dies with the
///   process. If the user's runtime is wedged and the Telemetry phase cannot run, the
///   supervisor runs the blocking flush itself, once, on its own thread. A
///   [`future`](Sink::future) flush runs on the user's runtime, bounded by the same deadline; it
///   cannot run without that runtime, so the supervisor's takeover skips it.
/// - **A report entry.** The Telemetry hook named after the sink says whether it completed,
///   failed, panicked or ran out of time, and counts given to its [`SinkCounter`] (with
///   [`counts`](Sink::counts)) appear in [`ShutdownReport::delivery`](crate::ShutdownReport::delivery),
///   split at the trigger, under the [`DeliveryPolicy`](crate::DeliveryPolicy).
///
/// # Examples
///
/// ```
/// use std::net::UdpSocket;
/// use finale::{Finale, Items, Sink};
///
/// # fn main() -> Result<(), finale::ConfigError> {
/// let finale = Finale::builder().no_signals().build()?;
/// let sink = Sink::blocking("statsd", |ctx| {
///     let socket = UdpSocket::bind("127.0.0.1:0")?;
///     socket.set_write_timeout(Some(ctx.remaining()))?;
///     for line in ["requests:3|c", "errors:1|c"] {
///         match socket.send_to(line.as_bytes(), "127.0.0.1:8125") {
///             Ok(_) => ctx.counter().exported(1),
///             Err(_) => ctx.counter().failed(1),
///         }
///     }
///     Ok::<(), std::io::Error>(())
/// })
/// .order(finale::ORDER_METRICS)
/// .share(1, 2)
/// .counts(Items::Other);
/// sink.register(&finale)?;
/// # Ok(())
/// # }
/// ```
///
/// `examples/statsd_sink.rs` is a complete service whose final StatsD flush is a `Sink`.
#[must_use = "a sink does nothing until `register` is called"]
pub struct Sink {
    name: Cow<'static, str>,
    order: i32,
    share: Share,
    items: Option<Items>,
    counter: SinkCounter,
    work: Work,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("name", &self.name)
            .field("order", &self.order)
            .field("share", &self.share)
            .field("items", &self.items)
            .field("blocking", &matches!(self.work, Work::Blocking(_)))
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// A sink that runs `flush` on a plain thread of its own (the supervisor's, if the runtime
    /// is wedged). `flush` should give up by [`SinkContext::deadline`]: set the timeouts of its
    /// sockets from [`SinkContext::remaining`]. It returns `()` or `Result<(), E>` for any
    /// error type a hook may return.
    pub fn blocking<F, O>(name: impl Into<Cow<'static, str>>, flush: F) -> Self
    where
        F: FnOnce(&SinkContext) -> O + Send + 'static,
        O: HookOutput,
    {
        Self::with(
            name.into(),
            Work::Blocking(Box::new(move |ctx| flush(ctx).into_result())),
        )
    }

    /// A sink whose flush is a future, run on the user's runtime until its deadline, then
    /// dropped. The supervisor's takeover of a wedged runtime cannot run it.
    pub fn future<F, Fut>(name: impl Into<Cow<'static, str>>, flush: F) -> Self
    where
        F: FnOnce(SinkContext) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HookOutput,
    {
        Self::with(name.into(), Work::Async(work_fn(flush)))
    }

    fn with(name: Cow<'static, str>, work: Work) -> Self {
        Self {
            name,
            order: ORDER_TRACES_LOGS,
            share: Share::TRACES_LOGS,
            items: None,
            counter: SinkCounter::default(),
            work,
        }
    }

    /// The stage it runs in: sinks and built-in stages of one order run together, and the next
    /// order starts when they are all done. Default [`ORDER_TRACES_LOGS`].
    pub fn order(mut self, order: i32) -> Self {
        self.order = order;
        self
    }

    /// How much of what is left of the slot, when its stage starts, it may use: `num / den`.
    /// Default 3/4, as the traces-and-logs stage; the last stage before the log file should
    /// leave the log file some.
    ///
    /// # Panics
    ///
    /// If `num` is 0 or greater than `den`.
    pub fn share(mut self, num: u32, den: u32) -> Self {
        assert!(
            num > 0 && num <= den,
            "a sink's share is a fraction in (0, 1]: got {num}/{den}"
        );
        self.share = Share::new(num, den);
        self
    }

    /// Puts what its [`SinkCounter`] counts in the report's
    /// [`delivery`](crate::ShutdownReport::delivery), as `items`.
    pub fn counts(mut self, items: Items) -> Self {
        self.items = Some(items);
        self
    }

    /// The counter the flush counts with ([`SinkContext::counter`]), for the application to
    /// count what it delivers during the run too (its periodic sends): the report splits the
    /// counts at the trigger.
    pub fn counter(&self) -> SinkCounter {
        self.counter.clone()
    }

    /// Registers the sink as the Telemetry hook `name` of its order.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`] if a hook of that name exists, [`ConfigError::EmptyName`]
    /// for an empty name.
    pub fn register(self, finale: &Finale) -> Result<(), ConfigError> {
        let Sink {
            name,
            order,
            share,
            items,
            counter,
            work,
        } = self;
        match work {
            Work::Async(run) => {
                let counter = counter.clone();
                let stage = name.clone();
                finale.hook(
                    Hook::new(Phase::Telemetry, name.clone(), move |ctx: HookContext| {
                        let deadline = stage_deadline(&ctx, share);
                        let sink = SinkContext {
                            deadline: std_deadline(deadline),
                            counter,
                        };
                        async move {
                            match tokio::time::timeout_at(deadline, run(sink)).await {
                                Ok(result) => result,
                                Err(_) => Err(HookError::msg(format!(
                                    "sink {stage:?} did not finish by its deadline"
                                ))),
                            }
                        }
                    })
                    .order(order),
                )?;
            }
            Work::Blocking(flush) => {
                let held = Handoff::new(flush);
                let for_hook = held.clone();
                let hook_counter = counter.clone();
                let stage = name.clone();
                finale.hook(
                    Hook::new(Phase::Telemetry, name.clone(), move |ctx: HookContext| {
                        let deadline = stage_deadline(&ctx, share);
                        run_blocking(stage, for_hook, hook_counter, deadline)
                    })
                    .order(order),
                )?;
                let emergency_counter = counter.clone();
                finale.shared.add_emergency(EmergencyStage {
                    name: name.clone(),
                    order,
                    share,
                    run: Box::new(move |deadline| {
                        held.run_or_wait(deadline, |flush| {
                            let ctx = SinkContext {
                                deadline,
                                counter: emergency_counter,
                            };
                            flush(&ctx).map_err(|e| e.to_string())
                        })
                    }),
                });
            }
        }
        if let Some(items) = items {
            finale.shared.add_tally(Arc::new(SinkTally {
                stage: name,
                items,
                counter,
            }));
        }
        Ok(())
    }
}

/// `deadline` on the std clock, for a thread without a runtime.
fn std_deadline(deadline: tokio::time::Instant) -> std::time::Instant {
    std::time::Instant::now() + deadline.saturating_duration_since(tokio::time::Instant::now())
}

/// Runs a blocking flush on a thread of its own until `deadline`.
async fn run_blocking(
    stage: Cow<'static, str>,
    held: Arc<Handoff<BlockingFn>>,
    counter: SinkCounter,
    deadline: tokio::time::Instant,
) -> Result<(), HookError> {
    let start = tokio::time::Instant::now();
    let ctx = SinkContext {
        deadline: std_deadline(deadline),
        counter,
    };
    let work = move || {
        // Taken here, not before: if the supervisor took it first (the runtime was wedged), it
        // is flushing already and this hook has nothing left to do.
        let Some(flush) = held.take() else {
            // The supervisor took the stage over: its result is the stage's.
            return held
                .wait(ctx.deadline)
                .map_err(|e| HookError::msg(format!("flushed by the supervisor: {e}")));
        };
        let result = flush(&ctx);
        held.done(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        result
    };
    match run_until(&format!("finale-sink-{stage}"), deadline, work).await {
        Ok(OffThread::Done(result)) => result,
        Ok(OffThread::Panicked(message)) => Err(HookError::msg(format!(
            "sink {stage:?} panicked: {message}"
        ))),
        Ok(OffThread::TimedOut) => Err(HookError::msg(format!(
            "sink {stage:?} did not finish within {:?}; its thread is left behind",
            start.elapsed()
        ))),
        Err(e) => Err(HookError::new(e)),
    }
}

/// What a sink's flush knows: its deadline and its counter.
#[derive(Clone, Debug)]
pub struct SinkContext {
    deadline: std::time::Instant,
    counter: SinkCounter,
}

impl SinkContext {
    /// When the flush must have given up (the std clock: a blocking flush has no runtime).
    pub fn deadline(&self) -> std::time::Instant {
        self.deadline
    }

    /// How long is left until [`deadline`](SinkContext::deadline); never zero, so it can be a
    /// socket timeout (which refuses zero).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1))
    }

    /// The sink's counter.
    pub fn counter(&self) -> &SinkCounter {
        &self.counter
    }
}

/// Counts what a [`Sink`] delivered, for the report; a cheap handle.
#[derive(Clone, Debug, Default)]
pub struct SinkCounter {
    inner: Arc<[AtomicU64; 3]>,
}

impl SinkCounter {
    /// `n` items reached the backend.
    pub fn exported(&self, n: u64) {
        self.inner[0].fetch_add(n, Ordering::Relaxed);
    }

    /// `n` items were sent, and the backend refused them or could not be reached.
    pub fn failed(&self, n: u64) {
        self.inner[1].fetch_add(n, Ordering::Relaxed);
    }

    /// `n` items were never sent (a full buffer, no time left).
    pub fn dropped(&self, n: u64) {
        self.inner[2].fetch_add(n, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        let [e, f, d] = &*self.inner;
        Counts::new(
            e.load(Ordering::Relaxed),
            f.load(Ordering::Relaxed),
            d.load(Ordering::Relaxed),
        )
    }
}

struct SinkTally {
    stage: Cow<'static, str>,
    items: Items,
    counter: SinkCounter,
}

impl Tally for SinkTally {
    fn stage(&self) -> Cow<'static, str> {
        self.stage.clone()
    }

    fn items(&self) -> Items {
        self.items
    }

    fn counts(&self) -> Counts {
        self.counter.counts()
    }
}
