//! The servers: finale's accept loop and the tower pieces every integration shares, and the
//! integrations with axum, hyper and tonic built on them.
//!
//! | file | what |
//! |---|---|
//! | `tower.rs` | [`DrainLayer`](tower::DrainLayer) (in-flight tracking, 503 while draining) and the health service |
//! | `accept.rs` | the bounded accept loop: bind in graceful start, drain, cut at the deadline |
//! | `gate.rs` | a future polled only when its own wake-ups fired (a connection's drain signals) |
//! | `transport.rs` | what the accept loop needs from a listener and a socket; TCP's |
//! | `unix.rs` | Unix domain sockets: binding a path, a stale socket file, its removal |
//! | `axum.rs`, `hyper.rs`, `tonic.rs` | each framework's `serve` on the accept loop |
//! | `tonic/grpc_timeout.rs` | the `grpc-timeout` deadline of a gRPC call, enforced by the server |
//! | `tls.rs` | the servers' rustls configuration (feature `tls`) |

#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod accept;
#[cfg(feature = "axum")]
pub mod axum;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod gate;
#[cfg(feature = "hyper")]
pub mod hyper;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tonic")]
pub mod tonic;
pub mod tower;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod transport;
#[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
mod unix;
