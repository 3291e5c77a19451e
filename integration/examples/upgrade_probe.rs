//! A configurable service for the upgrade's fault tests (`integration/tests/upgrade_faults.rs`).
//!
//! - `PROBE_ADDR`: the `http` server's address.
//! - `PROBE_ADMIN_ADDR`: a second server, `admin`, if set.
//! - `PROBE_SUCCESSOR_DROPS_ADMIN`: a successor (generation >= 1) has no `admin` server (a new
//!   version that removed it).
//! - `PROBE_SUCCESSOR_SLOW_START_MS`: a successor's graceful start takes this long after its
//!   servers are up (a warm-up task).
//! - `PROBE_SUCCESSOR_READY_ON_USR1`: a successor's graceful start completes only when it
//!   receives SIGUSR1 (it logs `probe warming pid=N` once it waits for it).
//! - `PROBE_READY_TIMEOUT_MS`: `Upgrade::ready_timeout`.
//! - `PROBE_SPAWN_CHILD`: spawns `sleep 300` right after build and logs `child pid=N`.
//! - `PROBE_PROGRAM`: `Upgrade::program`.
//! - `PROBE_SLEEP_BEFORE_RUN_MS`: the first process blocks this long between build and run.
//! - `/hello`: `hello from <pid>`; `/slow`: the same after 1.5 s; `/fds`: this process's fds.

#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use finale::upgrade::Upgrade;
use finale::{Finale, Task};

fn fds() -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push_str(&format!("{} {}\n", e.file_name().to_string_lossy(), target));
        }
    }
    out
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let env = |k: &str| std::env::var(k).ok();
    let generation = finale::upgrade::generation();
    let successor = generation > 0;
    let mut upgrade = Upgrade::new();
    if let Some(program) = env("PROBE_PROGRAM") {
        upgrade = upgrade.program(program);
    }
    if let Some(ms) = env("PROBE_READY_TIMEOUT_MS") {
        upgrade = upgrade.ready_timeout(Duration::from_millis(ms.parse().unwrap()));
    }
    let finale = Finale::builder()
        .upgrade(upgrade)
        .systemd_notify(true)
        .build()
        .unwrap();
    let pid = std::process::id();
    eprintln!("probe starting pid={pid} generation={generation}");
    if env("PROBE_SPAWN_CHILD").is_some() {
        // Left running on purpose (the test ends it by pid): what it inherited is the point.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        eprintln!("child pid={}", child.id());
    }
    let app = Router::new()
        .route(
            "/hello",
            get(move || async move { format!("hello from {pid}\n") }),
        )
        .route(
            "/slow",
            get(move || async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                format!("hello from {pid}\n")
            }),
        )
        .route("/fds", get(|| async { fds() }))
        .merge(finale::axum::health_router(&finale.handle()));
    let addr: SocketAddr = env("PROBE_ADDR").unwrap().parse().unwrap();
    finale::axum::serve(&finale, "http", addr, app.clone()).unwrap();
    if let Some(admin) = env("PROBE_ADMIN_ADDR")
        && !(successor && env("PROBE_SUCCESSOR_DROPS_ADMIN").is_some())
    {
        let admin: SocketAddr = admin.parse().unwrap();
        finale::axum::serve(&finale, "admin", admin, app).unwrap();
    }
    if successor && let Some(ms) = env("PROBE_SUCCESSOR_SLOW_START_MS") {
        let ms: u64 = ms.parse().unwrap();
        finale
            .spawn(Task::service("warmup", move |ctx| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ctx.set_ready();
                ctx.stopped().await;
                Ok::<(), std::io::Error>(())
            }))
            .unwrap();
    }
    if successor && env("PROBE_SUCCESSOR_READY_ON_USR1").is_some() {
        use tokio::signal::unix::{SignalKind, signal};
        let mut usr1 = signal(SignalKind::user_defined1()).unwrap();
        finale
            .spawn(Task::service("warmup-usr1", move |ctx| async move {
                eprintln!("probe warming pid={pid}");
                usr1.recv().await;
                ctx.set_ready();
                ctx.stopped().await;
                Ok::<(), std::io::Error>(())
            }))
            .unwrap();
    }
    eprintln!("probe serving pid={pid}");
    if !successor && let Some(ms) = env("PROBE_SLEEP_BEFORE_RUN_MS") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
    }
    let report = finale.run().await;
    eprintln!("probe report pid={pid}: {report}");
    report.exit()
}
