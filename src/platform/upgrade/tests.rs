//! The upgrade's unit tests: the hand-off's races, a caller that gives up, panics on the
//! upgrade thread, and successors that misbehave.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::successor::signal;
use super::*;
use crate::Finale;
use crate::report::Reason;

/// The successor's `READY=1` won (the upgrade thread claimed the hand-off) and a signal's
/// request came in the instant before the thread marked the hand-off done: the request is
/// the hand-off's, and so is the sequence it starts. It must not treat the upgrade as one
/// still under way: no "upgrade abandoned" wait (which would SIGKILL a successor that won
/// once its patience ran out), no drain delay. It waits instead for the hand-off to be
/// completed (systemd's `MAINPID=` may wait for room in a full queue): the process must not
/// end before the platform was told. Here the upgrade completes 300 ms into Announce.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_request_between_the_claim_and_the_hand_off_flag_is_the_hand_offs() {
    let finale = Finale::builder()
        .no_signals()
        .read_env(false)
        .environment(crate::Environment::Local)
        .upgrade(Upgrade::new().signal(None))
        .build()
        .unwrap();
    let shared = finale.shared.clone();
    let upgrade = state(&shared).unwrap();
    // What the upgrade thread has done at that instant: started, ready line read, claimed.
    upgrade.busy.store(true, Ordering::Release);
    upgrade.idle.send_replace(false);
    assert!(shared.life.claim_handover(4242));
    assert!(
        !finale.handle().trigger("signal"),
        "substituted, not the caller's"
    );
    assert!(matches!(
        shared.reason(),
        Some(Reason::Upgrade {
            successor_pid: 4242
        })
    ));
    assert!(shared.upgraded());
    // The upgrade's own task completes the hand-off a moment later.
    let completing = {
        let (shared, upgrade) = (shared.clone(), upgrade.clone());
        tokio::spawn(async move {
            shared.life.phase_started[crate::Phase::Announce.index()]
                .cancelled()
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            upgrade.handed_off.store(true, Ordering::Release);
            upgrade.idle.send_replace(true);
        })
    };
    let report = finale.run().await;
    completing.await.unwrap();
    let text = report.to_string();
    assert!(!text.contains("upgrade abandoned"), "{text}");
    assert!(text.contains("clean"), "{text}");
    let announce = &report.phases[crate::Phase::Announce.index()];
    assert!(
        announce.duration >= Duration::from_millis(300),
        "the Announce did not wait for the hand-off: {text}"
    );
    assert!(
        announce
            .entries
            .iter()
            .any(|e| e.name == "upgrade hand-over" && e.outcome.is_completed()),
        "{text}"
    );
}

/// A successor of the tests' own: a shell script, `body`, which writes its pid to
/// `$PID_FILE` (`finale.ready` is its fd 3: no listener is handed over here). Killed
/// (SIGKILL, by the pid it wrote) and its files removed when dropped, whatever the test's
/// outcome.
struct Successor {
    dir: std::path::PathBuf,
    script: std::path::PathBuf,
    pid_file: std::path::PathBuf,
}

impl Successor {
    fn new(name: &str, body: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("finale-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("successor.sh");
        let pid_file = dir.join("successor.pid");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nPID_FILE='{}'\n{body}", pid_file.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Self {
            dir,
            script,
            pid_file,
        }
    }

    /// A finale whose upgrades start this successor.
    fn finale(&self, shape: impl FnOnce(crate::Builder) -> crate::Builder) -> Finale {
        let builder = Finale::builder()
            .no_signals()
            .read_env(false)
            .environment(crate::Environment::Local);
        shape(builder).build().unwrap()
    }

    /// A finale that upgrades to this successor and tells systemd, whose notify socket is the
    /// returned one (read with a 5 s timeout).
    fn finale_under_systemd(&self) -> (Finale, std::os::unix::net::UnixDatagram) {
        let notify = self.dir.join("notify");
        let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        crate::platform::systemd::TEST_NOTIFY_SOCKET
            .with(|socket| *socket.borrow_mut() = Some(notify.clone()));
        let finale = self.finale(|b| b.systemd_notify(true).upgrade(self.upgrade()));
        crate::platform::systemd::TEST_NOTIFY_SOCKET.with(|socket| socket.borrow_mut().take());
        (finale, systemd)
    }

    /// The upgrade that starts this successor.
    fn upgrade(&self) -> Upgrade {
        Upgrade::new().signal(None).program(&self.script)
    }

