//! The process-wide instance. One test function: the instance is installed once per process.

use finale::global::{self, GlobalError};
use finale::{ConfigError, Finale, Hook, Phase, ShutdownStatus, Task};

#[tokio::test(flavor = "current_thread")]
async fn the_installed_instance_is_reachable_until_the_sequence_starts() {
    assert_eq!(global::handle().err(), Some(GlobalError::NotInstalled));
    assert_eq!(global::acquire().err(), Some(GlobalError::NotInstalled));
    // A library that cleans up after itself where a Finale runs, and does nothing elsewhere
    // (its tests, other binaries): no error to match on, the answer says what happened.
    let registered =
        global::hook_if_installed(Hook::new(Phase::Workers, "close-pool", |_| async {}));
    assert_eq!(registered, Ok(false));

    let builder = || Finale::builder().read_env(false).no_signals();
    let finale = builder().install(true).build().unwrap();
    // At most one per process.
    assert_eq!(
        builder().install(true).build().err(),
        Some(ConfigError::AlreadyInstalled)
    );
    // Without install, more can be built (test suites do).
    drop(builder().build().unwrap());

    // A library deep in the stack registers without seeing the `Finale`.
    assert_eq!(
        global::hook_if_installed(Hook::new(Phase::Workers, "close-pool", |_| async {})),
        Ok(true)
    );
    global::spawn(Task::worker("consumer", |ctx| async move {
        ctx.stopped().await
    }))
    .unwrap();
    assert!(matches!(
        global::hook(Hook::new(Phase::Workers, "close-pool", |_| async {})),
        Err(GlobalError::Config(ConfigError::DuplicateName { .. }))
    ));
    let guard = global::acquire().unwrap();
    let handle = global::handle().unwrap();
    handle.trigger("test");
    let run = tokio::spawn(finale.run());
    handle.phase_started(Phase::Drain).await;
    assert_eq!(global::acquire().err(), Some(GlobalError::Draining));
    assert_eq!(
        global::hook(Hook::new(Phase::Workers, "late", |_| async {})).err(),
        Some(GlobalError::AlreadyStarted)
    );
    drop(guard);
    let report = run.await.unwrap();
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.entry("close-pool").is_some());
    assert!(report.entry("consumer").is_some());
}
