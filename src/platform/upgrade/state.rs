//! The upgrade machinery of one `Finale` ([`UpgradeState`]): whether an upgrade is under way,
//! whether the listening sockets are shared with or handed to a successor, the servers'
//! sockets offered to it, and the failures for the report.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::signal::Signal;
use crate::state::{Shared, lock};

use super::config::Upgrade;

/// The upgrade machinery of one `Finale`.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
#[derive(Debug)]
pub(crate) struct UpgradeState {
    pub(super) config: Upgrade,
    /// The successor's program, found when the finale was built: by the time of an upgrade
    /// the running executable may have been replaced (renamed over), and the running process's
    /// own path then names a deleted file.
    pub(super) program: Result<PathBuf, String>,
    pub(super) busy: AtomicBool,
    pub(super) handed_off: AtomicBool,
    /// A successor is running that holds the listening sockets too (from its spawn until it is
    /// ready, or stopped): the servers must not change the shared sockets meanwhile.
    pub(super) sharing: AtomicBool,
    pub(super) next_id: AtomicU64,
    /// The listening sockets of the servers (a duplicate of each), while they accept.
    pub(super) listeners: std::sync::Mutex<Vec<(u64, String, OwnedFd)>>,
    /// Upgrades that failed, for the report.
    pub(super) failed: std::sync::Mutex<Vec<String>>,
    /// `false` while an upgrade is under way: sent `false` when it begins, `true` when it
    /// ends (handed over, failed or abandoned).
    pub(super) idle: tokio::sync::watch::Sender<bool>,
    /// The successor being started or stopped (0: none).
    pub(super) successor: std::sync::atomic::AtomicU32,
}

impl UpgradeState {
    pub(crate) fn new(config: Upgrade) -> Self {
        let program = match &config.program {
            Some(program) => Ok(program.clone()),
            None => std::env::current_exe().map_err(|e| e.to_string()),
        };
        Self {
            config,
            program,
            busy: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            sharing: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            listeners: std::sync::Mutex::new(Vec::new()),
            failed: std::sync::Mutex::new(Vec::new()),
            idle: tokio::sync::watch::Sender::new(true),
            successor: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Whether the listening sockets now belong to a successor, or are held by one that is
    /// starting: the servers stop accepting without touching them (no backlog change, no
    /// accept-queue sweep).
    pub(crate) fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::Acquire) || self.sharing.load(Ordering::Acquire)
    }

    /// Marks an upgrade under way; `false` if one is already.
    pub(super) fn begin(&self) -> bool {
        if self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.idle.send_replace(false);
        true
    }

    /// Marks the upgrade under way ended without a hand-over, so that another may begin:
    /// settled first, then free. (The other way round, an upgrade that began in between would
    /// be marked settled by this one while its successor starts.)
    pub(super) fn end(&self) {
        self.idle.send_replace(true);
        self.busy.store(false, Ordering::Release);
    }

    /// Whether an upgrade is under way (a successor is being started or waited for).
    pub(crate) fn in_progress(&self) -> bool {
        self.busy.load(Ordering::Acquire) && !self.succeeded()
    }

    /// Resolves once no upgrade is under way: the one running was abandoned (or failed, or
    /// handed over).
    pub(crate) async fn settled(&self) {
        let mut idle = self.idle.subscribe();
        let _ = idle
            .wait_for(|idle| *idle || self.succeeded() || !self.busy.load(Ordering::Acquire))
            .await;
    }

    /// Whether this process handed its service over (the successor is ready).
    pub(crate) fn succeeded(&self) -> bool {
        self.handed_off.load(Ordering::Acquire)
    }

    /// The signal that starts an upgrade.
    pub(crate) fn signal(&self) -> Option<Signal> {
        self.config.signal
    }

    pub(crate) fn take_failed(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.failed))
    }

    /// Keeps a duplicate of a server's listening socket until the returned registration drops
    /// (when the server stops accepting).
    #[cfg_attr(
        not(any(feature = "axum", feature = "hyper", feature = "tonic")),
        allow(dead_code)
    )]
    pub(crate) fn register(
        self: &Arc<Self>,
        name: &str,
        listener: &impl AsFd,
    ) -> io::Result<ListenerRegistration> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners).push((id, name.to_owned(), fd));
        Ok(ListenerRegistration {
            state: self.clone(),
            id,
        })
    }
}

/// The upgrade machinery of `shared`'s `Finale`, if it has upgrades on.
pub(crate) fn state(shared: &Shared) -> Option<Arc<UpgradeState>> {
    let any: Arc<dyn std::any::Any + Send + Sync> = shared.upgrade.clone()?;
    any.downcast().ok()
}

/// A server's listening socket, offered to a successor while the server accepts.
#[cfg_attr(
    not(any(feature = "axum", feature = "hyper", feature = "tonic")),
    allow(dead_code)
)]
#[derive(Debug)]
pub(crate) struct ListenerRegistration {
    state: Arc<UpgradeState>,
    id: u64,
}

impl Drop for ListenerRegistration {
    fn drop(&mut self) {
        lock(&self.state.listeners).retain(|(id, _, _)| *id != self.id);
    }
}
