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
//!   A value that is empty or holds anything but `A-Z a-z 0-9 - . _ ~` (a `/` for instance) is sent
//!   the Pushgateway's way, `<label>@base64/<base64url of the value>`.
//! - [`Method::Put`] (default) replaces the whole group, [`Method::Post`] only the metrics of the
//!   same names (use it for **batch jobs**: a failed run that does not push
//!   `…_last_success_timestamp_seconds` then leaves the last good run's value in place, where a
//!   PUT would erase it), [`Method::Delete`] deletes the group at exit (for long-lived services
//!   whose series should not outlive them; periodic pushes then use PUT), [`Method::None`] sends
//!   nothing at exit.
//! - [`Method::Delete`] does not delete at once: that would delete the shutdown's own metrics
//!   before any scrape could read them. It PUTs the final metrics, keeps them for the
//!   [`delete_delay`](PushgatewayBuilder::delete_delay) (15 s by default) as far as the metrics
//!   stage's share of the slot allows, leaving one request timeout for the DELETE, and then
//!   deletes the group. A shutdown with it takes that much longer; a slot too short for the
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
use std::error::Error as StdError;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use crate::Finale;
use crate::config::ConfigError;
use crate::hook::{Hook, HookContext};
use crate::phase::Phase;
use crate::report::{Counts, Items, Tally};
use crate::slot::{ORDER_METRICS, Share, stage_deadline};
use crate::state::EmergencyStage;
use crate::task::{Task, TaskContext};
use crate::telemetry::stages::{OffThread, run_until};

mod consistency;
mod transport;

pub use transport::TransportError;
#[cfg(feature = "pushgateway-tls")]
use transport::tls::{Pem, Tls, TlsSettings};
use transport::{Connector, HttpClient, new_client};

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

/// A [`Pushgateway`] setting that cannot work, found by [`PushgatewayBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushgatewayConfigError {
    /// The Pushgateway URL is not an absolute `http://host:port[/prefix]` (or `https://…`) URL.
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The job name is empty.
    EmptyJob,
    /// A grouping label's name is not a valid Prometheus label name, is reserved (`__…`), or is
    /// `job` (which is the job name).
    InvalidLabelName {
        /// The name as given.
        name: String,
    },
    /// The same grouping label was given twice.
    DuplicateLabel {
        /// The name.
        name: String,
    },
    /// The credentials cannot be sent in an HTTP header (a control character, say).
    InvalidCredentials,
    /// A duration setting is zero.
    ZeroDuration {
        /// Which setting.
        setting: &'static str,
    },
    /// The number of attempts is zero.
    ZeroAttempts,
    /// The URL is `https://`, but finale was built without its `pushgateway-tls` feature.
    TlsFeatureDisabled {
        /// The URL as given.
        url: String,
    },
    /// TLS settings (a CA, a client certificate) were given for an `http://` URL, which would
    /// send everything, credentials included, in clear text.
    TlsWithoutHttps {
        /// The URL as given.
        url: String,
    },
    /// A TLS certificate, key or server name cannot be used.
    InvalidTls {
        /// What: `CA certificate`, `client certificate`, `client key` or `server name`.
        what: &'static str,
        /// The file it was read from, if it came from a file.
        path: Option<std::path::PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for PushgatewayConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl { url, reason } => write!(
                f,
                "invalid Pushgateway URL {url:?}: {reason}; expected http://host:port or \
                 https://host:port, optionally with a path prefix"
            ),
            Self::EmptyJob => f.write_str("the Pushgateway job name is empty"),
            Self::InvalidLabelName { name } => write!(
                f,
                "invalid grouping label name {name:?}: use [a-zA-Z_][a-zA-Z0-9_]*, not starting \
                 with \"__\", and not \"job\" (the job is given separately)"
            ),
            Self::DuplicateLabel { name } => {
                write!(f, "grouping label {name:?} is given more than once")
            }
            Self::InvalidCredentials => f.write_str(
                "the Pushgateway credentials contain characters that cannot go in an HTTP header",
            ),
            Self::ZeroDuration { setting } => {
                write!(f, "the Pushgateway {setting} must be greater than zero")
            }
            Self::ZeroAttempts => f.write_str("the Pushgateway push needs at least one attempt"),
            Self::TlsFeatureDisabled { url } => write!(
                f,
                "the Pushgateway URL {url:?} is https://, which needs finale's \
                 `pushgateway-tls` feature"
            ),
            Self::TlsWithoutHttps { url } => write!(
                f,
                "TLS settings were given but the Pushgateway URL {url:?} is plain http://; \
                 use https://"
            ),
            Self::InvalidTls { what, path, reason } => {
                write!(f, "cannot use the Pushgateway TLS {what}")?;
                if let Some(path) = path {
                    write!(f, " {}", path.display())?;
                }
                write!(f, ": {reason}")
            }
        }
    }
}

impl StdError for PushgatewayConfigError {}

/// Why a push did not reach the Pushgateway.
///
/// Its [`Display`](fmt::Display) says what failed (and, for a transport error, the innermost
/// cause), because that is what the [report](crate::ShutdownReport) shows;
/// [`source`](StdError::source) gives the [`TransportError`] of an unreachable Pushgateway.
#[derive(Debug)]
#[non_exhaustive]
pub enum PushError {
    /// The Pushgateway answered, but not `2xx`.
    Rejected {
        /// The method of the request.
        method: Method,
        /// The grouping key URL.
        url: String,
        /// The answer's status.
        status: StatusCode,
        /// The start of the answer's body, which says why.
        body: String,
        /// How many requests were made.
        attempts: u32,
    },
    /// The request did not get through: connection refused or reset, a failed TLS handshake,
    /// or a protocol error.
    Unreachable {
        /// The method of the request.
        method: Method,
        /// The grouping key URL.
        url: String,
        /// How many requests were made.
        attempts: u32,
        /// What failed.
        source: TransportError,
    },
    /// The metrics were not rendered, so nothing was sent: the render panicked, did not
    /// finish before the push's time ran out (its thread is then left behind), or an earlier
    /// push's render has not returned yet (no second one is started beside it).
    NotRendered {
        /// The method of the push.
        method: Method,
        /// The grouping key URL.
        url: String,
        /// The panic's message, if the render panicked; `None` if it ran out of time or was
        /// not started.
        panic: Option<String>,
        /// How long the push waited for the render.
        waited: Duration,
        /// Whether this push started no render because the previous push's render is still
        /// running.
        previous_running: bool,
    },
    /// No answer came in time: within the request timeout or before the stage's time ran out.
    TimedOut {
        /// The method of the request.
        method: Method,
        /// The grouping key URL.
        url: String,
        /// How many requests were made.
        attempts: u32,
        /// How long the last request waited.
        waited: Duration,
    },
}

