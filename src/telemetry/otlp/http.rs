//! What an OTLP/HTTP collector's answer says it rejected: a counting HTTP client that reads
//! each answer's `partial_success` for [`Counted`](super::Counted).
//!
//! opentelemetry-otlp 0.33 reads an answer's `partial_success` only to log it, and returns
//! `Ok`: an export that the collector answered `200` with every item rejected looks delivered.
//! [`CountingClient`] wraps the HTTP client the exporter sends with and reads the answer
//! itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

use super::Counter;

/// An [`HttpClient`] for opentelemetry-otlp's OTLP/HTTP exporters that counts the items a
/// collector rejected in a partial success (`200` with `partial_success.rejected_spans`,
/// `rejected_log_records` or `rejected_data_points`) as failed, in its [`Counter`]. Made by
/// [`Counter::http_client`]; give it to the exporter with `with_http_client`.
///
/// Both encodings are read: protobuf (`http/protobuf`) and JSON (`http/json`, with the
/// lowerCamelCase or the original snake_case field names). The answer's `Content-Type` picks
/// the decoder (its media type, case-insensitively, parameters ignored); an answer that names
/// neither, or none, is decoded the way the request was encoded. An answer that does not parse
/// rejects nothing. The collector's `error_message` is logged
/// (target `finale`, warning).
///
/// OTLP/gRPC exporters cannot be counted this way: opentelemetry-otlp 0.33 takes a tonic
/// `Channel`, not a client finale could wrap, and its interceptors see requests only. Their
/// partial successes count as exported.
///
/// Wire it up before the exporter is built: make the [`Counter`] first, pass
/// `counter.http_client(client)` to the exporter builder's `with_http_client`, and wrap the
/// exporter with [`Counted::with_counter`](super::Counted::with_counter)`(exporter, counter)`.
pub struct CountingClient<C> {
    inner: C,
    counter: Counter,
}

impl<C: fmt::Debug> fmt::Debug for CountingClient<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingClient")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Counter {
    /// Wraps `client` so that the items a collector rejects in a partial success count as
    /// failed in this counter. See [`CountingClient`].
    ///
    /// An exporter sending through it needs no runtime of yours (the SDK exports from its own
    /// threads; the client must be a blocking one, see the [module docs](super)), so it
    /// delivers from a takeover too: [`Otlp::register`](super::Otlp::register) does not warn
    /// about the stage this counter is handed to. It goes by this call, not by the exporter:
    /// finale cannot see which client an exporter was built with, so a client made here and
    /// then not given to the exporter (a gRPC exporter picked at run time) silences the
    /// warning too. Make it only for the OTLP/HTTP exporter that sends through it.
    pub fn http_client<C: HttpClient>(&self, client: C) -> CountingClient<C> {
        self.inner.counting_client.store(true, Ordering::Release);
        CountingClient {
            inner: client,
            counter: self.clone(),
        }
    }
}

impl<C: HttpClient> HttpClient for CountingClient<C> {
    fn send_bytes<'s, 'f>(
        &'s self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'f>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let sent = content_type(request.headers()).map(str::to_owned);
            let response = self.inner.send_bytes(request).await?;
            if response.status().is_success() {
                let rejected = rejected(
                    content_type(response.headers()),
                    sent.as_deref(),
                    response.body(),
                );
                if let Some((rejected, message)) = rejected.filter(|(n, _)| *n > 0) {
                    // Before the exporter returns and `Counted` counts the batch: it counts
                    // these (at most the batch) as failed, the rest as exported.
                    self.counter
                        .inner
                        .rejected_answer
                        .fetch_add(rejected, Ordering::AcqRel);
                    tracing::warn!(
                        target: "finale",
                        rejected,
                        message,
                        "the OTLP collector rejected part of an export"
                    );
                }
            }
            Ok(response)
        })
    }
}

/// A message's `Content-Type`, if it is text.
fn content_type(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// The encodings an OTLP/HTTP message may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Json,
    Protobuf,
}

