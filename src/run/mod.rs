//! The service's life, in the order a SIGTERM meets it: the [`Builder`](builder::Builder)
//! starts the supervisor, which receives the signals and holds the hard deadline; the
//! [`Finale`](finale::Finale) waits for graceful start, then runs the sequence, phase by phase,
//! into the report.
//!
//! | file | step |
//! |---|---|
//! | `builder.rs` | settings → budget; starts the supervisor; the panic hook |
//! | `supervisor.rs` | the supervisor thread: signals, the watchdog, the takeover |
//! | `signals.rs` | receiving one kind of signal |
//! | `finale.rs` | registration, `run()` |
//! | `runtime.rs` | what `run()` needs from the user's runtime |
//! | `start.rs` | graceful start |
//! | `sequence.rs` | the four phases, the budget, the report |
//! | `entries.rs` | one phase's hooks, tasks and waits under its deadline |
//! | `global.rs` | the process-wide instance |

pub(crate) mod builder;
pub(crate) mod entries;
pub(crate) mod finale;
pub mod global;
pub(crate) mod runtime;
pub(crate) mod sequence;
pub(crate) mod signals;
pub(crate) mod start;
pub(crate) mod supervisor;