impl PushError {
    /// Whether another attempt could succeed: a transport error (but not a refused TLS
    /// handshake), a timeout, `408`, `429` or `5xx`.
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Rejected { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    // The server or a proxy gave up waiting for the request: not its content.
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            PushError::Unreachable { source, .. } => !source.is_tls(),
            PushError::TimedOut { .. } => true,
            // The same render would do the same again.
            PushError::NotRendered { .. } => false,
        }
    }

    /// Whether the Pushgateway refused the push as inconsistent (`400`): with what it holds
    /// for other groups, or in itself. Its message, in the error's `body`, says which metric.
    pub fn is_inconsistent(&self) -> bool {
        matches!(self, PushError::Rejected { status, .. } if *status == StatusCode::BAD_REQUEST)
    }

    fn set_attempts(&mut self, n: u32) {
        match self {
            PushError::Rejected { attempts, .. }
            | PushError::Unreachable { attempts, .. }
            | PushError::TimedOut { attempts, .. } => *attempts = n,
            PushError::NotRendered { .. } => {}
        }
    }
}

struct Tries(u32);

impl fmt::Display for Tries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("not sent: a periodic push was still waiting for its answer"),
            1 => f.write_str("1 attempt"),
            n => write!(f, "{n} attempts"),
        }
    }
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Rejected {
                method,
                url,
                status,
                body,
                attempts,
            } => {
                write!(f, "Pushgateway answered {status} to {method} {url}")?;
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                if *attempts > 1 {
                    write!(f, " ({})", Tries(*attempts))?;
                }
                Ok(())
            }
            PushError::Unreachable {
                method,
                url,
                attempts,
                source,
            } => {
                write!(f, "Pushgateway unreachable: {method} {url} failed")?;
                let mut cause: Option<&(dyn StdError + 'static)> = Some(source);
                let mut innermost = source as &(dyn StdError + 'static);
                while let Some(c) = cause {
                    innermost = c;
                    cause = c.source();
                }
                write!(f, " after {}: {innermost}", Tries(*attempts))
            }
            PushError::NotRendered {
                method,
                url,
                panic: Some(panic),
                ..
            } => write!(
                f,
                "the metrics for {method} {url} were not rendered: the render panicked: {panic}"
            ),
            PushError::NotRendered {
                method,
                url,
                previous_running: true,
                ..
            } => write!(
                f,
                "the metrics for {method} {url} were not rendered: the previous render has not \
                 returned, and no second one is started beside it"
            ),
            PushError::NotRendered {
                method,
                url,
                panic: None,
                waited,
                ..
            } => write!(
                f,
                "the metrics for {method} {url} were not rendered: still rendering after \
                 {waited:?}, when the push's time ran out"
            ),
            PushError::TimedOut {
                method,
                url,
                attempts,
                waited,
            } => write!(
                f,
                "Pushgateway did not answer {method} {url} within {waited:?} ({})",
                Tries(*attempts)
            ),
        }
    }
}

impl StdError for PushError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            PushError::Unreachable { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[derive(Clone)]
enum Auth {
    Basic { user: String, password: String },
    Bearer(String),
}

/// Configures a [`Pushgateway`]. Created by [`Pushgateway::builder`].
///
/// # Default values
///
/// | setting | default |
/// |---|---|
/// | [`label`](PushgatewayBuilder::label) | none: the group is the job alone |
/// | [`method`](PushgatewayBuilder::method) | [`Method::Put`] |
/// | [`basic_auth`](PushgatewayBuilder::basic_auth), [`bearer_token`](PushgatewayBuilder::bearer_token) | none |
/// | [`request_timeout`](PushgatewayBuilder::request_timeout) | 2 s ([`DEFAULT_REQUEST_TIMEOUT`]) |
/// | [`attempts`](PushgatewayBuilder::attempts) | 3 ([`DEFAULT_ATTEMPTS`]) |
/// | [`retry_backoff`](PushgatewayBuilder::retry_backoff) | 100 ms, doubling, at most 1 s ([`DEFAULT_RETRY_BACKOFF`]) |
/// | [`push_interval`](PushgatewayBuilder::push_interval) | none: only the final push |
/// | [`name`](PushgatewayBuilder::name) | `pushgateway` ([`DEFAULT_NAME`]) |
/// | [`check`](PushgatewayBuilder::check) | on: at registration and after a `400` |
/// | `gzip` (feature `pushgateway-gzip`) | off: the body is sent as plain text |
/// | [`delete_delay`](PushgatewayBuilder::delete_delay) | 15 s, cut to fit the slot ([`DEFAULT_DELETE_DELAY`]) |
/// | [`tls_ca_pem`](PushgatewayBuilder::tls_ca_pem), [`tls_ca_file`](PushgatewayBuilder::tls_ca_file) | Mozilla's roots (webpki-roots), for `https://` URLs |
/// | [`tls_client_cert_pem`](PushgatewayBuilder::tls_client_cert_pem), [`tls_client_cert_files`](PushgatewayBuilder::tls_client_cert_files) | none: no client certificate |
#[must_use = "a builder does nothing until `build` is called"]
pub struct PushgatewayBuilder {
    url: String,
    job: String,
    labels: Vec<(String, String)>,
    method: Method,
    auth: Option<Auth>,
    request_timeout: Duration,
    attempts: u32,
    backoff: Duration,
    interval: Option<Duration>,
    name: String,
    delete_delay: Duration,
    check: bool,
    #[cfg(feature = "pushgateway-gzip")]
    gzip: bool,
    #[cfg(feature = "pushgateway-tls")]
    tls: TlsSettings,
}

impl fmt::Debug for PushgatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushgatewayBuilder")
            .field("url", &self.url)
            .field("job", &self.job)
            .field("labels", &self.labels)
            .field("method", &self.method)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .field("interval", &self.interval)
            .field("name", &self.name)
            .field("delete_delay", &self.delete_delay)
            .field("check", &self.check)
            .field("gzip", &gzip_of(self))
            .finish_non_exhaustive()
    }
}

