//! [`Load`]: a bounded client loop against the service under test, and what it saw.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::track::StopToken;

/// How long one call of a [`Load`] may take by default before it counts as dropped.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How one call of a [`Load`] ended.
///
/// A call returning `Result<T, E>` converts: `Ok` is [`Served`](Call::Served), `Err` is
/// [`Dropped`](Call::Dropped) with the error's message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// Answered.
    Served,
    /// Turned away before any work started: a `503` while draining, a connection refused once
    /// the listener closed. Expected around a shutdown, and no loss: the client can retry
    /// elsewhere.
    Refused,
    /// Lost: accepted and not answered (a reset, a response cut short, no answer in time), or
    /// failed. With what happened.
    Dropped(String),
}

impl<T, E: fmt::Display> From<Result<T, E>> for Call {
    fn from(result: Result<T, E>) -> Self {
        match result {
            Ok(_) => Call::Served,
            Err(e) => Call::Dropped(e.to_string()),
        }
    }
}

/// A bounded client loop: at most [`new`](Load::new)`(calls)` calls, at most
/// [`concurrency`](Load::concurrency) at a time, optionally paced, each bounded by its
/// [`timeout`](Load::timeout). Runs in the background once spawned, on the test's runtime; on
/// paused time its pace and timeouts are exact.
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`concurrency`](Load::concurrency) | 1 |
/// | [`interval`](Load::interval) | none: each call starts when a place is free |
/// | [`timeout`](Load::timeout) | 10 s ([`DEFAULT_CALL_TIMEOUT`]) |
///
/// # Examples
///
/// Requests tracked by the service's [`InFlight`](crate::InFlight) tracker, each taking 100 ms,
/// one every 10 ms; a `SIGTERM` once 20 were served. The drain waits for the ones in flight, and
/// the calls that come after it are refused, none dropped.
///
/// ```
/// use std::time::Duration;
/// use finale::testing::{self, Call, Load};
///
/// #[tokio::main(flavor = "current_thread", start_paused = true)]
/// async fn main() {
///     let finale = testing::builder().build().unwrap();
///     let in_flight = finale.handle().in_flight();
///     let run = testing::Run::start(finale);
///     run.started().await;
///
///     let load = Load::new(1_000)
///         .concurrency(16)
///         .interval(Duration::from_millis(10))
///         .spawn(move |_| async move {
///             let Some(_guard) = in_flight.try_acquire() else {
///                 return Call::Refused; // a server answers 503 here
///             };
///             tokio::time::sleep(Duration::from_millis(100)).await;
///             Call::Served
///         });
///     assert!(load.until_served(20).await);
///     run.sigterm();
///     let report = run.report().await;
///     let load = load.stop().await;
///
///     testing::assert_clean(&report);
///     testing::assert_nothing_dropped(&load);
///     assert!(report.in_flight_at_drain_start > 0, "{report}");
///     assert!(load.refused > 0, "{load}");
/// }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a load does nothing until it is spawned"]
pub struct Load {
    calls: u64,
    concurrency: usize,
    interval: Option<Duration>,
    timeout: Duration,
}

impl Load {
    /// A load of at most `calls` calls.
    pub fn new(calls: u64) -> Self {
        Self {
            calls,
            concurrency: 1,
            interval: None,
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// How many calls may be in flight at once (at least 1).
    pub fn concurrency(mut self, calls: usize) -> Self {
        self.concurrency = calls.max(1);
        self
    }

    /// Starts at most one call per `every` (missed ticks are not made up for).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = Some(every);
        self
    }

    /// Bounds each call: one that takes longer is abandoned and counted as dropped.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Spawns the loop on the current tokio runtime: `call(i)` makes the `i`-th call (from 0).
    ///
    /// A call that panics counts as dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn<F, Fut>(self, call: F) -> LoadRun
    where
        F: FnMut(u64) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: Into<Call>,
    {
        let stop = StopToken::new();
        let (progress, seen) = watch::channel(LoadReport::default());
        let task = tokio::spawn(drive(self, call, stop.clone(), Arc::new(progress)));
        LoadRun { stop, seen, task }
    }
}

async fn drive<F, Fut>(
    load: Load,
    mut call: F,
    stop: StopToken,
    progress: Arc<watch::Sender<LoadReport>>,
) -> LoadReport
where
    F: FnMut(u64) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Into<Call>,
{
    let mut tick = load.interval.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut calls = JoinSet::new();
    let stopped = stop.cancelled();
    let mut stopped = std::pin::pin!(stopped);
    'calls: for i in 0..load.calls {
        // A free place, then the next tick: or the stop, whichever comes first.
        while calls.len() >= load.concurrency {
            tokio::select! {
                biased;
                () = &mut stopped => break 'calls,
                Some(ended) = calls.join_next() => record_panic(&progress, ended),
            }
        }
        if let Some(tick) = &mut tick {
            tokio::select! {
                biased;
                () = &mut stopped => break 'calls,
                _ = tick.tick() => {}
            }
        }
        if stop.is_cancelled() {
            break;
        }
        progress.send_modify(|r| r.sent += 1);
        let (fut, timeout, progress) = (call(i), load.timeout, progress.clone());
        calls.spawn(async move {
            let outcome = match tokio::time::timeout(timeout, fut).await {
                Ok(outcome) => outcome.into(),
                Err(_) => Call::Dropped(format!("no answer within {timeout:?}")),
            };
            progress.send_modify(|r| r.record(outcome));
        });
    }
    while let Some(ended) = calls.join_next().await {
        record_panic(&progress, ended);
    }
    progress.borrow().clone()
}

