//! A bounded, rate-limited HTTP load generator for the integration tests: a real hyper client
//! (keep-alive pool, HTTP/1.1) sending GET requests at a steady rate over loopback, and a
//! report of every outcome by kind.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct LoadReport {
    /// Requests sent.
    pub(crate) sent: u64,
    /// Responses by status code.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// Failures without a complete response, by kind.
    pub(crate) errors: BTreeMap<String, u64>,
}

impl LoadReport {
    pub(crate) fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub(crate) fn non_2xx(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub(crate) fn failures(&self) -> u64 {
        self.errors.values().sum()
    }

    fn record(&mut self, outcome: Result<u16, String>) {
        match outcome {
            Ok(status) => *self.statuses.entry(status).or_default() += 1,
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

fn kind(e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() {
        return "connect".to_owned();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "incomplete message (connection closed mid-response)".to_owned();
            }
            if h.is_canceled() {
                return "canceled".to_owned();
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return format!("io: {:?}", io.kind());
        }
        source = s.source();
    }
    format!("other: {e}")
}

/// Sends GET `url` at `rate` requests per second until `stop` resolves or `max` requests were
/// sent, whichever comes first; every request has `timeout`. Waits for every response.
pub(crate) async fn steady(
    url: &str,
    rate: u32,
    max: u64,
    timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> LoadReport {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    let uri: hyper::Uri = url.parse().expect("a valid URL");
    for _ in 0..max {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => break,
        }
        let (client, report, uri) = (client.clone(), report.clone(), uri.clone());
        report.lock().unwrap().sent += 1;
        tasks.spawn(async move {
            let outcome = match tokio::time::timeout(timeout, async {
                let response = client.get(uri).await.map_err(|e| kind(&e))?;
                let status = response.status().as_u16();
                // A response counts only with its whole body.
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?;
                Ok(status)
            })
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err("timeout".to_owned()),
            };
            report.lock().unwrap().record(outcome);
        });
    }
    while tasks.join_next().await.is_some() {}
    // Every task has finished: this is the last reference.
    Arc::into_inner(report)
        .expect("all requests finished")
        .into_inner()
        .unwrap()
}

/// [`steady`] on a thread of its own (with a runtime of its own) until the returned sender fires
/// or is dropped; the handle gives what the client saw.
pub(crate) fn steady_in_background(
    url: String,
    rate: u32,
    max: u64,
    timeout: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<LoadReport>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let load = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("a runtime for the load")
            .block_on(steady(&url, rate, max, timeout, async move {
                let _ = stop_rx.await;
            }))
    });
    (stop_tx, load)
}
