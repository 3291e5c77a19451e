//! The servers: finale's accept loop and the tower pieces every integration shares, and the
//! integrations with axum, hyper and tonic built on them.
//!
//! | file | what |
//! |---|---|
//! | `tower/` | the module docs (`mod.rs`); [`DrainLayer`](tower::DrainLayer), its service and response future (`layer.rs`); a request's admission and tracking (in flight until its body ends, `Connection: close` while draining, too late only near the deadline, `admit.rs`); the response body (`body.rs`); a connection as its requests see it and their names in the report (`conn.rs`); finale's own answers (`rejection.rs`, `responder.rs`); the health service (`health.rs`) |
//! | `server.rs` | `HttpServer`: a server's settings, its layers, its `serve` (registers the accept loop as a task) |
//! | `accept.rs` | the bounded accept loop (and why finale runs its own): bind in graceful start, hyper's connection builder with the user's settings, drain, cut at the deadline |
//! | `listen.rs` | where a server listens (`Listen`: an address, a `"host:port"` string, a listener, a Unix path) and its bind |
//! | `connection/` | one connection through the drain: its settings and stage, opened and handed to hyper (`mod.rs`), the TLS handshake (`handshake.rs`), the drive loop (`drive.rs`), slow clients' timing (`slow.rs`), upgrades held and the cut (`cut.rs`) |
//! | `conn_service.rs` | one connection's service: connection info, admission, the call of the user's service |
//! | `conn_io.rs` | a connection's socket as hyper sees it (HTTP/1 or HTTP/2 by its first bytes) |
//! | `gate.rs` | a future polled only when its own wake-ups fired (a connection's drain signals) |
//! | `prepare.rs` | the user's service made ready once (an axum `Router`'s routes), not per request |
//! | `listening.rs` | what `serve` returns: the bound address, or the typed bind error |
//! | `timers.rs` | the connections' slow-client timers, on a thread of the server's own |
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
mod conn_io;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod conn_service;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod connection;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod gate;
#[cfg(feature = "hyper")]
pub mod hyper;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod listen;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod listening;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod prepare;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod server;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod timers;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tonic")]
pub mod tonic;
pub mod tower;
#[cfg(any(feature = "axum", feature = "hyper", feature = "tonic"))]
mod transport;
#[cfg(all(unix, any(feature = "axum", feature = "hyper", feature = "tonic")))]
mod unix;
