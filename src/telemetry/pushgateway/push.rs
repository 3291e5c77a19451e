//! The push lifecycle: the final push (with its retries, and the DELETE of
//! [`Method::Delete`](super::Method::Delete)), the supervisor's push from its own thread, and the
//! periodic pushes.

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::render::Body;
use super::transport::new_client;
use super::{
    HttpClient, MAX_BACKOFF, MAX_ERROR_BODY, Method, PUSH_JITTER, PushError, Pushgateway,
    TEXT_FORMAT, TransportError,
};
use crate::hook::HookContext;
use crate::slot::{Share, stage_deadline};
use crate::task::TaskContext;
use crate::telemetry::stages::{OffThread, run_until};

impl Pushgateway {
    pub(super) async fn final_push(&self, ctx: &HookContext) -> Result<(), PushError> {
        let deadline = stage_deadline(ctx, Share::METRICS);
        let inner = &*self.inner;
        // Ordering: the flag is set before we queue for the lane, and a periodic push checks it
        // after taking the lane, so none can start once we hold it.
        inner.finished.store(true, Ordering::Release);
        if inner.held.take().is_none() {
            // The supervisor took the push over: its result, not a second push.
            return self.supervisor_result(deadline).await;
        }
        let result = self.final_push_held(deadline).await;
        // A hook dropped before this line (cancelled) leaves the supervisor waiting until its
        // own deadline, then saying so.
        inner
            .held
            .done(result.as_ref().map(|_| ()).map_err(ToString::to_string));
        result
    }

    /// Waits, on a plain thread and until `deadline`, for the supervisor's push.
    async fn supervisor_result(&self, deadline: Instant) -> Result<(), PushError> {
        let inner = &*self.inner;
        let held = inner.held.clone();
        let until = deadline.into_std();
        let waited = run_until("finale-pushgateway-wait", deadline, move || {
            held.wait(until)
        })
        .await;
        let error = match waited {
            Ok(OffThread::Done(Ok(()))) => return Ok(()),
            Ok(OffThread::Done(Err(error))) => error,
            Ok(OffThread::Panicked(panic)) => panic,
            Ok(OffThread::TimedOut) => "still running at the deadline".to_owned(),
            Err(error) => format!("no thread to wait on: {error}"),
        };
        let error = PushError::BySupervisor {
            method: inner.method,
            url: inner.url.clone(),
            error,
        };
        tracing::error!(target: "finale", %error, "final metrics push failed");
        Err(error)
    }

    /// The final push, once this side holds it.
    async fn final_push_held(&self, deadline: Instant) -> Result<(), PushError> {
        let inner = &*self.inner;
        let method = inner.method;
        let start = Instant::now();
        let lane = match tokio::time::timeout_at(deadline, inner.lane.lock()).await {
            Ok(lane) => lane,
            Err(_) => {
                let error = PushError::TimedOut {
                    method,
                    url: inner.url.clone(),
                    attempts: 0,
                    waited: start.elapsed(),
                };
                tracing::error!(target: "finale", %error, "final metrics push failed");
                return Err(error);
            }
        };
        if method == Method::None {
            return Ok(());
        }
        let result = self.send_final(&inner.client, deadline).await;
        drop(lane);
        match &result {
            Ok(()) => tracing::info!(
                target: "finale",
                url = %inner.url,
                method = %method,
                elapsed = ?start.elapsed(),
                "final metrics pushed to the Pushgateway"
            ),
            Err(error) => tracing::error!(target: "finale", %error, "final metrics push failed"),
        }
        result
    }

