//! The process-wide instance, as the JVM's `Runtime.addShutdownHook`: reachable from code that
//! never sees the [`Finale`](crate::Finale) (a library, a connection pool, an exporter set up
//! deep in the stack).
//!
//! Installing is one explicit builder option, [`Builder::install`](crate::Builder::install); at
//! most one instance per process is installed, for the life of the process. Everything here
//! answers a typed [`GlobalError`] when nothing is installed or it is too late.
//!
//! # Examples
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use finale::{Finale, Hook, Phase, global};
//!
//! // Somewhere in a library, before anything is installed:
//! assert!(matches!(global::handle(), Err(global::GlobalError::NotInstalled)));
//!
//! // In main:
//! let finale = Finale::builder().no_signals().install(true).build()?;
//!
//! // Deep in the stack, without the `Finale`:
//! global::hook(Hook::new(Phase::Workers, "close-pool", |_| async {}))?;
//! let guard = global::acquire()?; // in flight until dropped; the drain waits for it
//! drop(guard);
//!
//! let handle = global::handle()?;
//! handle.trigger("done");
//! let report = finale.run().await;
//! assert!(report.entry("close-pool").is_some());
//! assert!(matches!(
//!     global::hook(Hook::new(Phase::Workers, "too-late", |_| async {})),
//!     Err(global::GlobalError::AlreadyStarted)
//! ));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};

use crate::config::ConfigError;
use crate::handle::Handle;
use crate::hook::Hook;
use crate::run::finale::{register_hook, spawn_task};
use crate::state::{Refused, Shared};
use crate::task::Task;
use crate::track::{InFlight, InFlightGuard};

static INSTALLED: OnceLock<Weak<Shared>> = OnceLock::new();

/// Why a call on the process-wide instance was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GlobalError {
    /// No `Finale` was built with [`Builder::install`](crate::Builder::install), or it is gone.
    NotInstalled,
    /// The shutdown sequence has started: hooks and tasks can no longer be added.
    AlreadyStarted,
    /// The Drain phase has started: new in-flight work is refused.
    Draining,
    /// The hook or task itself is wrong (a duplicate name, say).
    Config(ConfigError),
}

impl fmt::Display for GlobalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalError::NotInstalled => {
                f.write_str("no finale instance is installed (Builder::install)")
            }
            GlobalError::AlreadyStarted => f.write_str(
                "the shutdown sequence has started: hooks and tasks can no longer be added",
            ),
            GlobalError::Draining => f.write_str("draining: new in-flight work is refused"),
            GlobalError::Config(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for GlobalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GlobalError::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Refused> for GlobalError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Config(e) => GlobalError::Config(e),
            Refused::Started => GlobalError::AlreadyStarted,
        }
    }
}

/// Installs `shared` as the process's instance.
pub(crate) fn install(shared: &Arc<Shared>) -> Result<(), ConfigError> {
    INSTALLED
        .set(Arc::downgrade(shared))
        .map_err(|_| ConfigError::AlreadyInstalled)
}

fn installed() -> Result<Arc<Shared>, GlobalError> {
    INSTALLED
        .get()
        .and_then(Weak::upgrade)
        .ok_or(GlobalError::NotInstalled)
}

/// A [`Handle`] to the installed instance.
///
/// # Errors
///
/// [`GlobalError::NotInstalled`].
pub fn handle() -> Result<Handle, GlobalError> {
    installed().map(|shared| Handle { shared })
}

/// Registers a hook with the installed instance, as [`Finale::hook`](crate::Finale::hook) does.
///
/// # Errors
///
/// [`GlobalError::NotInstalled`], [`GlobalError::AlreadyStarted`] once the sequence has
/// started, or [`GlobalError::Config`] for a bad hook.
pub fn hook(hook: Hook) -> Result<(), GlobalError> {
    Ok(register_hook(&*installed()?, hook)?)
}

/// Registers a hook with the installed instance if there is one, and does nothing otherwise:
/// for a library that cleans up after itself where a `Finale` runs, and must also work where
/// none does (its own tests, another binary).
///
/// Returns `Ok(true)` when the hook was registered and `Ok(false)` when no instance is
/// installed (the hook is dropped without running).
///
/// # Errors
///
/// [`GlobalError::AlreadyStarted`] once the sequence has started, or [`GlobalError::Config`]
/// for a bad hook: mistakes are still reported, only the absence of an instance is not one.
///
/// # Examples
///
/// ```
/// use finale::{Hook, Phase, global};
///
/// // In a library: no `match` on "not installed".
/// let registered = global::hook_if_installed(Hook::new(Phase::Workers, "close-pool", |_| async {
///     // pool.close().await
/// }))?;
/// if !registered {
///     // No Finale in this process: the pool is closed when it is dropped.
/// }
/// # Ok::<(), global::GlobalError>(())
/// ```
pub fn hook_if_installed(hook: Hook) -> Result<bool, GlobalError> {
    // `installed` fails only with `NotInstalled`.
    let Ok(shared) = installed() else {
        return Ok(false);
    };
    register_hook(&shared, hook)?;
    Ok(true)
}

/// Spawns a tracked task on the current runtime, as [`Finale::spawn`](crate::Finale::spawn)
/// does.
///
/// # Errors
///
/// As [`hook`].
pub fn spawn(task: Task) -> Result<(), GlobalError> {
    Ok(spawn_task(&installed()?, task)?)
}

/// The installed instance's in-flight tracker.
///
/// # Errors
///
/// [`GlobalError::NotInstalled`].
pub fn in_flight() -> Result<InFlight, GlobalError> {
    installed().map(|shared| shared.in_flight)
}

/// Marks one unit of work in flight on the installed instance, unless the drain has started
/// (see [`InFlight::try_acquire`]).
///
/// # Errors
///
/// [`GlobalError::NotInstalled`] or [`GlobalError::Draining`].
pub fn acquire() -> Result<InFlightGuard, GlobalError> {
    in_flight()?.try_acquire().ok_or(GlobalError::Draining)
}