impl PushgatewayBuilder {
    /// Adds a grouping label, such as `instance`. Its value may hold anything, `/` included.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((name.into(), value.into()));
        self
    }

    /// What the final push does.
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Sends HTTP basic authentication with every request (replaces a bearer token).
    pub fn basic_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(Auth::Basic {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request (replaces basic authentication).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.auth = Some(Auth::Bearer(token.into()));
        self
    }

    /// The timeout of one request, from connecting to the end of the answer.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How many requests the final push may make, time permitting.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// The wait before the first retry; it doubles for each further one, up to 1 s.
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Also pushes every `interval` while the service runs, each push early by a random part
    /// of up to [`PUSH_JITTER`] of it (one attempt each; a failure is
    /// logged and the next tick tries again).
    pub fn push_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// With [`Method::Delete`]: how long the final metrics stay in the Pushgateway, for a scrape
    /// to read them, before the group is deleted. The wait ends early enough to leave one
    /// request timeout for the `DELETE` within the metrics stage's share of the Telemetry slot
    /// (about half of the slot): to keep the metrics for a whole scrape interval, give the slot
    /// ([`telemetry_reserve`](crate::Builder::telemetry_reserve)) at least twice the interval
    /// plus two request timeouts. `Duration::ZERO` deletes right after the push.
    pub fn delete_delay(mut self, delay: Duration) -> Self {
        self.delete_delay = delay;
        self
    }

    /// Whether to compare the metrics with what the Pushgateway holds for other groups, once
    /// when the push is registered and again after a push it refused with `400`, and to log a
    /// warning for each metric it would refuse (see [the module docs](self#consistency-with-other-groups)).
    /// Each check reads the Pushgateway's whole state (`GET /api/v1/metrics`): turn it off
    /// for a Pushgateway that holds very many groups and many instances that start together.
    pub fn check(mut self, check: bool) -> Self {
        self.check = check;
        self
    }

    /// The hook's name in the report; the periodic task is named `<name> (periodic)`. Give two
    /// Pushgateways different names.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sends each push gzip-compressed (`Content-Encoding: gzip`), compressed on the thread
    /// that renders it. The text format compresses well (often to a tenth), which shortens the
    /// final push of a large registry on a slow link.
    ///
    /// Off by default: only Pushgateway 1.5.0 and later read a compressed body; an older one
    /// takes it for text and answers `400`.
    #[cfg(feature = "pushgateway-gzip")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pushgateway-gzip")))]
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Trusts only the CA certificates in `pem` (one or more `-----BEGIN CERTIFICATE-----`
    /// blocks) for the Pushgateway's certificate, instead of the Mozilla roots that
    /// webpki-roots compiles in. For a Pushgateway whose certificate a private CA signed.
    /// Replaces an earlier [`tls_ca_file`](Self::tls_ca_file).
    #[cfg(feature = "pushgateway-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pushgateway-tls")))]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca = Some(Pem::Bytes(pem.into()));
        self
    }

    /// [`tls_ca_pem`](Self::tls_ca_pem) from a file, read by [`build`](Self::build) (a
    /// rotated file is read again only by a new build).
    #[cfg(feature = "pushgateway-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pushgateway-tls")))]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.ca = Some(Pem::File(path.into()));
        self
    }

    /// Presents a client certificate (mutual TLS): `cert_chain` holds the certificate and any
    /// intermediates, leaf first; `key` its private key (PKCS#8, PKCS#1 or SEC1), both PEM.
    #[cfg(feature = "pushgateway-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pushgateway-tls")))]
    pub fn tls_client_cert_pem(
        mut self,
        cert_chain: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((Pem::Bytes(cert_chain.into()), Pem::Bytes(key.into())));
        self
    }

    /// [`tls_client_cert_pem`](Self::tls_client_cert_pem) from files, read by
    /// [`build`](Self::build).
    #[cfg(feature = "pushgateway-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pushgateway-tls")))]
    pub fn tls_client_cert_files(
        mut self,
        cert_chain: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.client = Some((Pem::File(cert_chain.into()), Pem::File(key.into())));
        self
    }

    /// Validates the settings and builds the [`Pushgateway`].
    ///
    /// # Errors
    ///
    /// A [`PushgatewayConfigError`] that says what to fix.
    pub fn build(self, handle: PrometheusHandle) -> Result<Pushgateway, PushgatewayConfigError> {
        self.build_with(move || handle.render())
    }

    /// Like [`build`](Self::build), with the metrics rendered by `render` instead of a
    /// [`PrometheusHandle`]: for a registry other than metrics-exporter-prometheus's (the
    /// `prometheus` crate's `TextEncoder`, an exposition written by hand). `render` returns the
    /// Prometheus text format (version 0.0.4) and is called once per push attempt (retries
    /// reuse the body), on a thread of its own, so it may take its time or block without
    /// holding up the runtime; while one call has not returned, pushes fail rather than call
    /// it again beside it (see [the module docs](self#what-is-pushed-where-and-how)).
    ///
    /// It is also called once by each consistency check ([`check`](Self::check): at
    /// registration and after a push refused with `400`), so it must not have side effects:
    /// it must not drain, reset or otherwise change what it renders.
    ///
    /// # Errors
    ///
    /// A [`PushgatewayConfigError`] that says what to fix.
    pub fn build_with<F>(self, render: F) -> Result<Pushgateway, PushgatewayConfigError>
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        let url = grouping_url(&self.url, &self.job, &self.labels)?;
        let https = url.starts_with("https://");
        let uri: Uri = url
            .parse()
            .map_err(|_| PushgatewayConfigError::InvalidUrl {
                url: self.url.clone(),
                reason: "it does not parse once the grouping key is added",
            })?;
        for (setting, d) in [
            ("request timeout", Some(self.request_timeout)),
            ("retry backoff", Some(self.backoff)),
            ("push interval", self.interval),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(PushgatewayConfigError::ZeroDuration { setting });
            }
        }
        if self.attempts == 0 {
            return Err(PushgatewayConfigError::ZeroAttempts);
        }
        let auth = match &self.auth {
            None => None,
            Some(Auth::Basic { user, password }) => Some(format!(
                "Basic {}",
                base64(format!("{user}:{password}").as_bytes(), STANDARD)
            )),
            Some(Auth::Bearer(token)) => Some(format!("Bearer {token}")),
        }
        .map(|v| HeaderValue::from_str(&v).map_err(|_| PushgatewayConfigError::InvalidCredentials))
        .transpose()?
        .map(|mut v| {
            v.set_sensitive(true);
            v
        });
        let connector = Connector::plain(self.request_timeout);
        #[cfg(feature = "pushgateway-tls")]
        let connector = match (https, self.tls.is_set()) {
            (true, _) => {
                let host = uri.host().unwrap_or_default();
                connector.with_tls(Tls::new(&self.tls, host)?)
            }
            (false, true) => {
                return Err(PushgatewayConfigError::TlsWithoutHttps { url: self.url });
            }
            (false, false) => connector,
        };
        #[cfg(not(feature = "pushgateway-tls"))]
        if https {
            return Err(PushgatewayConfigError::TlsFeatureDisabled { url: self.url });
        }
        let client = new_client(connector.clone());
        let gzip = gzip_of(&self);
        let api_uri =
            api_url(&self.url)
                .parse()
                .map_err(|_| PushgatewayConfigError::InvalidUrl {
                    url: self.url.clone(),
                    reason: "it does not parse once the API path is added",
                })?;
        let mut group = vec![("job".to_owned(), self.job)];
        group.extend(self.labels);
        Ok(Pushgateway {
            inner: Arc::new(Inner {
                render: Arc::new(render),
                url,
                uri,
                method: self.method,
                auth,
                request_timeout: self.request_timeout,
                attempts: self.attempts,
                backoff: self.backoff,
                interval: self.interval,
                name: self.name,
                delete_delay: self.delete_delay,
                gzip,
                check: self.check,
                api_uri,
                group,
                connector,
                client,
                lane: tokio::sync::Mutex::new(()),
                finished: AtomicBool::new(false),
                delivered: AtomicBool::new(false),
                jitter: std::collections::hash_map::RandomState::new(),
                samples: Arc::default(),
                refused: AtomicBool::new(false),
                rendering: Arc::default(),
                check_rendering: Arc::default(),
            }),
        })
    }
}

