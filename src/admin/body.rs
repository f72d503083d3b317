//! Reading admin request bodies under a deadline, so an authenticated caller cannot hold a
//! connection (and a blocking parser thread) by sending nothing, or a byte now and then.
//!
//! The rule is a minimum rate, like Apache's `mod_reqtimeout` `body=…,MinRate=…`: a body may
//! spend [`BODY_GRACE`] waiting for data, plus one second for every [`BODY_MIN_RATE`] bytes it
//! has delivered, and no single wait for the next bytes may last longer than [`BODY_IDLE`]. Only
//! time spent waiting for the client counts, not time the server spends parsing what arrived.
//! A 100 MB restore at 1 MB/s is well inside it; a client that declares a terabyte and sends
//! nothing, or one byte every five seconds, is answered 408 and disconnected after 10 s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::answer::{Answer, error};

/// Time a body may spend waiting for data before the rate rule gives it more.
pub(super) const BODY_GRACE: Duration = Duration::from_secs(10);
/// Bytes a body must deliver per second of waiting past [`BODY_GRACE`].
pub(super) const BODY_MIN_RATE: u64 = 1000;
/// Longest wait for the next bytes of a body.
pub(super) const BODY_IDLE: Duration = Duration::from_secs(10);

/// A request body read chunk by chunk under the minimum-rate deadline.
pub(super) struct Body {
    body: Incoming,
    waited: Duration,
    received: u64,
}

/// Why a body could not be read; [`BodyFault::answer`] is the reply.
#[derive(Debug)]
pub(super) enum BodyFault {
    /// Too slow: the deadline passed.
    TooSlow { received: u64, waited: Duration },
    /// Longer than the endpoint takes.
    TooLarge { limit: usize },
    /// The connection failed or the framing was broken.
    Broken(String),
}

impl BodyFault {
    pub(super) fn answer(&self) -> Answer {
        match self {
            BodyFault::TooSlow { received, waited } => {
                let mut resp = error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "body: too slow ({received} bytes in {} s): a body must keep arriving at \
                         {BODY_MIN_RATE} bytes/s after its first {} s, with no pause over {} s",
                        waited.as_secs(),
                        BODY_GRACE.as_secs(),
                        BODY_IDLE.as_secs()
                    ),
                );
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                resp
            }
            BodyFault::TooLarge { limit } => {
                let mut resp = error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body: over the {limit}-byte limit of one entry"),
                );
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                resp
            }
            BodyFault::Broken(e) => error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        }
    }
}

impl Body {
    pub(super) fn new(body: Incoming) -> Body {
        Body {
            body,
            waited: Duration::ZERO,
            received: 0,
        }
    }

    /// The next chunk of data, `None` at the end of the body.
    pub(super) async fn chunk(&mut self) -> Result<Option<Bytes>, BodyFault> {
        loop {
            let allowance =
                BODY_GRACE + Duration::from_millis(self.received * 1000 / BODY_MIN_RATE);
            let left = allowance.saturating_sub(self.waited).min(BODY_IDLE);
            let too_slow = |b: &Body| BodyFault::TooSlow {
                received: b.received,
                waited: b.waited,
            };
            if left.is_zero() {
                return Err(too_slow(self));
            }
            let started = Instant::now();
            let frame = tokio::time::timeout(left, self.body.frame()).await;
            self.waited += started.elapsed();
            match frame {
                Err(_) => return Err(too_slow(self)),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(BodyFault::Broken(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, refused with 413 past `limit` bytes (at once when `Content-Length`
    /// declares more).
    pub(super) async fn collect(
        mut self,
        content_length: Option<&HeaderValue>,
        limit: usize,
    ) -> Result<Bytes, BodyFault> {
        let declared = content_length
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(BodyFault::TooLarge { limit });
        }
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(BodyFault::TooLarge { limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

/// The declared `Content-Length` header of a request, for [`Body::collect`].
pub(super) fn content_length(headers: &http::HeaderMap) -> Option<&HeaderValue> {
    headers.get(CONTENT_LENGTH)
}
