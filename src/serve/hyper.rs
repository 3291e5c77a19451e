//! Serve a plain hyper / hyper-util service under finale (HTTP/1 and HTTP/2, auto-detected).
//!
//! The same accept loop and drain as [`finale::axum`](crate::axum) (see there for the sequence),
//! for a [`hyper::service::Service`] such as
//! `hyper::service::service_fn(..)`.
//!
//! # Examples
//!
//! ```no_run
//! use std::convert::Infallible;
//! use http_body_util::Full;
//! use hyper::{Request, Response, body::{Bytes, Incoming}, service::service_fn};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), finale::ConfigError> {
//!     let finale = finale::Finale::builder().build()?;
//!     let hello = service_fn(|_req: Request<Incoming>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
//!     });
//!     finale::hyper::serve(&finale, "http", ([127, 0, 0, 1], 3000), hello)?;
//!     finale.run_and_exit().await
//! }
//! ```

use std::borrow::Cow;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;

use crate::Finale;
use crate::config::ConfigError;
use crate::serve::conn_service::HyperToTower;

pub use crate::serve::listen::Listen;
pub use crate::serve::listening::{BindError, Listening, LocalAddr};
pub use crate::serve::server::{
    DEFAULT_CUT_MARGIN, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_GRACE, HttpServer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Serves the hyper `service` on `listen` as a [`Task::service`](crate::Task::service) named
/// `name`, with [`HttpServer`]'s defaults. (For a tower service, use
/// [`HttpServer::serve`] directly.)
///
/// # Errors
///
/// As [`Finale::spawn`]: a duplicate or empty name; [`ConfigError::ServerName`] for a name its
/// socket cannot be passed under ([`HttpServer::serve`]).
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn serve<S, B>(
    finale: &Finale,
    name: impl Into<Cow<'static, str>>,
    listen: impl Into<Listen>,
    service: S,
) -> Result<Listening, ConfigError>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    HttpServer::new(name).serve(finale, listen, HyperToTower(service))
}
