//! A final push of metrics-exporter-prometheus's metrics to a Prometheus Pushgateway, in the
//! Telemetry phase, and optionally a periodic push while the service runs.
//!
//! metrics-exporter-prometheus's own push loop never pushes at exit, has no request timeout and,
//! with its default features, panics without a rustls crypto provider. finale does not use it:
//! it renders the [`PrometheusHandle`] itself and sends the text with a small HTTP client
//! under the Telemetry slot's deadline. Build the recorder with
//! `PrometheusBuilder::new().install_recorder()` (or `build_recorder` plus
//! `metrics::set_global_recorder`); no exporter feature of metrics-exporter-prometheus is needed.
//!
//! # What is pushed, where, and how
//!
//! - The body is `handle.render()`: every metric the recorder holds, finale's own shutdown
//!   metrics ([`names`](crate::names)) included, since they are recorded before the Telemetry
//!   phase starts. Or whatever the closure given to
//!   [`build_with`](PushgatewayBuilder::build_with) renders.
//! - The body is rendered once per push (its retries send the same body) on a thread of its
//!   own, not on a runtime worker: rendering a large registry takes a while, and on a
//!   `current_thread` runtime every other task would wait for it. A render still running when
//!   the push's time is up is left behind and the push fails with
//!   [`PushError::NotRendered`]. No push starts a second render beside it: while it has not
//!   returned, every push (periodic or final) fails at once with `NotRendered` ("the previous
//!   render has not returned"), so a render that never returns leaves one thread behind, not
//!   one per push. (A consistency check renders on a thread of its own, with the same rule:
//!   one at a time, or none.)
//! - The metrics are also rendered by each consistency check (below), at registration and
//!   after a `400`: a render must not change what it renders (drain, reset or take the
//!   values), or what a push sends would depend on how many checks ran before it.
//! - With the `pushgateway-gzip` feature and [`gzip(true)`](PushgatewayBuilder::gzip), the
//!   body is sent gzip-compressed (`Content-Encoding: gzip`, compressed on the render thread):
//!   Pushgateway 1.5.0 and later read it; older ones answer `400`, hence off by default.
//! - The URL is `<url>/metrics/job/<job>{/<label>/<value>}`: the job plus the grouping labels.
//!   A value that is empty, is `.` or `..`, or holds anything but `A-Z a-z 0-9 - . _ ~` (a `/`
//!   for instance) is sent the Pushgateway's way, `<label>@base64/<base64url of the value>`;
//!   the job's name too.
//! - [`Method::Put`] (default) replaces the whole group, [`Method::Post`] only the metrics of the
//!   same names (use it for **batch jobs**: a failed run that does not push
//!   `…_last_success_timestamp_seconds` then leaves the last good run's value in place, where a
//!   PUT would erase it), [`Method::Delete`] deletes the group at exit (for long-lived services
//!   whose series should not outlive them; periodic pushes then use PUT), [`Method::None`] sends
//!   nothing at exit.
//! - [`Method::Delete`] does not delete at once: that would delete the shutdown's own metrics
//!   before any scrape could read them. It PUTs the final metrics, keeps them for the
//!   [`delete_delay`](PushgatewayBuilder::delete_delay) (15 s by default) as far as the metrics
//!   stage's share of the slot allows, and then deletes the group. One request timeout (at
//!   most half the share left) is kept for the DELETE from the start: the PUT and its retries
//!   never use it, so a Pushgateway that answers slowly still gets the DELETE. A shutdown with it takes that much longer; a slot too short for the
//!   delay is logged.
//! - Each request has a timeout; failed attempts (connection errors, timeouts, `408`, `429` and
//!   `5xx` answers) are retried with a doubling backoff, as long as the stage's share of the slot
//!   allows (see [`ORDER_METRICS`]). Any other `4xx` answer is final: the Pushgateway rejected
//!   the content or the credentials. So is a TLS handshake that one side refused.
//! - The report's [`delivery`](crate::ShutdownReport::delivery) entry (named like the hook)
//!   counts the samples of each push, periodic or final: exported when the Pushgateway took
//!   the push, failed when its last attempt did not (once per push, not per attempt), split at
//!   the trigger. A push whose metrics were not rendered counts as failed the samples of the
//!   last body rendered, at least one, so that
//!   [`DeliveryPolicy::WholeRun`](crate::DeliveryPolicy::WholeRun) sees it.
//!
//! # Consistency with other groups
//!
//! The Pushgateway refuses a whole push (`400`) whose metrics cannot be exposed together with
//! what it holds for the *other* groups: a metric that another group holds with another type
//! (`… is not a COUNTER`), or a series with the same name and labels, grouping labels
//! included, as another group's (`… was collected before with the same name and label
//! values`), or a name that a histogram or summary owns (`… collides with previously collected
//! histogram named …`: a histogram `x` owns `x_bucket`, `x_count` and `x_sum`, a summary `x`
//! owns `x_count` and `x_sum`, whichever side has the histogram and whatever the other's type).
//! Different help texts are accepted. Such a push fails every time, the final one included, so
//! finale looks for it early:
//!
//! - When the push is [registered](Pushgateway::register) inside a tokio runtime, a
//!   background check reads every group the Pushgateway holds (`GET /api/v1/metrics`,
//!   Pushgateway 1.2 and later), renders the metrics (on a thread of their own) and logs a
//!   warning (target `finale`) for each metric that would be refused: its name, its type here
//!   and there or the clashing series, and the other group's labels. It is bounded by one
//!   request timeout and never fails anything: a Pushgateway that cannot be asked, or whose
//!   answer is larger than [`MAX_CHECK_ANSWER`] (16 MiB; the rest is not read), is logged at
//!   debug level.
//! - The Pushgateway's own metrics (`go_*`, `process_*`, `pushgateway_*`) are not in the API's
//!   list of groups, so a push that clashes with one of them (a `process_cpu_seconds_total`
//!   gauge, say) is refused without a warning ahead: the refusal's message says which.
//! - After a push refused with `400` the check runs again (for periodic pushes, on the first
//!   of a run of refusals), so the log says which metric and which group, next to the error.
//!   The final push checks only then, never before it pushes: the shutdown's path costs
//!   nothing more while the pushes succeed.
//! - The refused push's error, [`PushError::Rejected`] (see
//!   [`is_inconsistent`](PushError::is_inconsistent)), carries the Pushgateway's own message
//!   in its `body`, and the report shows it.
//!
//! [`check(false)`](PushgatewayBuilder::check) turns the checks off.
//!
//! # https and proxies
//!
//! `https://` URLs need the `pushgateway-tls` feature; without it [`build`](PushgatewayBuilder::build)
//! refuses them ([`PushgatewayConfigError::TlsFeatureDisabled`]) rather than send credentials in
//! clear text. With it, the client speaks TLS 1.2 and 1.3 through rustls and its **ring**
//! provider, which finale passes to rustls itself: no process-wide crypto provider is needed
//! or installed. The Pushgateway's certificate is checked against Mozilla's roots as compiled
//! into webpki-roots (the same in every container image, none read from the system), or only
//! against your CA with [`tls_ca_pem`](PushgatewayBuilder::tls_ca_pem) /
//! [`tls_ca_file`](PushgatewayBuilder::tls_ca_file); a client certificate for mutual TLS is
//! given with [`tls_client_cert_pem`](PushgatewayBuilder::tls_client_cert_pem) /
//! [`tls_client_cert_files`](PushgatewayBuilder::tls_client_cert_files). Files are read and
//! checked by `build`: an unreadable file or a key that does not match its certificate is a
//! [`PushgatewayConfigError::InvalidTls`] at start, not a failed push at exit. A certificate the
//! client does not trust fails the push at once (no retry: see
//! [`TransportError::is_tls`]).
//!
//! Proxy variables (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, `ALL_PROXY`, in either case) are
//! **ignored**: finale connects to the Pushgateway's host directly. A final push must not depend
//! on one more hop, nor send the credentials to a proxy picked up from the environment.
//!
//! # What the report says
//!
//! The hook (named `pushgateway` unless [renamed](PushgatewayBuilder::name)) completes once the
//! Pushgateway answered `2xx`. Otherwise it fails with a [`PushError`] that says what failed, for
//! example `Pushgateway answered 400 Bad Request to PUT http://…: … is not a COUNTER`, and the
//! run's status becomes [`TelemetryNotDelivered`](crate::ShutdownStatus::TelemetryNotDelivered).
//!
//! # Periodic pushes
//!
//! With [`push_interval`](PushgatewayBuilder::push_interval), a worker task (named
//! `pushgateway (periodic)`) pushes every interval while the service runs. It stops when the
//! Telemetry phase starts; the final push waits for a periodic push still in flight to be
//! answered, and no periodic push starts after it, so no stale push can land after the final
//! one.
//!
//! Each wait is shortened by a random part of up to a fifth of the interval
//! ([`PUSH_JITTER`]), drawn again for every push: instances started together (a rollout) spread
//! their pushes out instead of reaching the Pushgateway in the same instant, every interval,
//! and no wait is longer than the interval (after an answer that came late, the next push waits
//! a full draw from then rather than catching up in a burst).
//!
//! # Examples
//!
//! ```no_run
//! use finale::Finale;
//! use finale::pushgateway::{Method, Pushgateway};
//! use metrics_exporter_prometheus::PrometheusBuilder;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let metrics = PrometheusBuilder::new().install_recorder()?;
//!     let finale = Finale::builder().build()?;
//!     Pushgateway::builder("http://pushgateway.monitoring:9091", "nightly-import")
//!         // A batch job: keep the last success timestamp of an earlier run if this one fails.
//!         .method(Method::Post)
//!         .build(metrics)?
//!         .register(&finale)?;
//!     // ... run the job, then trigger the shutdown ...
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::Uri;
use http::header::HeaderValue;
#[cfg(doc)]
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::Hook;
use crate::phase::Phase;
use crate::slot::{ORDER_METRICS, Share};
use crate::state::EmergencyStage;
use crate::task::Task;
use crate::telemetry::stages::Handoff;

