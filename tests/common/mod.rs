//! Shared helpers for the integration tests.

pub(crate) mod components;
pub(crate) mod examples;
pub(crate) mod load;