/// Pushes the metrics of a [`PrometheusHandle`] to a Prometheus Pushgateway at exit (and, if
/// asked, periodically). Cheap to clone. See the [module docs](self).
#[derive(Clone)]
pub struct Pushgateway {
    inner: Arc<Inner>,
}

/// What renders the metrics: [`PrometheusHandle::render`] or the user's closure.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

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
    /// Set once the final push was accepted: the supervisor need not push again.
    /// Seeds the periodic pushes' jitter: random keys for each Pushgateway.
    jitter: std::collections::hash_map::RandomState,
    delivered: AtomicBool,
    /// The samples pushed, for the report.
    samples: Arc<Samples>,
    /// Whether the Pushgateway refused the last periodic push as inconsistent.
    refused: AtomicBool,
    /// Whether a push's render thread is running (see [`RenderSlot`]).
    rendering: Arc<AtomicBool>,
    /// Whether a consistency check's render thread is running.
    check_rendering: Arc<AtomicBool>,
}

/// The right to run a render thread: one for pushes and one for consistency checks at a time,
/// so that a render that never returns leaves one thread behind, not one per push. Held by the
/// thread and given back when it returns (or panics).
struct RenderSlot(Arc<AtomicBool>);

impl RenderSlot {
    /// The slot, unless its last render is still running.
    fn take(running: &Arc<AtomicBool>) -> Option<RenderSlot> {
        running
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| RenderSlot(running.clone()))
    }
}

impl Drop for RenderSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Samples in pushes the Pushgateway took (`exported`) and refused or never answered
/// (`failed`), and how many the last body rendered held.
#[derive(Debug, Default)]
struct Samples {
    exported: AtomicU64,
    failed: AtomicU64,
    last_body: AtomicU64,
}

impl Samples {
    /// A push whose body was not rendered: it fails as many samples as the last body held, at
    /// least one, so that a [`DeliveryPolicy`](crate::DeliveryPolicy) sees the failure. Its own
    /// count is unknown; the last one is the best guess.
    fn nothing_rendered(&self) {
        self.last_body.fetch_max(1, Ordering::Relaxed);
    }

    /// Counts the last body's samples as pushed or not. One count per push, not per attempt:
    /// a push that succeeded on its second attempt lost nothing.
    fn record(&self, pushed: bool) {
        let n = self.last_body.load(Ordering::Relaxed);
        let to = if pushed { &self.exported } else { &self.failed };
        to.fetch_add(n, Ordering::Relaxed);
    }
}

/// The report's view of the samples pushed.
struct SampleTally {
    stage: String,
    samples: Arc<Samples>,
}

impl Tally for SampleTally {
    fn stage(&self) -> Cow<'static, str> {
        Cow::Owned(self.stage.clone())
    }

    fn items(&self) -> Items {
        Items::Samples
    }

    fn counts(&self) -> Counts {
        Counts::new(
            self.samples.exported.load(Ordering::Relaxed),
            self.samples.failed.load(Ordering::Relaxed),
            0,
        )
    }
}

