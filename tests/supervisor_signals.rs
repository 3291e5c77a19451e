//! Real signals sent to this test's own process: a `Finale` dropped without running leaves the
//! signals to the next one. One test function: signal handlers are process-wide.

#![cfg(unix)]

use std::process::Command;
use std::time::Duration;

use finale::{Finale, Hook, Phase, Reason, ShutdownStatus, Signal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_finale_leaves_the_signals_to_the_next_one() {
    let builder = || Finale::builder().read_env(false);
    // Built (handlers installed, supervisor started) and dropped, as a start that gave up, while
    // a handle lives on.
    let first = builder().build().unwrap();
    let stale = first.handle();
    drop(first);
    // The stale handle's trigger arms nothing: no watchdog ends this process later.
    stale.trigger("stale");

    let finale = builder().build().unwrap();
    finale
        .hook(Hook::new(Phase::Workers, "cleanup", |_| async {}))
        .unwrap();
    let handle = finale.handle();
    let run = tokio::spawn(finale.run());
    handle.health().started().await;
    let status = Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the new finale ran its sequence")
        .unwrap();
    assert_eq!(report.reason, Reason::Signal(Signal::Terminate), "{report}");
    assert_eq!(report.status, ShutdownStatus::Clean, "{report}");
    assert!(report.entry("cleanup").is_some());
}