mod builder;
mod check;
mod consistency;
mod error;
mod grouping;
mod push;
mod render;
mod tally;
mod transport;

pub use builder::PushgatewayBuilder;
pub use error::{PushError, PushgatewayConfigError};
use render::Render;
use tally::{SampleTally, Samples};
pub use transport::TransportError;
use transport::{Connector, HttpClient};

/// Default timeout of one request to the Pushgateway: 2 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of attempts of the final push: 3.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Default wait before the first retry, doubled for each further one (at most 1 s): 100 ms.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Default time [`Method::Delete`] keeps the final metrics in the Pushgateway before it deletes
/// the group, as far as the Telemetry slot allows: 15 s, a common scrape interval.
pub const DEFAULT_DELETE_DELAY: Duration = Duration::from_secs(15);
/// Default name of the hook in the report: `pushgateway`.
pub const DEFAULT_NAME: &str = "pushgateway";

/// The largest part of the push interval that a periodic push comes early by, picked at random
/// for each push: a fifth.
pub const PUSH_JITTER: f64 = 0.2;

const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How much of an error answer's body is read and goes into the error: enough for the
/// Pushgateway's message on a few inconsistent metrics. The rest is not read, however large.
const MAX_ERROR_BODY: usize = 2048;
/// The largest answer to the consistency check's `GET /api/v1/metrics` that is read: 16 MiB.
/// The check gives up (logged at debug level) on a larger one rather than hold it in memory.
pub const MAX_CHECK_ANSWER: usize = 16 << 20;
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The name of the threads that render the metrics.
const RENDER_THREAD: &str = "finale-pushgateway-render";