/// A push's body, rendered.
#[derive(Clone, Default)]
struct Body {
    bytes: Bytes,
    /// The samples it holds, for the report.
    samples: u64,
    /// Whether `bytes` is gzip-compressed.
    gzip: bool,
}

/// Renders a push's body, compressed if `gzip`. Runs on the render thread.
fn rendered(render: &Render, gzip: bool) -> Body {
    let text = render();
    let samples = samples_in(&text);
    #[cfg(feature = "pushgateway-gzip")]
    if let Some(bytes) = gzip.then(|| gzipped(text.as_bytes())).flatten() {
        return Body {
            bytes: Bytes::from(bytes),
            samples,
            gzip: true,
        };
    }
    #[cfg(not(feature = "pushgateway-gzip"))]
    let _ = gzip;
    Body {
        bytes: Bytes::from(text),
        samples,
        gzip: false,
    }
}

/// `text`, gzip-compressed; `None` if compressing failed (it cannot, into memory: the body is
/// then sent as it is).
#[cfg(feature = "pushgateway-gzip")]
fn gzipped(text: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(text).ok()?;
    encoder.finish().ok()
}

/// The builder's gzip setting: always off without the feature.
fn gzip_of(builder: &PushgatewayBuilder) -> bool {
    #[cfg(feature = "pushgateway-gzip")]
    return builder.gzip;
    #[cfg(not(feature = "pushgateway-gzip"))]
    {
        let _ = builder;
        false
    }
}

