//! What the service tells the platform that runs it: systemd's notify socket and socket
//! activation (`systemd.rs`, feature `systemd`), Kubernetes' termination message
//! (`kubernetes.rs`).
//!
//! Both plug into the running state as [`Observer`]s, which the builder's settings make
//! (`PlatformSettings::observers`, defined here) before the state is shared, and only when the
//! user asked (the termination message's default is on only on Kubernetes, where the file is
//! the platform's own channel for it). `state.rs` calls them at
//! each moment of the service's life; nothing here is called on the request path.

pub(crate) mod kubernetes;
#[cfg(all(feature = "systemd", unix))]
pub mod systemd;
#[cfg(all(feature = "upgrade", unix))]
pub mod upgrade;

/// The variable that names the process passed sockets come from, in an upgrade's successor.
#[cfg(all(feature = "systemd", unix))]
pub(crate) const PARENT_ENV: &str = "FINALE_LISTEN_PARENT";

use crate::config::Environment;
use crate::state::Observer;

pub use self::kubernetes::TERMINATION_MESSAGE_MAX;

use crate::run::builder::PlatformSettings;

impl PlatformSettings {
    /// The observers the settings ask for; reads the platform's environment variables
    /// (`FINALE_TERMINATION_LOG` only when `read_env`). The builder calls it at build: defined
    /// here, so that the builder never names the platform.
    pub(crate) fn observers(
        &self,
        read_env: bool,
        environment: Environment,
    ) -> Vec<Box<dyn Observer>> {
        let mut observers: Vec<Box<dyn Observer>> = Vec::new();
        #[cfg(all(feature = "systemd", unix))]
        if self.systemd_notify
            && let Some(notifier) = systemd::Notifier::from_env()
        {
            observers.push(Box::new(notifier));
        }
        let env = read_env
            .then(|| std::env::var(crate::termination_log::TERMINATION_LOG_ENV).ok())
            .flatten();
        if let Some(writer) = kubernetes::writer(&self.termination_log, env, environment) {
            observers.push(Box::new(writer));
        }
        #[cfg(all(feature = "upgrade", unix))]
        if let Some(reporter) = upgrade::ready_reporter() {
            observers.push(Box::new(reporter));
        }
        observers
    }
}
