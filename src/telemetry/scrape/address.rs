//! Where the endpoint listens: text (resolved at build) or a socket address.

use std::fmt;
use std::net::SocketAddr;

/// Where the endpoint listens: `"127.0.0.1:9090"`, `"localhost:9090"`, `"[::]:9090"`, or a
/// [`SocketAddr`].
#[derive(Clone, Debug)]
pub struct Address(pub(super) AddressKind);

#[derive(Clone, Debug)]
pub(super) enum AddressKind {
    Text(String),
    Socket(SocketAddr),
}

impl From<&str> for Address {
    fn from(s: &str) -> Self {
        Address(AddressKind::Text(s.to_owned()))
    }
}

impl From<String> for Address {
    fn from(s: String) -> Self {
        Address(AddressKind::Text(s))
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address(AddressKind::Socket(a))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            AddressKind::Text(s) => f.write_str(s),
            AddressKind::Socket(a) => write!(f, "{a}"),
        }
    }
}
