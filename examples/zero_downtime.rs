//! Restart without refusing a connection: `SIGUSR2` starts a successor with the listening
//! socket, and this process shuts down once the successor is ready (Unix only).
//!
//! ```sh
//! cargo run --example zero_downtime --features upgrade,axum
//! curl http://127.0.0.1:3000/hello        # "hello from <pid>"
//! kill -USR2 <pid>                         # the successor takes over; no connection refused
//! curl http://127.0.0.1:3000/hello        # a new pid
//! ```
//!
//! Rebuild in between, and the successor is the new binary (the same path).
//!
//! - `ZERO_DOWNTIME_ADDR`: where to listen (default `127.0.0.1:3000`).
//! - `ZERO_DOWNTIME_UNIX`: also serve on a Unix domain socket at this path (handed over too).
//! - `ZERO_DOWNTIME_FAIL_SUCCESSOR`: a successor (a process started by an upgrade) exits with
//!   code 3 before it is ready: the old one keeps serving and says why.
//! - `ZERO_DOWNTIME_WEDGE_OLD`: the first process runs on a `current_thread` runtime and, once
//!   handed over, blocks that thread in a Workers hook: its supervisor takes over.
//! - `ZERO_DOWNTIME_NO_NOTIFY`: no systemd notifications, even under systemd.
//! - `FINALE_*`: any budget setting.
//! - Under systemd (`NOTIFY_SOCKET` set) it reports ready and hands over its main pid.

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use finale::Finale;
use finale::upgrade::Upgrade;
use tracing_subscriber::EnvFilter;

fn main() {
    let successor = std::env::var_os("FINALE_LISTEN_PARENT").is_some();
    let wedge = !successor && std::env::var_os("ZERO_DOWNTIME_WEDGE_OLD").is_some();
    let mut runtime = if wedge {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime.enable_all().build().expect("a tokio runtime");
    runtime.block_on(serve(wedge));
}

async fn serve(wedge: bool) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();

    let successor = std::env::var_os("FINALE_LISTEN_PARENT").is_some();
    if successor && std::env::var_os("ZERO_DOWNTIME_FAIL_SUCCESSOR").is_some() {
        eprintln!("successor {}: failing on purpose", std::process::id());
        std::process::exit(3);
    }

    let finale = Finale::builder()
        .upgrade(Upgrade::new())
        // Under systemd (`ExecReload=/bin/kill -USR2 $MAINPID`): READY=1, MAINPID= at a hand-off.
        .systemd_notify(std::env::var_os("ZERO_DOWNTIME_NO_NOTIFY").is_none())
        .build()
        .unwrap_or_else(|e| {
            eprintln!("configuration error: {e}");
            std::process::exit(2)
        });
    let addr: SocketAddr = std::env::var("ZERO_DOWNTIME_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()
        .unwrap_or_else(|e| {
            eprintln!("ZERO_DOWNTIME_ADDR must be host:port: {e}");
            std::process::exit(2)
        });
    let pid = std::process::id();
    tracing::info!(pid, generation = finale::upgrade::generation(), "starting");
    let app = Router::new()
        .route(
            "/hello",
            get(move || async move { format!("hello from {pid}\n") }),
        )
        .merge(finale::axum::health_router(&finale.handle()));
    if let Some(path) = std::env::var_os("ZERO_DOWNTIME_UNIX") {
        let unix = finale::axum::Listen::unix(path);
        finale::axum::serve(&finale, "unix", unix, app.clone()).expect("unique name");
    }
    finale::axum::serve(&finale, "http", addr, app).expect("unique name");
    if wedge {
        finale
            .hook(finale::Hook::new(
                finale::Phase::Workers,
                "wedge",
                |_| async {
                    // Holds the runtime's only thread: the scenario, not synchronisation.
                    std::thread::sleep(std::time::Duration::from_secs(8));
                },
            ))
            .expect("unique name");
    }
    eprintln!("pid {pid} serving on http://{addr}");
    finale.run_and_exit().await
}
