//! The servers: finale's accept loop and the tower pieces every integration shares, and the
//! integrations with axum, hyper and tonic built on them.
//!
//! | file | what |
//! |---|---|
//! | `tower.rs` | [`DrainLayer`](tower::DrainLayer) (in-flight tracking, 503 while draining) and the health service |
//! | `accept.rs` | the bounded accept loop: bind in graceful start, drain, cut at the deadline |
//! | `axum.rs`, `hyper.rs`, `tonic.rs` | each framework's `serve` on the accept loop |
//! | `tonic/grpc_timeout.rs` | the `grpc-timeout` deadline of a gRPC call, enforced by the server |
//! | `tls.rs` | the servers' rustls configuration (feature `tls`) |

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod accept;
#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "hyper")]
pub mod hyper;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tonic")]
pub mod tonic;
pub mod tower;
