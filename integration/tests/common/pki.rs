//! Certificates for the TLS tests, made with rcgen: a CA, a server certificate for
//! `127.0.0.1` and `localhost`, a client certificate.

// Each test binary uses only part of this module.
#![allow(dead_code)]

/// A CA, and what it signed: a certificate and its key, PEM.
pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) server: (String, String),
    pub(crate) client: (String, String),
}

pub(crate) fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("finale test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["127.0.0.1".into(), "localhost".into()], "pushgateway"),
        client: leaf(vec!["finale-client".into()], "finale-client"),
    }
}