/// The encoding a `Content-Type` names: its media type, without parameters, compared
/// case-insensitively; `None` for any other.
fn encoding(content_type: Option<&str>) -> Option<Encoding> {
    let media = content_type?.split(';').next()?.trim();
    if media.eq_ignore_ascii_case("application/json") {
        Some(Encoding::Json)
    } else if media.eq_ignore_ascii_case("application/x-protobuf") {
        Some(Encoding::Protobuf)
    } else {
        None
    }
}

/// What an answer with `Content-Type` `answer` and `body` rejected, for a request sent with
/// `Content-Type` `sent`: decoded as the answer says, or, when it names neither encoding (or
/// nothing), as the request was encoded (the exporter's configured protocol), else protobuf.
fn rejected(answer: Option<&str>, sent: Option<&str>, body: &[u8]) -> Option<(u64, String)> {
    match encoding(answer).or_else(|| encoding(sent)) {
        Some(Encoding::Json) => rejected_json(body),
        Some(Encoding::Protobuf) | None => rejected_protobuf(body),
    }
}

/// `partial_success` (field 1) of an `Export*ServiceResponse`: its `rejected_*` count (field 1,
/// int64) and `error_message` (field 2). `None` if the bytes are not such a message.
fn rejected_protobuf(body: &[u8]) -> Option<(u64, String)> {
    let mut fields = Fields(body);
    let mut found = None;
    while let Some((number, value)) = fields.next()? {
        if let (1, Value::Bytes(inner)) = (number, value) {
            let (mut rejected, mut message) = (0, String::new());
            let mut inner = Fields(inner);
            while let Some((number, value)) = inner.next()? {
                match (number, value) {
                    (1, Value::Varint(n)) => rejected = n,
                    (2, Value::Bytes(text)) => message = String::from_utf8_lossy(text).into(),
                    _ => {}
                }
            }
            found = Some((rejected, message));
        }
    }
    found
}

/// The same from the JSON encoding: `{"partialSuccess": {"rejectedSpans": "10", …}}`, or with
/// the original field names (`partial_success`, `rejected_spans`, `error_message`), which
/// proto3 JSON parsers accept too (an int64 may be a string or a number).
fn rejected_json(body: &[u8]) -> Option<(u64, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = |value: &'_ serde_json::Value, camel: &str, snake: &str| {
        value.get(camel).or_else(|| value.get(snake)).cloned()
    };
    let partial = field(&value, "partialSuccess", "partial_success")?;
    let rejected = [
        ("rejectedSpans", "rejected_spans"),
        ("rejectedLogRecords", "rejected_log_records"),
        ("rejectedDataPoints", "rejected_data_points"),
    ]
    .iter()
    .find_map(|(camel, snake)| match field(&partial, camel, snake)? {
        serde_json::Value::String(s) => s.parse().ok(),
        n => n.as_u64(),
    })
    .unwrap_or(0);
    let message = field(&partial, "errorMessage", "error_message")
        .and_then(|m| m.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some((rejected, message))
}

