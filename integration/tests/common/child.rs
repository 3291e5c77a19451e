//! The start of a test's child process: finale's log on stderr (for the parent to read), and
//! a `current_thread` runtime (one thread, which a blocking hook wedges whole).

#![allow(dead_code)]

/// Logs to stderr, without colours (at `filter`, or tracing's default), and builds a
/// `current_thread` runtime with every driver, its clock paused if `paused`.
pub(crate) fn logged_runtime(filter: Option<&str>, paused: bool) -> tokio::runtime::Runtime {
    let logs = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr);
    match filter {
        Some(filter) => logs
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init(),
        None => logs.init(),
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .unwrap()
}