    /// Its pid, once it started.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Whether it runs (started, and neither gone nor a zombie).
    fn alive(&self) -> bool {
        self.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a caller lets go of `Handle::upgrade`'s future while the successor starts.
#[derive(Clone, Copy, Debug)]
enum GiveUp {
    /// A timeout on the caller's runtime.
    Timeout,
    /// A timeout on a scratch runtime, which is then dropped.
    RuntimeDropped,
    /// Polled once with no runtime at all, then dropped.
    NoRuntime,
}

/// The caller lets go of `Handle::upgrade` while the successor starts (it reports ready
/// 0.3 s after it started): the upgrade still runs to its end on its own thread. The
/// hand-off is completed (the shutdown requested as the upgrade's, nothing left under way)
/// rather than left half done with both processes serving and every later upgrade refused.
#[tokio::test]
async fn an_upgrade_whose_caller_gave_up_still_completes() {
    for give_up in [GiveUp::Timeout, GiveUp::RuntimeDropped, GiveUp::NoRuntime] {
        caller_gives_up(give_up).await;
    }
}

async fn caller_gives_up(give_up: GiveUp) {
    let successor = Successor::new(
        &format!("upgrade-dropped-{give_up:?}"),
        "echo $$ > \"$PID_FILE\"\nsleep 0.3\nprintf 'READY=1\\n' >&3\nexec sleep 30\n",
    );
    let finale = successor.finale(|b| b.upgrade(successor.upgrade()));
    let shared = finale.shared.clone();
    let handle = finale.handle();
    match give_up {
        GiveUp::Timeout => {
            let gave_up = tokio::time::timeout(Duration::from_millis(50), handle.upgrade()).await;
            assert!(gave_up.is_err(), "the successor reports ready only later");
        }
        GiveUp::RuntimeDropped => std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let gave_up = runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), handle.upgrade()).await
            });
            assert!(gave_up.is_err(), "the successor reports ready only later");
            drop(runtime);
        })
        .join()
        .unwrap(),
        GiveUp::NoRuntime => std::thread::spawn(move || {
            let mut upgrade = Box::pin(handle.upgrade());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(upgrade.as_mut().poll(&mut cx).is_pending());
        })
        .join()
        .unwrap(),
    }
    // Bounded: the successor is ready 0.3 s after it started.
    let until = Instant::now() + Duration::from_secs(10);
    while shared.reason().is_none() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reason = shared.reason();
    assert!(
        matches!(reason, Some(Reason::Upgrade { .. })),
        "{give_up:?}: the hand-off was left half done: {reason:?}"
    );
    let upgrade = state(&shared).unwrap();
    assert!(
        !upgrade.in_progress(),
        "{give_up:?}: an upgrade still under way"
    );
    assert!(
        *upgrade.idle.borrow(),
        "{give_up:?}: the hand-off was not completed"
    );
}

/// Counts the upgrade's `ready` outcome by panicking: a user's recorder gone wrong.
struct PanicsOnReady;

impl crate::names::Recorder for PanicsOnReady {
    fn add(&self, metric: &crate::names::Metric, labels: crate::names::Labels<'_>, _: u64) {
        if metric.name == crate::names::metric::UPGRADES_TOTAL.name
            && labels.contains(&("outcome", "ready"))
        {
            panic!("a recorder that panics on the hand-off");
        }
    }