/// The sample lines of a text exposition: neither empty nor comments.
fn samples_in(body: &str) -> u64 {
    body.lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#')
        })
        .count() as u64
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
    /// Starts configuring a push of `job`'s metrics to the Pushgateway at `url`
    /// (`http://host:port` or, with the `pushgateway-tls` feature, `https://host:port`,
    /// optionally with a path prefix).
    pub fn builder(url: impl Into<String>, job: impl Into<String>) -> PushgatewayBuilder {
        PushgatewayBuilder {
            url: url.into(),
            job: job.into(),
            labels: Vec::new(),
            method: Method::Put,
            auth: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            backoff: DEFAULT_RETRY_BACKOFF,
            interval: None,
            name: DEFAULT_NAME.to_owned(),
            delete_delay: DEFAULT_DELETE_DELAY,
            check: true,
            #[cfg(feature = "pushgateway-gzip")]
            gzip: false,
            #[cfg(feature = "pushgateway-tls")]
            tls: TlsSettings::default(),
        }
    }

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
    /// pushes from its own thread instead, on a small runtime and a client of its own.
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

    async fn final_push(&self, ctx: &HookContext) -> Result<(), PushError> {
        let deadline = stage_deadline(ctx, Share::METRICS);
        let inner = &*self.inner;
        // Ordering: the flag is set before we queue for the lane, and a periodic push checks it
        // after taking the lane, so none can start once we hold it.
        inner.finished.store(true, Ordering::Release);
        let method = inner.method;
        let start = Instant::now();
        let lane = match tokio::time::timeout_at(deadline, inner.lane.lock()).await {
            Ok(lane) => lane,
            Err(_) => {
                let error = PushError::TimedOut {
                    method,
                    url: inner.url.clone(),
                    attempts: 0,
                    waited: start.elapsed(),
                };
                tracing::error!(target: "finale", %error, "final metrics push failed");
                return Err(error);
            }
        };
        if method == Method::None {
            return Ok(());
        }
        let result = self.send_final(&inner.client, deadline).await;
        if result.is_ok() {
            inner.delivered.store(true, Ordering::Release);
        }
        drop(lane);
        match &result {
            Ok(()) => tracing::info!(
                target: "finale",
                url = %inner.url,
                method = %method,
                elapsed = ?start.elapsed(),
                "final metrics pushed to the Pushgateway"
            ),
            Err(error) => tracing::error!(target: "finale", %error, "final metrics push failed"),
        }
        result
    }

    /// The final push from a plain thread, when the user's runtime is wedged. Its own client:
    /// a pooled connection's task lives on the wedged runtime and would never run.
    fn emergency_push(&self, deadline: std::time::Instant) -> Result<(), String> {
        let inner = &*self.inner;
        if inner.method == Method::None || inner.delivered.load(Ordering::Acquire) {
            return Ok(());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let client = new_client(inner.connector.clone());
            let deadline = Instant::from_std(deadline);
            self.send_final(&client, deadline)
                .await
                .map_err(|e| e.to_string())
        })
    }

    async fn periodic(self, ctx: TaskContext, interval: Duration) {
        let inner = &*self.inner;
        let method = match inner.method {
            Method::Post => Method::Post,
            _ => Method::Put,
        };
        let mut pushes = 0u64;
        let mut next = Instant::now() + jittered(interval, inner.jitter.hash_one(pushes));
        loop {
            tokio::select! {
                // Stopping wins over a push that is due at the same time.
                biased;
                () = ctx.stopped() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            pushes += 1;
            let wait = jittered(interval, inner.jitter.hash_one(pushes));
            // After a late answer, a full wait from now rather than a burst to catch up.
            next = (next + wait).max(Instant::now() + wait);
            let lane = inner.lane.lock().await;
            if inner.finished.load(Ordering::Acquire) {
                return;
            }
            // A push in flight is not cancelled by the stop signal: the final push waits for its
            // answer, so it cannot land after the final one.
            let deadline = Instant::now() + inner.request_timeout;
            let result = match self.render(method, deadline).await {
                Ok(body) => self.send_once(&inner.client, method, body, deadline).await,
                Err(error) => Err(error),
            };
            drop(lane);
            inner.samples.record(result.is_ok());
            // Checked on the first of a run of refusals, not on every tick that repeats it.
            let refused = matches!(&result, Err(e) if e.is_inconsistent());
            let refused_before = inner.refused.swap(refused, Ordering::Relaxed);
            match result {
                Ok(()) => tracing::debug!(target: "finale", url = %inner.url, "periodic push"),
                Err(error) => tracing::warn!(target: "finale", %error, "periodic push failed"),
            }
            if refused && !refused_before && inner.check {
                let deadline = Instant::now() + inner.request_timeout;
                tokio::select! {
                    biased;
                    () = ctx.stopped() => return,
                    _ = self.check(&inner.client, deadline) => {}
                }
            }
        }
    }

    /// The final push with the configured method (not [`Method::None`]), by `deadline`.
    async fn send_final(&self, client: &HttpClient, deadline: Instant) -> Result<(), PushError> {
        let inner = &*self.inner;
        if inner.method != Method::Delete {
            return self.send_with_retries(client, inner.method, deadline).await;
        }
        // The final snapshot first, finale's shutdown metrics included, so that a scrape can
        // read it; the group is deleted after the delay, keeping a request's time for that.
        let put = self.send_with_retries(client, Method::Put, deadline).await;
        match &put {
            Ok(()) => {
                let asked = Instant::now() + inner.delete_delay;
                let latest = deadline
                    .checked_sub(inner.request_timeout)
                    .unwrap_or(deadline);
                if latest < asked {
                    tracing::warn!(
                        target: "finale",
                        delete_delay = ?inner.delete_delay,
                        kept = ?latest.saturating_duration_since(Instant::now()),
                        "the Telemetry slot is too short to keep the final metrics for the \
                         delete delay before deleting the group"
                    );
                }
                tokio::time::sleep_until(asked.min(latest)).await;
            }
            Err(error) => tracing::warn!(
                target: "finale",
                %error,
                "the final metrics were not pushed; deleting the group all the same"
            ),
        }
        self.send_with_retries(client, Method::Delete, deadline)
            .await?;
        put
    }

    async fn send_with_retries(
        &self,
        client: &HttpClient,
        method: Method,
        deadline: Instant,
    ) -> Result<(), PushError> {
        let inner = &*self.inner;
        let mut backoff = inner.backoff;
        let mut attempt = 0;
        let counted = method != Method::Delete;
        // Rendered once for all attempts: a retry sends what the first attempt did.
        let body = if counted {
            match self.render(method, deadline).await {
                Ok(body) => body,
                Err(error) => {
                    inner.samples.record(false);
                    return Err(error);
                }
            }
        } else {
            Body::default()
        };
        loop {
            attempt += 1;
            let mut error = match self.send_once(client, method, body.clone(), deadline).await {
                Ok(()) => {
                    if counted {
                        inner.samples.record(true);
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            error.set_attempts(attempt);
            let retry_at = Instant::now() + backoff;
            if attempt >= inner.attempts || !error.is_transient() || retry_at >= deadline {
                if counted {
                    inner.samples.record(false);
                }
                // Say which metric clashed, with whom; bounded like one more request.
                if error.is_inconsistent() && inner.check {
                    let until = (Instant::now() + inner.request_timeout).min(deadline);
                    self.check(client, until).await;
                }
                return Err(error);
            }
            tracing::debug!(target: "finale", %error, ?backoff, "retrying the push");
            tokio::time::sleep_until(retry_at).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Compares the metrics with what the Pushgateway holds for the other groups and logs a
    /// warning for each that it would refuse; returns how many. Bounded by `deadline`. A check
    /// that cannot be made (the Pushgateway unreachable, an answer that is not its API's, as
    /// from a gateway older than 1.2) is logged at debug level and changes nothing.
    async fn check(&self, client: &HttpClient, deadline: Instant) -> usize {
        let inner = &*self.inner;
        let mut request = Request::builder()
            .method(http::Method::GET)
            .uri(inner.api_uri.clone());
        if let Some(auth) = &inner.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .expect("the URI and headers were validated at build time");
        let exchange = async {
            let response = client.request(request).await.map_err(|e| {
                let e = TransportError::new(e);
                let mut cause: &(dyn StdError + 'static) = &e;
                while let Some(c) = cause.source() {
                    cause = c;
                }
                format!("{e}: {cause}")
            })?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("the Pushgateway answered {status}"));
            }
            let too_large = || format!("the answer is larger than {} MiB", MAX_CHECK_ANSWER >> 20);
            let announced = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if announced.is_some_and(|n| n > MAX_CHECK_ANSWER as u64) {
                return Err(too_large());
            }
            // Read frame by frame, so that a larger answer is not taken whole into memory; the
            // rest is not read (dropping the body closes the connection).
            let mut incoming = response.into_body();
            let mut held = Vec::new();
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| format!("reading the answer failed: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    if held.len() + data.len() > MAX_CHECK_ANSWER {
                        return Err(too_large());
                    }
                    held.extend_from_slice(&data);
                }
            }
            Ok(held)
        };
        let held = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(held)) => held,
            Ok(Err(reason)) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, %reason, "no consistency check");
                return 0;
            }
            Err(_) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, "no consistency check: no answer in time");
                return 0;
            }
        };
        // Rendering and comparing take a while for a large registry: off the runtime too.
        let Some(slot) = RenderSlot::take(&inner.check_rendering) else {
            tracing::debug!(target: "finale", "no consistency check: the previous check's render has not returned");
            return 0;
        };
        let render = inner.render.clone();
        let group = inner.group.clone();
        let compare = move || {
            let _slot = slot;
            consistency::clashes(&render(), &group, &held)
        };
        let clashes = match run_until(RENDER_THREAD, deadline, compare).await {
            Ok(OffThread::Done(Ok(clashes))) => clashes,
            Ok(OffThread::Done(Err(reason))) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, %reason, "no consistency check: not the Pushgateway's API");
                return 0;
            }
            Ok(OffThread::Panicked(reason)) => {
                tracing::debug!(target: "finale", %reason, "no consistency check: the render panicked");
                return 0;
            }
            Ok(OffThread::TimedOut) | Err(_) => {
                tracing::debug!(target: "finale", "no consistency check: not rendered in time");
                return 0;
            }
        };
        if clashes.is_empty() {
            tracing::debug!(target: "finale", url = %inner.url, "consistency check: nothing the Pushgateway would refuse");
        }
        for clash in &clashes {
            tracing::warn!(
                target: "finale",
                url = %inner.url,
                metric = %clash.metric,
                group = %clash.group,
                "{clash}"
            );
        }
        clashes.len()
    }

    /// Renders the metrics for a push on a thread of its own, by `deadline`, and notes how many
    /// samples they hold for the report.
    ///
    /// One render thread for pushes at a time: while the last one has not returned (a render
    /// that blocks), a push fails at once rather than leave one more thread behind each time.
    ///
    /// Not on the runtime: rendering a large registry (or a user's render that blocks) would
    /// stall every task of a `current_thread` runtime for as long. A plain thread rather than
    /// `spawn_blocking`, for the reason in [`stages`](crate::telemetry::stages): one that
    /// outlives its deadline is left behind, not waited for by the runtime's drop. The thread
    /// also works under the supervisor's takeover, whose runtime is a small one of its own.
    async fn render(&self, method: Method, deadline: Instant) -> Result<Body, PushError> {
        let inner = &*self.inner;
        let start = Instant::now();
        let Some(slot) = RenderSlot::take(&inner.rendering) else {
            inner.samples.nothing_rendered();
            return Err(PushError::NotRendered {
                method,
                url: inner.url.clone(),
                panic: None,
                waited: Duration::ZERO,
                previous_running: true,
            });
        };
        let render = inner.render.clone();
        let gzip = inner.gzip;
        let work = move || {
            let _slot = slot;
            rendered(&render, gzip)
        };
        let rendered = match run_until(RENDER_THREAD, deadline, work).await {
            Ok(OffThread::Done(rendered)) => Ok(rendered),
            Ok(OffThread::Panicked(panic)) => Err(Some(panic)),
            Ok(OffThread::TimedOut) => Err(None),
            // No thread can start (a process at its limit): rendering here beats not pushing.
            Err(error) => {
                tracing::debug!(target: "finale", %error, "rendering on the runtime's thread");
                Ok(rendered(&inner.render, inner.gzip))
            }
        };
        match rendered {
            Ok(body) => {
                inner
                    .samples
                    .last_body
                    .store(body.samples, Ordering::Relaxed);
                Ok(body)
            }
            Err(panic) => {
                inner.samples.nothing_rendered();
                Err(PushError::NotRendered {
                    method,
                    url: inner.url.clone(),
                    panic,
                    waited: start.elapsed(),
                    previous_running: false,
                })
            }
        }
    }

    /// One request with `body`, bounded by the request timeout and `deadline`.
    async fn send_once(
        &self,
        client: &HttpClient,
        method: Method,
        body: Body,
        deadline: Instant,
    ) -> Result<(), PushError> {
        let inner = &*self.inner;
        let start = Instant::now();
        let until = (start + inner.request_timeout).min(deadline);
        let mut request = Request::builder()
            .method(method.http())
            .uri(inner.uri.clone())
            .header(CONTENT_TYPE, TEXT_FORMAT);
        if body.gzip {
            request = request.header(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if let Some(auth) = &inner.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(body.bytes))
            .expect("method, URI and headers were validated at build time");
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            // The body of an error answer says why; read its start only. The rest is not read:
            // dropping the body closes the connection.
            let mut body = Vec::new();
            if !status.is_success() {
                let mut incoming = response.into_body();
                while body.len() <= MAX_ERROR_BODY {
                    match incoming.frame().await {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                body.extend_from_slice(&data);
                            }
                        }
                        Some(Err(_)) | None => break,
                    }
                }
            }
            Ok::<_, hyper_util::client::legacy::Error>((status, body))
        };
        match tokio::time::timeout_at(until, exchange).await {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, body))) => {
                let text = String::from_utf8_lossy(&body);
                let mut text = text.trim().to_owned();
                if text.len() > MAX_ERROR_BODY {
                    let mut cut = MAX_ERROR_BODY;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    text.push('…');
                }
                Err(PushError::Rejected {
                    method,
                    url: inner.url.clone(),
                    status,
                    body: text,
                    attempts: 1,
                })
            }
            Ok(Err(source)) => Err(PushError::Unreachable {
                method,
                url: inner.url.clone(),
                attempts: 1,
                source: TransportError::new(source),
            }),
            Err(_) => Err(PushError::TimedOut {
                method,
                url: inner.url.clone(),
                attempts: 1,
                waited: start.elapsed(),
            }),
        }
    }
}

