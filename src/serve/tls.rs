//! HTTPS for finale's servers (feature `tls`): rustls with its ring provider, passed with the
//! configuration (no process-wide crypto provider is installed or needed).
//!
//! ```no_run
//! # #[allow(dead_code)]
//! # async fn demo(app: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
//! use finale::axum::HttpServer;
//! use finale::tls::TlsConfig;
//!
//! let finale = finale::Finale::builder().build()?;
//! let tls = TlsConfig::from_pem_files("/etc/tls/cert.pem", "/etc/tls/key.pem")?;
//! HttpServer::new("https").tls(tls).serve(&finale, ([0, 0, 0, 0], 443), app)?;
//! # Ok(()) }
//! ```
//!
//! The handshake runs in the connection's own task, bounded by
//! [`HttpServer::tls_handshake_timeout`](crate::axum::HttpServer::tls_handshake_timeout); the
//! drain treats a connection in its handshake like a fresh one (it gets the idle grace). ALPN
//! offers `h2` and `http/1.1`. Certificates are read once, when the configuration is built:
//! rotating them needs a restart (or an [upgrade](https://docs.rs/finale/latest/finale/upgrade/),
//! with the `upgrade` feature).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;

/// How long a client may take over its TLS handshake: 10 seconds.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server's TLS configuration; see the [module docs](self).
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// A certificate chain (PEM, the server's certificate first) and its private key (PEM:
    /// PKCS#8, PKCS#1 or SEC1), with the ring provider, rustls's safe default protocol versions
    /// and ALPN `h2`, `http/1.1`.
    ///
    /// # Errors
    ///
    /// [`TlsError`] when a document holds no usable certificate or key, or the key does not go
    /// with the certificate.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        Self::build(cert_chain, None, key, None)
    }

    /// As [`from_pem`](TlsConfig::from_pem), reading the two files.
    ///
    /// # Errors
    ///
    /// As [`from_pem`](TlsConfig::from_pem), and when a file cannot be read.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError {
                what,
                path: Some(path.to_owned()),
                reason: format!("cannot read it: {e}"),
            })
        };
        let (cert_path, key_path) = (cert_chain.as_ref(), key.as_ref());
        let cert_bytes = read("certificate chain", cert_path)?;
        let key_bytes = read("private key", key_path)?;
        Self::build(&cert_bytes, Some(cert_path), &key_bytes, Some(key_path))
    }

    /// The rustls configuration (to serve the same with another stack, say).
    pub fn rustls_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// A rustls configuration of your own (client certificates, session tickets, another
    /// provider): used as it is, so set its ALPN protocols (`h2`, `http/1.1`) yourself.
    pub fn from_rustls(config: Arc<ServerConfig>) -> Self {
        Self { config }
    }

    fn build(
        cert_chain: &[u8],
        cert_path: Option<&Path>,
        key: &[u8],
        key_path: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let error = |what: &'static str, path: Option<&Path>, reason: String| TlsError {
            what,
            path: path.map(Path::to_owned),
            reason,
        };
        let chain = crate::pem::certificates(cert_chain)
            .map_err(|reason| error("certificate chain", cert_path, reason))?;
        let key = crate::pem::private_key(key)
            .map_err(|reason| error("private key", key_path, reason))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| error("configuration", None, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                error(
                    "certificate chain",
                    cert_path,
                    format!("it does not go with the key: {e}"),
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// Why a [`TlsConfig`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsError {
    /// Which part: `certificate chain`, `private key` or `configuration`.
    pub what: &'static str,
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "TLS {} ({}): {}", self.what, path.display(), self.reason),
            None => write!(f, "TLS {}: {}", self.what, self.reason),
        }
    }
}

impl std::error::Error for TlsError {}
