//! A real Pushgateway serving TLS with basic auth (and, on request, client certificates), and a
//! TLS reader of what it holds: shared by the Pushgateway tests and the end-to-end service test.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::components::{Pushgateway as Gateway, parse_samples};
use super::pki::{Pki, pki};

const BOUND: Duration = Duration::from_secs(10);

/// The basic-auth user and password the TLS Pushgateway accepts.
pub(crate) const USER: &str = "finale";
pub(crate) const PASSWORD: &str = "s3cret-pass";
/// bcrypt of `PASSWORD` (cost 4: the Pushgateway checks it on every request), made with
/// `python3 -c "import crypt; print(crypt.crypt('s3cret-pass', crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))"`
/// (`htpasswd -nbBC 4 finale s3cret-pass` gives an equivalent one).
pub(crate) const PASSWORD_BCRYPT: &str =
    "$2b$04$f7WyvjdgLrmXDoRNLwa10OjuNj/f3kHi7wEmz.xkshlI7pcwKr/p2";

/// A directory removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("finale-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real Pushgateway whose web config turns on TLS (with `pki`'s server certificate) and
/// basic auth, and, with `client_auth`, requires a client certificate signed by `pki`'s CA.
pub(crate) struct TlsGateway {
    pub(crate) gateway: Gateway,
    pub(crate) pki: Pki,
    _dir: TempDir,
}

pub(crate) fn tls_gateway(client_auth: bool) -> Option<TlsGateway> {
    let dir = TempDir::new("pushgateway-tls");
    let pki = pki("right");
    let cert = dir.write("server.pem", &pki.server.0);
    let key = dir.write("server-key.pem", &pki.server.1);
    let ca = dir.write("ca.pem", &pki.ca);
    let mut config = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        cert.display(),
        key.display()
    );
    if client_auth {
        config += &format!(
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            ca.display()
        );
    }
    config += &format!("basic_auth_users:\n  {USER}: {PASSWORD_BCRYPT}\n");
    let web_config = dir.write("web.yml", &config);
    let gateway = Gateway::start_with_web_config(&web_config, true)?;
    Some(TlsGateway {
        gateway,
        pki,
        _dir: dir,
    })
}

impl TlsGateway {
    /// `GET /metrics` over TLS with basic auth (and the client certificate when one is
    /// required): the Pushgateway's own view of what was pushed.
    pub(crate) fn metrics_text(&self, client_auth: bool) -> String {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pki.ca.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = if client_auth {
            let chain = CertificateDer::pem_slice_iter(self.pki.client.0.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(self.pki.client.1.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.gateway.port())).unwrap();
        tcp.set_read_timeout(Some(BOUND)).unwrap();
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        let auth = basic(USER, PASSWORD);
        write!(
            tls,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        // A peer that closes without close_notify ends the read with an error, after the data.
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    pub(crate) fn sample(
        &self,
        client_auth: bool,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        parse_samples(&self.metrics_text(client_auth))
            .into_iter()
            .find(|s| s.name == name && s.has_labels(labels))
            .map(|s| s.value)
    }
}

/// `user:password` in base64, for a hand-written `Authorization` header.
pub(crate) fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let mut out = String::new();
    for chunk in input.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
