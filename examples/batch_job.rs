//! The classic Pushgateway batch job: do the work, then push the final metrics at exit, also when
//! the work fails or the job is stopped by a signal.
//!
//! ```sh
//! PUSHGATEWAY_URL=http://127.0.0.1:9091 cargo run --example batch_job --features pushgateway
//! PUSHGATEWAY_URL=http://127.0.0.1:9091 BATCH_FAIL_AT=40 cargo run --example batch_job --features pushgateway
//! ```
//!
//! The job processes `BATCH_ITEMS` items (default 100). It records
//! `batch_items_processed_total`, `batch_duration_seconds`, and, only when every item was
//! processed, `batch_last_success_timestamp_seconds`: the metric to alert on ("no success for a
//! day"). finale's own shutdown metrics (`finale_*`) are pushed with them.
//!
//! The push is a POST: it replaces the metrics this run pushed and keeps the others in the group.
//! A failed run does not push `batch_last_success_timestamp_seconds`, so the one the last good
//! run pushed stays in place for the alert; a PUT would replace the whole group and erase it.
//!
//! Environment variables:
//! - `PUSHGATEWAY_URL`: the Pushgateway. Without it the job still runs and exits with its own
//!   status, and logs that nothing is pushed: an unset address is a choice, not a delivery
//!   failure. With it, a push that fails makes the exit code 6 (if the job itself succeeded).
//! - `PUSHGATEWAY_JOB`: the job name (default `batch_job`). No `instance` label: a batch job's
//!   metrics describe the job, not the machine that happened to run it.
//! - `BATCH_ITEMS`, `BATCH_FAIL_AT` (the item that fails; default none), `BATCH_ITEM_MS` (work
//!   per item, default 5).
//! - `FINALE_*`: any budget setting.
//!
//! Exit codes: `0` done and pushed, `4` the job failed (its metrics were still pushed), `6` done
//! but the push failed, and finale's other codes (see `finale::ExitCodes`).

// Examples print the report; the library itself never prints.
#![allow(clippy::print_stderr)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use finale::pushgateway::{Method, Pushgateway};
use finale::{Finale, Task};
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Why the job failed.
#[derive(Debug)]
struct ItemFailed(u64);

impl std::fmt::Display for ItemFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "item {} could not be processed", self.0)
    }
}

impl std::error::Error for ItemFailed {}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .expect("no other global metrics recorder");
    let finale = Finale::builder().build().unwrap_or_else(|e| {
        eprintln!("configuration error: {e}");
        std::process::exit(2)
    });

    match env("PUSHGATEWAY_URL") {
        Some(url) => {
            let job = env("PUSHGATEWAY_JOB").unwrap_or_else(|| "batch_job".to_owned());
            Pushgateway::builder(url, job)
                // Keep the last success of an earlier run when this one fails.
                .method(Method::Post)
                .build(metrics)
                .unwrap_or_else(|e| {
                    eprintln!("{e}");
                    std::process::exit(2)
                })
                .register(&finale)
                .expect("a unique name");
        }
        None => tracing::warn!("PUSHGATEWAY_URL is not set: the final metrics are not pushed"),
    }

    let number =
        |name: &str, default: u64| env(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let items = number("BATCH_ITEMS", 100);
    let fail_at = env("BATCH_FAIL_AT").and_then(|v| v.parse::<u64>().ok());
    let item_time = Duration::from_millis(number("BATCH_ITEM_MS", 5));

    // The work is a critical worker: when it fails, the shutdown starts (exit code 4) and the
    // metrics are still pushed; when it is done, it ends the run itself; a SIGTERM stops it
    // between two items.
    finale
        .spawn(
            Task::worker("batch", move |ctx| async move {
                let start = std::time::Instant::now();
                let processed = metrics::counter!("batch_items_processed_total");
                let mut result = Ok(());
                for item in 1..=items {
                    if ctx.is_stopping() {
                        tracing::warn!(item, "stopped before the end");
                        break;
                    }
                    tokio::time::sleep(item_time).await;
                    if fail_at == Some(item) {
                        result = Err(ItemFailed(item));
                        break;
                    }
                    processed.increment(1);
                    if item == items {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default();
                        metrics::gauge!("batch_last_success_timestamp_seconds")
                            .set(now.as_secs_f64());
                    }
                }
                metrics::gauge!("batch_duration_seconds").set(start.elapsed().as_secs_f64());
                if result.is_ok() {
                    tracing::info!(items, "batch done");
                    ctx.handle().trigger("batch done");
                }
                result
            })
            .critical(true),
        )
        .expect("a unique name");

    let report = finale.run().await;
    eprintln!("{report}");
    report.exit()
}
