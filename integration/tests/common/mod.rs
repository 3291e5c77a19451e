//! Shared helpers for the integration tests: the real components, the load generator, and the
//! workspace's examples as child processes (shared with the crate's own tests).

pub(crate) mod child;
pub(crate) mod components;
#[path = "../../../tests/common/examples.rs"]
pub(crate) mod examples;
pub(crate) mod load;
#[path = "../../../tests/common/logfmt.rs"]
pub(crate) mod logfmt;
pub(crate) mod pki;
pub(crate) mod scratch;
pub(crate) mod served;
pub(crate) mod tls_gateway;