/// `interval`, shortened by up to [`PUSH_JITTER`] of it, by how much `random` says.
fn jittered(interval: Duration, random: u64) -> Duration {
    // The top 53 bits as a fraction in [0, 1): exact in an f64.
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(1.0 - PUSH_JITTER * fraction)
}

/// Validates the base URL, job and labels and builds the group's URL.
fn grouping_url(
    base: &str,
    job: &str,
    labels: &[(String, String)],
) -> Result<String, PushgatewayConfigError> {
    let invalid = |reason| PushgatewayConfigError::InvalidUrl {
        url: base.to_owned(),
        reason,
    };
    let uri: Uri = base.parse().map_err(|_| invalid("it is not a valid URL"))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => return Err(invalid("the scheme (http:// or https://) is missing")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("the host is missing"))?;
    if authority.as_str().contains('@') {
        return Err(invalid(
            "credentials in the URL are not sent; use basic_auth instead",
        ));
    }
    if uri.query().is_some() {
        return Err(invalid("it must not have a query"));
    }
    if job.is_empty() {
        return Err(PushgatewayConfigError::EmptyJob);
    }
    let prefix = uri.path().trim_end_matches('/');
    let mut url = format!("{scheme}://{authority}{prefix}/metrics");
    push_pair(&mut url, "job", job);
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in labels {
        if !is_label_name(name) {
            return Err(PushgatewayConfigError::InvalidLabelName { name: name.clone() });
        }
        if seen.contains(&name.as_str()) {
            return Err(PushgatewayConfigError::DuplicateLabel { name: name.clone() });
        }
        seen.push(name);
        push_pair(&mut url, name, value);
    }
    Ok(url)
}

/// The API's list of groups, `<scheme>://<authority><prefix>/api/v1/metrics`, for a base URL
/// that [`grouping_url`] accepted.
fn api_url(base: &str) -> String {
    let uri: Uri = base.parse().unwrap_or_default();
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let prefix = uri.path().trim_end_matches('/');
    format!("{scheme}://{authority}{prefix}/api/v1/metrics")
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name != "job"
}

