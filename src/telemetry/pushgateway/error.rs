//! What can go wrong: a setting that cannot work, found at build time, and a push that failed.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::StatusCode;

use super::{Method, TransportError};
#[cfg(doc)]
use super::{Pushgateway, PushgatewayBuilder};

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
    /// The supervisor took the final push over (the runtime was wedged, then unblocked) and
    /// the sequence's hook waited for it instead of pushing again: the supervisor's push
    /// failed, or had not ended by the hook's deadline.
    BySupervisor {
        /// The method of the push.
        method: Method,
        /// The grouping key URL.
        url: String,
        /// The supervisor's outcome.
        error: String,
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
            // Another side's push: not this one's to retry.
            PushError::BySupervisor { .. } => false,
        }
    }

    /// Whether the Pushgateway refused the push as inconsistent (`400`): with what it holds
    /// for other groups, or in itself. Its message, in the error's `body`, says which metric.
    pub fn is_inconsistent(&self) -> bool {
        matches!(self, PushError::Rejected { status, .. } if *status == StatusCode::BAD_REQUEST)
    }

    pub(super) fn set_attempts(&mut self, n: u32) {
        match self {
            PushError::Rejected { attempts, .. }
            | PushError::Unreachable { attempts, .. }
            | PushError::TimedOut { attempts, .. } => *attempts = n,
            PushError::NotRendered { .. } | PushError::BySupervisor { .. } => {}
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
            PushError::BySupervisor { method, url, error } => write!(
                f,
                "the supervisor's {method} {url}, which the final push waited for: {error}"
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
