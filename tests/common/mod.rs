//! Shared helpers for the integration tests.

pub(crate) mod examples;
pub(crate) mod logfmt;