    /// The final push from a plain thread, when the user's runtime is wedged. Its own client:
    /// a pooled connection's task lives on the wedged runtime and would never run.
    /// Runs only if the Telemetry hook has not taken the push; otherwise waits for the hook's
    /// result (the hook's push is then the one).
    pub(super) fn emergency_push(&self, deadline: std::time::Instant) -> Result<(), String> {
        let inner = &*self.inner;
        inner.held.run_or_wait(deadline, |()| {
            if inner.method == Method::None {
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let client = new_client(inner.connector.clone());
                let deadline = Instant::from_std(deadline);
                self.send_final(&client, deadline)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
    }

    pub(super) async fn periodic(self, ctx: TaskContext, interval: Duration) {
        let inner = &*self.inner;
        let method = match inner.method {
            Method::Post => Method::Post,
            _ => Method::Put,
        };
        let mut pushes = 0u64;
        let mut next = Instant::now() + jittered(interval, inner.jitter.hash_one(pushes));
        loop {
            tokio::select! {
                // Stopping wins over a push that is due at the same time.
                biased;
                () = ctx.stopped() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            pushes += 1;
            let wait = jittered(interval, inner.jitter.hash_one(pushes));
            // After a late answer, a full wait from now rather than a burst to catch up.
            next = (next + wait).max(Instant::now() + wait);
            let lane = inner.lane.lock().await;
            if inner.finished.load(Ordering::Acquire) {
                return;
            }
            // A push in flight is not cancelled by the stop signal: the final push waits for its
            // answer, so it cannot land after the final one.
            let deadline = Instant::now() + inner.request_timeout;
            let result = match self.render(method, deadline).await {
                Ok(body) => self.send_once(&inner.client, method, body, deadline).await,
                Err(error) => Err(error),
            };
            drop(lane);
            inner.samples.record(result.is_ok());
            // Checked on the first of a run of refusals, not on every tick that repeats it.
            let refused = matches!(&result, Err(e) if e.is_inconsistent());
            let refused_before = inner.refused.swap(refused, Ordering::Relaxed);
            match result {
                Ok(()) => tracing::debug!(target: "finale", url = %inner.url, "periodic push"),
                Err(error) => tracing::warn!(target: "finale", %error, "periodic push failed"),
            }
            if refused && !refused_before && inner.check {
                let deadline = Instant::now() + inner.request_timeout;
                tokio::select! {
                    biased;
                    () = ctx.stopped() => return,
                    _ = self.check(&inner.client, deadline) => {}
                }
            }
        }
    }

    /// The final push with the configured method (not [`Method::None`]), by `deadline`.
    pub(super) async fn send_final(
        &self,
        client: &HttpClient,
        deadline: Instant,
    ) -> Result<(), PushError> {
        let inner = &*self.inner;
        if inner.method != Method::Delete {
            return self.send_with_retries(client, inner.method, deadline).await;
        }
        // The final snapshot first, finale's shutdown metrics included, so that a scrape can
        // read it; the group is deleted after the delay. One request timeout (at most half of
        // what is left) is kept for the DELETE from the start: the PUT's retries against a slow
        // Pushgateway must not use it, or the group would outlive the service.
        let left = deadline.saturating_duration_since(Instant::now());
        let latest = deadline - inner.request_timeout.min(left / 2);
        let put = self.send_with_retries(client, Method::Put, latest).await;
        match &put {
            Ok(()) => {
                let asked = Instant::now() + inner.delete_delay;
                if latest < asked {
                    tracing::warn!(
                        target: "finale",
                        delete_delay = ?inner.delete_delay,
                        kept = ?latest.saturating_duration_since(Instant::now()),
                        "the Telemetry slot is too short to keep the final metrics for the \
                         delete delay before deleting the group"
                    );
                }
                tokio::time::sleep_until(asked.min(latest)).await;
            }
            Err(error) => tracing::warn!(
                target: "finale",
                %error,
                "the final metrics were not pushed; deleting the group all the same"
            ),
        }
        self.send_with_retries(client, Method::Delete, deadline)
            .await?;
        put
    }

    pub(super) async fn send_with_retries(
        &self,
        client: &HttpClient,
        method: Method,
        deadline: Instant,
    ) -> Result<(), PushError> {
        let inner = &*self.inner;
        let mut backoff = inner.backoff;
        let mut attempt = 0;
        let counted = method != Method::Delete;
        // Rendered once for all attempts: a retry sends what the first attempt did.
        let body = if counted {
            match self.render(method, deadline).await {
                Ok(body) => body,
                Err(error) => {
                    inner.samples.record(false);
                    return Err(error);
                }
            }
        } else {
            Body::default()
        };
        loop {
            attempt += 1;
            let mut error = match self.send_once(client, method, body.clone(), deadline).await {
                Ok(()) => {
                    if counted {
                        inner.samples.record(true);
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            error.set_attempts(attempt);
            let retry_at = Instant::now() + backoff;
            if attempt >= inner.attempts || !error.is_transient() || retry_at >= deadline {
                if counted {
                    inner.samples.record(false);
                }
                // Say which metric clashed, with whom; bounded like one more request.
                if error.is_inconsistent() && inner.check {
                    let until = (Instant::now() + inner.request_timeout).min(deadline);
                    self.check(client, until).await;
                }
                return Err(error);
            }
            tracing::debug!(target: "finale", %error, ?backoff, "retrying the push");
            tokio::time::sleep_until(retry_at).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One request with `body`, bounded by the request timeout and `deadline`.
    pub(super) async fn send_once(
        &self,
        client: &HttpClient,
        method: Method,
        body: Body,
        deadline: Instant,
    ) -> Result<(), PushError> {
        let inner = &*self.inner;
        let start = Instant::now();
        let until = (start + inner.request_timeout).min(deadline);
        let mut request = Request::builder()
            .method(method.http())
            .uri(inner.uri.clone())
            .header(CONTENT_TYPE, TEXT_FORMAT);
        if body.gzip {
            request = request.header(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if let Some(auth) = &inner.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(body.bytes))
            .expect("method, URI and headers were validated at build time");
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            // The body of an error answer says why; read its start only. The rest is not read:
            // dropping the body closes the connection.
            let mut body = Vec::new();
            if !status.is_success() {
                let mut incoming = response.into_body();
                while body.len() <= MAX_ERROR_BODY {
                    match incoming.frame().await {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                body.extend_from_slice(&data);
                            }
                        }
                        Some(Err(_)) | None => break,
                    }
                }
            }
            Ok::<_, hyper_util::client::legacy::Error>((status, body))
        };
        match tokio::time::timeout_at(until, exchange).await {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, body))) => {
                let text = String::from_utf8_lossy(&body);
                let mut text = text.trim().to_owned();
                if text.len() > MAX_ERROR_BODY {
                    let mut cut = MAX_ERROR_BODY;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    text.push('…');
                }
                Err(PushError::Rejected {
                    method,
                    url: inner.url.clone(),
                    status,
                    body: text,
                    attempts: 1,
                })
            }
            Ok(Err(source)) => Err(PushError::Unreachable {
                method,
                url: inner.url.clone(),
                attempts: 1,
                source: TransportError::new(source),
            }),
            Err(_) => Err(PushError::TimedOut {
                method,
                url: inner.url.clone(),
                attempts: 1,
                waited: start.elapsed(),
            }),
        }
    }
}

/// `interval`, shortened by up to [`PUSH_JITTER`] of it, by how much `random` says.
fn jittered(interval: Duration, random: u64) -> Duration {
    // The top 53 bits as a fraction in [0, 1): exact in an f64.
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(1.0 - PUSH_JITTER * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_last_fifth_of_the_interval() {
        let interval = Duration::from_secs(10);
        assert_eq!(jittered(interval, 0), interval);
        let earliest = jittered(interval, u64::MAX);
        assert!(
            earliest >= Duration::from_secs(8) && earliest < Duration::from_millis(8001),
            "{earliest:?}"
        );
        let keys = std::collections::hash_map::RandomState::new();
        let waits: Vec<_> = (0..1000u64)
            .map(|n| jittered(interval, keys.hash_one(n)))
            .collect();
        assert!(
            waits
                .iter()
                .all(|w| *w > Duration::from_secs(8) && *w <= interval)
        );
        let mean = waits.iter().sum::<Duration>() / 1000;
        assert!(
            mean > Duration::from_millis(8900) && mean < Duration::from_millis(9100),
            "{mean:?}"
        );
    }

    /// The supervisor's push and the sequence's final push never both run: once the
    /// supervisor took the push (a wedged runtime that unblocks after the takeover), the
    /// sequence's hook waits for its result instead of pushing again. A stand-in Pushgateway
    /// (a real one cannot hold an answer on demand) holds the supervisor's PUT until the
    /// sequence's hook is waiting, then answers; it must have seen one request.
    #[tokio::test(flavor = "current_thread")]
    async fn the_supervisor_and_the_sequence_push_once_between_them() {
        use std::io::{Read, Write};
        use std::sync::{Arc, Mutex, mpsc};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let (release, released) = mpsc::channel::<()>();
        let (arrived, first) = mpsc::channel::<()>();
        let log = seen.clone();
        std::thread::spawn(move || {
            let released = Mutex::new(released);
            for stream in listener.incoming().take(8) {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                let end = loop {
                    if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end;
                    }
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                let method = head.split_whitespace().next().unwrap_or("").to_owned();
                let first_one = {
                    let mut log = log.lock().unwrap();
                    log.push(method);
                    log.len() == 1
                };
                if first_one {
                    let _ = arrived.send(());
                    let _ = released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(10));
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let gateway = Pushgateway::builder(format!("http://127.0.0.1:{port}"), "j")
            .check(false)
            .build(handle)
            .unwrap();
        let finale = crate::Finale::builder()
            .no_signals()
            .read_env(false)
            .total_budget(Duration::from_secs(8))
            .telemetry_reserve(Duration::from_secs(6))
            .build()
            .unwrap();
        gateway.register(&finale).unwrap();
        // The supervisor's side, as a takeover runs it: on a plain thread.
        let stages = finale.shared.take_emergency();
        let supervisor = std::thread::spawn(move || {
            crate::run::supervisor::deliver(
                stages,
                std::time::Instant::now() + Duration::from_secs(5),
            )
        });
        first
            .recv_timeout(Duration::from_secs(5))
            .expect("the supervisor's PUT arrived");
        finale.handle().trigger("test");
        // The sequence's hook runs while the supervisor's PUT waits for its answer, whatever
        // the order from here: the hook starts after the supervisor took the push.
        let run = tokio::spawn(finale.run());
        let _ = release.send(());
        let report = run.await.unwrap();
        let outcomes = tokio::task::spawn_blocking(move || supervisor.join().unwrap())
            .await
            .unwrap();
        assert!(outcomes.iter().all(|(_, r)| r.is_ok()), "{outcomes:?}");
        assert_eq!(*seen.lock().unwrap(), ["PUT"], "{report}");
    }
}