/// What the final push does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// `PUT`: replace the whole group with the rendered metrics.
    #[default]
    Put,
    /// `POST`: replace only the metrics of the same names in the group. The choice for batch
    /// jobs: a metric that a failed run does not push, such as the last success timestamp,
    /// keeps the value of the run before.
    Post,
    /// `PUT` the final metrics, keep them for the
    /// [`delete_delay`](PushgatewayBuilder::delete_delay) so that a scrape reads this run's last
    /// values (finale's shutdown metrics included), then `DELETE` the group, so a stopped
    /// instance leaves no stale series. The hook fails if either request fails.
    Delete,
    /// Nothing at exit (periodic pushes, if any, still stop before the end).
    None,
}

impl Method {
    /// The HTTP method's name, or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::None => "none",
        }
    }

    fn http(self) -> http::Method {
        match self {
            Method::Post => http::Method::POST,
            Method::Delete => http::Method::DELETE,
            Method::Put | Method::None => http::Method::PUT,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Pushes the metrics of a [`PrometheusHandle`] to a Prometheus Pushgateway at exit (and, if
/// asked, periodically). Cheap to clone. See the [module docs](self).
#[derive(Clone)]
pub struct Pushgateway {
    inner: Arc<Inner>,
}

struct Inner {
    render: Render,
    url: String,
    uri: Uri,
    method: Method,
    auth: Option<HeaderValue>,
    request_timeout: Duration,
    attempts: u32,
    backoff: Duration,
    interval: Option<Duration>,
    name: String,
    delete_delay: Duration,
    /// Whether pushes are sent gzip-compressed (never without the `pushgateway-gzip` feature).
    gzip: bool,
    /// Whether to compare the metrics with the other groups' ([`PushgatewayBuilder::check`]).
    check: bool,
    /// `<url>/api/v1/metrics`: every group the Pushgateway holds.
    api_uri: Uri,
    /// The grouping labels, job first.
    group: Vec<(String, String)>,
    connector: Connector,
    client: HttpClient,
    /// Held for the whole of every push, periodic or final, so they never overlap.
    lane: tokio::sync::Mutex<()>,
    /// Set by the final push (before it takes the lane): no periodic push may start after it.
    finished: AtomicBool,
    /// Seeds the periodic pushes' jitter: random keys for each Pushgateway.
    jitter: std::collections::hash_map::RandomState,
    /// The final push, handed to whoever runs it first: the Telemetry hook or the supervisor's
    /// takeover. The other waits for its result: one final push (and one DELETE) between them.
    held: Arc<Handoff<()>>,
    /// The samples pushed, for the report.
    samples: Arc<Samples>,
    /// Whether the Pushgateway refused the last periodic push as inconsistent.
    refused: AtomicBool,
    /// Whether a push's render thread is running (see [`RenderSlot`]).
    rendering: Arc<AtomicBool>,
    /// Whether a consistency check's render thread is running.
    check_rendering: Arc<AtomicBool>,
}

impl fmt::Debug for Pushgateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        f.debug_struct("Pushgateway")
            .field("url", &i.url)
            .field("method", &i.method)
            .field("auth", &i.auth.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &i.request_timeout)
            .field("attempts", &i.attempts)
            .field("interval", &i.interval)
            .field("name", &i.name)
            .finish_non_exhaustive()
    }
}

impl Pushgateway {
    /// The group's URL: `<url>/metrics/job/<job>{/<label>/<value>}`.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Registers the final push as a Telemetry hook of order
    /// [`ORDER_METRICS`] and, with a
    /// [`push_interval`](PushgatewayBuilder::push_interval), spawns the periodic pusher.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DuplicateName`] if the hook's or the task's name is taken.
    ///
    /// # Panics
    ///
    /// With a push interval, outside a tokio runtime (the periodic pusher is spawned on it).
    ///
    /// If the user's runtime is wedged and the Telemetry phase cannot run, finale's supervisor
    /// pushes from its own thread instead, on a small runtime and a client of its own. The
    /// final push goes to whichever side starts it first; if the runtime unblocks after the
    /// takeover, the hook waits for the supervisor's push (and reports its result,
    /// [`PushError::BySupervisor`] if it failed) instead of pushing, or deleting, again.
    pub fn register(&self, finale: &Finale) -> Result<(), ConfigError> {
        let this = self.clone();
        finale.hook(
            Hook::new(
                Phase::Telemetry,
                self.inner.name.clone(),
                move |ctx| async move { this.final_push(&ctx).await },
            )
            .order(ORDER_METRICS),
        )?;
        let this = self.clone();
        finale.shared.add_emergency(EmergencyStage {
            name: Cow::Owned(self.inner.name.clone()),
            order: ORDER_METRICS,
            share: Share::METRICS,
            run: Box::new(move |deadline| this.emergency_push(deadline)),
        });
        if self.inner.method != Method::None {
            finale.shared.add_tally(Arc::new(SampleTally {
                stage: self.inner.name.clone(),
                samples: self.inner.samples.clone(),
            }));
        }
        let pushes = self.inner.method != Method::None || self.inner.interval.is_some();
        if self.inner.check && pushes {
            // In the background, bounded by a request timeout: the service need not wait for
            // it, and a Pushgateway that is down now is no reason to fail the start.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let this = self.clone();
                runtime.spawn(async move {
                    let deadline = Instant::now() + this.inner.request_timeout;
                    this.check(&this.inner.client, deadline).await;
                });
            }
        }
        if let Some(interval) = self.inner.interval {
            let this = self.clone();
            finale.spawn(
                Task::worker(format!("{} (periodic)", self.inner.name), move |ctx| {
                    this.periodic(ctx, interval)
                })
                .stop_in(Phase::Telemetry),
            )?;
        }
        Ok(())
    }

    /// Pushes now, with the configured [`Method`] (PUT for [`Method::None`]), retrying as
    /// configured. For pushes outside the shutdown, such as a batch job's checkpoints.
    ///
    /// # Errors
    ///
    /// A [`PushError`] saying why the last attempt failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a request in flight is dropped. Whether the Pushgateway applied it is then
    /// unknown.
    pub async fn push(&self) -> Result<(), PushError> {
        let budget = (self.inner.request_timeout + MAX_BACKOFF) * self.inner.attempts;
        let method = match self.inner.method {
            Method::None => Method::Put,
            m => m,
        };
        let _lane = self.inner.lane.lock().await;
        self.send_with_retries(&self.inner.client, method, Instant::now() + budget)
            .await
    }
}