/// A protobuf field's value, as far as these messages need.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// The fields of a protobuf message, in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The next field: `Some(None)` at the end, `None` if the bytes are malformed.
    fn next(&mut self) -> Option<Option<(u64, Value<'a>)>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.0 = self.0.get(8..)?;
                Value::Other
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let (bytes, rest) = (self.0.get(..len)?, self.0.get(len..)?);
                self.0 = rest;
                Value::Bytes(bytes)
            }
            5 => {
                self.0 = self.0.get(4..)?;
                Value::Other
            }
            _ => return None,
        };
        Some(Some((key >> 3, value)))
    }

    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for (i, byte) in self.0.iter().enumerate().take(10) {
            n |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(n);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_success_is_read_in_both_encodings() {
        // partial_success { rejected_spans: 10, error_message: "bad" }
        let body = [0x0a, 0x07, 0x08, 0x0a, 0x12, 0x03, b'b', b'a', b'd'];
        assert_eq!(rejected_protobuf(&body), Some((10, "bad".to_owned())));
        assert_eq!(rejected_protobuf(&[]), None);
        assert_eq!(rejected_protobuf(&[0x0a, 0x05, 0x08]), None);
        let json = br#"{"partialSuccess":{"rejectedLogRecords":"7","errorMessage":"x"}}"#;
        assert_eq!(rejected_json(json), Some((7, "x".to_owned())));
        assert_eq!(
            rejected_json(br#"{"partialSuccess":{"rejectedSpans":3}}"#)
                .unwrap()
                .0,
            3
        );
        assert_eq!(rejected_json(b"{}"), None);
    }

    /// A media type is case-insensitive and may carry parameters; proto3 JSON parsers accept the
    /// original (snake_case) field names too; an answer without a `Content-Type` is decoded the
    /// way the request was encoded.
    #[test]
    fn a_json_partial_success_is_read_whatever_its_spelling() {
        let camel = br#"{"partialSuccess":{"rejectedSpans":"10"}}"#;
        let snake = br#"{"partial_success":{"rejected_spans":"10","error_message":"no"}}"#;
        let json = Some("application/json");
        for (answer, body) in [
            (Some("Application/JSON"), &camel[..]),
            (Some("application/json; charset=utf-8"), &camel[..]),
            (Some(" APPLICATION/JSON ;charset=UTF-8"), &camel[..]),
            (Some("application/json"), &snake[..]),
            (None, &camel[..]),
            (Some("text/plain"), &snake[..]),
        ] {
            assert_eq!(
                rejected(answer, json, body).map(|r| r.0),
                Some(10),
                "{answer:?} {}",
                String::from_utf8_lossy(body)
            );
        }
        let snake_logs = br#"{"partial_success":{"rejected_log_records":4}}"#;
        assert_eq!(rejected_json(snake_logs).map(|r| r.0), Some(4));
        // A protobuf request answered without a Content-Type: protobuf.
        let body = [0x0a, 0x02, 0x08, 0x05];
        assert_eq!(
            rejected(None, Some("application/x-protobuf"), &body).map(|r| r.0),
            Some(5)
        );
    }

    /// A collector that claims more rejections than the batch held lowers no other batch's
    /// count: the rejections are clamped per export.
    #[test]
    fn rejections_are_clamped_to_their_batch() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};
        use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;

        /// Answers `200` with a partial success rejecting 25 items the first time, then `200`
        /// with an empty body.
        #[derive(Debug, Default)]
        struct Claims(AtomicUsize);
        impl HttpClient for Claims {
            fn send_bytes<'s, 'f>(
                &'s self,
                _: Request<Bytes>,
            ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'f>>
            where
                's: 'f,
                Self: 'f,
            {
                let body = if self.0.fetch_add(1, Ordering::Relaxed) == 0 {
                    vec![0x0a, 0x02, 0x08, 25]
                } else {
                    Vec::new()
                };
                Box::pin(std::future::ready(Ok(Response::builder()
                    .status(200)
                    .header("content-type", "application/x-protobuf")
                    .body(Bytes::from(body))
                    .unwrap())))
            }
        }
        #[derive(Debug)]
        struct Through(Arc<CountingClient<Claims>>);
        impl SpanExporter for Through {
            fn export(
                &self,
                _: Vec<SpanData>,
            ) -> impl Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
                let client = self.0.clone();
                async move {
                    let _ = client.send_bytes(Request::new(Bytes::new())).await;
                    Ok(())
                }
            }
        }
        let counter = Counter::default();
        let client = Arc::new(counter.http_client(Claims::default()));
        let tracer = SdkTracerProvider::builder()
            .with_simple_exporter(super::super::Counted::with_counter(
                Through(client),
                counter.clone(),
            ))
            .build();
        let t = tracer.tracer("test");
        // One span per export: the first export's answer claims 25 rejected.
        t.in_span("first", |_| {});
        t.in_span("second", |_| {});
        assert_eq!((counter.exported(), counter.failed()), (1, 1));
    }
}
