//! Why an endpoint could not be built.

use std::fmt;
use std::io;

/// Why [`MetricsEndpointBuilder::build`](super::MetricsEndpointBuilder::build) refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum ScrapeConfigError {
    /// The address does not parse or resolve.
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// The address could not be bound (in use, not on this host, no permission).
    Bind {
        /// The address as given.
        address: String,
        /// The last bind error.
        source: io::Error,
    },
    /// The path does not start with `/`.
    InvalidPath {
        /// The path as given.
        path: String,
    },
    /// A duration setting is zero.
    ZeroDuration {
        /// Which setting.
        setting: &'static str,
    },
    /// The endpoint's thread or runtime could not start.
    Start(io::Error),
}

impl fmt::Display for ScrapeConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScrapeConfigError::InvalidAddress { address, source } => {
                write!(
                    f,
                    "metrics endpoint address {address:?} is invalid: {source}"
                )
            }
            ScrapeConfigError::Bind { address, source } => {
                write!(f, "metrics endpoint cannot bind {address:?}: {source}")
            }
            ScrapeConfigError::InvalidPath { path } => {
                write!(f, "metrics endpoint path {path:?} must start with '/'")
            }
            ScrapeConfigError::ZeroDuration { setting } => {
                write!(f, "metrics endpoint: the {setting} must not be zero")
            }
            ScrapeConfigError::Start(e) => write!(f, "metrics endpoint cannot start: {e}"),
        }
    }
}

impl std::error::Error for ScrapeConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ScrapeConfigError::InvalidAddress { source, .. }
            | ScrapeConfigError::Bind { source, .. }
            | ScrapeConfigError::Start(source) => Some(source),
            _ => None,
        }
    }
}