/// Appends `/<name>/<value>`, or `/<name>@base64/<value as base64url>` when the value is empty
/// or holds anything but URL-unreserved characters (the Pushgateway's own encoding).
fn push_pair(url: &mut String, name: &str, value: &str) {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    url.push('/');
    url.push_str(name);
    if plain {
        url.push('/');
        url.push_str(value);
    } else if value.is_empty() {
        // The Pushgateway's spelling of an empty value.
        url.push_str("@base64/=");
    } else {
        url.push_str("@base64/");
        url.push_str(&base64(value.as_bytes(), URL_SAFE));
    }
}

const STANDARD: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    true,
);
const URL_SAFE: (&[u8; 64], bool) = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    false,
);

/// RFC 4648 base64 with the given alphabet, padded or not.
fn base64(input: &[u8], (alphabet, pad): (&[u8; 64], bool)) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, s) in sextets.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(alphabet[*s as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn handle() -> PrometheusHandle {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    }

    #[cfg(not(feature = "pushgateway-tls"))]
    #[test]
    fn https_needs_the_tls_feature() {
        let e = Pushgateway::builder("https://gw:9091", "j")
            .basic_auth("user", "secret")
            .build(handle())
            .unwrap_err();
        assert_eq!(
            e,
            PushgatewayConfigError::TlsFeatureDisabled {
                url: "https://gw:9091".to_owned()
            }
        );
        assert!(e.to_string().contains("`pushgateway-tls` feature"), "{e}");
    }

    #[cfg(feature = "pushgateway-tls")]
    #[test]
    fn tls_settings_are_checked_at_build_time() {
        assert!(
            Pushgateway::builder("https://[::1]:9091", "j")
                .build(handle())
                .is_ok()
        );
        let e = Pushgateway::builder("http://gw:9091", "j")
            .tls_ca_pem("x")
            .build(handle())
            .unwrap_err();
        assert!(
            matches!(e, PushgatewayConfigError::TlsWithoutHttps { .. }),
            "{e}"
        );
        let e = Pushgateway::builder("https://gw:9091", "j")
            .tls_client_cert_pem("", "")
            .build(handle())
            .unwrap_err();
        assert!(
            matches!(
                e,
                PushgatewayConfigError::InvalidTls {
                    what: "client certificate",
                    path: None,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn jitter_stays_within_the_last_fifth_of_the_interval() {
        let interval = Duration::from_secs(10);
        assert_eq!(jittered(interval, 0), interval);
        let earliest = jittered(interval, u64::MAX);
        assert!(
            earliest >= Duration::from_secs(8) && earliest < Duration::from_millis(8001),
            "{earliest:?}"
        );
        let keys = std::collections::hash_map::RandomState::new();
        let waits: Vec<_> = (0..1000u64)
            .map(|n| jittered(interval, keys.hash_one(n)))
            .collect();
        assert!(
            waits
                .iter()
                .all(|w| *w > Duration::from_secs(8) && *w <= interval)
        );
        let mean = waits.iter().sum::<Duration>() / 1000;
        assert!(
            mean > Duration::from_millis(8900) && mean < Duration::from_millis(9100),
            "{mean:?}"
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (input, padded, url) in [
            ("", "", ""),
            ("f", "Zg==", "Zg"),
            ("fo", "Zm8=", "Zm8"),
            ("foo", "Zm9v", "Zm9v"),
            ("foobar", "Zm9vYmFy", "Zm9vYmFy"),
            ("/var/tmp", "L3Zhci90bXA=", "L3Zhci90bXA"),
            ("\u{ff}\u{fe}", "w7/Dvg==", "w7_Dvg"),
        ] {
            assert_eq!(base64(input.as_bytes(), STANDARD), padded, "{input:?}");
            assert_eq!(base64(input.as_bytes(), URL_SAFE), url, "{input:?}");
        }
    }

    #[test]
    fn grouping_key_is_encoded_the_pushgateway_way() {
        let url = grouping_url(
            "http://127.0.0.1:9091/",
            "batch",
            &labels(&[("instance", "host-1"), ("path", "/var/tmp"), ("empty", "")]),
        )
        .unwrap();
        assert_eq!(
            url,
            "http://127.0.0.1:9091/metrics/job/batch/instance/host-1\
             /path@base64/L3Zhci90bXA/empty@base64/="
        );
        let url = grouping_url("http://gw:80/prefix", "a b", &[]).unwrap();
        assert_eq!(url, "http://gw:80/prefix/metrics/job@base64/YSBi");
    }

    #[test]
    fn bad_settings_say_what_to_fix() {
        let err = |base: &str, job: &str, l: &[(&str, &str)]| {
            grouping_url(base, job, &labels(l)).unwrap_err()
        };
        assert!(matches!(
            err("ftp://gw:9091", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert!(matches!(
            err("gw:9091", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert!(matches!(
            err("http://gw:9091?x=1", "j", &[]),
            PushgatewayConfigError::InvalidUrl { .. }
        ));
        assert_eq!(
            err("http://gw:9091", "", &[]),
            PushgatewayConfigError::EmptyJob
        );
        for bad in ["job", "__name", "1abc", "a-b", ""] {
            assert_eq!(
                err("http://gw:9091", "j", &[(bad, "v")]),
                PushgatewayConfigError::InvalidLabelName {
                    name: bad.to_owned()
                }
            );
        }
        assert_eq!(
            err("http://gw:9091", "j", &[("a", "1"), ("a", "2")]),
            PushgatewayConfigError::DuplicateLabel {
                name: "a".to_owned()
            }
        );
        let shown = err("ftp://gw:9091", "j", &[]).to_string();
        assert!(
            shown.contains("the scheme must be http or https"),
            "{shown}"
        );
        assert_eq!(
            grouping_url("https://gw:9091/p", "j", &[]).unwrap(),
            "https://gw:9091/p/metrics/job/j"
        );
    }
}