    fn set(&self, _: &crate::names::Metric, _: crate::names::Labels<'_>, _: f64) {}
}

/// The upgrade thread panics after the hand-off won (in a recorder of the user's): systemd
/// still hears `MAINPID=`, the shutdown is still requested as the hand-off's, the caller
/// hears of the successor, and the process is not left serving beside it, refusing every
/// later upgrade.
#[tokio::test]
async fn a_panic_after_the_hand_off_won_still_shuts_down() {
    let successor = Successor::new(
        "upgrade-panicked",
        "echo $$ > \"$PID_FILE\"\nprintf 'READY=1\\n' >&3\nexec sleep 30\n",
    );
    let (finale, systemd) = successor.finale_under_systemd();
    let shared = finale.shared.clone();
    shared.add_recorder(Arc::new(PanicsOnReady));
    let answer = finale.handle().upgrade().await;
    let reason = shared.reason();
    let again = finale.handle().upgrade().await;
    let heard = heard_up_to_mainpid(&systemd);
    assert!(answer.is_ok(), "the successor serves: {answer:?}");
    let successor = answer.as_ref().map(|u| u.successor_pid).unwrap_or_default();
    assert!(
        heard
            .iter()
            .any(|m| m.starts_with(&format!("MAINPID={successor}\n"))),
        "systemd never heard MAINPID=: {heard:?}"
    );
    assert!(
        matches!(reason, Some(Reason::Upgrade { .. })),
        "no shutdown requested: {reason:?}"
    );
    assert_eq!(again, Err(UpgradeError::ShuttingDown));
    assert!(*state(&shared).unwrap().idle.borrow());
}

/// A shutdown wins while the successor starts, and the successor ignores SIGTERM: the
/// Announce phase kills it (SIGKILL) before its own deadline, however little time the phase
/// has, and whatever Announce hooks run first, so that no orphan outlives this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_successor_never_outlives_the_announce_phase() {
    type Shape = fn(crate::Builder) -> crate::Builder;
    let shapes: [(&str, Shape, bool); 2] = [
        (
            "300 ms before the Telemetry reserve",
            |b| {
                b.total_budget(Duration::from_secs(3))
                    .telemetry_reserve(Duration::from_millis(2_700))
            },
            false,
        ),
        ("a 900 ms Announce hook first", |b| b, true),
    ];
    for (round, (what, shape, slow_hook)) in shapes.into_iter().enumerate() {
        // Never ready, and deaf to SIGTERM (ignored across the `exec`) by the time its pid
        // is known.
        let successor = Successor::new(
            &format!("upgrade-orphan-{round}"),
            "trap '' TERM\necho $$ > \"$PID_FILE\"\nexec sleep 30\n",
        );
        let finale = successor.finale(|b| shape(b.upgrade(successor.upgrade())));
        if slow_hook {
            finale
                .hook(
                    crate::Hook::new(crate::Phase::Announce, "slow", |_| {
                        tokio::time::sleep(Duration::from_millis(900))
                    })
                    .order(-10),
                )
                .unwrap();
        }
        let handle = finale.handle();
        let upgrading = tokio::spawn(async move { handle.upgrade().await });
        // Bounded: until the successor has started.
        let until = Instant::now() + Duration::from_secs(10);
        while successor.pid().is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = successor.pid().expect("the successor started");
        finale.handle().trigger("stop");
        let report = finale.run().await;
        let alive = successor.alive();
        let answer = upgrading.await.unwrap();
        assert!(
            !alive,
            "{what}: the successor {pid} outlived the run\n{report}"
        );
        assert!(
            matches!(answer, Err(UpgradeError::Aborted { .. })),
            "{what}: {answer:?}"
        );
    }
}

/// A successor that closes its ready socket and runs on (a program that closes the
/// descriptors it inherits) is not waited for past the ready timeout: it is stopped, and
/// the upgrade fails as not ready, the old process serving on.
#[tokio::test]
async fn a_successor_that_closes_its_ready_socket_is_not_waited_for_for_ever() {
    let successor = Successor::new(
        "upgrade-closed",
        "echo $$ > \"$PID_FILE\"\nexec 3>&-\nexec sleep 30\n",
    );
    let finale = successor.finale(|b| {
        b.upgrade(
            successor
                .upgrade()
                .ready_timeout(Duration::from_millis(300)),
        )
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), finale.handle().upgrade()).await;
    let alive = successor.alive();
    assert!(
        matches!(answer, Ok(Err(UpgradeError::NotReady { .. }))),
        "{answer:?}"
    );
    assert!(!alive, "the successor {:?} runs on", successor.pid());
    assert!(finale.shared.reason().is_none(), "still serving");
}

