//! What running code checks on the hot path: in-flight work, one-shot stop tokens and health.
//! Leaves of the crate: they depend on nothing else in it but the metric names.

mod health;
mod in_flight;
mod token;

pub use self::health::Health;
pub use self::in_flight::{InFlight, InFlightGuard};
pub use self::token::{Cancelled, StopToken};
