//! The consistency check: what the Pushgateway holds for the other groups, read and compared
//! with the rendered metrics (see [`consistency`](super::consistency)).

use std::error::Error as StdError;

use bytes::Bytes;
use http::Request;
use http::header::AUTHORIZATION;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::render::RenderSlot;
use super::{
    HttpClient, MAX_CHECK_ANSWER, Pushgateway, RENDER_THREAD, TransportError, consistency,
};
use crate::telemetry::stages::{OffThread, run_until};

impl Pushgateway {
    /// Compares the metrics with what the Pushgateway holds for the other groups and logs a
    /// warning for each that it would refuse; returns how many. Bounded by `deadline`. A check
    /// that cannot be made (the Pushgateway unreachable, an answer that is not its API's, as
    /// from a gateway older than 1.2) is logged at debug level and changes nothing.
    pub(super) async fn check(&self, client: &HttpClient, deadline: Instant) -> usize {
        let inner = &*self.inner;
        let mut request = Request::builder()
            .method(http::Method::GET)
            .uri(inner.api_uri.clone());
        if let Some(auth) = &inner.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .expect("the URI and headers were validated at build time");
        let exchange = async {
            let response = client.request(request).await.map_err(|e| {
                let e = TransportError::new(e);
                let mut cause: &(dyn StdError + 'static) = &e;
                while let Some(c) = cause.source() {
                    cause = c;
                }
                format!("{e}: {cause}")
            })?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("the Pushgateway answered {status}"));
            }
            let too_large = || format!("the answer is larger than {} MiB", MAX_CHECK_ANSWER >> 20);
            let announced = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if announced.is_some_and(|n| n > MAX_CHECK_ANSWER as u64) {
                return Err(too_large());
            }
            // Read frame by frame, so that a larger answer is not taken whole into memory; the
            // rest is not read (dropping the body closes the connection).
            let mut incoming = response.into_body();
            let mut held = Vec::new();
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| format!("reading the answer failed: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    if held.len() + data.len() > MAX_CHECK_ANSWER {
                        return Err(too_large());
                    }
                    held.extend_from_slice(&data);
                }
            }
            Ok(held)
        };
        let held = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(held)) => held,
            Ok(Err(reason)) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, %reason, "no consistency check");
                return 0;
            }
            Err(_) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, "no consistency check: no answer in time");
                return 0;
            }
        };
        // Rendering and comparing take a while for a large registry: off the runtime too.
        let Some(slot) = RenderSlot::take(&inner.check_rendering) else {
            tracing::debug!(target: "finale", "no consistency check: the previous check's render has not returned");
            return 0;
        };
        let render = inner.render.clone();
        let group = inner.group.clone();
        let compare = move || {
            let _slot = slot;
            consistency::clashes(&render(), &group, &held)
        };
        let clashes = match run_until(RENDER_THREAD, deadline, compare).await {
            Ok(OffThread::Done(Ok(clashes))) => clashes,
            Ok(OffThread::Done(Err(reason))) => {
                tracing::debug!(target: "finale", url = %inner.api_uri, %reason, "no consistency check: not the Pushgateway's API");
                return 0;
            }
            Ok(OffThread::Panicked(reason)) => {
                tracing::debug!(target: "finale", %reason, "no consistency check: the render panicked");
                return 0;
            }
            Ok(OffThread::TimedOut) | Err(_) => {
                tracing::debug!(target: "finale", "no consistency check: not rendered in time");
                return 0;
            }
        };
        if clashes.is_empty() {
            tracing::debug!(target: "finale", url = %inner.url, "consistency check: nothing the Pushgateway would refuse");
        }
        for clash in &clashes {
            tracing::warn!(
                target: "finale",
                url = %inner.url,
                metric = %clash.metric,
                group = %clash.group,
                "{clash}"
            );
        }
        clashes.len()
    }
}
