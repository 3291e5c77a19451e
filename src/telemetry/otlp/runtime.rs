//! A runtime of finale's own for gRPC exporters: a tonic channel's tasks live on the runtime it
//! was built in, and an export makes progress only while that runtime's threads poll them.
//! Built on the user's runtime, a gRPC exporter delivers nothing once that runtime is wedged
//! (every thread blocked), which is exactly when the supervisor flushes from its own threads.
//! Built with [`with_exporter_runtime`], its tasks run on a thread of finale's, which nothing of
//! the user's blocks.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The name of the exporter runtime's thread.
const THREAD: &str = "finale-exporters";

/// Set by the first call of [`with_exporter_runtime`], before its closure runs.
static USED: AtomicBool = AtomicBool::new(false);

/// Whether [`with_exporter_runtime`] has run a closure in this process: the exporters are built
/// the way the docs show, as far as finale can see (it cannot tell which exporters a closure
/// built, nor see the exporter inside a provider).
pub(super) fn used() -> bool {
    USED.load(Ordering::Acquire)
}

/// Runs `build` (the building of OTLP exporters) with a tokio runtime of finale's own entered,
/// and returns what it returns.
///
/// A gRPC (tonic) exporter built inside spawns its channel's tasks on that runtime: its exports
/// keep going when every thread of your runtime is blocked, so the supervisor's takeover (see
/// [`Finale::run`](crate::Finale::run)) can deliver the final spans, log records and metrics.
/// HTTP exporters with a blocking client need no runtime; building them inside is harmless.
///
/// Calling it also tells finale that the exporters are built the way that delivers from a
/// takeover: [`Otlp::register`](super::Otlp::register) then warns about none of them. finale
/// knows this per process, not per exporter (it cannot see which exporters the closure built),
/// so build every gRPC exporter inside.
///
/// The runtime is a `current_thread` runtime on one thread, `finale-exporters`, started by the
/// first call (only then: nothing starts unless you call this) and kept for the life of the
/// process; every call uses the same one. It runs only the exporters' I/O tasks.
///
/// # Panics
///
/// If the thread or its runtime cannot be started (the process is out of threads or file
/// descriptors) on the first call.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handle = finale::otlp::with_exporter_runtime(|| {
///     // SpanExporter::builder().with_tonic().with_endpoint(…).build(), and the others.
///     tokio::runtime::Handle::current()
/// });
/// assert_ne!(handle.id(), tokio::runtime::Handle::current().id());
/// # }
/// ```
pub fn with_exporter_runtime<T>(build: impl FnOnce() -> T) -> T {
    let _entered = handle().enter();
    USED.store(true, Ordering::Release);
    build()
}

fn handle() -> &'static tokio::runtime::Handle {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("finale's exporter runtime");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name(THREAD.to_owned())
            // Blocks its own thread for the life of the process: the runtime polls the
            // exporters' tasks there, and is never dropped (no drop waits on a blocked task).
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("finale's exporter runtime thread");
        handle
    })
}