/// A call whose task panicked never recorded its outcome: it was dropped.
fn record_panic(progress: &watch::Sender<LoadReport>, ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        progress.send_modify(|r| r.record(Call::Dropped(format!("the call panicked: {e}"))));
    }
}

/// A spawned [`Load`]: wait for its progress, stop it, get its [`LoadReport`].
///
/// Dropping it leaves the load running until its last call.
#[derive(Debug)]
#[must_use = "a load runs in the background; `stop` or `finish` it for its report"]
pub struct LoadRun {
    stop: StopToken,
    seen: watch::Receiver<LoadReport>,
    task: JoinHandle<LoadReport>,
}

impl LoadRun {
    /// What the load saw so far.
    pub fn progress(&self) -> LoadReport {
        self.seen.borrow().clone()
    }

    /// Waits until at least `n` calls were served. Returns `false` if the load ended first.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn until_served(&self, n: u64) -> bool {
        let mut seen = self.seen.clone();
        let reached = seen.wait_for(|r| r.served >= n).await.is_ok();
        // Err: the load ended, every call recorded.
        reached || seen.borrow().served >= n
    }

    /// Starts no more calls, waits for the calls in flight (each within its timeout) and
    /// returns the report.
    ///
    /// # Panics
    ///
    /// If the loop itself panicked (the `call` closure did, outside its future).
    pub async fn stop(self) -> LoadReport {
        self.stop.cancel();
        self.finish().await
    }

    /// Waits until every call was made and ended, and returns the report.
    ///
    /// # Panics
    ///
    /// As [`stop`](LoadRun::stop).
    pub async fn finish(self) -> LoadReport {
        match self.task.await {
            Ok(report) => report,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the load was cancelled: {e}"),
        }
    }
}

/// What a [`Load`] saw: every call it started, and how each ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// Calls started.
    pub sent: u64,
    /// Calls answered ([`Call::Served`]).
    pub served: u64,
    /// Calls turned away ([`Call::Refused`]).
    pub refused: u64,
    /// Calls lost ([`Call::Dropped`]).
    pub dropped: u64,
    /// The lost calls by what happened to them.
    pub dropped_by: BTreeMap<String, u64>,
}

impl LoadReport {
    /// Calls started and not ended yet (0 once the load is over).
    pub fn in_flight(&self) -> u64 {
        self.sent - self.served - self.refused - self.dropped
    }

    fn record(&mut self, call: Call) {
        match call {
            Call::Served => self.served += 1,
            Call::Refused => self.refused += 1,
            Call::Dropped(why) => {
                self.dropped += 1;
                *self.dropped_by.entry(why).or_default() += 1;
            }
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls: {} served, {} refused, {} dropped",
            self.sent, self.served, self.refused, self.dropped
        )?;
        if self.in_flight() > 0 {
            write!(f, ", {} in flight", self.in_flight())?;
        }
        for (why, n) in &self.dropped_by {
            write!(f, "\n  dropped {n}: {why}")?;
        }
        Ok(())
    }
}

cfg_http! {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    impl Load {
        /// Spawns the loop with plain HTTP/1.1 `GET url` calls from a real client (hyper-util's,
        /// keep-alive pool), over real sockets: give it real time, not paused time.
        ///
        /// Each response is read to its end. A `503`, or a connection refused, is
        /// [`Refused`](Call::Refused); another `5xx`, a failed request or a response cut short is
        /// [`Dropped`](Call::Dropped); any other complete response is [`Served`](Call::Served).
        ///
        /// # Panics
        ///
        /// If `url` is not a valid `http://` URL, or outside a tokio runtime.
        pub fn spawn_get(self, url: &str) -> LoadRun {
            let uri: http::Uri = url
                .parse()
                .unwrap_or_else(|e| panic!("Load::spawn_get: {url:?} is not a URL: {e}"));
            let client: Client<HttpConnector, Empty<bytes::Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            self.spawn(move |_| get(client.clone(), uri.clone()))
        }
    }

    async fn get(client: Client<HttpConnector, Empty<bytes::Bytes>>, uri: http::Uri) -> Call {
        let response = match client.get(uri).await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Call::Refused,
            Err(e) => return Call::Dropped(chain(&e)),
        };
        let status = response.status();
        if let Err(e) = response.into_body().collect().await {
            return Call::Dropped(format!("response cut short: {}", chain(&e)));
        }
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            Call::Refused
        } else if status.is_server_error() {
            Call::Dropped(format!("answered {status}"))
        } else {
            Call::Served
        }
    }

    /// An error and its sources, `: `-separated.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut out = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}
