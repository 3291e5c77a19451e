//! The builder: settings, their defaults and their checks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::Uri;
use http::header::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;

use super::grouping::{STANDARD, api_url, base64, grouping_url};
#[cfg(feature = "pushgateway-tls")]
use super::transport::tls::{Pem, Tls, TlsSettings};
use super::transport::{Connector, new_client};
use super::{
    DEFAULT_ATTEMPTS, DEFAULT_DELETE_DELAY, DEFAULT_NAME, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY_BACKOFF, Inner, Method, Pushgateway, PushgatewayConfigError,
};

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
    /// of up to [`PUSH_JITTER`](super::PUSH_JITTER) of it (one attempt each; a failure is
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
    /// warning for each metric it would refuse (see [the module docs](super#consistency-with-other-groups)).
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
    /// it again beside it (see [the module docs](super#what-is-pushed-where-and-how)).
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
                held: crate::telemetry::stages::Handoff::new(()),
                jitter: std::collections::hash_map::RandomState::new(),
                samples: Arc::default(),
                refused: AtomicBool::new(false),
                rendering: Arc::default(),
                check_rendering: Arc::default(),
            }),
        })
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> PrometheusHandle {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    }

    #[cfg(not(feature = "pushgateway-tls"))]
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
}