/// An upgrade that ends as another begins: the one that begins is never seen settled (`idle`)
/// while it is under way. (It was, when the ending one let the next begin before it marked
/// itself settled: the Announce phase then neither waited for the new successor nor stopped
/// it.) Two threads, started together, begin and end upgrades as fast as they can, 5,000,000
/// times each.
#[test]
fn an_upgrade_that_begins_as_another_ends_is_never_seen_settled() {
    let state = Arc::new(state::UpgradeState::new(Upgrade::new()));
    let seen_settled = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let start = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (state, seen_settled) = (state.clone(), seen_settled.clone());
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..5_000_000 {
                    if state.begin() {
                        if *state.idle.borrow() {
                            seen_settled.fetch_add(1, Ordering::Relaxed);
                        }
                        state.end();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(seen_settled.load(Ordering::Relaxed), 0);
}

/// A shutdown requested in the instant after `begin` found none, before it marked the upgrade
/// under way: the Announce phase, which looks right after the request, saw no upgrade. The
/// upgrade must then not go on (its successor would be neither waited for nor stopped): it is
/// refused.
#[test]
fn a_shutdown_as_an_upgrade_begins_refuses_the_upgrade() {
    let finale = Finale::builder()
        .no_signals()
        .read_env(false)
        .upgrade(Upgrade::new().signal(None))
        .build()
        .unwrap();
    let shared = finale.shared.clone();
    let requested = shared.clone();
    let announce_saw = Arc::new(std::sync::Mutex::new(None));
    let saw = announce_saw.clone();
    super::handoff::BETWEEN_CHECK_AND_MARK.set(Some(Box::new(move || {
        requested.request(Reason::Signal(crate::Signal::Terminate));
        *saw.lock().unwrap() = Some(state(&requested).unwrap().in_progress());
    })));
    let began = super::handoff::begin(&shared);
    assert_eq!(*announce_saw.lock().unwrap(), Some(false), "the hook ran");
    assert_eq!(began.err(), Some(UpgradeError::ShuttingDown));
    let upgrade = state(&shared).unwrap();
    assert!(
        !upgrade.in_progress() && *upgrade.idle.borrow(),
        "backed out"
    );
}

/// A shutdown that won while the successor was being prepared (its sockets gathered): the
/// successor is not started at all, where it was started and then stopped at once (and one
/// deaf to SIGTERM from its first instant outlived the Announce phase's one kill).
#[test]
fn a_shutdown_before_the_spawn_starts_no_successor() {
    let successor = Successor::new(
        "upgrade-not-spawned",
        "echo $$ > \"$PID_FILE\"\nexec sleep 30\n",
    );
    let finale = successor.finale(|b| b.upgrade(successor.upgrade()));
    let shared = finale.shared.clone();
    let upgrade = state(&shared).unwrap();
    assert!(upgrade.begin());
    shared.request(Reason::Signal(crate::Signal::Terminate));
    let result = super::successor::spawn_and_wait(&upgrade, &shared.life);
    assert_eq!(result, Err(UpgradeError::ShuttingDown));
    assert!(!upgrade.handed_off(), "the sockets stay this process's");
}

/// Counts the upgrade's `ready` outcome slowly: it waits (at most 10 s) until the test lets it
/// go. A user's recorder that blocks.
struct BlocksOnReady(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl crate::names::Recorder for BlocksOnReady {
    fn add(&self, metric: &crate::names::Metric, labels: crate::names::Labels<'_>, _: u64) {
        if metric.name == crate::names::metric::UPGRADES_TOTAL.name
            && labels.contains(&("outcome", "ready"))
        {
            let _ = self.0.lock().unwrap().recv_timeout(Duration::from_secs(10));
        }
    }

    fn set(&self, _: &crate::names::Metric, _: crate::names::Labels<'_>, _: f64) {}
}

/// systemd hears `MAINPID=` as soon as the hand-off won, before the user's recorders and log
/// layers are called: one that blocks must not hold it back (a signal after the hand-off's
/// claim starts a shutdown whose Announce phase waits for the hand-off only so long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_mainpid_before_a_blocking_recorder_returns() {
    let successor = Successor::new(
        "upgrade-blocked",
        "echo $$ > \"$PID_FILE\"\nprintf 'READY=1\\n' >&3\nexec sleep 30\n",
    );
    let (finale, systemd) = successor.finale_under_systemd();
    let (release, held) = std::sync::mpsc::channel();
    finale
        .shared
        .add_recorder(Arc::new(BlocksOnReady(std::sync::Mutex::new(held))));
    let handle = finale.handle();
    let upgrading = tokio::spawn(async move { handle.upgrade().await });
    // What systemd heard while the recorder is held.
    let heard = tokio::task::spawn_blocking(move || heard_up_to_mainpid(&systemd))
        .await
        .unwrap();
    release.send(()).unwrap();
    let answer = upgrading.await.unwrap();
    assert!(answer.is_ok(), "the successor serves: {answer:?}");
    assert!(
        heard.last().is_some_and(|m| m.starts_with("MAINPID=")),
        "systemd did not hear MAINPID= while the recorder was held: {heard:?}"
    );
}

/// What systemd heard on `systemd`: every datagram up to `MAINPID=`, or until none comes within
/// the socket's read timeout.
fn heard_up_to_mainpid(systemd: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let (mut heard, mut buf) = (Vec::new(), [0u8; 256]);
    while let Ok(n) = systemd.recv(&mut buf) {
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if heard.last().is_some_and(|m| m.starts_with("MAINPID=")) {
            break;
        }
    }
    heard
}
