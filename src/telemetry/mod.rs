//! The Telemetry phase's built-in stages: the Pushgateway push, the OTLP flushes and the log
//! writer, each a Telemetry hook of its stage's order (see [`ORDER_METRICS`](crate::ORDER_METRICS))
//! plus an emergency stage the supervisor runs itself if the user's runtime is wedged.
//!
//! | file | what |
//! |---|---|
//! | `stages.rs` | blocking work on plain threads; work that runs once, in the hook or the emergency |
//! | `pushgateway/` | the final push to a Prometheus Pushgateway; `transport.rs`: TCP, TLS, errors |
//! | `otlp.rs` | the OpenTelemetry providers' flush and shutdown |
//! | `appender.rs` | the tracing-appender writer, released last |
//! | `scrape/` | the last scrape: a metrics endpoint on finale's own thread, the final-scrape stage |
//! | `sink.rs` | the user's own stages ([`Sink`](crate::Sink)), on the same machinery |

pub(crate) mod sink;
mod stages;

#[cfg(feature = "tracing-appender")]
pub mod appender;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "pushgateway")]
pub mod pushgateway;
#[cfg(feature = "prometheus")]
pub mod scrape;
